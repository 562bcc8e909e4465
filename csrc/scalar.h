// Scalar types and exact conversions, the same on host and device: the data
// types the ops read and write, the math type they compute in, and rounding.
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

// Storage-only 16-bit floats: the same layout on host and device. Under nvcc
// the conversions use cuda_fp16/cuda_bf16 (IEEE round to nearest even on host
// and device); g++ uses _Float16 and an integer bf16 rounding. Only NaN payload
// bits may differ between the two.
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
template <> struct FloatBits<float> { using uint = uint32_t; static constexpr int kMan = 23, kBias = 127; };
template <> struct FloatBits<double> { using uint = uint64_t; static constexpr int kMan = 52, kBias = 1023; };

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
  return float(bit_cast<_Float16>(v.bits));
#endif
}

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
    const uint16_t quiet_nan = uint16_t((u >> 16) | 0x0040u), rounded = uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    return {v != v ? quiet_nan : rounded};  // a select, not a branch: the CPU loops vectorize
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

BJ_HD float round_half_even(float v) { return rintf(v); }
BJ_HD double round_half_even(double v) { return rint(v); }

}  // namespace baracuda
