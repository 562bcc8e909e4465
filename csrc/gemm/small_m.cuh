// The small-M scaled matmul of decode: out[m, n] = a_scale[m] * b_scale[n] * sum_k a[m, k] b[n, k]
// (+ residual[m, n]), a and b both int8 or both float8_e4m3fn, b stored [N][K], on tensor cores
// through mma.sync. At a few tokens the product is bound by reading the weight once from HBM;
// this kernel streams it at that bound where cuBLASLt's 128-row tiles would be mostly empty.
//
// Swap-AB: the weight is mma's 16-row A operand (16 output channels a row tile), the tokens its
// 8-column B operand (8 tokens a column tile), so M = 1..8 fills one column tile instead of one
// row of a 128-row tile. A lane reads 16 contiguous bytes of a weight row (the 4 lanes of a quad
// cover 64 bytes) and hands them to mma as they are: the k order inside a step is permuted, the
// same way for the tokens' bytes, which leaves the sum's terms unchanged (int8: exactly; float8:
// a fixed order). So a weight byte goes from one 16-byte load to the tensor core with no shuffle.
//
//   int8:    mma.m16n8k32 s8 -> s32, exact.
//   float8:  each e4m3 value converted exactly to f16, mma.m16n8k16 f16 -> f32: the products are
//            exact and the sums float32 (Hopper's float8 mma keeps about 13 bits in its sums).
//
// A CTA is 8 warps over the same 16 weight rows, each warp over its eighth of K, with a tile of up
// to 64 tokens; at the end the CTA adds its warps' sums in warp order. Where the grid would still
// not fill the GPU (small N), K is also split over the CTAs of a cluster (up to 8), which add
// their sums through distributed shared memory in rank order, each CTA finishing a share of the
// outputs: one kernel, no workspace, the same bits every run.
//
// The weight stream is what bounds the kernel, so each thread keeps its share of it in flight
// without holding registers: cp.async copies its 16-byte pieces of the weight rows into its own
// slots of a ring of kDepth groups in shared memory, kDepth groups ahead of their use (no other
// thread reads them, so the ring needs no barrier). A lane loads its tokens' bytes straight into
// mma's layout a group ahead, so the loop has no barrier at all.
//
// Chained after the row kernel of a fused W8A8 op (programmatic dependent launch, cuda/pdl.cuh),
// the CTAs start while the rows are being quantized: each fills its ring with the first groups of
// its weight rows, then waits for the rows, so that the weight stream overlaps the row kernel.
#pragma once

#include <cooperative_groups.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "contract/matmul.h"
#include "contract/scalar.h"
#include "cuda/pdl.cuh"

namespace baracuda::small_m {

constexpr int kWarps = 8;
constexpr int kThreads = 32 * kWarps;
constexpr int kStepK = 64;          // k per step: a quad's 4 lanes x 16 bytes of a row
constexpr int kMaxSplits = 8;       // the portable cluster size

struct Problem {
  const void* a;        // [M][K]
  const float* a_scale; // [M]
  const void* b;        // [N][K]
  const float* b_scale; // [N]
  const void* residual; // [M][N] in the output's type, or null
  void* out;            // [M][N]
  int64_t m, n, k;
  int splits;           // CTAs along K per cluster
};

// ---- the two formats: the B words a lane keeps per step, and the mma ---------------------------

struct Int8Mma {
  using Sum = int32_t;
  static constexpr int kBWords = 4;  // a token's 16 bytes as they are
  struct A {
    uint32_t w[2][4];  // the 16 bytes of rows g and g + 8
  };

  __device__ static void stage(uint4 src, uint32_t (&dst)[kBWords]) {
    dst[0] = src.x, dst[1] = src.y, dst[2] = src.z, dst[3] = src.w;
  }
  __device__ static A a_fragment(uint4 row, uint4 row8) {
    return {{{row.x, row.y, row.z, row.w}, {row8.x, row8.y, row8.z, row8.w}}};
  }

