// CUDA backend: one row-map kernel template serves every static op, one
// block-per-row kernel the dynamic ops, another the LSQ backward. Each moves a
// row in 16-byte vectors; the few elements before the first aligned vector and
// after the last are done one by one (RowSpan).
#include <cuda/std/tuple>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <initializer_list>
#include <string>

#include "cuda_ops.h"
#include "producer_handlers.h"

namespace baracuda {
namespace {

constexpr int kThreads = 128;
constexpr int kUnroll = 4;  // the most independent vectors in flight per thread

template <class T, int W>
struct Vec {
  T v[W];
};

// An unsigned word of N bytes: vectors travel as one such load or store (the
// compiler would otherwise split a vector of 16-bit structs into 2-byte stores).
template <int N> struct Word;
template <> struct Word<1> { using type = uint8_t; };
template <> struct Word<2> { using type = uint16_t; };
template <> struct Word<4> { using type = uint32_t; };
template <> struct Word<8> { using type = uint2; };
template <> struct Word<16> { using type = uint4; };
template <class T, int W> using WordOf = typename Word<sizeof(T) * W>::type;

template <int W, class T>
__device__ __forceinline__ Vec<T, W> load_vec(const T* p) {
  const WordOf<T, W> w = __ldg(reinterpret_cast<const WordOf<T, W>*>(p));
  Vec<T, W> v;
  memcpy(&v, &w, sizeof(v));
  return v;
}

// Stores one vector word assembled from 32-bit lanes built with shifts: given a
// memcpy, the compiler splits a vector of 16-bit values into 2- or 4-byte
// stores, which cost more than half of the bandwidth.
template <int W, class T>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, W>& v) {
  constexpr int kBytes = sizeof(T) * W;
  WordOf<T, W> w;
  if constexpr (kBytes >= 4 && sizeof(T) < 4) {
    constexpr int kPer = 4 / sizeof(T);
    using Bits = typename Word<sizeof(T)>::type;
    uint32_t words[kBytes / 4];
#pragma unroll
    for (int i = 0; i < kBytes / 4; ++i) {
      words[i] = 0;
#pragma unroll
      for (int k = 0; k < kPer; ++k)
        words[i] |= uint32_t(bit_cast<Bits>(v.v[i * kPer + k])) << (8 * sizeof(T) * k);
    }
    if constexpr (kBytes == 16) w = make_uint4(words[0], words[1], words[2], words[3]);
    if constexpr (kBytes == 8) w = make_uint2(words[0], words[1]);
    if constexpr (kBytes == 4) w = words[0];
  } else {
    memcpy(&w, &v, kBytes);
  }
  __stcs(reinterpret_cast<WordOf<T, W>*>(p), w);  // streaming: the output is not read again here
}

// An op writes one output (T*), or two (Split<T>, for a Pair-valued op).
template <int W, class T>
__device__ __forceinline__ void store_out(T* out, int64_t i, const Vec<T, W>& v) {
  store_vec<W>(out + i, v);
}
template <int W, class T>
__device__ __forceinline__ void store_out(Split<T> out, int64_t i, const Vec<Pair<T>, W>& v) {
  Vec<T, W> a, b;
#pragma unroll
  for (int k = 0; k < W; ++k) a.v[k] = v.v[k].first, b.v[k] = v.v[k].second;
  store_vec<W>(out.first + i, a);
  store_vec<W>(out.second + i, b);
}
template <class T> __device__ __forceinline__ void put(T* out, int64_t i, T v) { out[i] = v; }
template <class T> __device__ __forceinline__ void put(Split<T> out, int64_t i, Pair<T> v) {
  out.first[i] = v.first;
  out.second[i] = v.second;
}
template <class P> struct OutElem { using type = std::remove_pointer_t<P>; };
template <class T> struct OutElem<Split<T>> { using type = T; };

template <class... Ts> constexpr int max_size() { return std::max({int(sizeof(Ts))...}); }

// Elements per vector: the widest operand moves 16 bytes at a time.
template <class Out, class... In> constexpr int vec_width() { return 16 / max_size<Out, In...>(); }

template <int W, class Op, class P, class OutPtr, class... In>
__device__ __forceinline__ void apply_vec(const Op& op, const P& p, OutPtr out, int64_t i, const Vec<In, W>&... v) {
  Vec<decltype(op(p, v.v[0]...)), W> r;
#pragma unroll
  for (int k = 0; k < W; ++k) r.v[k] = op(p, v.v[k]...);
  store_out<W>(out, i, r);
}

// A row's layout for W-element vectors: `head` elements up to the first aligned
// vector, `nvec` vectors from `body`, then fewer than W elements to the row's end.
template <int W>
struct RowSpan {
  int64_t base, head, nvec, body;

