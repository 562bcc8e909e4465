// The numerics contract, written once. The CPU handlers and the CUDA kernels
// both evaluate these functors, and baracuda_jax/reference.py computes the same
// bits in jnp; the tests hold the three together.
//
//   M     = float64 for float64 data, else float32 (the math type)
//   inv   = 1 / M(scale)                       one IEEE division per row
//   t     = round_half_even(M(x) * inv) + M(zp)
//   t     = isnan(t) ? M(zp) : t               NaN never reaches a float->int cast
//   q     = t < qmin ? qmin : t > qmax ? qmax : t     (+inf -> qmax, -inf -> qmin)
//   deq   = (M(q) - M(zp)) * M(scale)          then rounded once to the output type
//   ste   = qmin <= t <= qmax ? g : 0          inclusive, after rounding (NaN -> 0)
//
// Symmetric ops (no zero point) skip the `+ zp` and `- zp` rather than adding
// zero, so the sign of a zero survives (fake_quantize(-0.25) = -0.0): that is
// also what XLA computes, since it folds x + 0 away. The scale arrives already
// converted to M (the Python layer does it with an XLA convert, which rounds
// exactly as a C++ cast would).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define BJ_HD __host__ __device__ __forceinline__
#else
#define BJ_HD inline
#endif

namespace baracuda {

// Storage-only 16-bit floats: the same layout on host and device. Under nvcc
// the conversions use cuda_fp16/cuda_bf16 (IEEE round to nearest even on host
// and device); g++ uses _Float16 and an integer bf16 rounding. Only NaN payload
// bits may differ between the two.
struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };

template <class T> struct MathOf { using type = float; };
template <> struct MathOf<double> { using type = double; };
template <class T> using math_t = typename MathOf<T>::type;

template <class To, class From>
BJ_HD To bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast size mismatch");
  To to;
  memcpy(&to, &from, sizeof(To));
  return to;
}

// ---- conversions to the math type (all exact) ------------------------------
BJ_HD float to_math(float v) { return v; }
BJ_HD double to_math(double v) { return v; }
BJ_HD float to_math(bf16 v) { return bit_cast<float>(uint32_t(v.bits) << 16); }
BJ_HD float to_math(f16 v) {
#if defined(__CUDACC__)
  return __half2float(__ushort_as_half(v.bits));
#else
  return float(bit_cast<_Float16>(v.bits));
#endif
}
BJ_HD float to_math(int8_t v) { return float(v); }
BJ_HD float to_math(uint8_t v) { return float(v); }

// ---- rounding from the math type (round to nearest even, like XLA's convert)
template <class T> struct From;
template <> struct From<float> { BJ_HD static float math(float v) { return v; } };
template <> struct From<double> { BJ_HD static double math(double v) { return v; } };
template <> struct From<bf16> {
  BJ_HD static bf16 math(float v) {
#if defined(__CUDACC__)
    return {__bfloat16_as_ushort(__float2bfloat16_rn(v))};
#else
    const uint32_t u = bit_cast<uint32_t>(v);
    if (std::isnan(v)) return {uint16_t((u >> 16) | 0x0040u)};  // stay quiet
    return {uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16)};
#endif
  }
};
template <> struct From<f16> {
  BJ_HD static f16 math(float v) {
#if defined(__CUDACC__)
    return {__half_as_ushort(__float2half_rn(v))};
#else
    return {bit_cast<uint16_t>(static_cast<_Float16>(v))};
#endif
  }
};
// q is integral and already clamped into the integer type's range: exact.
template <> struct From<int8_t> { BJ_HD static int8_t math(float v) { return int8_t(v); } BJ_HD static int8_t math(double v) { return int8_t(v); } };
template <> struct From<uint8_t> { BJ_HD static uint8_t math(float v) { return uint8_t(v); } BJ_HD static uint8_t math(double v) { return uint8_t(v); } };

BJ_HD float round_half_even(float v) { return rintf(v); }
BJ_HD double round_half_even(double v) { return rint(v); }

// Per-row constants, computed once per row (and once per CUDA tile).
template <class M>
struct RowParams {
  M scale, inv, zp;
};

// The parameters every op shares: per-row scale/zero point and the grid.
template <class M>
struct QParams {
  const M* scale;             // static ops: one per row
  const int32_t* zero_point;  // static ops: one per row, or nullptr
  bool has_zp;                // false: symmetric, no zero-point add or subtract
  M qmin, qmax;