  // Two m16n8k32: words 0-1 of each 16 bytes, then words 2-3.
  __device__ static void mma(Sum (&c)[4], const A& a, const uint32_t (&b)[kBWords]) {
#pragma unroll
    for (int i = 0; i < 2; ++i)
      asm("mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
          "{%0, %1, %2, %3};"
          : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
          : "r"(a.w[0][2 * i]), "r"(a.w[1][2 * i]), "r"(a.w[0][2 * i + 1]), "r"(a.w[1][2 * i + 1]), "r"(b[2 * i]),
            "r"(b[2 * i + 1]));
  }
};

struct E4M3Mma {
  using Sum = float;
  static constexpr int kBWords = 8;  // a token's 16 values as f16 pairs

  // Two e4m3 values (the low and high byte) as an f16 pair, exactly (NaN stays NaN).
  __device__ static uint32_t to_f16x2(uint32_t two) {
    const __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(static_cast<__nv_fp8x2_storage_t>(two), __NV_E4M3);
    return uint32_t{h.x} | uint32_t{h.y} << 16;
  }
  __device__ static void widen(uint32_t four, uint32_t& lo, uint32_t& hi) {
    lo = to_f16x2(four & 0xFFFFu);
    hi = to_f16x2(four >> 16);
  }
  struct A {
    uint32_t h[4][4];  // per mma: rows g and g + 8, k pairs 0-1 and 2-3 of the word
  };

  __device__ static void stage(uint4 src, uint32_t (&dst)[kBWords]) {
    widen(src.x, dst[0], dst[1]);
    widen(src.y, dst[2], dst[3]);
    widen(src.z, dst[4], dst[5]);
    widen(src.w, dst[6], dst[7]);
  }
  __device__ static A a_fragment(uint4 row, uint4 row8) {
    const uint32_t r[4] = {row.x, row.y, row.z, row.w}, r8[4] = {row8.x, row8.y, row8.z, row8.w};
    A a;
#pragma unroll
    for (int i = 0; i < 4; ++i) {  // mma's a0..a3: (g, k 0-1), (g + 8, k 0-1), (g, k 8-9), (g + 8, k 8-9)
      widen(r[i], a.h[i][0], a.h[i][2]);
      widen(r8[i], a.h[i][1], a.h[i][3]);
    }
    return a;
  }

  // Four m16n8k16, one per 4 bytes of the lane's 16.
  __device__ static void mma(Sum (&c)[4], const A& a, const uint32_t (&b)[kBWords]) {
#pragma unroll
    for (int i = 0; i < 4; ++i)
      asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
          "{%0, %1, %2, %3};"
          : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
          : "r"(a.h[i][0]), "r"(a.h[i][1]), "r"(a.h[i][2]), "r"(a.h[i][3]), "r"(b[2 * i]), "r"(b[2 * i + 1]));
  }
};

// ---- the kernel ---------------------------------------------------------------------------------

