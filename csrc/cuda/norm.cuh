// The fused RMSNorm kernels (contract/producers.h): the forward (the residual add, the norm, then
// the quantizer, one block a row), the backward (dx a row, and each group of rows' d(weight), one
// block a group), and the sum of the groups' d(weight) in a fixed order.
//
// A row of whole vectors (W divides D, else W = 1), so that each thread owns the same columns in
// every row: the weight is read at the row's offsets, and the backward keeps its d(weight) terms
// in registers.
#pragma once

#include <cstdint>

#include "contract/producers.h"
#include "cuda/pdl.cuh"
#include "cuda/reduce.cuh"
#include "cuda/vec.cuh"

namespace baracuda {
namespace {

// The forward: one block a row, C vectors a thread held in registers with the weight's (longer
// rows recompute the rest from memory). The weight is loaded with the row, not after its sum: a
// decode row's time is a chain of dependent steps, and this takes one memory round trip off it.
constexpr int kNormCache = 4;  // the most vectors a thread caches
constexpr int kNormVectors = 2;

template <int W, int C, class T, class Q, class Out>
__global__ void __launch_bounds__(kMaxThreads)
norm_row_kernel(NormQuantizeRows<T, Q, Out> io, int64_t rows, int64_t cols) {
  using M = math_t<T>;
  __shared__ RowSum<M> sums[kMaxThreads / 32];
  __shared__ RowRange<M> ranges[kMaxThreads / 32];
  let_dependents_start();  // a fused W8A8 op's matmul may start streaming its weight
  const int64_t nvec = cols / W, cached = int64_t{C} * blockDim.x;
  Vec<T, W> w_cache[C];
#pragma unroll
  for (int c = 0; c < C; ++c) {
    const int64_t v = threadIdx.x + c * int64_t{blockDim.x};
    if (v < nvec) w_cache[c] = load_vec<W>(io.weight + v * W);
  }
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
    Vec<T, W> cache[C];
#pragma unroll
    for (int c = 0; c < C; ++c) {
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
    for (int c = 0; c < C; ++c) {
      const int64_t v = threadIdx.x + c * int64_t{blockDim.x};
      if (v < nvec) first(v, cache[c]);
    }
    for (int64_t v = cached + threadIdx.x; v < nvec; v += blockDim.x) first(v, r_vec(v));
    const M inv = io.norm.inv_rms(block_reduce(ss, sums).sum);

    const auto h_vec = [&](const Vec<T, W>& r, const Vec<T, W>& w) {
      Vec<T, W> h;
#pragma unroll
      for (int k = 0; k < W; ++k) h.v[k] = RmsNorm<T>::normed(r.v[k], inv, w.v[k]);
      return h;
    };
    // The cached vectors' r becomes their h, once for the two passes below: a decode row's time is
    // the length of each thread's instruction stream.
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const int64_t v = threadIdx.x + c * int64_t{blockDim.x};
      if (v < nvec) cache[c] = h_vec(cache[c], w_cache[c]);
    }
    // f(v, h) for each of this thread's vectors of h, from the cache or recomputed.
    const auto each_h = [&](auto&& f) {
#pragma unroll
      for (int c = 0; c < C; ++c) {
        const int64_t v = threadIdx.x + c * int64_t{blockDim.x};
        if (v < nvec) f(v, cache[c]);
      }
      for (int64_t v = cached + threadIdx.x; v < nvec; v += blockDim.x)
        f(v, h_vec(r_vec(v), load_vec<W>(io.weight + v * W)));
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

// The norm backward over one group of rows a block (contract/producers.h): dx a row, and the group's
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
      if (v < nvec)
        terms(v, gc[c], rc[c], [&](int k, M dh, const auto& t) {
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

// dw = the groups' sums added in slices (contract/producers.h): thread (column, slice) adds its slice's
// groups in order, then the slices are added in order.
constexpr int kSumColumns = 32;

// (clang-format would read the bound's `*` as a pointer's.)
// clang-format off
template <class T, class G>
__global__ void __launch_bounds__(kSumColumns * NormGradRows<T, G>::kDwSlices)
dw_sum_kernel(NormGradRows<T, G> io, int64_t cols) {
  // clang-format on
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

}  // namespace
}  // namespace baracuda
