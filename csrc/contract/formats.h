// The output formats, one trait each: its name (numpy's), its range, and how a
// value v = M(x) * inv in the math type M becomes a stored value.
// baracuda_jax/_formats.py mirrors this table; ffi/dispatch.h maps each format
// to its FFI dtype (ffi_dtype_of), so that this contract compiles without XLA.
//
// Every format F provides, with g the op's grid parameters (qmin, qmax, zero
// point) and p the row's parameters:
//   F::saturate(g, p, v)  the value to store, still in M
//                           integer: clamp(round_half_even(v) + zp, qmin, qmax), NaN -> zp
//                           float8:  v itself (encode saturates)
//   F::round(m)           that value as stored, read back in M (integer: m; float8: m rounded)
//   F::encode(m)          M -> storage (integer: an exact cast; float8: clamp to [-fmax, fmax],
//                         NaN staying NaN, then one round to nearest even: the hardware's
//                         saturating conversion, cvt.rn.satfinite)
//   F::decode(q)          storage -> float, exact
//   F::passes(g, p, v)    the straight-through mask: g passes where saturation did not move v
// and `grid`, the type that carries the rounding rule alone (int8 and uint8
// share theirs, so the ops that store nothing are compiled once for both).
#pragma once

#include <cstdint>
#include <limits>

#include "contract/scalar.h"

#if defined(__CUDACC__)
#include <cuda_fp8.h>
#endif

namespace baracuda {

// ---- integer formats: a runtime grid [qmin, qmax] inside the type's range ----
struct IntegerGrid {
  using grid = IntegerGrid;
  static constexpr bool kFloat = false;

  // round_half_even(v) + zp: the value that is clamped and masked.
  template <class G, class P, class M>
  BJ_HD static M shifted(const G& g, const P& p, M v) {
    // Without a zero point, adding -0 leaves every value as it is (-0 included) and keeps the select
    // out of the element loop (a select on the grid's flag stops GCC's vectorizer).
    return round_half_even(v) + (g.has_zp ? p.zp : M(-0.0));
  }
  template <class G, class P, class M>
  BJ_HD static M saturate(const G& g, const P& p, M v) {
    const M t = shifted(g, p, v);
    return g.clamp(t != t ? p.zp : t);  // NaN never reaches a float->int cast
  }
  template <class G, class P, class M>
  BJ_HD static bool passes(const G& g, const P& p, M v) {
    const M t = shifted(g, p, v);
    return t >= g.qmin && t <= g.qmax;  // inclusive, after rounding; NaN fails
  }
  template <class M> BJ_HD static M round(M m) { return m; }
};

template <class Q>
struct IntegerFormat : IntegerGrid {
  using storage = Q;
  static constexpr int64_t kLowest = std::numeric_limits<Q>::min(), kMax = std::numeric_limits<Q>::max();
  template <class M> BJ_HD static Q encode(M m) { return Q(m); }  // m is integral and in range: exact
  BJ_HD static float decode(Q q) { return float(q); }
};

struct Int8 : IntegerFormat<int8_t> { static constexpr const char* kName = "int8"; };
struct UInt8 : IntegerFormat<uint8_t> { static constexpr const char* kName = "uint8"; };

// ---- float8 formats: a fixed grid, saturating at +-fmax, no zero point ------
struct f8_bits { uint8_t bits; };  // storage only

// A float8 format F over its constants S: kMan mantissa bits, exponent bias
// kBias, fmax = kMax (bits kMaxBits), kNanBits, whether it has infinities, and
// kOverflow, the midpoint between fmax and the next step, where rounding
// without saturation leaves the format. The device converts floats with the
// hardware's instructions, which the tests hold to the portable code bit for bit.
template <class S>
struct Float8Format : S {
  using grid = Float8Format;
  using storage = f8_bits;
  static constexpr bool kFloat = true;
  static constexpr int64_t kLowest = -S::kMax;
  static constexpr int kMinExp = 1 - S::kBias;  // exponent of the smallest normal

  // encode() saturates
  template <class G, class P, class M> BJ_HD static M saturate(const G&, const P&, M v) { return v; }
  // Rounding v unsaturated stays finite: below kOverflow, or at it when fmax is even (ties to even).
  template <class G, class P, class M>
  BJ_HD static bool passes(const G&, const P&, M v) {
    const M a = v < 0 ? -v : v;
    return (S::kMaxBits & 1) ? a < M(S::kOverflow) : a <= M(S::kOverflow);
  }
  template <class M> BJ_HD static M round(M m) {
#if defined(__CUDA_ARCH__)
    return M(decode(encode(m)));  // the hardware's conversions, both ways
#else
    return round_to_grid(m);
#endif
  }

  // The value decode(encode(m)) gives, computed in M without the 8-bit round trip (so that the
  // CPU's loops vectorize): saturate, then round to a multiple of the binade's step, ties to even.
  template <class M>
  BJ_HD static M round_to_grid(M m) {
    using U = typename FloatBits<M>::uint;
    constexpr U kSign = U(1) << (8 * sizeof(U) - 1), kExponent = (kSign - 1) & ~((U(1) << FloatBits<M>::kMan) - 1);
    const U u = bit_cast<U>(m);
    const M a = bit_cast<M>(u & ~kSign);
    const M binade = bit_cast<M>(u & kExponent);  // 2^floor(log2 |m|); 0 for M's subnormals
    const M normal_step = binade * pow2<M>(-S::kMan), subnormal_step = pow2<M>(kMinExp - S::kMan);
    const M step = normal_step > subnormal_step ? normal_step : subnormal_step;
    const M rounded = round_half_even(a * (M(1) / step)) * step;  // exact but for the rounding itself
    const M saturated = a >= M(S::kMax) ? M(S::kMax) : rounded;  // NaN compares false and stays NaN
    return bit_cast<M>(bit_cast<U>(saturated) | (u & kSign));
  }

