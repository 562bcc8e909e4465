// The small-M scaled matmul of decode: out[m, n] = a_scale[m] * b_scale[n] * sum_k a[m, k] b[n, k]
// (+ residual[m, n]), a and b both int8 or both float8_e4m3fn, b stored [N][K], on tensor cores
// through mma.sync. At a few tokens the product is bound by reading the weight once from HBM;
// this kernel streams it at that bound where cuBLASLt's 128-row tiles would be mostly empty.
//
// Swap-AB: the weight is mma's 16-row A operand (16 output channels a warp), the tokens its
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
// A CTA is 4 warps over 64 weight rows and a tile of up to 64 tokens; the tokens' bytes of each
// group of steps are staged in shared memory once for the 4 warps (float8: converted there once).
// K is split over the CTAs of a cluster (up to 8) so that small N still fills the GPU; the
// cluster adds its partial sums through distributed shared memory in rank order, each CTA
// finishing a share of the outputs: one kernel, no workspace, the same bits every run.
//
// Chained after the row kernel of a fused W8A8 op (programmatic dependent launch, cuda/pdl.cuh),
// the CTAs start while the rows are being quantized: each prefetches the start of its weight rows
// into L2, then waits for the rows, so that the weight stream overlaps the row kernel.
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

constexpr int kWarps = 4;
constexpr int kThreads = 32 * kWarps;
constexpr int kRows = 16 * kWarps;  // weight rows (output channels) per CTA
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
  int64_t prefetch = 0; // chained: bytes of each of a CTA's weight rows prefetched into L2
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

