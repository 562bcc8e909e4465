// The CPU engine: CpuExec, the row engine that the handler bodies of ffi/per_token.h and
// ffi/fused.h run on, over XLA's intra-op thread pool (ParallelRows) with IEEE subnormals
// (IeeeSubnormals), in row loops written for the compiler to vectorize.
//
// Its definitions have internal linkage: the header belongs to cpu/module.cc alone, and GCC inlines
// and clones functions local to a file more freely than ones it must keep for others.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <memory>
#include <mutex>
#include <vector>

#include "contract/producers.h"
#include "xla/ffi/api/ffi.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

namespace baracuda {

namespace ffi = xla::ffi;

namespace {

// XLA:CPU runs computations with subnormals flushed to zero (FTZ/DAZ), the GPU
// does not. The kernels compute IEEE everywhere, so that CPU and GPU give the
// same bits: this guard restores IEEE subnormals for the handler's duration.
class IeeeSubnormals {
 public:
#if defined(__x86_64__) || defined(_M_X64)
  IeeeSubnormals() : saved_(_mm_getcsr()) { _mm_setcsr(saved_ & ~kFlushBits); }
  ~IeeeSubnormals() { _mm_setcsr(saved_); }

 private:
  static constexpr unsigned kFlushBits = 0x8040;  // FTZ | DAZ
  unsigned saved_;
#elif defined(__aarch64__)
  IeeeSubnormals() : saved_(__builtin_aarch64_get_fpcr64()) { __builtin_aarch64_set_fpcr64(saved_ & ~kFZ); }
  ~IeeeSubnormals() { __builtin_aarch64_set_fpcr64(saved_); }

 private:
  static constexpr uint64_t kFZ = uint64_t{1} << 24;
  uint64_t saved_;
#endif
};

// Runs body(r0, r1) over row ranges that together cover [0, rows), on XLA's
// intra-op thread pool. The rows are cut into chunks of at least kChunk
// elements, claimed from a shared counter by the pool's tasks and by the
// calling thread alike, so the call never waits on a task that has not
// started (and a task that starts after the last chunk was claimed does
// nothing). Small work runs inline: a decode row pays no scheduling. A row is
// always done by one thread, so no row's result depends on the split.
class ParallelRows {
 public:
  static constexpr int64_t kChunk = int64_t{1} << 15;

  template <class Body>
  static void run(ffi::ThreadPool& pool, int64_t rows, int64_t cols, const Body& body) {
    const int64_t rows_per_chunk = std::max<int64_t>(1, kChunk / std::max<int64_t>(cols, 1));
    const int64_t chunks = (rows + rows_per_chunk - 1) / rows_per_chunk;
    const int64_t helpers = std::min<int64_t>(pool.num_threads(), chunks - 1);
    if (helpers <= 0) {
      IeeeSubnormals ieee;
      body(int64_t{0}, rows);
      return;
    }
    auto state = std::make_shared<State>();
    state->chunks = chunks;
    auto work = [state, &body, rows, rows_per_chunk] {
      IeeeSubnormals ieee;
      for (int64_t c; (c = state->next.fetch_add(1)) < state->chunks;) {
        body(c * rows_per_chunk, std::min(rows, (c + 1) * rows_per_chunk));
        if (state->done.fetch_add(1) + 1 == state->chunks) {
          std::lock_guard<std::mutex> lock(state->mutex);
          state->finished.notify_all();
        }
      }
    };
    for (int64_t i = 0; i < helpers; ++i) {
      auto task = work;  // the pool takes its task by value
      pool.Schedule(std::move(task));
    }
    work();
    std::unique_lock<std::mutex> lock(state->mutex);
    state->finished.wait(lock, [&] { return state->done.load() == state->chunks; });
  }

