// The numerics contract of the per-token quantizers, written once: the functors
// that the CPU engine and the CUDA kernels both evaluate (baracuda_jax/reference.py
// computes the same bits in jnp; the tests hold the three together), and at the
// end the generic pieces every row engine applies them through (Produced, Split).
//
//   M     = float64 for float64 data, else float32 (the math type)
//   inv   = 1 / M(scale)                       one IEEE division per row
//   v     = M(x) * inv
//   q     = F::saturate(v), stored by F::encode (formats.h):
//             integer: t = round_half_even(v) + M(zp); NaN -> M(zp); clamp to [qmin, qmax]
//             float8:  clamp(v, -fmax, fmax) (NaN stays NaN), one round to nearest even
//                      (a saturating conversion: the hardware's on the GPU)
//   deq   = (M(q) - M(zp)) * M(scale)          then rounded once to the output type
//   ste   = F::passes(v) ? g : 0               integer: qmin <= t <= qmax (NaN -> 0)
//                                              float8: v rounds to a finite value unsaturated
//
// Symmetric ops (no zero point, and every float8 op) skip the `+ zp` and `- zp`
// rather than adding zero, so the sign of a zero survives (fake_quantize(-0.25)
// = -0.0): that is also what XLA computes, since it folds x + 0 away. The scale
// arrives already converted to M (the Python layer does it with an XLA convert,
// which rounds exactly as a C++ cast would).
#pragma once

#include "contract/formats.h"

namespace baracuda {

// Per-row constants, computed once per row (and once per CUDA tile).
template <class M>
struct RowParams {
  M scale, inv, zp;
};

// The parameters every op shares: per-row scale/zero point and the grid.
template <class M>
struct QParams {
  using math = M;
  static constexpr bool kDynamic = false;  // the row parameters come from `scale`, not the row's range
  const M* scale;             // static ops: one per row
  const int32_t* zero_point;  // static ops: one per row, or nullptr
  bool has_zp;                // false: symmetric, no zero-point add or subtract
  M qmin, qmax;               // the integer grid (a float8 format's is fixed: -fmax, fmax)

