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
#include "handlers.h"

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

template <class... Ts> constexpr int max_size() { return std::max({int(sizeof(Ts))...}); }

// Elements per vector: the widest operand moves 16 bytes at a time.
template <class Out, class... In> constexpr int vec_width() { return 16 / max_size<Out, In...>(); }

template <int W, class Op, class P, class Out, class... In>
__device__ __forceinline__ void apply_vec(const Op& op, const P& p, Out* out, const Vec<In, W>&... v) {
  Vec<Out, W> r;
#pragma unroll
  for (int k = 0; k < W; ++k) r.v[k] = op(p, v.v[k]...);
  store_vec<W>(out, r);
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

  // Calls f(index) for the unaligned elements that lane c (< W) owns: one of the head, one of the tail.
  template <class F>
  __device__ void ends(int64_t cols, int64_t c, F f) const {
    if (c < head) f(base + c);
    if (c < W && head + nvec * W + c < cols) f(base + head + nvec * W + c);
  }
};

// grid-stride over tiles; a tile is (row, chunk of kThreads * per_thread vectors),
// per_thread <= U.
template <int W, int U, class Op, class Out, class... In>
__global__ void __launch_bounds__(kThreads)
row_map_kernel(Op op, int64_t cols, int64_t chunks, int64_t tiles, int per_thread, Out* __restrict__ out,
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
    if (chunk == 0) span.ends(cols, threadIdx.x, [&](int64_t i) { out[i] = op(p, in[i]...); });
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int64_t v = v0 + u * kThreads;
      if (u < per_thread && v < nvec)
        cuda::std::apply([&](const auto&... x) { apply_vec<W>(op, p, out + body + v * W, x...); }, buf[u]);
    }
  }
}

// ---- dynamic ops: one block per row ----------------------------------------
// The block reads its row once into registers (up to kCache vectors a thread),
// reduces the range, derives the row's scale and zero point, then quantizes
// from registers. A row longer than kMaxThreads * kCache vectors (64 KiB:
// 32768 bf16, 16384 f32 or 8192 f64 values) streams its remainder from memory
// a second time.
constexpr int kMaxThreads = 512;
constexpr int kCache = 8;

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