 private:
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    int64_t chunks = 0;
    std::mutex mutex;
    std::condition_variable finished;
  };
};

// The row loops are compiled twice on x86 (GCC's function multiversioning):
// for AVX-512 CPUs (x86-64-v4), chosen when the module loads, and for the
// module's AVX2 baseline. The same IEEE operations either way.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define BJ_VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "default")))
#else
#define BJ_VECTOR_CLONES
#endif

// The storage types as the compiler can vectorize them: a 16-bit float or a
// float8 value moves as its integer bits (a struct has no vector type).
template <class T> struct Raw {
  using type = T;
  static const T* of(const T* p) { return p; }
  static T* of(T* p) { return p; }
  static T value(T v) { return v; }
  static T bits(T v) { return v; }
};
template <class T, class B> struct RawBits {
  using type = B;
  static const B* of(const T* p) { return reinterpret_cast<const B*>(p); }
  static B* of(T* p) { return reinterpret_cast<B*>(p); }
  static T value(B b) { return {b}; }
  static B bits(T v) { return v.bits; }
};
template <> struct Raw<bf16> : RawBits<bf16, uint16_t> {};
template <> struct Raw<f16> : RawBits<f16, uint16_t> {};
template <> struct Raw<f8_bits> : RawBits<f8_bits, uint8_t> {};

// The row engine of ffi/per_token.h and ffi/fused.h. Each row's inner loop is written so that the
// compiler vectorizes it (AVX2, F16C on x86): no calls, branches it can turn into selects, and row
// reductions in fixed lanes.
struct CpuExec {
  const char* op;  // the op's name, for errors
  ffi::ThreadPool pool;
  CpuExec(const char* op, ffi::ThreadPool pool) : op(op), pool(pool) {}