  __device__ RowSpan(int64_t row, int64_t cols) : base(row * cols) {
    const int64_t skew = (W - base % W) % W;
    head = skew < cols ? skew : cols;
    nvec = (cols - head) / W;
    body = base + head;
  }

  // Calls f(index) for the unaligned elements that lane c of `lanes` owns: the head's and the
  // tail's elements c, c + lanes, ... (below W).
  template <class F>
  __device__ void ends(int64_t cols, int64_t c, F f, int64_t lanes = W) const {
    for (; c < W; c += lanes) {
      if (c < head) f(base + c);
      if (head + nvec * W + c < cols) f(base + head + nvec * W + c);
    }
  }
};

// grid-stride over tiles; a tile is (row, chunk of kThreads * per_thread vectors),
// per_thread <= U.
template <int W, int U, class Op, class OutPtr, class... In>
__global__ void __launch_bounds__(kThreads)
row_map_kernel(Op op, int64_t cols, int64_t chunks, int64_t tiles, int per_thread, OutPtr out,
               const In* __restrict__... in) {
  for (int64_t tile = blockIdx.x; tile < tiles; tile += gridDim.x) {
    const int64_t row = tile / chunks, chunk = tile - row * chunks;
    const RowSpan<W> span(row, cols);
    const int64_t nvec = span.nvec, body = span.body;
    // All loads of the tile first, so that they are in flight together, and before the
    // row's scale is loaded and inverted, which then overlaps them.
    const int64_t v0 = chunk * (kThreads * per_thread) + threadIdx.x;
    cuda::std::tuple<Vec<In, W>...> buf[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t v = v0 + u * kThreads;
      if (u < per_thread && v < nvec) buf[u] = cuda::std::make_tuple(load_vec<W>(in + body + v * W)...);
    }
    const auto p = op.row(row);
    if (chunk == 0) span.ends(cols, threadIdx.x, [&](int64_t i) { put(out, i, op(p, in[i]...)); });
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t v = v0 + u * kThreads;
      if (u < per_thread && v < nvec)
        cuda::std::apply([&](const auto&... x) { apply_vec<W>(op, p, out, body + v * W, x...); }, buf[u]);
    }
  }
}

// ---- dynamic ops: `lanes` threads per row -----------------------------------
// A row's lanes read it once into registers (up to C vectors a lane), reduce
// the range, derive the row's scale and zero point, then quantize from
// registers. A long row takes a block (up to kMaxThreads lanes); a short one (a
// per-token group of 128) a power of two of at most 32 lanes, so that a block
// of kShortRowThreads holds many rows and reduces with shuffles alone. A row
// longer than kMaxThreads * C vectors (C = kCache for one input: 64 KiB, 32768
// bf16 values) streams its remainder from memory a second time.
constexpr int kMaxThreads = 512;
constexpr int kCache = 8;
constexpr int kShortRowThreads = 256;

template <class M>
__device__ __forceinline__ RowRange<M> shfl_xor(const RowRange<M>& r, int offset) {
  RowRange<M> o;
  o.lo = __shfl_xor_sync(0xffffffffu, r.lo, offset);
  o.hi = __shfl_xor_sync(0xffffffffu, r.hi, offset);
  return o;
}
template <class M>
__device__ __forceinline__ RowSum<M> shfl_xor(const RowSum<M>& r, int offset) {
  RowSum<M> o;
  o.sum = __shfl_xor_sync(0xffffffffu, r.sum, offset);
  return o;
}

// Merges every thread's V (RowRange or RowSum) in a fixed order, so a sum
// comes out the same on every run; all threads get the result.
template <class V>
__device__ V block_reduce(V v, V* partial) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v.merge(shfl_xor(v, offset));
  const int warp = threadIdx.x / 32, warps = blockDim.x / 32;
  if (threadIdx.x % 32 == 0) partial[warp] = v;
  __syncthreads();
  V all = partial[0];
  for (int w = 1; w < warps; ++w) all.merge(partial[w]);
  __syncthreads();  // partial[] is reused by the block's next row
  return all;
}

// The reduction over a row's `lanes` consecutive threads (lanes <= 32: shuffles within the warp).
template <class V>
__device__ V lanes_reduce(V v, int lanes) {
  for (int offset = lanes / 2; offset > 0; offset /= 2) v.merge(shfl_xor(v, offset));
  return v;
}

// h of the W elements from `at`: the op's producer over its inputs.
template <int W, class Op, class... In>
__device__ __forceinline__ auto produce_vec(const Op& op, int64_t at, const In*... in) {
  const auto loaded = cuda::std::make_tuple(load_vec<W>(in + at)...);
  Vec<decltype(op.value(in[0]...)), W> h;
#pragma unroll
  for (int k = 0; k < W; ++k) h.v[k] = cuda::std::apply([&](const auto&... x) { return op.value(x.v[k]...); }, loaded);
  return h;
}