template <int W, class Op, class Out, class T, class M>
__global__ void __launch_bounds__(kMaxThreads)
dynamic_row_kernel(Op op, int64_t rows, int64_t cols, Out* __restrict__ out, const T* __restrict__ x,
                   M* __restrict__ scale, int32_t* __restrict__ zp) {
  __shared__ RowRange<M> partial[kMaxThreads / 32];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const RowSpan<W> span(row, cols);
    const int64_t nvec = span.nvec, body = span.body;
    const int64_t streamed = int64_t{kCache} * blockDim.x;  // vectors past this are read twice

    RowRange<M> range;
    Vec<T, W> cache[kCache];
#pragma unroll
    for (int c = 0; c < kCache; ++c) {
      const int64_t v = threadIdx.x + c * int64_t{blockDim.x};
      if (v < nvec) cache[c] = load_vec<W>(x + body + v * W);
    }
#pragma unroll
    for (int c = 0; c < kCache; ++c) {
      if (threadIdx.x + c * int64_t{blockDim.x} < nvec) {
#pragma unroll
        for (int k = 0; k < W; ++k) range.add(to_math(cache[c].v[k]));
      }
    }
    for (int64_t v = streamed + threadIdx.x; v < nvec; v += blockDim.x) {
      const auto vec = load_vec<W>(x + body + v * W);
#pragma unroll
      for (int k = 0; k < W; ++k) range.add(to_math(vec.v[k]));
    }
    span.ends(cols, threadIdx.x, [&](int64_t i) { range.add(to_math(x[i])); });

    const auto p = op.params(block_reduce(range, partial));
    if (threadIdx.x == 0) {
      scale[row] = p.scale;
      zp[row] = static_cast<int32_t>(p.zp);
    }
#pragma unroll
    for (int c = 0; c < kCache; ++c) {
      const int64_t v = threadIdx.x + c * int64_t{blockDim.x};
      if (v < nvec) apply_vec<W>(op, p, out + body + v * W, cache[c]);
    }
    for (int64_t v = streamed + threadIdx.x; v < nvec; v += blockDim.x)
      apply_vec<W>(op, p, out + body + v * W, load_vec<W>(x + body + v * W));
    span.ends(cols, threadIdx.x, [&](int64_t i) { out[i] = op(p, x[i]); });
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
template <int W, class... Ts>
bool vector_aligned(const Ts*... ptrs) {
  return ((reinterpret_cast<uintptr_t>(ptrs) % (W * sizeof(Ts)) == 0) && ...);
}

// Host-side entries into the handlers: a command buffer replays the kernels
// without them, which is how the tests see that XLA captured the custom call.
std::atomic<int64_t> handler_calls{0};

struct CudaExec {
  cudaStream_t stream;
  CudaExec(cudaStream_t s) : stream(s) {}

  template <int W, class Op, class Out, class... In>
  ffi::Error launch(const Op& op, int64_t rows, int64_t cols, Out* out, const In*... in) const {
    const int64_t nvec = cols / W;  // the most whole vectors any row holds
    const int per_thread = vectors_per_thread(rows * nvec, kUnroll);
    const int64_t chunk = int64_t{kThreads} * per_thread;
    const int64_t chunks = std::max<int64_t>(1, (nvec + chunk - 1) / chunk);
    const int64_t tiles = rows * chunks;
    const int grid = static_cast<int>(std::min<int64_t>(tiles, int64_t{1} << 20));
    // One vector a thread gets its own kernel, 40 % of the four-vector one's instructions:
    // small shapes are bound by the length of each thread's instruction stream.
    const auto kernel =
        per_thread == 1 ? row_map_kernel<W, 1, Op, Out, In...> : row_map_kernel<W, kUnroll, Op, Out, In...>;
    kernel<<<grid, kThreads, 0, stream>>>(op, cols, chunks, tiles, per_thread, out, in...);
    return launch_error();
  }

  template <class Op, class Out, class... In>
  ffi::Error map_rows(const Op& op, int64_t rows, int64_t cols, Out* out, const In*... in) const {
    handler_calls.fetch_add(1, std::memory_order_relaxed);
    if (rows == 0 || cols == 0) return ffi::Error::Success();
    constexpr int W = vec_width<Out, In...>();
    // XLA's buffers are aligned; the scalar kernel covers any that are not.
    if (vector_aligned<W>(out, in...))
      return launch<W>(op, rows, cols, out, in...);
    return launch<1>(op, rows, cols, out, in...);
  }

  template <int W, class Op, class Out, class T, class M>
  ffi::Error launch_dynamic(const Op& op, int64_t rows, int64_t cols, Out* out, const T* x, M* scale,
                            int32_t* zp) const {
    // Up to eight vectors a thread: fewer threads per row leave room for more rows per SM, whose
    // loads overlap the others' reductions; rows past kMaxThreads * kCache vectors stream.
    const int64_t nvec = cols / W;
    const int threads = row_threads(nvec, vectors_per_thread(rows * nvec, kCache));
    const int grid = static_cast<int>(std::min<int64_t>(rows, int64_t{1} << 20));
    dynamic_row_kernel<W><<<grid, threads, 0, stream>>>(op, rows, cols, out, x, scale, zp);
    return launch_error();
  }

  template <class Op, class Out, class T, class M>
  ffi::Error dynamic_rows(const Op& op, int64_t rows, int64_t cols, Out* out, const T* x, M* scale,
                          int32_t* zp) const {
    handler_calls.fetch_add(1, std::memory_order_relaxed);
    if (rows == 0) return ffi::Error::Success();
    constexpr int W = vec_width<Out, T>();
    if (vector_aligned<W>(out, x)) return launch_dynamic<W>(op, rows, cols, out, x, scale, zp);
    return launch_dynamic<1>(op, rows, cols, out, x, scale, zp);
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

int64_t baracuda_cuda_handler_calls() { return baracuda::handler_calls.load(); }

using namespace baracuda;
// No allocation and no host sync inside: safe to capture in a CUDA graph.
#define BJ_OP(name, body, bind)                                                   \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name##_cuda, body<CudaExec>, bind(stream()), \
                                {ffi::Traits::kCmdBufferCompatible});
#include "ops.def"
#undef BJ_OP
