// Vector I/O for the row kernels: a row moves in 16-byte vectors (Vec, one Word per load or
// store), the few elements before its first aligned vector and after its last one by one
// (RowSpan, put); an op applied across one vector (apply_vec, produce_vec, quantize_vec); and the
// host's check that a launch's pointers are vector-aligned.
//
// The cuda/*.cuh headers split engine.cu's translation unit by kernel family; their kernels keep
// the internal linkage they would have in that one file.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <cuda/std/tuple>
#include <initializer_list>
#include <type_traits>

#include "contract/numerics.h"

namespace baracuda {
namespace {

template <class T, int W>
struct Vec {
  T v[W];
};

// An unsigned word of N bytes: vectors travel as one such load or store (the
// compiler would otherwise split a vector of 16-bit structs into 2-byte stores).
template <int N> struct Word;
template <> struct Word<1> { using type = uint8_t; };
template <> struct Word<2> { using type = uint16_t; };
template <> struct Word<4> { using type = uint32_t; };
template <> struct Word<8> { using type = uint2; };
template <> struct Word<16> { using type = uint4; };
template <class T, int W> using WordOf = typename Word<sizeof(T) * W>::type;

template <int W, class T>
__device__ __forceinline__ Vec<T, W> load_vec(const T* p) {
  const WordOf<T, W> w = __ldg(reinterpret_cast<const WordOf<T, W>*>(p));
  Vec<T, W> v;
  memcpy(&v, &w, sizeof(v));
  return v;
}

// Stores one vector word assembled from 32-bit lanes built with shifts: given a
// memcpy, the compiler splits a vector of 16-bit values into 2- or 4-byte
// stores, which cost more than half of the bandwidth.
template <int W, class T>
__device__ __forceinline__ void store_vec(T* p, const Vec<T, W>& v) {
  constexpr int kBytes = sizeof(T) * W;
  WordOf<T, W> w;
  if constexpr (kBytes >= 4 && sizeof(T) < 4) {
    constexpr int kPer = 4 / sizeof(T);
    using Bits = typename Word<sizeof(T)>::type;
    uint32_t words[kBytes / 4];
#pragma unroll
    for (int i = 0; i < kBytes / 4; ++i) {
      words[i] = 0;
#pragma unroll
      for (int k = 0; k < kPer; ++k) words[i] |= uint32_t(bit_cast<Bits>(v.v[i * kPer + k])) << (8 * sizeof(T) * k);
    }
    if constexpr (kBytes == 16) w = make_uint4(words[0], words[1], words[2], words[3]);
    if constexpr (kBytes == 8) w = make_uint2(words[0], words[1]);
    if constexpr (kBytes == 4) w = words[0];
  } else {
    memcpy(&w, &v, kBytes);
  }
  __stcs(reinterpret_cast<WordOf<T, W>*>(p), w);  // streaming: the output is not read again here
}

// An op writes one output (T*), or two (Split<T>, for a Pair-valued op).
template <int W, class T>
__device__ __forceinline__ void store_out(T* out, int64_t i, const Vec<T, W>& v) {
  store_vec<W>(out + i, v);
}
template <int W, class T>
__device__ __forceinline__ void store_out(Split<T> out, int64_t i, const Vec<Pair<T>, W>& v) {
  Vec<T, W> a, b;
#pragma unroll
  for (int k = 0; k < W; ++k) a.v[k] = v.v[k].first, b.v[k] = v.v[k].second;
  store_vec<W>(out.first + i, a);
  store_vec<W>(out.second + i, b);
}
template <class T> __device__ __forceinline__ void put(T* out, int64_t i, T v) { out[i] = v; }
template <class T> __device__ __forceinline__ void put(Split<T> out, int64_t i, Pair<T> v) {
  out.first[i] = v.first;
  out.second[i] = v.second;
}
template <class P> struct OutElem { using type = std::remove_pointer_t<P>; };
template <class T> struct OutElem<Split<T>> { using type = T; };

template <class... Ts> constexpr int max_size() { return std::max({int(sizeof(Ts))...}); }

// Elements per vector: the widest operand moves 16 bytes at a time.
template <class Out, class... In> constexpr int vec_width() { return 16 / max_size<Out, In...>(); }

template <int W, class Op, class P, class OutPtr, class... In>
__device__ __forceinline__ void apply_vec(const Op& op, const P& p, OutPtr out, int64_t i, const Vec<In, W>&... v) {
  Vec<decltype(op(p, v.v[0]...)), W> r;
#pragma unroll
  for (int k = 0; k < W; ++k) r.v[k] = op(p, v.v[k]...);
  store_out<W>(out, i, r);
}

// A row's layout for W-element vectors: `head` elements up to the first aligned
// vector, `nvec` vectors from `body`, then fewer than W elements to the row's end.
template <int W>
struct RowSpan {
  int64_t base, head, nvec, body;

  __device__ RowSpan(int64_t row, int64_t cols) : base(row * cols) {
    const int64_t skew = (W - base % W) % W;
    head = skew < cols ? skew : cols;
    nvec = (cols - head) / W;
    body = base + head;
  }

  // Calls f(index) for the unaligned elements that lane c of `lanes` owns: the head's and the
  // tail's elements c, c + lanes, ... (below W).
  template <class F>
  __device__ void ends(int64_t cols, int64_t c, F f, int64_t lanes = W) const {
    for (; c < W; c += lanes) {
      if (c < head) f(base + c);
      if (head + nvec * W + c < cols) f(base + head + nvec * W + c);
    }
  }
};

// h of the W elements from `at`: the op's producer over its inputs.
template <int W, class Op, class... In>
__device__ __forceinline__ auto produce_vec(const Op& op, int64_t at, const In*... in) {
  const auto loaded = cuda::std::make_tuple(load_vec<W>(in + at)...);
  Vec<decltype(op.value(in[0]...)), W> h;
#pragma unroll
  for (int k = 0; k < W; ++k) h.v[k] = cuda::std::apply([&](const auto&... x) { return op.value(x.v[k]...); }, loaded);
  return h;
}

template <int W, class Op, class P, class Out, class T>
__device__ __forceinline__ void quantize_vec(const Op& op, const P& p, Out* out, const Vec<T, W>& h) {
  Vec<Out, W> q;
#pragma unroll
  for (int k = 0; k < W; ++k) q.v[k] = op.quantize(p, h.v[k]);
  store_vec<W>(out, q);
}

// True when every pointer can be read or written in W-element vectors.
template <int W, class T> bool aligned(const T* p) { return reinterpret_cast<uintptr_t>(p) % (W * sizeof(T)) == 0; }
template <int W, class T> bool aligned(Split<T> p) { return aligned<W>(p.first) && aligned<W>(p.second); }
template <int W, class... Ps> bool vector_aligned(const Ps&... ptrs) { return (aligned<W>(ptrs) && ...); }

}  // namespace
}  // namespace baracuda