template <int W, class Op, class P, class Out, class T>
__device__ __forceinline__ void quantize_vec(const Op& op, const P& p, Out* out, const Vec<T, W>& h) {
  Vec<Out, W> q;
#pragma unroll
  for (int k = 0; k < W; ++k) q.v[k] = op.quantize(p, h.v[k]);
  store_vec<W>(out, q);
}

template <int W, int C, class Op, class Out, class M, class... In>
__global__ void __launch_bounds__(kMaxThreads)
dynamic_row_kernel(Op op, int64_t rows, int64_t cols, int lanes, Out* __restrict__ out, M* __restrict__ scale,
                   int32_t* __restrict__ zp, const In* __restrict__... in) {
  __shared__ RowRange<M> partial[kMaxThreads / 32];
  const int lane = threadIdx.x % lanes;  // lanes divides blockDim.x
  const int64_t rows_per_block = blockDim.x / lanes;
  // Every thread runs the same number of passes: the shuffles and barriers need all of them.
  for (int64_t first = blockIdx.x * rows_per_block; first < rows; first += gridDim.x * rows_per_block) {
    const int64_t row = first + threadIdx.x / lanes;
    const bool live = row < rows;
    const RowSpan<W> span(live ? row : 0, cols);
    const int64_t nvec = live ? span.nvec : 0, body = span.body;
    const int64_t streamed = int64_t{C} * lanes;  // vectors past this are read twice

    RowRange<M> range;
    decltype(produce_vec<W>(op, 0, in...)) cache[C];
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const int64_t v = lane + c * int64_t{lanes};
      if (v < nvec) cache[c] = produce_vec<W>(op, body + v * W, in...);
    }
#pragma unroll
    for (int c = 0; c < C; ++c) {
      if (lane + c * int64_t{lanes} < nvec) {
#pragma unroll
        for (int k = 0; k < W; ++k) range.add(to_math(cache[c].v[k]));
      }
    }
    for (int64_t v = streamed + lane; v < nvec; v += lanes) {
      const auto h = produce_vec<W>(op, body + v * W, in...);
#pragma unroll
      for (int k = 0; k < W; ++k) range.add(to_math(h.v[k]));
    }
    if (live) span.ends(cols, lane, [&](int64_t i) { range.add(to_math(op.value(in[i]...))); }, lanes);

    const auto p = op.params(lanes <= 32 ? lanes_reduce(range, lanes) : block_reduce(range, partial));
    if (live && lane == 0) {
      if (scale) scale[row] = p.scale;
      if (zp) zp[row] = static_cast<int32_t>(p.zp);
    }
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const int64_t v = lane + c * int64_t{lanes};
      if (v < nvec) quantize_vec<W>(op, p, out + body + v * W, cache[c]);
    }
    for (int64_t v = streamed + lane; v < nvec; v += lanes)
      quantize_vec<W>(op, p, out + body + v * W, produce_vec<W>(op, body + v * W, in...));
    if (live) span.ends(cols, lane, [&](int64_t i) { out[i] = op.quantize(p, op.value(in[i]...)); }, lanes);
  }
}

// Short rows of whole vectors (a per-token group of 128: 16 bf16 vectors): one vector a lane,
// `lanes` = the row's vectors (a power of two <= 32), and up to R rows a thread, loaded together.
// Each load and store of a warp then covers 32 consecutive vectors (32 / lanes whole rows), where
// the general kernel's few lanes a row would touch 16-byte pieces of many rows at a time.
template <int W, int R, class Op, class Out, class M, class... In>
__global__ void __launch_bounds__(kShortRowThreads)
short_row_kernel(Op op, int64_t rows, int64_t cols, int lanes, int per_thread, Out* __restrict__ out,
                 M* __restrict__ scale, int32_t* __restrict__ zp, const In* __restrict__... in) {
  const int lane = threadIdx.x % lanes;
  const int64_t slots = blockDim.x / lanes, slot = threadIdx.x / lanes;  // rows a block covers per r
  for (int64_t first = blockIdx.x * slots * per_thread; first < rows; first += gridDim.x * slots * per_thread) {
    decltype(produce_vec<W>(op, 0, in...)) cache[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int64_t row = first + r * slots + slot;
      if (r < per_thread && row < rows) cache[r] = produce_vec<W>(op, row * cols + lane * W, in...);
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (r >= per_thread) break;  // the same for every thread: the shuffles below see all lanes
      const int64_t row = first + r * slots + slot;
      RowRange<M> range;
      if (row < rows) {
#pragma unroll
        for (int k = 0; k < W; ++k) range.add(to_math(cache[r].v[k]));
      }
      const auto p = op.params(lanes_reduce(range, lanes));
      if (row < rows) {
        if (lane == 0) {
          if (scale) scale[row] = p.scale;
          if (zp) zp[row] = static_cast<int32_t>(p.zp);
        }
        quantize_vec<W>(op, p, out + row * cols + lane * W, cache[r]);
      }
    }
  }
}

