// Row reductions in a fixed order: a RowRange or RowSum merged over a row's lanes (shuffles) or
// its block (shuffles, then the warps in order), so that a sum comes out the same on every run;
// and the reduce-row kernel, which maps a row while summing each element's term (the LSQ
// backward's scale gradient).
#pragma once

#include <cstdint>
#include <cuda/std/tuple>

#include "cuda/vec.cuh"

namespace baracuda {
namespace {

constexpr int kMaxThreads = 512;  // the most threads of a block that owns whole rows

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

}  // namespace
}  // namespace baracuda