// The weight stream: read once, so kept out of L1, and fetched into L2 256 bytes at a time.
// Volatile, so that the compiler keeps a group's loads where they are issued, a group ahead of
// their use, instead of sinking them to it (and likewise for the tokens, which go through L1:
// every CTA over the same rows of K reads them).
__device__ __forceinline__ uint4 weight_load(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}
// Starts the copy of `bytes` (a multiple of 16, 16-byte aligned) into L2, with no registers.
__device__ __forceinline__ void prefetch_l2(const void* p, uint32_t bytes) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
#endif
}
__device__ __forceinline__ uint4 token_load(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

// kTiles column tiles of 8 tokens; a group of kUnroll steps is loaded a group ahead of its use.
template <class Mma, class Out, int kTiles, int kUnroll>
struct Kernel {
  using Sum = typename Mma::Sum;
  static constexpr int kTokens = 8 * kTiles;
  static constexpr int kBVecs = Mma::kBWords / 4;
  // The staged tokens of a group: [step][tile][vec][lane], 16 bytes each, so that a warp's read
  // of one vec is 512 contiguous bytes (no bank conflict).
  static constexpr int kStaged = kUnroll * kTiles * kBVecs * 32;
  static constexpr int kChunks = (kUnroll * kTiles * 32 + kThreads - 1) / kThreads;  // token loads a thread
  static constexpr int kPartials = kTiles * 4 * kThreads;  // the sums at the end, [tile][c][thread]
  static constexpr int kSharedWords = kStaged * 4 > kPartials ? kStaged * 4 : kPartials;

  __device__ static void run(const Problem& p) {
    __shared__ alignas(16) uint32_t shared[kSharedWords];
    auto* partials = reinterpret_cast<Sum*>(shared);
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    namespace cg = cooperative_groups;
    cg::cluster_group cluster = cg::this_cluster();
    const int rank = static_cast<int>(cluster.block_rank());
    const auto sync_cluster = [&] { cluster.sync(); };
    const auto partials_of = [&](int r) { return cluster.map_shared_rank(partials, r); };
#else
    const int rank = 0;  // no clusters before sm_90: the launcher splits K there only
    const auto sync_cluster = [] { __syncthreads(); };
    const auto partials_of = [&](int) { return partials; };
#endif
    const int splits = p.splits;
    const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
    const int64_t n0 = int64_t{blockIdx.x} * kRows, m0 = int64_t{blockIdx.z} * kTokens;

    // This CTA's steps along K.
    const int64_t steps = (p.k + kStepK - 1) / kStepK;
    const int64_t begin = steps * rank / splits, end = steps * (rank + 1) / splits;

    // The lane's two weight rows; rows past N read row N - 1, and their sums are dropped.
    const auto* b = static_cast<const uint8_t*>(p.b);
    const int64_t row = n0 + warp * 16 + g;
    const uint8_t* w_g = b + (row < p.n ? row : p.n - 1) * p.k + 16 * t;
    const uint8_t* w_g8 = b + (row + 8 < p.n ? row + 8 : p.n - 1) * p.k + 16 * t;
    const auto load_weights = [&](int64_t step, uint4(&w)[kUnroll][2]) {
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const bool in = step + u < end && (step + u) * kStepK + 16 * t < p.k;
        w[u][0] = in ? weight_load(w_g + (step + u) * kStepK) : uint4{};
        w[u][1] = in ? weight_load(w_g8 + (step + u) * kStepK) : uint4{};
      }
    };

    // The tokens' 16 bytes per (step, tile, lane), zeros past M and K: loaded a group ahead into
    // registers, then staged (float8: converted) in shared memory for the 4 warps.
    const auto* a = static_cast<const uint8_t*>(p.a);
    auto* staged = reinterpret_cast<uint4*>(shared);
    const auto load_tokens = [&](int64_t step, uint4(&tokens)[kChunks]) {
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        const int i = tid + c * kThreads, l = i % 32, tile = i / 32 % kTiles, u = i / (32 * kTiles);
        const int64_t m = m0 + 8 * tile + l / 4, k = (step + u) * kStepK + 16 * (l % 4);
        const bool in = i < kUnroll * kTiles * 32 && step + u < end && m < p.m && k < p.k;
        tokens[c] = in ? token_load(a + m * p.k + k) : uint4{};
      }
    };
    const auto stage_tokens = [&](const uint4(&tokens)[kChunks]) {
#pragma unroll
      for (int c = 0; c < kChunks; ++c) {
        const int i = tid + c * kThreads, l = i % 32, tile = i / 32 % kTiles, u = i / (32 * kTiles);
        if (i >= kUnroll * kTiles * 32) break;
        uint32_t words[Mma::kBWords];
        Mma::stage(tokens[c], words);
#pragma unroll
        for (int v = 0; v < kBVecs; ++v)
          staged[((u * kTiles + tile) * kBVecs + v) * 32 + l] =
              uint4{words[4 * v], words[4 * v + 1], words[4 * v + 2], words[4 * v + 3]};
      }
    };

    Sum sums[kTiles][4] = {};
    uint4 current[kUnroll][2], next[kUnroll][2], tokens[kChunks];
    load_weights(begin, current);
    if (p.prefetch > 0 && tid < kRows && n0 + tid < p.n) {  // chained: the weight before the tokens
      const int64_t first = begin * kStepK, last = end * kStepK < p.k ? end * kStepK : p.k;
      const int64_t bytes = (p.prefetch < last - first ? p.prefetch : last - first) / 16 * 16;
      if (bytes > 0) prefetch_l2(b + (n0 + tid) * p.k + first, static_cast<uint32_t>(bytes));
    }
    wait_for_producers();  // the tokens and their scales may be a chained row kernel's results
    load_tokens(begin, tokens);
    for (int64_t step = begin; step < end; step += kUnroll) {
      stage_tokens(tokens);
      __syncthreads();
      if (step + kUnroll < end) {
        load_weights(step + kUnroll, next);
        load_tokens(step + kUnroll, tokens);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const typename Mma::A frag = Mma::a_fragment(current[u][0], current[u][1]);
#pragma unroll
        for (int tile = 0; tile < kTiles; ++tile) {
          uint32_t words[Mma::kBWords];
#pragma unroll
          for (int v = 0; v < kBVecs; ++v) {
            const uint4 s = staged[((u * kTiles + tile) * kBVecs + v) * 32 + lane];
            words[4 * v] = s.x, words[4 * v + 1] = s.y, words[4 * v + 2] = s.z, words[4 * v + 3] = s.w;
          }
          Mma::mma(sums[tile], frag, words);
        }
      }
      __syncthreads();
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) current[u][0] = next[u][0], current[u][1] = next[u][1];
    }

    // The cluster's sums: each CTA's in its shared memory, then each CTA adds a share of the
    // outputs over the ranks in order and writes them.
#pragma unroll
    for (int tile = 0; tile < kTiles; ++tile)