// The weight stream: read once, so copied past L1 (.cg), fetched into L2 256 bytes at a time;
// zeros where `in` is false (a source size of 0 reads nothing).
__device__ __forceinline__ void weight_copy(uint4* dst, const void* src, bool in) {
  asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;" ::"r"(
                   static_cast<uint32_t>(__cvta_generic_to_shared(dst))),
               "l"(src), "r"(in ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void commit_copies() { asm volatile("cp.async.commit_group;" ::: "memory"); }
// Waits until at most kPending of this thread's committed groups of copies are still in flight.
template <int kPending>
__device__ __forceinline__ void wait_copies() {
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending) : "memory");
}
// Volatile, so that the compiler keeps a group's token loads where they are issued, a group ahead
// of their use, instead of sinking them to it. Through L1: every CTA over the same rows of K
// reads them.
__device__ __forceinline__ uint4 token_load(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

// A CTA: kWarps warps over the same 16 weight rows, each warp over its share of the
// CTA's steps along K, with kTiles column tiles of 8 tokens. The weight of a group of kUnroll
// steps is copied kDepth groups ahead of its use, a lane's tokens one group ahead (into registers,
// straight in mma's layout: no staging, no barrier in the loop). At the end the warps' sums are
// added in warp order, then a cluster's CTAs' in rank order.
template <class Mma, class Out, int kTiles, int kUnroll, int kDepth>
struct Kernel {
  using Sum = typename Mma::Sum;
  static constexpr int kTokens = 8 * kTiles;
  static constexpr int kRows = 16;
  static constexpr int kSums = kTiles * 4 * 32;  // a CTA's sums, [tile][c][lane]
  // The weight ring, [group][step][row g, g + 8][thread], 16 bytes each; after the loop the same
  // dynamic shared memory holds the warps' sums, [warp][kSums].
  static constexpr int kRingBytes = kDepth * kUnroll * 2 * kThreads * 16;
  static constexpr int kWarpSumBytes = kWarps * kSums * static_cast<int>(sizeof(Sum));
  static constexpr int kDynamicBytes = kRingBytes > kWarpSumBytes ? kRingBytes : kWarpSumBytes;

  __device__ static void run(const Problem& p) {
    extern __shared__ uint4 ring[];
    __shared__ Sum cta_sums[kSums];
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    const int rank = static_cast<int>(cluster.block_rank());
    const auto sync_cluster = [&] { cluster.sync(); };
    const auto sums_of = [&](int r) { return cluster.map_shared_rank(cta_sums, r); };
#else
    const int rank = 0;  // no clusters before sm_90: the launcher does not split K across CTAs there
    const auto sync_cluster = [] { __syncthreads(); };
    const auto sums_of = [&](int) { return cta_sums; };
#endif
    const int splits = p.splits;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    // x: the row tile by the token tile, token tiles fastest, so that the CTAs over the same weight
    // rows run together and read them once from HBM, then from L2.
    const int64_t token_tiles = (p.m + kTokens - 1) / kTokens;
    const int64_t n0 = blockIdx.x / token_tiles * kRows, m0 = blockIdx.x % token_tiles * kTokens;

    // This warp's steps along K: its share of its CTA's (the cluster rank's) share.
    const int64_t steps = (p.k + kStepK - 1) / kStepK;
    const int64_t cta_begin = steps * rank / splits, cta_steps = steps * (rank + 1) / splits - cta_begin;
    const int64_t begin = cta_begin + cta_steps * warp / kWarps, end = cta_begin + cta_steps * (warp + 1) / kWarps;

    // The lane's weight rows, g and g + 8; rows past N read row N - 1, and their sums are dropped.
    const auto* b = static_cast<const uint8_t*>(p.b);
    const auto row_of = [&](int r) {
      const int64_t row = n0 + 8 * r + g;
      return b + (row < p.n ? row : p.n - 1) * p.k + 16 * t;
    };
    const auto slot = [&](int group, int u, int r) -> uint4& {
      return ring[((group * kUnroll + u) * 2 + r) * kThreads + tid];
    };
    const auto copy_weights = [&](int64_t step, int group) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {  // zeros past the warp's steps too: mma reads every slot
        const int64_t k = (step + u) * kStepK;
        const bool in = step + u < end && k + 16 * t < p.k;
#pragma unroll
        for (int r = 0; r < 2; ++r) weight_copy(&slot(group, u, r), row_of(r) + (in ? k : 0), in);
      }
      commit_copies();
    };

    // The lane's tokens: token 8 * tile + g's 16 bytes at the lane's offset of each step (mma's B
    // fragment in the k order of the weight's bytes), zeros past M and K.
    const auto* a = static_cast<const uint8_t*>(p.a);
    const auto load_tokens = [&](int64_t step, uint4(&tokens)[kUnroll][kTiles]) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
#pragma unroll
        for (int tile = 0; tile < kTiles; ++tile) {
          const int64_t m = m0 + 8 * tile + g, k = (step + u) * kStepK + 16 * t;
          tokens[u][tile] = step + u < end && m < p.m && k < p.k ? token_load(a + m * p.k + k) : uint4{};
        }
    };

    Sum sums[kTiles][4] = {};
    uint4 tokens[kUnroll][kTiles];
#pragma unroll
    for (int group = 0; group < kDepth; ++group) copy_weights(begin + group * kUnroll, group);
    wait_for_producers();  // the tokens and their scales may be a chained row kernel's results
    load_tokens(begin, tokens);
    for (int64_t step = begin, group = 0; step < end; step += kUnroll, group = group + 1 < kDepth ? group + 1 : 0) {
      uint32_t words[kUnroll][kTiles][Mma::kBWords];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
#pragma unroll
        for (int tile = 0; tile < kTiles; ++tile) Mma::stage(tokens[u][tile], words[u][tile]);
      if (step + kUnroll < end) load_tokens(step + kUnroll, tokens);
      wait_copies<kDepth - 1>();  // this group's weight
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const typename Mma::A frag = Mma::a_fragment(slot(group, u, 0), slot(group, u, 1));
#pragma unroll
        for (int tile = 0; tile < kTiles; ++tile) Mma::mma(sums[tile], frag, words[u][tile]);
      }
      copy_weights(step + kDepth * kUnroll, group);  // the thread's own slots, read above
    }

    // The warps' sums, in the ring's memory once no copy is in flight.
    wait_copies<0>();
    __syncthreads();
    auto* warp_sums = reinterpret_cast<Sum*>(ring);