  template <class M> BJ_HD static f8_bits encode(M v) {
#if defined(__CUDA_ARCH__)
    if constexpr (sizeof(M) == 4) return {__nv_cvt_float_to_fp8(v, __NV_SATFINITE, S::kInterp)};
#endif
    return {encode_bits(v)};
  }
  BJ_HD static float decode(f8_bits q) {
#if defined(__CUDA_ARCH__)
    return __half2float(__half(__nv_cvt_fp8_to_halfraw(q.bits, S::kInterp)));
#else
    return decode_bits(q.bits);
#endif
  }

  // Clamps |v| to fmax (NaN stays NaN), then rounds to nearest even: a saturating conversion.
  // Every case is computed and one selected, so that a loop over it vectorizes.
  template <class M>
  BJ_HD static uint8_t encode_bits(M v) {
    using U = typename FloatBits<M>::uint;
    constexpr int kMan = S::kMan, kShift = FloatBits<M>::kMan - kMan;
    const U u = bit_cast<U>(v);
    const uint8_t sign = uint8_t(u >> (8 * sizeof(U) - 8)) & 0x80u;
    const M a = bit_cast<M>(u & ~(U(1) << (8 * sizeof(U) - 1)));  // |v|
    const bool is_nan = a != a, saturated = a >= M(S::kMax);
    const M in_range = (is_nan | saturated) ? M(0) : a;
    // The format's subnormals (and zero): multiples of 2^(kMinExp - kMan).
    const uint8_t sub = uint8_t(round_half_even(in_range * pow2<M>(kMan - kMinExp)));
    // Normal: keep kMan mantissa bits, rounding half to even (a carry moves into the exponent).
    const U b = bit_cast<U>(in_range);
    const U rounded = (b + (U(1) << (kShift - 1)) - 1 + ((b >> kShift) & 1)) >> kShift;
    const uint8_t normal = uint8_t(rounded - (U(FloatBits<M>::kBias - S::kBias) << kMan));
    const uint8_t bits = is_nan ? S::kNanBits : saturated ? S::kMaxBits : in_range < pow2<M>(kMinExp) ? sub : normal;
    return sign | bits;
  }

  BJ_HD static float decode_bits(uint8_t b) {
    constexpr int kMan = S::kMan;
    const uint32_t e = (b & 0x7Fu) >> kMan, m = b & ((1u << kMan) - 1);
    const float normal = bit_cast<float>(((e + 127 - S::kBias) << 23) | (m << (23 - kMan)));  // exact
    const float finite = e == 0 ? float(int(m)) * pow2<float>(kMinExp - kMan) : normal;
    const unsigned past_max = (b & 0x7Fu) - S::kMaxBits;  // 1 is infinity where the format has it
    const float magnitude = past_max == 0 || past_max > 0x80u ? finite
                            : S::kInf && past_max == 1        ? std::numeric_limits<float>::infinity()
                                                              : std::numeric_limits<float>::quiet_NaN();
    return bit_cast<float>(bit_cast<uint32_t>(magnitude) | (uint32_t(b & 0x80u) << 24));
  }
};

// float8_e4m3fn: no infinity (0x7F is NaN); 448 < |v| <= 464 rounds to 448 (464 is a tie, and 448 is even).
struct E4M3Constants {
  static constexpr const char* kName = "float8_e4m3fn";
  static constexpr int kMan = 3, kBias = 7;
  static constexpr int64_t kMax = 448, kOverflow = 464;
  static constexpr uint8_t kMaxBits = 0x7E, kNanBits = 0x7F;
  static constexpr bool kInf = false;
#if defined(__CUDACC__)
  static constexpr __nv_fp8_interpretation_t kInterp = __NV_E4M3;
#endif
};
// float8_e5m2: the top byte of an IEEE half; 61440 is the tie between 57344 (odd) and infinity: it overflows.
struct E5M2Constants {
  static constexpr const char* kName = "float8_e5m2";
  static constexpr int kMan = 2, kBias = 15;
  static constexpr int64_t kMax = 57344, kOverflow = 61440;
  static constexpr uint8_t kMaxBits = 0x7B, kNanBits = 0x7E;
  static constexpr bool kInf = true;
#if defined(__CUDACC__)
  static constexpr __nv_fp8_interpretation_t kInterp = __NV_E5M2;
#endif
};
using E4M3 = Float8Format<E4M3Constants>;
using E5M2 = Float8Format<E5M2Constants>;

// Every output format. A new one is a struct above, an entry here, its FFI dtype in
// ffi/dispatch.h, and its entry in baracuda_jax/_formats.py.
using Formats = TypeList<Int8, UInt8, E4M3, E5M2>;

}  // namespace baracuda