// ---- the fused norm: one block per row, the row cached in registers --------
// A row of whole vectors (W divides D, else W = 1), so that each thread owns the
// same columns in every row: the weight is read at the row's offsets, and the
// backward keeps its d(weight) terms in registers.

// Threads for a fused row of `nvec` vectors, `per_thread` vectors each: a function of D alone,
// so that a row's sums are added in the same order whatever the number of rows. Small blocks
// leave room for many rows per SM, whose loads overlap each other's reductions.
constexpr int kNormCache = 4;
inline int fused_threads(int64_t nvec, int per_thread, int at_least = 32) {
  const int64_t most_useful = std::max<int64_t>(32, (nvec + 31) / 32 * 32);
  const int64_t lower = std::min<int64_t>(at_least, most_useful);
  return static_cast<int>(std::clamp<int64_t>((nvec / per_thread + 31) / 32 * 32, lower, kMaxThreads));
}

template <int W, class T, class Q, class Out>
__global__ void __launch_bounds__(kMaxThreads)
norm_row_kernel(NormQuantizeRows<T, Q, Out> io, int64_t rows, int64_t cols) {
  using M = math_t<T>;
  __shared__ RowSum<M> sums[kMaxThreads / 32];
  __shared__ RowRange<M> ranges[kMaxThreads / 32];
  const int64_t nvec = cols / W, cached = int64_t{kNormCache} * blockDim.x;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t base = row * cols;
    const auto r_vec = [&](int64_t v) {  // r of vector v, from memory
      const auto x = load_vec<W>(io.x + base + v * W);
      if (!io.residual) return x;
      const auto res = load_vec<W>(io.residual + base + v * W);
      Vec<T, W> r;
#pragma unroll
      for (int k = 0; k < W; ++k) r.v[k] = RmsNorm<T>::residual(x.v[k], res.v[k]);
      return r;
    };
    Vec<T, W> cache[kNormCache];
#pragma unroll
    for (int c = 0; c < kNormCache; ++c) {
      const int64_t v = threadIdx.x + c * int64_t{blockDim.x};
      if (v < nvec) cache[c] = r_vec(v);
    }
    RowSum<M> ss;
    const auto first = [&](int64_t v, const Vec<T, W>& r) {  // store r, add its squares
      if (io.r_out) store_vec<W>(io.r_out + base + v * W, r);
#pragma unroll
      for (int k = 0; k < W; ++k) ss.sum += RmsNorm<T>::square(r.v[k]);
    };
#pragma unroll
    for (int c = 0; c < kNormCache; ++c) {
      const int64_t v = threadIdx.x + c * int64_t{blockDim.x};
      if (v < nvec) first(v, cache[c]);
    }
    for (int64_t v = cached + threadIdx.x; v < nvec; v += blockDim.x) first(v, r_vec(v));
    const M inv = io.norm.inv_rms(block_reduce(ss, sums).sum);

    // f(v, h) for each of this thread's vectors of h, from the cache or recomputed.
    const auto each_h = [&](auto&& f) {
      const auto h_vec = [&](int64_t v, const Vec<T, W>& r) {
        const auto w = load_vec<W>(io.weight + v * W);
        Vec<T, W> h;
#pragma unroll
        for (int k = 0; k < W; ++k) h.v[k] = RmsNorm<T>::normed(r.v[k], inv, w.v[k]);
        return h;
      };
#pragma unroll
      for (int c = 0; c < kNormCache; ++c) {
        const int64_t v = threadIdx.x + c * int64_t{blockDim.x};
        if (v < nvec) f(v, h_vec(v, cache[c]));
      }
      for (int64_t v = cached + threadIdx.x; v < nvec; v += blockDim.x) f(v, h_vec(v, r_vec(v)));
    };
    RowParams<M> p;
    if constexpr (Q::kDynamic) {
      RowRange<M> range;
      each_h([&](int64_t, const Vec<T, W>& h) {
#pragma unroll
        for (int k = 0; k < W; ++k) range.add(to_math(h.v[k]));
      });
      p = io.quant.params(block_reduce(range, ranges));
    } else {
      p = io.quant.row(row);
    }
    if (threadIdx.x == 0) {
      io.inv_rms[row] = inv;
      if (io.scale_out) io.scale_out[row] = p.scale;
    }
    each_h([&](int64_t v, const Vec<T, W>& h) { quantize_vec<W>(io.quant, p, io.out + base + v * W, h); });
  }
}

// The norm backward over one group of rows a block (producers.h): dx a row, and the group's
// d(weight) in registers (smem for columns past the register cache), written to dw_groups. Two
// vectors a thread are cached, for this row and the next.
constexpr int kGradCache = 2;