#pragma unroll
    for (int tile = 0; tile < kTiles; ++tile)
#pragma unroll
      for (int c = 0; c < 4; ++c) warp_sums[warp * kSums + (tile * 4 + c) * 32 + lane] = sums[tile][c];
    __syncthreads();
    const auto cta_sum = [&](int e) {
      Sum sum = warp_sums[e];
      for (int w = 1; w < kWarps; ++w) sum = sum + warp_sums[w * kSums + e];
      return sum;
    };
    const auto* residual = static_cast<const Out*>(p.residual);
    auto* out = static_cast<Out*>(p.out);
    // e = (tile * 4 + c) * 32 + lane: c is mma's accumulator index, rows g and g + 8 (channels)
    // by columns 2t and 2t + 1 (tokens)
    const auto write = [&](int e, Sum sum) {
      const int l = e % 32, c = e / 32 % 4, tile = e / 128;
      const int64_t n = n0 + 8 * (c / 2) + l / 4, m = m0 + 8 * tile + 2 * (l % 4) + c % 2;
      if (n < p.n && m < p.m)
        out[m * p.n + n] =
            scaled_output<Out>(sum, p.a_scale[m], p.b_scale[n], residual != nullptr ? residual + m * p.n + n : nullptr);
    };
    if (splits == 1) {
      for (int e = tid; e < kSums; e += kThreads) write(e, cta_sum(e));
      return;
    }
    // A cluster: each CTA's sums in its shared memory, then each CTA adds a share of the outputs
    // over the ranks in order and writes them.
    for (int e = tid; e < kSums; e += kThreads) cta_sums[e] = cta_sum(e);
    sync_cluster();
    const int share = (kSums + splits - 1) / splits;
    const int last = (rank + 1) * share < kSums ? (rank + 1) * share : kSums;
    for (int e = rank * share + tid; e < last; e += kThreads) {
      Sum sum = sums_of(0)[e];
      for (int r = 1; r < splits; ++r) sum = sum + sums_of(r)[e];
      write(e, sum);
    }
    sync_cluster();  // the other ranks' shared memory stays until all have read it
  }
};

template <class Mma, class Out, int kTiles, int kUnroll, int kDepth>
__global__ void __launch_bounds__(kThreads) small_m_kernel(Problem p) {
  Kernel<Mma, Out, kTiles, kUnroll, kDepth>::run(p);
}

// ---- the launch --------------------------------------------------------------------------------