#pragma unroll
      for (int c = 0; c < 4; ++c) partials[(tile * 4 + c) * kThreads + tid] = sums[tile][c];
    sync_cluster();
    const int share = (kPartials + splits - 1) / splits;
    const int last = (rank + 1) * share < kPartials ? (rank + 1) * share : kPartials;
    const auto* residual = static_cast<const Out*>(p.residual);
    auto* out = static_cast<Out*>(p.out);
    for (int e = rank * share + tid; e < last; e += kThreads) {
      Sum sum = partials_of(0)[e];
      for (int r = 1; r < splits; ++r) sum = sum + partials_of(r)[e];
      // e = (tile * 4 + c) * kThreads + thread: c is mma's accumulator index, rows g and g + 8
      // (channels) by columns 2t and 2t + 1 (tokens)
      const int thread = e % kThreads, tc = e / kThreads, tile = tc / 4, c = tc % 4;
      const int tl = thread % 32, tw = thread / 32;
      const int64_t n = n0 + tw * 16 + tl / 4 + 8 * (c / 2), m = m0 + 8 * tile + 2 * (tl % 4) + c % 2;
      if (n < p.n && m < p.m)
        out[m * p.n + n] =
            scaled_output<Out>(sum, p.a_scale[m], p.b_scale[n], residual != nullptr ? residual + m * p.n + n : nullptr);
    }
    sync_cluster();  // the other ranks' shared memory stays until all have read it
  }
};

template <class Mma, class Out, int kTiles, int kUnroll>
__global__ void __launch_bounds__(kThreads) small_m_kernel(Problem p) {
  Kernel<Mma, Out, kTiles, kUnroll>::run(p);
}

// ---- the launch --------------------------------------------------------------------------------

// The fixed rule, from (M, N, K) and the device's SM count: the token tile is the fewest column
// tiles that hold M (up to 8; more tokens run as more CTAs over the same weight rows, which meet
// in L2); K is split over a cluster so that the grid fills the GPU about four CTAs an SM, each
// split at least a group of steps long. Two steps a group up to 16 tokens, one past that (the
// registers of more tiles), as measured on an H200.
struct Shape {
  int tiles;   // column tiles of 8 tokens a CTA
  int splits;  // CTAs along K
  dim3 grid;
};

constexpr int unroll_of(int tiles) { return tiles <= 2 ? 2 : 1; }  // steps a group

// The device: its SMs, and whether it has clusters (sm_90 and newer), which the split along K needs.
struct Device {
  int sms;
  bool clusters;
};

constexpr int kCtasPerSm = 4;
// Chained: the weight bytes prefetched into L2 before the rows are ready, over all CTAs; well
// inside an H100's or H200's L2 (50, 60 MB), so that no prefetched line is evicted before its use.
constexpr int64_t kPrefetchBytes = 24 << 20;

inline Shape shape_of(int64_t m, int64_t n, int64_t k, Device device) {
  Shape s;
  s.tiles = m <= 8 ? 1 : m <= 16 ? 2 : m <= 32 ? 4 : 8;
  const int64_t row_tiles = (n + kRows - 1) / kRows, token_tiles = (m + 8 * s.tiles - 1) / (8 * s.tiles);
  const int64_t group_k = int64_t{kStepK} * unroll_of(s.tiles), groups = (k + group_k - 1) / group_k;
  const int64_t fill = int64_t{kCtasPerSm} * device.sms / (row_tiles * token_tiles);
  s.splits =
      static_cast<int>(std::max<int64_t>(1, std::min<int64_t>({fill, groups, device.clusters ? kMaxSplits : 1})));
  s.grid = dim3(static_cast<unsigned>(row_tiles), static_cast<unsigned>(s.splits), static_cast<unsigned>(token_tiles));
  return s;
}

template <class Mma, class Out, int kTiles>
cudaError_t launch_shape(Problem p, const Shape& s, bool chained, cudaStream_t stream) {
  cudaLaunchConfig_t config = {};
  config.gridDim = s.grid;
  config.blockDim = dim3(kThreads);
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
    const int64_t ctas = int64_t{s.grid.x} * s.grid.y * s.grid.z;
    p.prefetch = kPrefetchBytes / (ctas * kRows);
  }
  config.attrs = attrs;
  config.numAttrs = n_attrs;
  p.splits = s.splits;
  return cudaLaunchKernelEx(&config, small_m_kernel<Mma, Out, kTiles, unroll_of(kTiles)>, p);
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