  BJ_HD RowParams<M> row(int64_t r) const {
    const M s = scale[r];
    return {s, M(1) / s, has_zp ? M(zero_point[r]) : M(0)};
  }
  // q - zp: the value measured from the zero point.
  BJ_HD M centered(const RowParams<M>& p, M q) const { return q - (has_zp ? p.zp : M(0)); }  // q - 0 is q
  BJ_HD M clamp(M t) const { return t < qmin ? qmin : (t > qmax ? qmax : t); }
};

// x -> q, in format F.
template <class T, class F>
struct QuantizeOp : QParams<math_t<T>> {
  BJ_HD typename F::storage operator()(const RowParams<math_t<T>>& p, T x) const {
    return F::encode(F::saturate(*this, p, to_math(x) * p.inv));
  }
};

// q -> y. Here M follows the output type.
template <class F, class T>
struct DequantizeOp : QParams<math_t<T>> {
  BJ_HD T operator()(const RowParams<math_t<T>>& p, typename F::storage q) const {
    using M = math_t<T>;
    return From<T>::math(this->centered(p, M(F::decode(q))) * p.scale);
  }
};

// x -> dequantize(quantize(x)), with no round trip through memory. G: a format's grid.
template <class T, class G>
struct FakeQuantizeOp : QParams<math_t<T>> {
  BJ_HD T operator()(const RowParams<math_t<T>>& p, T x) const {
    const auto q = G::round(G::saturate(*this, p, to_math(x) * p.inv));
    return From<T>::math(this->centered(p, q) * p.scale);
  }
};

// (g, x) -> dx: the straight-through estimator, mask recomputed from x.
template <class T, class G>
struct FakeQuantizeGradOp : QParams<math_t<T>> {
  BJ_HD T operator()(const RowParams<math_t<T>>& p, T g, T x) const {
    return G::passes(*this, p, to_math(x) * p.inv) ? g : From<T>::math(0);
  }
};

// (g, x) -> dx, and this element's term of the learned-scale gradient (LSQ,
// Esser et al. 2019; torch's _fake_quantize_learnable_per_channel_affine), with
// v = x * inv and q the stored value:
//   ds += g * (passes ? (q - zp) - v : q - zp)     (integer inside: round_half_even(v) - v)
// A NaN x adds nothing (its dx is 0 too). The sum is kept in M.
template <class T, class G>
struct LsqGradOp : QParams<math_t<T>> {
  using M = math_t<T>;
  BJ_HD T operator()(const RowParams<M>& p, T g, T x, M& ds) const {
    const M v = to_math(x) * p.inv;
    const M q = this->centered(p, G::round(G::saturate(*this, p, v)));
    const bool passes = G::passes(*this, p, v);
    const M term = passes ? q - v : q == q ? q : M(0);
    ds += to_math(g) * term;
    return passes ? g : From<T>::math(0);
  }
};

// ---- dynamic ops: each row's scale and zero point come from its range -------
//
//   lo, hi   = min(0, min x), max(0, max x)    NaN ignored
//   symmetric:         scale = max(min(max(-lo, hi), scale_ub) * (1 / qmax), min_scale)
//                      (float8: qmax = fmax; min_scale 0 for none, vLLM's fp8 floor: 1 / (448 * 512))
//   asymmetric:        scale = (hi - lo) * (1 / (qmax - qmin))
//                      zp    = clamp(qmin - round_half_even(lo * (1/scale)))   NaN -> qmin
//   scale = 1 where the product is 0 (an all-zero row), so such rows give q = zp
//   and dequantize to exact zeros. A row holding +-inf gets scale = inf: every
//   q is the zero point and dequantizes to NaN.
//   pow2_scale (symmetric only): scale = pow2_ceil(scale), the power of two at or
//   above it (UE8M0-style scales, whose reciprocal is exact); inf stays inf.

BJ_HD float nan_ignoring_min(float a, float b) { return fminf(a, b); }
BJ_HD float nan_ignoring_max(float a, float b) { return fmaxf(a, b); }
BJ_HD double nan_ignoring_min(double a, double b) { return fmin(a, b); }
BJ_HD double nan_ignoring_max(double a, double b) { return fmax(a, b); }

template <class M>
struct RowSum {
  M sum = 0;
  BJ_HD void merge(const RowSum& o) { sum += o.sum; }
};

template <class M>
struct RowRange {
  M lo = 0, hi = 0;  // starting at 0 widens the range to include 0
  BJ_HD void add(M x) {
    lo = nan_ignoring_min(lo, x);
    hi = nan_ignoring_max(hi, x);
  }
  BJ_HD void merge(const RowRange& o) {
    lo = nan_ignoring_min(lo, o.lo);
    hi = nan_ignoring_max(hi, o.hi);
  }
};

// 2^ceil(log2 s) for s > 0, by its bits (so XLA:CPU's flushed subnormals cannot
// change it): a power of two stays, a normal s moves to the next binade (past the
// largest, to inf), a subnormal to the next power of two above it; inf stays.
template <class M>
BJ_HD M pow2_ceil(M s) {
  using U = typename FloatBits<M>::uint;
  constexpr U kMan = (U(1) << FloatBits<M>::kMan) - 1;
  constexpr U kInf = ((U(1) << (8 * sizeof(U) - 1)) - 1) & ~kMan;  // the exponent bits of inf and NaN
  const U u = bit_cast<U>(s), man = u & kMan, exp = u & ~kMan;
  if (man == 0 || exp == kInf) return s;
  if (exp != 0) return bit_cast<M>(exp + kMan + 1);
  U p = 1;
  while (p < man) p <<= 1;
  return bit_cast<M>(p);
}

// QuantizeOp or FakeQuantizeOp whose row parameters come from the row's range.
template <class Base>
struct Dynamic : Base {
  using M = typename Base::math;
  static constexpr bool kDynamic = true;
  M scale_ub;  // the symmetric ops' bound on the row's amax (vLLM's scale_ub); +inf for none
  M min_scale = 0;  // the symmetric ops' floor on the scale (vLLM's min_scaling_factor); 0 for none
  bool pow2_scale = false;  // round the scale up to a power of two

  BJ_HD RowParams<M> params(const RowRange<M>& r) const {
    const M qmin = this->qmin, qmax = this->qmax;
    const M amax = nan_ignoring_min(nan_ignoring_max(-r.lo, r.hi), scale_ub);
    // the floor applies where vLLM applies it: to amax / qmax, before the rules below
    M s = this->has_zp ? (r.hi - r.lo) * (M(1) / (qmax - qmin)) : nan_ignoring_max(amax * (M(1) / qmax), min_scale);
    if (s == 0) s = 1;
    if (pow2_scale) s = pow2_ceil(s);
    const M inv = M(1) / s;
    M zp = 0;
    if (this->has_zp) {
      zp = qmin - round_half_even(r.lo * inv);
      zp = zp != zp ? qmin : this->clamp(zp);
    }
    return {s, inv, zp};
  }
};

// ---- what the row engines apply: an op fed by a producer, and two outputs ----

template <class T> struct Pair { T first, second; };  // an op's two outputs

// Where a Pair-valued op writes: two outputs, moved together.
template <class T> struct Split {
  T *first, *second;
  BJ_HD Split operator+(int64_t i) const { return {first + i, second + i}; }
};

// The plain ops' producer: h = x.
struct Identity {
  template <class T> BJ_HD static T value(T x) { return x; }
};

// A quantizer (QuantizeOp, FakeQuantizeOp, or Dynamic of one) fed by a producer of h: the row
// engines take h = value(inputs...) and apply quantize(p, h).
template <class Base, class Source>
struct Produced : Base {
  using M = typename Base::math;
  template <class... In> BJ_HD static auto value(In... in) { return Source::value(in...); }
  template <class T> BJ_HD auto quantize(const RowParams<M>& p, T h) const { return Base::operator()(p, h); }
  template <class... In>
  BJ_HD auto operator()(const RowParams<M>& p, In... in) const {
    return quantize(p, value(in...));
  }
};

}  // namespace baracuda