template <int W, class T, class G>
__global__ void __launch_bounds__(kMaxThreads)
norm_grad_kernel(NormGradRows<T, G> io, int64_t rows, int64_t cols) {
  using M = math_t<T>;
  extern __shared__ float dw_streamed[];  // [W][nvec - cached], for long rows
  __shared__ RowSum<M> sums[kMaxThreads / 32];
  const int64_t nvec = cols / W, cached = int64_t{kGradCache} * blockDim.x;
  const int64_t n_streamed = nvec > cached ? nvec - cached : 0;
  const int64_t group = blockIdx.x, per_group = io.rows_per_group(rows);
  M dw[kGradCache][W] = {};
  for (int64_t v = cached + threadIdx.x; v < nvec; v += blockDim.x)
    for (int k = 0; k < W; ++k) dw_streamed[k * n_streamed + v - cached] = 0;

  const int64_t first = group * per_group, end = (group + 1) * per_group < rows ? (group + 1) * per_group : rows;
  // This thread's cached vectors of g and r (and g_residual) of a row; the next row's are loaded
  // while this one is reduced, so that a block's rows do not wait on each other's loads.
  const auto load_row = [&](int64_t row, Vec<T, W>(&g)[kGradCache], Vec<T, W>(&r)[kGradCache]) {
#pragma unroll
    for (int c = 0; c < kGradCache; ++c) {
      const int64_t v = threadIdx.x + c * int64_t{blockDim.x};
      if (v < nvec) g[c] = load_vec<W>(io.g + row * cols + v * W), r[c] = load_vec<W>(io.r + row * cols + v * W);
    }
  };
  Vec<T, W> gc[kGradCache], rc[kGradCache], gn[kGradCache], rn[kGradCache], grc[kGradCache];
  if (first < end) load_row(first, gc, rc);
  for (int64_t row = first; row < end; ++row) {
    const int64_t base = row * cols;
    if (row + 1 < end) load_row(row + 1, gn, rn);
    if (io.g_residual) {
#pragma unroll
      for (int c = 0; c < kGradCache; ++c) {
        const int64_t v = threadIdx.x + c * int64_t{blockDim.x};
        if (v < nvec) grc[c] = load_vec<W>(io.g_residual + base + v * W);
      }
    }
    const auto p = io.mask.row(row);
    const M inv = io.inv_rms[row];
    // f(k, dh, terms) for the W elements of vector v
    const auto terms = [&](int64_t v, const Vec<T, W>& g, const Vec<T, W>& r, auto&& f) {
      const auto w = load_vec<W>(io.weight + v * W);
#pragma unroll
      for (int k = 0; k < W; ++k) {
        const M dh = io.dh(p, g.v[k], RmsNorm<T>::normed(r.v[k], inv, w.v[k]));
        f(k, dh, RmsNormGrad<T>::terms(dh, r.v[k], inv, w.v[k]));
      }
    };
    RowSum<M> sum;
#pragma unroll
    for (int c = 0; c < kGradCache; ++c) {
      const int64_t v = threadIdx.x + c * int64_t{blockDim.x};
      if (v < nvec) terms(v, gc[c], rc[c], [&](int k, M dh, const auto& t) {
        sum.sum += t.dn * t.n;
        dw[c][k] += dh * t.n;
      });
    }
    for (int64_t v = cached + threadIdx.x; v < nvec; v += blockDim.x)
      terms(v, load_vec<W>(io.g + base + v * W), load_vec<W>(io.r + base + v * W), [&](int k, M dh, const auto& t) {
        sum.sum += t.dn * t.n;
        dw_streamed[k * n_streamed + v - cached] += dh * t.n;
      });
    const M mean = io.grad.mean(block_reduce(sum, sums).sum);
    const auto dx_vec = [&](int64_t v, const Vec<T, W>& g, const Vec<T, W>& r, const Vec<T, W>& gr) {
      Vec<T, W> dx;
      terms(v, g, r, [&](int k, M, const auto& t) {
        dx.v[k] = RmsNormGrad<T>::dr(t, inv, mean, io.g_residual ? to_math(gr.v[k]) : M(0));
      });
      store_vec<W>(io.dx + base + v * W, dx);
    };
#pragma unroll
    for (int c = 0; c < kGradCache; ++c) {
      const int64_t v = threadIdx.x + c * int64_t{blockDim.x};
      if (v < nvec) dx_vec(v, gc[c], rc[c], grc[c]);
    }
    for (int64_t v = cached + threadIdx.x; v < nvec; v += blockDim.x) {
      Vec<T, W> gr;
      if (io.g_residual) gr = load_vec<W>(io.g_residual + base + v * W);
      dx_vec(v, load_vec<W>(io.g + base + v * W), load_vec<W>(io.r + base + v * W), gr);
    }
#pragma unroll
    for (int c = 0; c < kGradCache; ++c) gc[c] = gn[c], rc[c] = rn[c];
  }
  M* out = io.dw_groups + group * cols;
#pragma unroll
  for (int c = 0; c < kGradCache; ++c) {
    const int64_t v = threadIdx.x + c * int64_t{blockDim.x};
    if (v < nvec)
      for (int k = 0; k < W; ++k) out[v * W + k] = dw[c][k];
  }
  for (int64_t v = cached + threadIdx.x; v < nvec; v += blockDim.x)
    for (int k = 0; k < W; ++k) out[v * W + k] = dw_streamed[k * n_streamed + v - cached];
}