  template <class Op, class OutPtr, class... In>
  ffi::Error map_rows(const Op& op, int64_t rows, int64_t cols, OutPtr out, const In*... in) {
    ParallelRows::run(pool, rows, cols, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) map_row(op, op.row(r), cols, out + r * cols, (in + r * cols)...);
    });
    return ffi::Error::Success();
  }

  template <class Op, class Out, class M, class... In>
  ffi::Error reduce_rows(const Op& op, int64_t rows, int64_t cols, Out* out, M* sums, const In*... in) {
    ParallelRows::run(pool, rows, cols, [&](int64_t r0, int64_t r1) {
      std::vector<M> terms(cols);
      for (int64_t r = r0; r < r1; ++r) {
        reduce_terms<Out, In...>(op, op.row(r), cols, Raw<Out>::of(out + r * cols), terms.data(),
                                 Raw<In>::of(in + r * cols)...);
        sums[r] = lane_sum(terms.data(), cols);
      }
    });
    return ffi::Error::Success();
  }

  template <class Op, class Out, class M, class... In>
  ffi::Error dynamic_rows(const Op& op, int64_t rows, int64_t cols, Out* out, M* scale, int32_t* zp, const In*... in) {
    using T = decltype(op.value(in[0]...));
    ParallelRows::run(pool, rows, cols, [&](int64_t r0, int64_t r1) {
      std::vector<T> produced(sizeof...(In) > 1 ? cols : 0);
      std::vector<M> scratch(cols);
      for (int64_t r = r0; r < r1; ++r) {
        const T* h = row_values(op, cols, produced.data(), (in + r * cols)...);
        const auto p = op.params(row_range(h, cols, scratch.data()));
        if (scale) scale[r] = p.scale;
        if (zp) zp[r] = static_cast<int32_t>(p.zp);
        map_row(QuantizeValue<Op>{op}, p, cols, out + r * cols, h);
      }
    });
    return ffi::Error::Success();
  }

  // The columns as the rows of x.T, transposed into a buffer in tiles (zero tokens after the last),
  // so that they are quantized by dynamic_rows itself.
  template <class Op, class Q, class M, class T>
  ffi::Error dynamic_rows_and_columns(const Op& op, int64_t rows, int64_t cols, int64_t padded, Q* q, M* scale, Q* q_t,
                                      M* scale_t, const T* x) {
    if (ffi::Error rows_done = dynamic_rows(op, rows, cols, q, scale, nullptr, x); !rows_done.success())
      return rows_done;
    std::vector<T> x_t(static_cast<size_t>(cols * padded), From<T>::math(math_t<T>(0)));
    constexpr int64_t kTile = 64;
    ParallelRows::run(pool, (cols + kTile - 1) / kTile, kTile * rows, [&](int64_t b0, int64_t b1) {
      for (int64_t c0 = b0 * kTile; c0 < std::min(cols, b1 * kTile); c0 += kTile)
        for (int64_t r0 = 0; r0 < rows; r0 += kTile)
          for (int64_t c = c0; c < std::min(cols, c0 + kTile); ++c)
            for (int64_t r = r0; r < std::min(rows, r0 + kTile); ++r) x_t[c * padded + r] = x[r * cols + c];
    });
    return dynamic_rows(op, cols, padded, q_t, scale_t, nullptr, x_t.data());
  }

  template <class T, class Q, class Out>
  ffi::Error norm_rows(const NormQuantizeRows<T, Q, Out>& io, int64_t rows, int64_t cols) {
    using M = math_t<T>;
    ParallelRows::run(pool, rows, cols, [&](int64_t r0, int64_t r1) {
      std::vector<T> h(cols);
      std::vector<M> squares(cols);
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t at = r * cols;
        const T* rv = io.x + at;
        if (io.residual) {
          map_raw<T, T, T>(Residual{}, 0, cols, Raw<T>::of(io.r_out + at), Raw<T>::of(io.x + at),
                           Raw<T>::of(io.residual + at));
          rv = io.r_out + at;
        }
        map_raw<M, T>(Square{}, 0, cols, squares.data(), Raw<T>::of(rv));
        const M inv = io.norm.inv_rms(lane_sum(squares.data(), cols));
        io.inv_rms[r] = inv;
        map_raw<T, T, T>(Normed<M>{}, inv, cols, Raw<T>::of(h.data()), Raw<T>::of(rv), Raw<T>::of(io.weight));
        RowParams<M> p;
        if constexpr (Q::kDynamic) {
          p = io.quant.params(row_range(h.data(), cols, squares.data()));
          io.scale_out[r] = p.scale;
        } else {
          p = io.quant.row(r);
        }
        map_row(io.quant, p, cols, io.out + at, h.data());
      }
    });
    return ffi::Error::Success();
  }

  // dw: each group's rows in order into its row of dw_groups (groups run in parallel), then the
  // groups in slices (contract/producers.h).
  template <class T, class G>
  ffi::Error norm_grad_rows(const NormGradRows<T, G>& io, int64_t rows, int64_t cols) {
    using M = math_t<T>;
    const int64_t per_group = io.rows_per_group(rows);
    ParallelRows::run(pool, io.groups, cols * per_group, [&](int64_t g0, int64_t g1) {
      std::vector<M> dh(cols), terms(cols);
      for (int64_t k = g0; k < g1; ++k) {
        M* dw = io.dw_groups + k * cols;
        std::fill(dw, dw + cols, M(0));
        for (int64_t r = k * per_group; r < std::min(rows, (k + 1) * per_group); ++r)
          norm_grad_row(io, r, cols, dh.data(), terms.data(), dw);
      }
    });
    std::vector<M> sum(cols, M(0)), slice(cols);
    const int64_t per_slice = io.groups_per_slice();
    for (int64_t k0 = 0; k0 < io.groups; k0 += per_slice) {
      std::fill(slice.begin(), slice.end(), M(0));
      for (int64_t k = k0; k < std::min(io.groups, k0 + per_slice); ++k)
        add_row(slice.data(), io.dw_groups + k * cols, cols);
      add_row(sum.data(), slice.data(), cols);
    }
    for (int64_t c = 0; c < cols; ++c) io.dw[c] = From<T>::math(sum[c]);
    return ffi::Error::Success();
  }

 private:
  // Function objects for the loops below (a lambda cannot carry target_clones' attributes).
  template <class Op>
  struct QuantizeValue {  // a Produced op's quantizer applied to h
    Op op;
    template <class P, class T> auto operator()(const P& p, T h) const { return op.quantize(p, h); }
  };
  template <class Op>
  struct Value {  // a Produced op's h
    Op op;
    template <class... In> auto operator()(int, In... in) const { return op.value(in...); }
  };
  struct Residual {
    template <class T> T operator()(int, T x, T res) const { return RmsNorm<T>::residual(x, res); }
  };
  struct ToMath {
    template <class T> auto operator()(int, T v) const { return to_math(v); }
  };
  struct Square {
    template <class T> auto operator()(int, T r) const { return RmsNorm<T>::square(r); }
  };
  template <class M>
  struct Normed {
    template <class T> T operator()(M inv, T r, T w) const { return RmsNorm<T>::normed(r, inv, w); }
  };

  // h of one row: the input itself, or the producer's values written into `buffer`.
  template <class Op, class T> static const T* row_values(const Op&, int64_t, T*, const T* x) { return x; }
  template <class Op, class T, class... In>
  static const T* row_values(const Op& op, int64_t cols, T* buffer, const In*... in) {
    map_raw<T, In...>(Value<Op>{op}, 0, cols, Raw<T>::of(buffer), Raw<In>::of(in)...);
    return buffer;
  }

  template <class Op, class P, class Out, class... In>
  static void map_row(const Op& op, const P& p, int64_t cols, Out* out, const In*... in) {
    map_raw<Out, In...>(op, p, cols, Raw<Out>::of(out), Raw<In>::of(in)...);
  }
  template <class Op, class P, class T, class... In>
  static void map_row(const Op& op, const P& p, int64_t cols, Split<T> out, const In*... in) {
    map_pair_raw<T, In...>(op, p, cols, Raw<T>::of(out.first), Raw<T>::of(out.second), Raw<In>::of(in)...);
  }
  // op and p by value, restrict pointers: nothing the loop stores (int8 stores may alias
  // anything) can change what it reads, so the loop vectorizes.
  template <class Out, class... In, class Op, class P>
  BJ_VECTOR_CLONES static void map_raw(const Op op, const P p, int64_t cols, typename Raw<Out>::type* __restrict__ out,
                                       const typename Raw<In>::type* __restrict__... in) {
    for (int64_t c = 0; c < cols; ++c) out[c] = Raw<Out>::bits(op(p, Raw<In>::value(in[c])...));
  }
  template <class T, class... In, class Op, class P>
  BJ_VECTOR_CLONES static void map_pair_raw(const Op op, const P p, int64_t cols,
                                            typename Raw<T>::type* __restrict__ first,
                                            typename Raw<T>::type* __restrict__ second,
                                            const typename Raw<In>::type* __restrict__... in) {
    for (int64_t c = 0; c < cols; ++c) {
      const Pair<T> d = op(p, Raw<In>::value(in[c])...);
      first[c] = Raw<T>::bits(d.first);
      second[c] = Raw<T>::bits(d.second);
    }
  }

  BJ_VECTOR_CLONES static void add_row(float* __restrict__ sum, const float* __restrict__ part, int64_t cols) {
    for (int64_t c = 0; c < cols; ++c) sum[c] += part[c];
  }

  // One row of the norm backward: dh, the terms of the row's sum c (lane_sum) and dw's terms
  // added into `dw`, then dx. (grad_terms takes io by value, as map_raw its op: fields that no
  // store can change, so that the loop vectorizes.)
  template <class T, class G, class M>
  static void norm_grad_row(const NormGradRows<T, G>& io, int64_t r, int64_t cols, M* dh, M* terms, M* dw) {
    const int64_t at = r * cols;
    const M inv = io.inv_rms[r];
    grad_terms<T>(io, io.mask.row(r), inv, cols, Raw<T>::of(io.g + at), Raw<T>::of(io.r + at), Raw<T>::of(io.weight),
                  dh, terms, dw);
    grad_dx<T>(inv, io.grad.mean(lane_sum(terms, cols)), cols, Raw<T>::of(io.dx + at), Raw<T>::of(io.r + at),
               Raw<T>::of(io.weight), dh, io.g_residual ? Raw<T>::of(io.g_residual + at) : nullptr);
  }
  template <class T, class IO, class P, class M, class B>
  BJ_VECTOR_CLONES static void grad_terms(const IO io, const P p, const M inv, int64_t cols, const B* __restrict__ g,
                                          const B* __restrict__ r, const B* __restrict__ w, M* __restrict__ dh,
                                          M* __restrict__ terms, M* __restrict__ dw) {
    for (int64_t c = 0; c < cols; ++c) {
      const T rc = Raw<T>::value(r[c]), wc = Raw<T>::value(w[c]);
      dh[c] = io.dh(p, Raw<T>::value(g[c]), RmsNorm<T>::normed(rc, inv, wc));
      const auto t = RmsNormGrad<T>::terms(dh[c], rc, inv, wc);
      terms[c] = t.dn * t.n;
      dw[c] += dh[c] * t.n;
    }
  }
  template <class T, class M, class B>
  BJ_VECTOR_CLONES static void grad_dx(const M inv, const M mean, int64_t cols, B* __restrict__ dx,
                                       const B* __restrict__ r, const B* __restrict__ w, const M* __restrict__ dh,
                                       const B* __restrict__ g_residual) {
    for (int64_t c = 0; c < cols; ++c) {
      const auto t = RmsNormGrad<T>::terms(dh[c], Raw<T>::value(r[c]), inv, Raw<T>::value(w[c]));
      const M gr = g_residual ? to_math(Raw<T>::value(g_residual[c])) : M(0);
      dx[c] = Raw<T>::bits(RmsNormGrad<T>::dr(t, inv, mean, gr));
    }
  }

  // An op that adds each element's term into a sum: out, and each term in `terms` (op adds it to
  // a zero of its own; from +0, x comes back, and the sum of the terms is the same whatever the
  // sign of a zero term).
  template <class Out, class... In, class Op, class P>
  BJ_VECTOR_CLONES static void reduce_terms(const Op op, const P p, int64_t cols,
                                            typename Raw<Out>::type* __restrict__ out,
                                            typename Op::M* __restrict__ terms,
                                            const typename Raw<In>::type* __restrict__... in) {
    for (int64_t c = 0; c < cols; ++c) {
      typename Op::M t = 0;
      out[c] = Raw<Out>::bits(op(p, Raw<In>::value(in[c])..., t));
      terms[c] = t;
    }
  }

  // The sum of t[0, cols) in kLanes interleaved lanes (lane k adds t[k], t[k + kLanes], ... in
  // order), the lanes added in order, then the tail: one fixed order, the same on every run and
  // for any split of the rows, and one vector add per kLanes terms.
  template <class M>
  BJ_VECTOR_CLONES static M lane_sum(const M* __restrict__ t, int64_t cols) {
    constexpr int kLanes = 8;
    typedef M Lanes __attribute__((vector_size(kLanes * sizeof(M))));
    Lanes lanes = {};
    int64_t c = 0;
    for (; c + kLanes <= cols; c += kLanes) {
      Lanes v;
      std::memcpy(&v, t + c, sizeof v);
      lanes += v;
    }
    M sum = 0;
    for (int k = 0; k < kLanes; ++k) sum += lanes[k];
    for (; c < cols; ++c) sum += t[c];
    return sum;
  }

  // The row's range: its values converted to M into `scratch` (a map, which vectorizes), then
  // taken in kLanes interleaved lanes held as GCC vectors and merged at the end. min and max are
  // exact, so it is the sequential range (but for the sign of a zero bound, which no output
  // depends on). (Converted and compared in one loop, the lanes stayed scalar: GCC built each
  // block's vector from 16-bit loads, or compared with one cmov per element.)
  template <class M, class T>
  static RowRange<M> row_range(const T* x, int64_t cols, M* scratch) {
    map_raw<M, T>(ToMath{}, 0, cols, scratch, Raw<T>::of(x));
    return lane_range(scratch, cols);
  }
  template <class M>
  BJ_VECTOR_CLONES static RowRange<M> lane_range(const M* __restrict__ t, int64_t cols) {
    constexpr int kLanes = 64 / sizeof(M);
    typedef M Lanes __attribute__((vector_size(kLanes * sizeof(M))));
    Lanes lo = {}, hi = {};
    int64_t c = 0;
    for (; c + kLanes <= cols; c += kLanes) {
      Lanes v;
      std::memcpy(&v, t + c, sizeof v);
      lo = v < lo ? v : lo;  // NaN compares false: ignored
      hi = v > hi ? v : hi;
    }
    // The lanes hold no NaN, so plain compares merge them (not libm's fmin: a group of 128 values
    // paid 32 calls for it).
    RowRange<M> range{lo[0], hi[0]};
    for (int k = 1; k < kLanes; ++k) {
      range.lo = lo[k] < range.lo ? lo[k] : range.lo;
      range.hi = hi[k] > range.hi ? hi[k] : range.hi;
    }
    for (; c < cols; ++c) range.add(t[c]);
    return range;
  }
};

}  // namespace
}  // namespace baracuda
