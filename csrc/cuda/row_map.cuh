// The row-map kernel: every op that maps elements with per-row parameters and no reduction (the
// static quantize, dequantize, fake-quantize and its gradient, and the SiLU-gated product's static
// forward and its backward), grid-stride over tiles of a row's vectors.
#pragma once

#include <cstdint>
#include <cuda/std/tuple>

#include "cuda/vec.cuh"

namespace baracuda {
namespace {

constexpr int kThreads = 128;
constexpr int kUnroll = 4;  // the most independent vectors in flight per thread

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

}  // namespace
}  // namespace baracuda