// dw = the groups' sums added in slices (producers.h): thread (column, slice) adds its slice's
// groups in order, then the slices are added in order.
constexpr int kSumColumns = 32;

template <class T, class G>
__global__ void __launch_bounds__(kSumColumns * NormGradRows<T, G>::kDwSlices)
dw_sum_kernel(NormGradRows<T, G> io, int64_t cols) {
  using M = math_t<T>;
  constexpr int kSlices = NormGradRows<T, G>::kDwSlices;
  __shared__ M partial[kSlices][kSumColumns];
  const int lane = threadIdx.x % kSumColumns, slice = threadIdx.x / kSumColumns;
  const int64_t col = blockIdx.x * int64_t{kSumColumns} + lane, per_slice = io.groups_per_slice();
  M sum = 0;
  const int64_t end = (slice + 1) * per_slice < io.groups ? (slice + 1) * per_slice : io.groups;
  if (col < cols)
    for (int64_t k = slice * per_slice; k < end; ++k) sum += io.dw_groups[k * cols + col];
  partial[slice][lane] = sum;
  __syncthreads();
  if (slice == 0 && col < cols) {
    M total = 0;
    for (int s = 0; s < kSlices; ++s) total += partial[s][lane];
    io.dw[col] = From<T>::math(total);
  }
}

// (in...) -> (out, per-row sum): one block per row, the sum reduced in a fixed order.
template <int W, class Op, class Out, class M, class... In>
__global__ void __launch_bounds__(kMaxThreads)
reduce_row_kernel(Op op, int64_t rows, int64_t cols, Out* __restrict__ out, M* __restrict__ sums,
                  const In* __restrict__... in) {
  __shared__ RowSum<M> partial[kMaxThreads / 32];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const auto p = op.row(row);
    const RowSpan<W> span(row, cols);
    const int64_t nvec = span.nvec, body = span.body;
    RowSum<M> acc;
    for (int64_t v = threadIdx.x; v < nvec; v += blockDim.x) {
      const auto loaded = cuda::std::make_tuple(load_vec<W>(in + body + v * W)...);
      Vec<Out, W> r;
#pragma unroll
      for (int k = 0; k < W; ++k)
        r.v[k] = cuda::std::apply([&](const auto&... x) { return op(p, x.v[k]..., acc.sum); }, loaded);
      store_vec<W>(out + body + v * W, r);
    }
    span.ends(cols, threadIdx.x, [&](int64_t i) { out[i] = op(p, in[i]..., acc.sum); });
    acc = block_reduce(acc, partial);
    if (threadIdx.x == 0) sums[row] = acc.sum;
  }
}

// True when every pointer can be read or written in W-element vectors.
template <int W, class T> bool aligned(const T* p) { return reinterpret_cast<uintptr_t>(p) % (W * sizeof(T)) == 0; }
template <int W, class T> bool aligned(Split<T> p) { return aligned<W>(p.first) && aligned<W>(p.second); }
template <int W, class... Ps> bool vector_aligned(const Ps&... ptrs) { return (aligned<W>(ptrs) && ...); }

struct CudaExec {
  cudaStream_t stream;
  CudaExec(cudaStream_t s) : stream(s) {}

  template <int W, class Op, class OutPtr, class... In>
  ffi::Error launch(const Op& op, int64_t rows, int64_t cols, OutPtr out, const In*... in) const {
    // Ops of three inputs (the SiLU backward) keep two vectors of each in flight, not four: their
    // registers would otherwise limit the threads per SM.
    constexpr int U = sizeof...(In) >= 3 ? 2 : kUnroll;
    const int64_t nvec = cols / W;  // the most whole vectors any row holds
    const int per_thread = vectors_per_thread(rows * nvec, U);
    const int64_t chunk = int64_t{kThreads} * per_thread;
    const int64_t chunks = std::max<int64_t>(1, (nvec + chunk - 1) / chunk);
    const int64_t tiles = rows * chunks;
    const int grid = static_cast<int>(std::min<int64_t>(tiles, int64_t{1} << 20));
    // One vector a thread gets its own kernel, 40 % of the four-vector one's instructions:
    // small shapes are bound by the length of each thread's instruction stream.
    const auto kernel = per_thread == 1 ? row_map_kernel<W, 1, Op, OutPtr, In...>
                                        : row_map_kernel<W, U, Op, OutPtr, In...>;
    kernel<<<grid, kThreads, 0, stream>>>(op, cols, chunks, tiles, per_thread, out, in...);
    return launch_error();
  }

