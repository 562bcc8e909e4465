// The rows-and-columns quantizer's kernels (TransformerEngine's cast-transpose, with a scale per row
// and one per column): x [N, D] read twice, in 2-D tiles that cover the whole GPU at any N and D.
//   ranges_kernel  each tile's per-row and per-column amax, merged into `row_amax` and `col_amax`
//                  (zeroed first) by integer atomicMax on the bits of |x|: a max is exact, so the
//                  merge order changes no bit, and the ordering of non-negative floats is their
//                  bits' (NaN is skipped, as the contract's range ignores it)
//   scales_kernel  each amax into its row's or column's scale, in place
//   values_kernel  each tile quantized twice: by its rows' parameters into q, and by its columns'
//                  into a transposed tile in shared memory, stored as rows of q_t [D, N'] (the
//                  tokens past N as zeros, quantized)
#pragma once

#include <cstdint>

#include "cuda/vec.cuh"

namespace baracuda {
namespace {

constexpr int kRangeThreads = 256, kRangeRows = 128;  // a range tile: kRangeRows x 32 vectors
constexpr int kValueThreads = 256, kValueRows = 128, kValueCols = 64;  // a value tile, in elements

__device__ __forceinline__ void atomic_max_bits(float* at, float v) {
  if (v > 0) atomicMax(reinterpret_cast<unsigned int*>(at), __float_as_uint(v));  // +0 is the start
}

// A warp per row at a time: lane l reads the row's vector l of the tile, so a warp reads 32
// consecutive vectors, and keeps each of its W columns' amax over the warp's rows.
template <int W, class T>
__global__ void __launch_bounds__(kRangeThreads)
ranges_kernel(int64_t rows, int64_t cols, const T* __restrict__ x, float* __restrict__ row_amax,
              float* __restrict__ col_amax) {
  constexpr int kWarps = kRangeThreads / 32;
  __shared__ float partial[kWarps][32 * W];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t col = (int64_t{blockIdx.y} * 32 + lane) * W, row0 = int64_t{blockIdx.x} * kRangeRows;
  const bool whole = col + W <= cols;  // W divides cols when W > 1 (the launch's choice)
  float amax[W] = {};
  for (int64_t r = row0 + warp; r < row0 + kRangeRows && r < rows; r += kWarps) {
    float row_max = 0;
    if (whole) {
      const auto v = load_vec<W>(x + r * cols + col);
#pragma unroll
      for (int k = 0; k < W; ++k) {
        const float a = fabsf(to_math(v.v[k]));  // fmaxf drops a NaN
        amax[k] = fmaxf(amax[k], a);
        row_max = fmaxf(row_max, a);
      }
    }
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2)
      row_max = fmaxf(row_max, __shfl_xor_sync(0xffffffffu, row_max, offset));
    if (lane == 0) atomic_max_bits(row_amax + r, row_max);
  }
#pragma unroll
  for (int k = 0; k < W; ++k) partial[warp][lane * W + k] = amax[k];
  __syncthreads();
  for (int c = threadIdx.x; c < 32 * W; c += kRangeThreads) {
    const int64_t at = int64_t{blockIdx.y} * 32 * W + c;
    if (at >= cols) continue;
    float m = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) m = fmaxf(m, partial[w][c]);
    atomic_max_bits(col_amax + at, m);
  }
}

// amax -> scale, for the rows (the first `rows` values) and then the columns.
template <class Op>
__global__ void scales_kernel(Op op, int64_t count, float* __restrict__ row_scale, int64_t rows,
                              float* __restrict__ col_scale) {
  for (int64_t i = int64_t{blockIdx.x} * blockDim.x + threadIdx.x; i < count; i += int64_t{gridDim.x} * blockDim.x) {
    float* at = i < rows ? row_scale + i : col_scale + (i - rows);
    const float amax = *at;
    *at = op.params(RowRange<float>{-amax, amax}).scale;
  }
}

template <class M>
__device__ __forceinline__ RowParams<M> params_of_scale(M s) {
  return {s, M(1) / s, M(0)};  // as Dynamic::params gives them: inv = 1 / the final scale
}

// One kValueRows x kValueCols tile of x. The threads read it in W-vectors (a tile row's vectors
// by consecutive threads), store each vector's row quantization, and put its column quantization
// in `tile` at [column][token]; the tile's q_t rows then leave as 32-bit words, a warp's 32 words
// one row's 128 tokens.
template <int W, class Op, class Q, class T>
__global__ void __launch_bounds__(kValueThreads)
values_kernel(Op op, int64_t rows, int64_t cols, int64_t padded, const T* __restrict__ x, Q* __restrict__ q,
              const float* __restrict__ row_scale, Q* __restrict__ q_t, const float* __restrict__ col_scale) {
  constexpr int kVecs = kValueCols / W;  // vectors per tile row
  constexpr int kPitch = kValueRows + 4;  // bytes per tile row: words stay aligned, fewer conflicts
  __shared__ RowParams<float> row_p[kValueRows], col_p[kValueCols];
  __shared__ __align__(16) uint8_t tile[kValueCols * kPitch];
  const int64_t row0 = int64_t{blockIdx.x} * kValueRows, col0 = int64_t{blockIdx.y} * kValueCols;
  for (int i = threadIdx.x; i < kValueRows; i += kValueThreads)
    if (row0 + i < rows) row_p[i] = params_of_scale(row_scale[row0 + i]);
  for (int i = threadIdx.x; i < kValueCols; i += kValueThreads)
    if (col0 + i < cols) col_p[i] = params_of_scale(col_scale[col0 + i]);
  __syncthreads();

  for (int i = threadIdx.x; i < kValueRows * kVecs; i += kValueThreads) {
    const int r = i / kVecs, c = i % kVecs * W;
    const int64_t row = row0 + r, col = col0 + c;
    if (row >= padded || col >= cols) continue;
    Vec<T, W> v;
    const bool live = row < rows;
#pragma unroll
    for (int k = 0; k < W; ++k) v.v[k] = From<T>::math(0.0f);  // a padding token
    if (live) v = load_vec<W>(x + row * cols + col);
    if (live) {
      Vec<Q, W> out;
#pragma unroll
      for (int k = 0; k < W; ++k) out.v[k] = op.quantize(row_p[r], v.v[k]);
      store_vec<W>(q + row * cols + col, out);
    }
#pragma unroll
    for (int k = 0; k < W; ++k) tile[(c + k) * kPitch + r] = bit_cast<uint8_t>(op.quantize(col_p[c + k], v.v[k]));
  }
  __syncthreads();

  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const bool words = padded % 4 == 0;  // q_t's rows then start on 4-byte boundaries
  for (int c = warp; c < kValueCols && col0 + c < cols; c += kValueThreads / 32) {
    const int64_t t = row0 + 4 * lane;
    Q* dst = q_t + (col0 + c) * padded + t;
    const uint8_t* src = tile + c * kPitch + 4 * lane;
    if (words && t + 4 <= padded) {
      __stcs(reinterpret_cast<uint32_t*>(dst), *reinterpret_cast<const uint32_t*>(src));
    } else {
      for (int k = 0; k < 4 && t + k < padded; ++k) dst[k] = bit_cast<Q>(src[k]);
    }
  }
}

}  // namespace
}  // namespace baracuda