  BJ_HD RowParams<M> row(int64_t r) const {
    const M s = scale[r];
    return {s, M(1) / s, has_zp ? M(zero_point[r]) : M(0)};
  }
  // round_half_even(x * inv) + zp: the value that is clamped and masked.
  BJ_HD M shifted(const RowParams<M>& p, M x) const {
    const M r = round_half_even(x * p.inv);
    return has_zp ? r + p.zp : r;
  }
  // q - zp: the integer value measured from the zero point.
  BJ_HD M centered(const RowParams<M>& p, M q) const { return has_zp ? q - p.zp : q; }
  BJ_HD M clamp(M t) const { return t < qmin ? qmin : (t > qmax ? qmax : t); }
  BJ_HD M quantize(const RowParams<M>& p, M x) const {
    M t = shifted(p, x);
    if (t != t) t = p.zp;
    return clamp(t);
  }
};

// x -> q
template <class T, class Q>
struct QuantizeOp : QParams<math_t<T>> {
  BJ_HD Q operator()(const RowParams<math_t<T>>& p, T x) const {
    return From<Q>::math(this->quantize(p, to_math(x)));
  }
};

// q -> y. Here M follows the output type.
template <class Q, class T>
struct DequantizeOp : QParams<math_t<T>> {
  BJ_HD T operator()(const RowParams<math_t<T>>& p, Q q) const {
    using M = math_t<T>;
    return From<T>::math(this->centered(p, M(to_math(q))) * p.scale);
  }
};

// x -> dequantize(quantize(x)), with no integer round trip through memory.
template <class T>
struct FakeQuantizeOp : QParams<math_t<T>> {
  BJ_HD T operator()(const RowParams<math_t<T>>& p, T x) const {
    return From<T>::math(this->centered(p, this->quantize(p, to_math(x))) * p.scale);
  }
};

// (g, x) -> dx: the straight-through estimator, mask recomputed from x.
template <class T>
struct FakeQuantizeGradOp : QParams<math_t<T>> {
  BJ_HD T operator()(const RowParams<math_t<T>>& p, T g, T x) const {
    const auto t = this->shifted(p, to_math(x));
    return (t >= this->qmin && t <= this->qmax) ? g : From<T>::math(0);
  }
};

// (g, x) -> dx, and this element's term of the learned-scale gradient (LSQ,
// Esser et al. 2019; torch's _fake_quantize_learnable_per_channel_affine), with
// v = x * inv and r = round_half_even(v):
//   ds += g * (t < qmin ? qmin - zp : t > qmax ? qmax - zp : r - v)
// A NaN x adds nothing (its dx is 0 too). The sum is kept in M.
template <class T>
struct LsqGradOp : QParams<math_t<T>> {
  using M = math_t<T>;
  BJ_HD T operator()(const RowParams<M>& p, T g, T x, M& ds) const {
    const M v = to_math(x) * p.inv;
    const M r = round_half_even(v);
    const M t = this->has_zp ? r + p.zp : r;
    const M term = t < this->qmin ? this->centered(p, this->qmin)
                 : t > this->qmax ? this->centered(p, this->qmax)
                 : t == t ? r - v : M(0);
    ds += to_math(g) * term;
    return (t >= this->qmin && t <= this->qmax) ? g : From<T>::math(0);
  }
};

// ---- dynamic ops: each row's scale and zero point come from its range -------
//
//   lo, hi   = min(0, min x), max(0, max x)    NaN ignored
//   symmetric (int8):  scale = max(-lo, hi) * (1 / qmax)
//   asymmetric:        scale = (hi - lo) * (1 / (qmax - qmin))
//                      zp    = clamp(qmin - round_half_even(lo * (1/scale)))   NaN -> qmin
//   scale = 1 where the product is 0 (an all-zero row), so such rows give q = zp
//   and dequantize to exact zeros. A row holding +-inf gets scale = inf: every
//   q is the zero point and dequantizes to NaN.

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

// QuantizeOp or FakeQuantizeOp whose row parameters come from the row's range.
template <class Base>
struct Dynamic : Base {
  template <class M>
  BJ_HD RowParams<M> params(const RowRange<M>& r) const {
    const M qmin = this->qmin, qmax = this->qmax;
    M s = this->has_zp ? (r.hi - r.lo) * (M(1) / (qmax - qmin)) : nan_ignoring_max(-r.lo, r.hi) * (M(1) / qmax);
    if (s == 0) s = 1;
    const M inv = M(1) / s;
    M zp = 0;
    if (this->has_zp) {
      zp = qmin - round_half_even(r.lo * inv);
      zp = zp != zp ? qmin : this->clamp(zp);
    }
    return {s, inv, zp};
  }
};

}  // namespace baracuda