  template <class Op, class OutPtr, class... In>
  ffi::Error map_rows(const Op& op, int64_t rows, int64_t cols, OutPtr out, const In*... in) const {
    handler_calls.fetch_add(1, std::memory_order_relaxed);
    if (rows == 0 || cols == 0) return ffi::Error::Success();
    constexpr int W = vec_width<typename OutElem<OutPtr>::type, In...>();
    // XLA's buffers are aligned; the scalar kernel covers any that are not.
    if (vector_aligned<W>(out, in...))
      return launch<W>(op, rows, cols, out, in...);
    return launch<1>(op, rows, cols, out, in...);
  }

  template <int W, class Op, class Out, class M, class... In>
  ffi::Error launch_dynamic(const Op& op, int64_t rows, int64_t cols, Out* out, M* scale, int32_t* zp,
                            const In*... in) const {
    // Up to eight vectors a thread (four with a producer of several inputs, whose loads are all
    // in flight together): fewer threads per row leave room for more rows per SM, whose loads
    // overlap the others' reductions; rows past kMaxThreads * C vectors stream.
    constexpr int C = kCache / (sizeof...(In) > 1 ? 2 : 1);
    const int64_t nvec = cols / W;
    const int per_thread = vectors_per_thread(rows * nvec, C);
    if (cols % W == 0 && nvec >= 1 && nvec <= 32 && (nvec & (nvec - 1)) == 0) {  // short rows of whole vectors
      const int lanes = static_cast<int>(nvec), rows_per_pass = kShortRowThreads / lanes * per_thread;
      const int grid = static_cast<int>(std::min<int64_t>((rows + rows_per_pass - 1) / rows_per_pass, 1 << 20));
      short_row_kernel<W, C><<<grid, kShortRowThreads, 0, stream>>>(op, rows, cols, lanes, per_thread, out, scale,
                                                                    zp, in...);
      return launch_error();
    }
    const int64_t wanted = std::max<int64_t>(1, (nvec + per_thread - 1) / per_thread);
    int lanes = row_threads(nvec, per_thread), threads = lanes;
    if (wanted <= 32) {  // a short row: a power of two of lanes, many rows a block
      lanes = 1;
      while (lanes < wanted) lanes *= 2;
      threads = kShortRowThreads;
    }
    const int64_t blocks = (rows + threads / lanes - 1) / (threads / lanes);
    const int grid = static_cast<int>(std::min<int64_t>(blocks, int64_t{1} << 20));
    dynamic_row_kernel<W, C><<<grid, threads, 0, stream>>>(op, rows, cols, lanes, out, scale, zp, in...);
    return launch_error();
  }

  template <class Op, class Out, class M, class... In>
  ffi::Error dynamic_rows(const Op& op, int64_t rows, int64_t cols, Out* out, M* scale, int32_t* zp,
                          const In*... in) const {
    handler_calls.fetch_add(1, std::memory_order_relaxed);
    if (rows == 0) return ffi::Error::Success();
    constexpr int W = vec_width<Out, In...>();
    if (vector_aligned<W>(out, in...)) return launch_dynamic<W>(op, rows, cols, out, scale, zp, in...);
    return launch_dynamic<1>(op, rows, cols, out, scale, zp, in...);
  }

  // The fused rows use W-vectors when W divides D (and the buffers are aligned), else W = 1.
  template <int W, class... Ps>
  static bool whole_vectors(int64_t cols, const Ps&... ptrs) {
    return cols % W == 0 && vector_aligned<W>(ptrs...);
  }

  template <class T, class Q, class Out>
  ffi::Error norm_rows(const NormQuantizeRows<T, Q, Out>& io, int64_t rows, int64_t cols) const {
    handler_calls.fetch_add(1, std::memory_order_relaxed);
    if (rows == 0) return ffi::Error::Success();
    constexpr int W = vec_width<Out, T>();
    const int grid = static_cast<int>(std::min<int64_t>(rows, int64_t{1} << 20));
    if (whole_vectors<W>(cols, io.x, io.residual, io.weight, io.r_out, io.out))
      norm_row_kernel<W><<<grid, fused_threads(cols / W, kNormCache), 0, stream>>>(io, rows, cols);
    else
      norm_row_kernel<1><<<grid, fused_threads(cols, kNormCache), 0, stream>>>(io, rows, cols);
    return launch_error();
  }

