// Scalar types and exact conversions, the same on host and device: the data
// types the ops read and write, the math type they compute in, and rounding;
// and TypeList, the sets of types (data types, formats) the ops dispatch over.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define BJ_HD __host__ __device__ __forceinline__
#else
// Always inlined on the host too: a call left in a row loop (GCC's inliner gives up on the larger
// producers, host_exp's polynomial) keeps the loop scalar.
#define BJ_HD inline __attribute__((always_inline))
#endif

namespace baracuda {

template <class... Ts> struct TypeList {};

// Storage-only 16-bit floats: the same layout on host and device. Under nvcc
// the conversions use cuda_fp16/cuda_bf16 (IEEE round to nearest even on host
// and device); g++ builds them from bits and float operations (below). Only NaN
// payload bits may differ between the two.
struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };

// M: float64 for float64 data, else float32.
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

template <class M> struct FloatBits;
template <> struct FloatBits<float> {
  using uint = uint32_t;
  static constexpr int kMan = 23, kBias = 127;
};
template <> struct FloatBits<double> {
  using uint = uint64_t;
  static constexpr int kMan = 52, kBias = 1023;
};

// 2^n, exact, for n in the normal exponent range of M.
template <class M>
BJ_HD M pow2(int n) {
  using U = typename FloatBits<M>::uint;
  return bit_cast<M>(U(n + FloatBits<M>::kBias) << FloatBits<M>::kMan);
}

// ---- conversions to the math type (all exact) ------------------------------
BJ_HD float to_math(float v) { return v; }
BJ_HD double to_math(double v) { return v; }
BJ_HD float to_math(bf16 v) { return bit_cast<float>(uint32_t(v.bits) << 16); }
BJ_HD float to_math(f16 v) {
#if defined(__CUDACC__)
  return __half2float(__ushort_as_half(v.bits));
#else
  // In integer and float operations that vectorize (GCC does not vectorize _Float16 conversions
  // without AVX512-FP16): a normal half's bits moved into place and scaled by 2^-112, a subnormal
  // one built as 0.5 + m * 2^-24 and less 0.5. Checked against F16C's conversion on all halves.
  const uint32_t w = uint32_t(v.bits) << 16, sign = w & 0x80000000u, two_w = w + w;
  const float normal = bit_cast<float>((two_w >> 4) + (0xE0u << 23)) * 0x1.0p-112f;
  const float subnormal = bit_cast<float>((two_w >> 17) | (126u << 23)) - 0.5f;
  return bit_cast<float>(sign | (two_w < (1u << 27) ? bit_cast<uint32_t>(subnormal) : bit_cast<uint32_t>(normal)));
#endif
}

// ---- rounding from the math type (round to nearest even, like XLA's convert)
template <class T> struct From;
template <> struct From<float> {
  BJ_HD static float math(float v) { return v; }
};
template <> struct From<double> {
  BJ_HD static double math(double v) { return v; }
};
template <> struct From<bf16> {
  BJ_HD static bf16 math(float v) {
#if defined(__CUDACC__)
    return {__bfloat16_as_ushort(__float2bfloat16_rn(v))};
#else
    const uint32_t u = bit_cast<uint32_t>(v);
    const uint16_t quiet_nan = uint16_t((u >> 16) | 0x0040u),
                   rounded = uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return {v != v ? quiet_nan : rounded};  // a select, not a branch: the CPU loops vectorize
#endif
  }
};
template <> struct From<f16> {
  BJ_HD static f16 math(float v) {
#if defined(__CUDACC__)
    return {__half_as_ushort(__float2half_rn(v))};
#else
    // As to_math(f16), in vectorizable operations: |v| scaled by 2^112 * 2^-110 (to inf past the
    // range), then added to 2^(e - 10 + 23) (at least 2^-1, for subnormal halves), which rounds
    // the kept bits to nearest even at the bottom of the sum's mantissa. NaN: quiet, with its
    // sign and top payload bits. Checked against F16C's conversion on all 2^32 floats.
    const uint32_t w = bit_cast<uint32_t>(v), sign = (w >> 16) & 0x8000u, abs2 = w + w;
    const uint32_t exponent = abs2 & 0xFF000000u, bias = exponent < 0x71000000u ? 0x71000000u : exponent;
    const float base = (bit_cast<float>(w & 0x7FFFFFFFu) * 0x1.0p+112f) * 0x1.0p-110f;
    const uint32_t r = bit_cast<uint32_t>(bit_cast<float>((bias >> 1) + 0x07800000u) + base);
    const uint32_t finite = ((r >> 13) & 0x7C00u) + (r & 0x0FFFu), nan = 0x7E00u | ((w >> 13) & 0x03FFu);
    return {uint16_t(sign | (abs2 > 0xFF000000u ? nan : finite))};
#endif
  }
};

BJ_HD float round_half_even(float v) { return rintf(v); }
BJ_HD double round_half_even(double v) { return rint(v); }

}  // namespace baracuda