// The fixed rule, from (M, N, K) and the device's SM count, as measured on an H200:
// - the token tile is the fewest column tiles that hold M (up to 8; more tokens run as more CTAs
//   over the same weight rows, which meet in L2);
// - K is split over a cluster only where the grid would not give every other SM a CTA: a
//   cluster's launch and its exchange of sums cost more than the extra CTAs gain above that
//   (at N = 1024, 64 CTAs, one is faster than two or four).
struct Shape {
  int tiles;   // column tiles of 8 tokens a CTA
  int splits;  // CTAs along K
  dim3 grid;
};

// Steps a group and groups in flight, per tile count (measured: at 2 tiles the tokens' registers
// and a second group in flight cost more than the deeper ring gains).
constexpr int unroll_of(int tiles) { return tiles <= 2 ? 2 : 1; }
constexpr int depth_of(int tiles) { return tiles == 2 ? 1 : 2; }

// The device: its SMs, and whether it has clusters (sm_90 and newer), which the split along K needs.
struct Device {
  int sms;
  bool clusters;
};

inline Shape shape_of(int64_t m, int64_t n, int64_t k, Device device) {
  Shape s;
  s.tiles = m <= 8 ? 1 : m <= 16 ? 2 : m <= 32 ? 4 : 8;
  const int64_t token_tiles = (m + 8 * s.tiles - 1) / (8 * s.tiles), ctas = (n + 15) / 16 * token_tiles;
  const int64_t group_k = int64_t{kStepK} * unroll_of(s.tiles) * kWarps, groups = (k + group_k - 1) / group_k;
  s.splits = static_cast<int>(
      std::max<int64_t>(1, std::min<int64_t>({device.sms / 2 / ctas, groups, device.clusters ? kMaxSplits : 1})));
  s.grid = dim3(static_cast<unsigned>(ctas), static_cast<unsigned>(s.splits), 1);
  return s;
}

template <class Mma, class Out, int kTiles, int kUnroll = unroll_of(kTiles), int kDepth = depth_of(kTiles)>
cudaError_t launch_shape(Problem p, const Shape& s, bool chained, cudaStream_t stream) {
  using K = Kernel<Mma, Out, kTiles, kUnroll, kDepth>;
  static_assert(K::kDynamicBytes + K::kSums * sizeof(typename K::Sum) <= 48 << 10,
                "within the shared memory a CTA gets without opting in");
  cudaLaunchConfig_t config = {};
  config.gridDim = s.grid;
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = K::kDynamicBytes;
  config.stream = stream;
  cudaLaunchAttribute attrs[2];
  unsigned n_attrs = 0;
  if (s.splits > 1) {
    attrs[n_attrs].id = cudaLaunchAttributeClusterDimension;
    attrs[n_attrs++].val.clusterDim = {1, static_cast<unsigned>(s.splits), 1};
  }
  if (chained) {
    attrs[n_attrs].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attrs[n_attrs++].val.programmaticStreamSerializationAllowed = 1;
  }
  config.attrs = attrs;
  config.numAttrs = n_attrs;
  p.splits = s.splits;
  return cudaLaunchKernelEx(&config, small_m_kernel<Mma, Out, kTiles, kUnroll, kDepth>, p);
}

// Enqueues the product on `stream`; `chained` (sm_90 and newer): as the dependent of the kernel
// enqueued just before it, whose results it reads (a and a_scale).
template <class Mma, class Out>
cudaError_t launch(const Problem& p, Device device, bool chained, cudaStream_t stream) {
  const Shape s = shape_of(p.m, p.n, p.k, device);
  chained = chained && device.clusters;  // programmatic launch: sm_90 too
  switch (s.tiles) {
    case 1: return launch_shape<Mma, Out, 1>(p, s, chained, stream);
    case 2: return launch_shape<Mma, Out, 2>(p, s, chained, stream);
    case 4: return launch_shape<Mma, Out, 4>(p, s, chained, stream);
    default: return launch_shape<Mma, Out, 8>(p, s, chained, stream);
  }
}

}  // namespace baracuda::small_m
