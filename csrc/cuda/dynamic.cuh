// The dynamic quantizers' kernels: each row's scale (and zero point) from its range, in one pass
// over the row held in registers. dynamic_row_kernel takes any row length; short_row_kernel the
// short rows of whole vectors (a per-token group of 128), several rows a thread.
#pragma once

#include <cstdint>

#include "cuda/pdl.cuh"
#include "cuda/reduce.cuh"
#include "cuda/vec.cuh"

namespace baracuda {
namespace {

// `lanes` threads a row: a row's lanes read it once into registers (up to C vectors a lane),
// reduce the range, derive the row's scale and zero point, then quantize from registers. A long
// row takes a block (up to kMaxThreads lanes); a short one (a per-token group of 128) a power of
// two of at most 32 lanes, so that a block of kShortRowThreads holds many rows and reduces with
// shuffles alone. A row longer than kMaxThreads * C vectors (C = kCache for one input: 64 KiB,
// 32768 bf16 values) streams its remainder from memory a second time.
constexpr int kCache = 8;
constexpr int kDecodeVectors = 2;  // a lane's vectors where the rows are few
constexpr int kShortRowThreads = 256;

template <int W, int C, class Op, class Out, class M, class... In>
__global__ void __launch_bounds__(kMaxThreads)
dynamic_row_kernel(Op op, int64_t rows, int64_t cols, int lanes, Out* __restrict__ out, M* __restrict__ scale,
                   int32_t* __restrict__ zp, const In* __restrict__... in) {
  __shared__ RowRange<M> partial[kMaxThreads / 32];
  let_dependents_start();  // a fused W8A8 op's matmul may start streaming its weight
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
  let_dependents_start();
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

}  // namespace
}  // namespace baracuda