  template <class T, class G>
  ffi::Error norm_grad_rows(const NormGradRows<T, G>& io, int64_t rows, int64_t cols) const {
    handler_calls.fetch_add(1, std::memory_order_relaxed);
    if (cols == 0) return ffi::Error::Success();
    constexpr int W = vec_width<T>();
    if (rows > 0) {
      const bool whole = whole_vectors<W>(cols, io.g, io.r, io.weight, io.g_residual, io.dx);
      if (auto err = whole ? launch_norm_grad<W>(io, rows, cols) : launch_norm_grad<1>(io, rows, cols);
          !err.success())
        return err;
    }
    const int64_t groups_of_columns = (cols + kSumColumns - 1) / kSumColumns;
    dw_sum_kernel<<<static_cast<int>(groups_of_columns), kSumColumns * NormGradRows<T, G>::kDwSlices, 0, stream>>>(
        io, cols);
    return launch_error();
  }

  template <int W, class T, class G>
  ffi::Error launch_norm_grad(const NormGradRows<T, G>& io, int64_t rows, int64_t cols) const {
    const int64_t nvec = cols / W;
    // a block works through its group's rows one after another: at least four warps a block
    const int threads = fused_threads(nvec, kGradCache, 128);
    const int64_t streamed = std::max<int64_t>(0, nvec - int64_t{kGradCache} * threads);
    const size_t smem = static_cast<size_t>(streamed) * W * sizeof(math_t<T>);
    const auto kernel = norm_grad_kernel<W, T, G>;
    if (smem > 48 * 1024 && cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 static_cast<int>(smem)) != cudaSuccess) {
      cudaGetLastError();
      return ffi::Error::InvalidArgument("baracuda rms_norm_fake_quantize_per_token_grad: rows of " +
                                         std::to_string(cols) + " values are too long for this GPU's shared memory");
    }
    kernel<<<static_cast<int>(io.groups), threads, smem, stream>>>(io, rows, cols);
    return launch_error();
  }

  template <class Op, class Out, class M, class... In>
  ffi::Error reduce_rows(const Op& op, int64_t rows, int64_t cols, Out* out, M* sums, const In*... in) const {
    handler_calls.fetch_add(1, std::memory_order_relaxed);
    if (rows == 0) return ffi::Error::Success();
    constexpr int W = vec_width<Out, In...>();
    const int grid = static_cast<int>(std::min<int64_t>(rows, int64_t{1} << 20));
    const auto threads = [&](int64_t nvec) { return row_threads(nvec, vectors_per_thread(rows * nvec, 4)); };
    if (vector_aligned<W>(out, in...)) {
      reduce_row_kernel<W><<<grid, threads(cols / W), 0, stream>>>(op, rows, cols, out, sums, in...);
    } else {
      reduce_row_kernel<1><<<grid, threads(cols), 0, stream>>>(op, rows, cols, out, sums, in...);
    }
    return launch_error();
  }

  // Vectors per thread for a launch over `vectors`: up to `most` (several loads in flight), but
  // no more than keeps every thread slot of the GPU busy. Small shapes are bound by the latency
  // of one pass, not by bandwidth, and finish sooner spread over more threads.
  static int vectors_per_thread(int64_t vectors, int most) {
    int dev = 0, sms = 0, threads_per_sm = 0;
    if (cudaGetDevice(&dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
        cudaDeviceGetAttribute(&threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, dev) != cudaSuccess) {
      cudaGetLastError();  // not fatal: the launch works with any count
      return most;
    }
    const int64_t slots = int64_t{sms} * threads_per_sm;
    return static_cast<int>(std::clamp<int64_t>((vectors + slots - 1) / slots, 1, most));
  }

  // Threads for a block that owns a row of `nvec` vectors, about `per_thread` vectors each.
  static int row_threads(int64_t nvec, int per_thread) {
    return static_cast<int>(
        std::min<int64_t>(kMaxThreads, std::max<int64_t>(32, (nvec / per_thread + 31) / 32 * 32)));
  }

  static ffi::Error launch_error() {
    if (cudaError_t err = cudaGetLastError(); err != cudaSuccess)
      return ffi::Error::Internal(std::string("baracuda: kernel launch failed: ") + cudaGetErrorString(err));
    return ffi::Error::Success();
  }
};

auto stream() { return ffi::Ffi::Bind().Ctx<ffi::PlatformStream<cudaStream_t>>(); }

}  // namespace
}  // namespace baracuda

// Host-side entries into the handlers (scaled_matmul.cu's too): a command buffer replays the
// kernels without them, which is how the tests see that XLA captured the custom call.
std::atomic<int64_t> baracuda::handler_calls{0};

int64_t baracuda_cuda_handler_calls() { return baracuda::handler_calls.load(); }

using namespace baracuda;
// No allocation and no host sync inside: safe to capture in a CUDA graph.
#define BJ_OP(name, body, bind)                                                   \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name##_cuda, body<CudaExec>, bind(stream()), \
                                {ffi::Traits::kCmdBufferCompatible});
#include "ops.def"
#undef BJ_OP
