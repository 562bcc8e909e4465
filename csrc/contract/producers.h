// The fused producers' contract: the value h that a per-token quantizer of
// numerics.h receives when the op also computes what feeds it, and the
// backward through that producer. T is float16, bfloat16 or float32; M = float.
//
// RMSNorm with a residual add:
//   r       = T(M(x) + M(residual))            the new residual stream (x itself without one)
//   ss      = sum over the row of M(r)^2, in a fixed order per backend (run to run the same)
//   inv_rms = 1 / sqrt(ss * (1/D) + eps)       IEEE sqrt and division (XLA turns a mean's
//                                              division into this multiply)
//   h       = T(M(r) * inv_rms * M(w))
// SiLU-gated product, with s = 1 / (1 + exp(-M(a))) (exp: platform_exp below; one division):
//   h       = T(M(a) * s * M(b))
//
// Backward, with dh = the quantizer's straight-through mask of h ? g : 0 (numerics.h):
//   norm:  n = M(r) * inv_rms, dn = dh * M(w), c = sum over the row of dn * n, in a fixed order
//          dr = inv_rms * (dn - n * (c * (1/D))) + M(g_residual)   -> dx and d(residual)
//          dw = sum over the rows of dh * n: in row order within each of G groups of rows, then
//               in group order within each of kDwSlices slices of groups, then the slices in order
//   silu:  da = dh * M(b) * (s * (1 + a * (1 - s))),  db = dh * (a * s)
#pragma once

#include "contract/numerics.h"

namespace baracuda {

BJ_HD float ieee_sqrt(float v) { return sqrtf(v); }
// e^v on the CPU without a libm call, so that the row loops vectorize: Cody-Waite reduction
// v = n ln2 + r, |r| <= ln2/2, Cephes' degree-6 polynomial for e^r, then 2^n in two exact halves
// (so that results down to the subnormals round once). Selects, no branches. Checked against a
// double-precision exp over all 2^32 floats: within 0.99 ulp, inf, 0 and NaN where expf gives them.
BJ_HD float host_exp(float v) {
  const float x = v < -104.0f ? -104.0f : (v > 89.0f ? 89.0f : v);  // beyond: 0 and inf anyway
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round(x / ln2)
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float e = p * r * r + r + 1.0f;
  const int ni = static_cast<int>(n), half = ni / 2;
  const float scaled = e * pow2<float>(half) * pow2<float>(ni - half);
  return v != v ? v : scaled;
}

// CUDA's expf on the GPU; host_exp on the CPU.
BJ_HD float platform_exp(float v) {
#ifdef __CUDA_ARCH__
  return expf(v);
#else
  return host_exp(v);
#endif
}

template <class T>
struct RmsNorm {
  using M = math_t<T>;
  M eps, inv_cols;  // eps, 1/D

  BJ_HD static T residual(T x, T res) { return From<T>::math(to_math(x) + to_math(res)); }
  BJ_HD static M square(T r) {
    const M v = to_math(r);
    return v * v;
  }
  BJ_HD M inv_rms(M ss) const { return M(1) / ieee_sqrt(ss * inv_cols + eps); }
  BJ_HD static T normed(T r, M inv, T w) { return From<T>::math(to_math(r) * inv * to_math(w)); }
};

// The norm backward's element terms: row_term (to c) and column_term (to dw) before the row's c
// is known; then dr.
template <class T>
struct RmsNormGrad {
  using M = math_t<T>;
  M inv_cols;

  struct Terms { M n, dn; };
  BJ_HD static Terms terms(M dh, T r, M inv, T w) { return {to_math(r) * inv, dh * to_math(w)}; }
  BJ_HD M mean(M c) const { return c * inv_cols; }
  BJ_HD static T dr(const Terms& t, M inv, M mean_c, M g_residual) {
    return From<T>::math(inv * (t.dn - t.n * mean_c) + g_residual);
  }
};

template <class T>
struct SiluMul {
  using M = math_t<T>;
  BJ_HD static M sigmoid(M v) { return M(1) / (M(1) + platform_exp(-v)); }
  BJ_HD static T product(M v, M s, T b) { return From<T>::math(v * s * to_math(b)); }
  BJ_HD static T value(T a, T b) {
    const M v = to_math(a);
    return product(v, sigmoid(v), b);
  }
  // dh -> (da, db), with v = M(a) and s = sigmoid(v)
  BJ_HD static Pair<T> grad(M dh, M v, M s, T b) {
    return {From<T>::math(dh * to_math(b) * (s * (M(1) + v * (M(1) - s)))), From<T>::math(dh * (v * s))};
  }
};

// ---- what the fused engines receive (ffi/fused.h documents the engine calls) ----

// The forward of RMSNorm -> quantizer Q (QuantizeOp/FakeQuantizeOp read a per-row scale; a
// Dynamic one derives it). [N, D]: x, residual and r_out (both null without a residual), out;
// [D]: weight; [N]: scale_out (the row's scale, written) and inv_rms (written).
template <class T, class Q, class Out>
struct NormQuantizeRows {
  using M = math_t<T>;
  RmsNorm<T> norm;
  Q quant;
  const T *x, *residual, *weight;
  T* r_out;
  Out* out;
  M *scale_out, *inv_rms;
};

// The backward of RMSNorm -> fake-quantizer over grid G. [N, D]: g, r, dx, g_residual (or null);
// [D]: weight, dw; [N]: the forward's scale and inv_rms; [groups, D]: each group of rows' dw.
// Group k holds rows [k * R, (k + 1) * R), R = ceil(N / groups).
template <class T, class G>
struct NormGradRows {
  using M = math_t<T>;
  RmsNormGrad<T> grad;
  FakeQuantizeGradOp<T, G> mask;  // holds the forward's scale
  const T *g, *r, *weight, *g_residual;
  const M* inv_rms;
  T *dx, *dw;
  M* dw_groups;
  int64_t groups;

  static constexpr int kDwSlices = 8;
  BJ_HD int64_t rows_per_group(int64_t rows) const { return (rows + groups - 1) / groups; }
  BJ_HD int64_t groups_per_slice() const { return (groups + kDwSlices - 1) / kDwSlices; }
  // dh of one element: the upstream gradient where h's quantization did not saturate.
  BJ_HD M dh(const RowParams<M>& p, T g_, T h) const { return to_math(mask(p, g_, h)); }
};

// The silu backward: (g, a, b) -> (da, db), the mask recomputed from h (one exp, one division).
template <class T, class G>
struct SiluMulGradOp : QParams<math_t<T>> {
  using M = math_t<T>;
  BJ_HD Pair<T> operator()(const RowParams<M>& p, T g, T a, T b) const {
    const M v = to_math(a), s = SiluMul<T>::sigmoid(v);
    const T h = SiluMul<T>::product(v, s, b);
    const M dh = G::passes(*this, p, to_math(h) * p.inv) ? to_math(g) : M(0);
    return SiluMul<T>::grad(dh, v, s, b);
  }
};

}  // namespace baracuda
