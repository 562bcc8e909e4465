// Handler bodies shared by the CPU and CUDA backends: argument checks, dtype
// dispatch, and the construction of the numerics functors. A backend supplies
// an `Exec` with
//   template <class Op, class Out, class... In>
//   ffi::Error map_rows(const Op&, int64_t rows, int64_t cols, Out*, const In*...);
// which applies `op(op.row(r), in[r, c]...)` to every element.
#pragma once

#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>

#include "numerics.h"
#include "xla/ffi/api/ffi.h"

namespace baracuda {

namespace ffi = xla::ffi;

template <class T> struct Tag { using type = T; };

inline std::string dtype_name(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F16: return "float16";
    case ffi::DataType::BF16: return "bfloat16";
    case ffi::DataType::F32: return "float32";
    case ffi::DataType::F64: return "float64";
    case ffi::DataType::S8: return "int8";
    case ffi::DataType::U8: return "uint8";
    case ffi::DataType::S32: return "int32";
    default: return "dtype #" + std::to_string(static_cast<int>(t));
  }
}

inline ffi::Error invalid(const char* op, const std::string& what) {
  return ffi::Error::InvalidArgument(std::string("baracuda ") + op + ": " + what);
}

// Calls fn(Tag<T>{}) for the floating types the ops accept.
template <class Fn>
ffi::Error dispatch_float(const char* op, const char* arg, ffi::DataType t, Fn&& fn) {
  switch (t) {
    case ffi::DataType::F16: return fn(Tag<f16>{});
    case ffi::DataType::BF16: return fn(Tag<bf16>{});
    case ffi::DataType::F32: return fn(Tag<float>{});
    case ffi::DataType::F64: return fn(Tag<double>{});
    default:
      return invalid(op, std::string(arg) + " has dtype " + dtype_name(t) +
                             "; expected float16, bfloat16, float32 or float64");
  }
}

// Calls fn(Tag<Q>{}) for the integer grids.
template <class Fn>
ffi::Error dispatch_int(const char* op, const char* arg, ffi::DataType t, Fn&& fn) {
  switch (t) {
    case ffi::DataType::S8: return fn(Tag<int8_t>{});
    case ffi::DataType::U8: return fn(Tag<uint8_t>{});
    default:
      return invalid(op, std::string(arg) + " has dtype " + dtype_name(t) + "; expected int8 or uint8");
  }
}

template <class T> constexpr ffi::DataType ffi_dtype();
template <> constexpr ffi::DataType ffi_dtype<float>() { return ffi::DataType::F32; }
template <> constexpr ffi::DataType ffi_dtype<double>() { return ffi::DataType::F64; }

// The row layout every op shares: data [..., D] folded into [N, D]; scale and
// zero_point hold N values.
struct Rows {
  int64_t rows = 0, cols = 0;
};

inline ffi::Error check_same_dims(const char* op, const char* arg, ffi::AnyBuffer a,
                                  const char* ref_arg, ffi::AnyBuffer ref) {
  const auto da = a.dimensions(), dr = ref.dimensions();
  bool same = da.size() == dr.size();
  for (size_t i = 0; same && i < da.size(); ++i) same = da[i] == dr[i];
  if (!same) return invalid(op, std::string(arg) + " must have the shape of " + ref_arg);
  return ffi::Error::Success();
}

// Checks data/out/scale against each other; fills `shape`.
template <class M>
ffi::Error check_rows(const char* op, ffi::AnyBuffer data, ffi::AnyBuffer out, ffi::AnyBuffer scale, Rows& shape) {
  const auto dims = data.dimensions();
  if (dims.size() < 1) return invalid(op, "the data operand must have rank >= 1");
  if (auto err = check_same_dims(op, "the output", out, "the data operand", data); !err.success())
    return err;
  shape.cols = dims.back();
  shape.rows = 1;
  for (size_t i = 0; i + 1 < dims.size(); ++i) shape.rows *= dims[i];
  if (scale.element_type() != ffi_dtype<M>())
    return invalid(op, "scale has dtype " + dtype_name(scale.element_type()) + "; expected " +
                           dtype_name(ffi_dtype<M>()) + " (the math type)");
  if (static_cast<int64_t>(scale.element_count()) != shape.rows)
    return invalid(op, "scale has " + std::to_string(scale.element_count()) +
                           " elements; expected one per row (" + std::to_string(shape.rows) + ")");
  return ffi::Error::Success();
}

// The static ops' optional zero point: none (symmetric) or int32, one per row.
inline ffi::Error decode_zero_point(const char* op, ffi::RemainingArgs rest, int64_t rows, const int32_t*& zp) {
  zp = nullptr;
  if (rest.size() > 1) return invalid(op, "expected at most one zero_point operand");
  if (rest.size() == 0) return ffi::Error::Success();
  auto buf = rest.get<ffi::AnyBuffer>(0);
  if (buf.has_error()) return buf.error();
  if (buf->element_type() != ffi::DataType::S32)
    return invalid(op, "zero_point has dtype " + dtype_name(buf->element_type()) + "; expected int32");
  if (static_cast<int64_t>(buf->element_count()) != rows)
    return invalid(op, "zero_point has " + std::to_string(buf->element_count()) +
                           " elements; expected one per row (" + std::to_string(rows) + ")");
  zp = static_cast<const int32_t*>(buf->untyped_data());
  return ffi::Error::Success();
}

template <class M>
ffi::Error check_static(const char* op, ffi::AnyBuffer data, ffi::AnyBuffer out, ffi::AnyBuffer scale,
                        ffi::RemainingArgs rest, Rows& shape, const int32_t*& zp) {
  if (auto e = check_rows<M>(op, data, out, scale, shape); !e.success()) return e;
  return decode_zero_point(op, rest, shape.rows, zp);
}

template <class Q>
ffi::Error check_grid(const char* op, int32_t qmin, int32_t qmax) {
  constexpr int64_t lo = std::numeric_limits<Q>::min(), hi = std::numeric_limits<Q>::max();
  if (qmin > qmax || qmin < lo || qmax > hi)
    return invalid(op, "need " + std::to_string(lo) + " <= qmin <= qmax <= " + std::to_string(hi) +
                           ", got qmin=" + std::to_string(qmin) + ", qmax=" + std::to_string(qmax));
  return ffi::Error::Success();
}

template <class Op, class M>
Op make_op(ffi::AnyBuffer scale, const int32_t* zp, int32_t qmin, int32_t qmax) {
  Op op;
  op.scale = static_cast<const M*>(scale.untyped_data());
  op.zero_point = zp;
  op.has_zp = zp != nullptr;
  op.qmin = M(qmin);
  op.qmax = M(qmax);
  return op;
}

template <class T> T* data_of(ffi::AnyBuffer b) { return static_cast<T*>(b.untyped_data()); }

// x[..., D] -> q (int8/uint8)
template <class Exec>
ffi::Error quantize(const Exec& exec, ffi::AnyBuffer x, ffi::AnyBuffer scale, ffi::RemainingArgs rest,
                    ffi::Result<ffi::AnyBuffer> q, int32_t qmin, int32_t qmax) {
  constexpr const char* op = "quantize_per_token";
  return dispatch_float(op, "x", x.element_type(), [&](auto xt) {
    using T = typename decltype(xt)::type;
    using M = math_t<T>;
    return dispatch_int(op, "the output", q->element_type(), [&](auto qt) {
      using Q = typename decltype(qt)::type;
      Rows s;
      const int32_t* zp;
      if (auto e = check_static<M>(op, x, *q, scale, rest, s, zp); !e.success()) return e;
      if (auto e = check_grid<Q>(op, qmin, qmax); !e.success()) return e;
      return exec.map_rows(make_op<QuantizeOp<T, Q>, M>(scale, zp, qmin, qmax), s.rows, s.cols,
                           data_of<Q>(*q), data_of<const T>(x));
    });
  });
}

// q[..., D] -> y (float); the math type follows y.
template <class Exec>
ffi::Error dequantize(const Exec& exec, ffi::AnyBuffer q, ffi::AnyBuffer scale, ffi::RemainingArgs rest,
                      ffi::Result<ffi::AnyBuffer> y) {
  constexpr const char* op = "dequantize_per_token";
  return dispatch_int(op, "q", q.element_type(), [&](auto qt) {
    using Q = typename decltype(qt)::type;
    return dispatch_float(op, "the output", y->element_type(), [&](auto yt) {
      using T = typename decltype(yt)::type;
      using M = math_t<T>;
      Rows s;
      const int32_t* zp;
      if (auto e = check_static<M>(op, q, *y, scale, rest, s, zp); !e.success()) return e;
      return exec.map_rows(make_op<DequantizeOp<Q, T>, M>(scale, zp, 0, 0), s.rows, s.cols,
                           data_of<T>(*y), data_of<const Q>(q));
    });
  });
}

// x[..., D] -> dequantize(quantize(x)) in x's dtype.
template <class Exec>
ffi::Error fake_quantize(const Exec& exec, ffi::AnyBuffer x, ffi::AnyBuffer scale, ffi::RemainingArgs rest,
                         ffi::Result<ffi::AnyBuffer> y, int32_t qmin, int32_t qmax) {
  constexpr const char* op = "fake_quantize_per_token";
  return dispatch_float(op, "x", x.element_type(), [&](auto xt) {
    using T = typename decltype(xt)::type;
    using M = math_t<T>;
    Rows s;
    const int32_t* zp;
    if (auto e = check_static<M>(op, x, *y, scale, rest, s, zp); !e.success()) return e;
    if (x.element_type() != y->element_type()) return invalid(op, "the output must have x's dtype");
    if (qmin > qmax) return invalid(op, "need qmin <= qmax");
    return exec.map_rows(make_op<FakeQuantizeOp<T>, M>(scale, zp, qmin, qmax), s.rows, s.cols,
                         data_of<T>(*y), data_of<const T>(x));
  });
}

// The backward ops' operands: g and dx shaped and typed like x, on the static layout.
template <class M>
ffi::Error check_grad(const char* op, ffi::AnyBuffer g, ffi::AnyBuffer x, ffi::AnyBuffer scale,
                      ffi::RemainingArgs rest, ffi::AnyBuffer dx, int32_t qmin, int32_t qmax, Rows& s,
                      const int32_t*& zp) {
  if (auto e = check_static<M>(op, x, dx, scale, rest, s, zp); !e.success()) return e;
  if (auto e = check_same_dims(op, "g", g, "x", x); !e.success()) return e;
  if (g.element_type() != x.element_type() || dx.element_type() != x.element_type())
    return invalid(op, "g and dx must have x's dtype");
  if (qmin > qmax) return invalid(op, "need qmin <= qmax");
  return ffi::Error::Success();
}

// (g, x) -> dx, the straight-through estimator of fake_quantize.
template <class Exec>
ffi::Error fake_quantize_grad(const Exec& exec, ffi::AnyBuffer g, ffi::AnyBuffer x, ffi::AnyBuffer scale,
                              ffi::RemainingArgs rest, ffi::Result<ffi::AnyBuffer> dx, int32_t qmin,
                              int32_t qmax) {
  constexpr const char* op = "fake_quantize_per_token_grad";
  return dispatch_float(op, "x", x.element_type(), [&](auto xt) {
    using T = typename decltype(xt)::type;
    using M = math_t<T>;
    Rows s;
    const int32_t* zp;
    if (auto e = check_grad<M>(op, g, x, scale, rest, *dx, qmin, qmax, s, zp); !e.success()) return e;
    return exec.map_rows(make_op<FakeQuantizeGradOp<T>, M>(scale, zp, qmin, qmax), s.rows, s.cols,
                         data_of<T>(*dx), data_of<const T>(g), data_of<const T>(x));
  });
}

// (g, x) -> (dx, ds): the straight-through dx and the LSQ gradient of the scale, one pass.
template <class Exec>
ffi::Error fake_quantize_lsq_grad(const Exec& exec, ffi::AnyBuffer g, ffi::AnyBuffer x, ffi::AnyBuffer scale,
                                  ffi::RemainingArgs rest, ffi::Result<ffi::AnyBuffer> dx,
                                  ffi::Result<ffi::AnyBuffer> ds, int32_t qmin, int32_t qmax) {
  constexpr const char* op = "fake_quantize_per_token_lsq_grad";
  return dispatch_float(op, "x", x.element_type(), [&](auto xt) {
    using T = typename decltype(xt)::type;
    using M = math_t<T>;
    Rows s;
    const int32_t* zp;
    if (auto e = check_grad<M>(op, g, x, scale, rest, *dx, qmin, qmax, s, zp); !e.success()) return e;
    if (ds->element_type() != ffi_dtype<M>() || static_cast<int64_t>(ds->element_count()) != s.rows)
      return invalid(op, "ds must have scale's dtype and shape");
    return exec.reduce_rows(make_op<LsqGradOp<T>, M>(scale, zp, qmin, qmax), s.rows, s.cols, data_of<T>(*dx),
                            data_of<M>(*ds), data_of<const T>(g), data_of<const T>(x));
  });
}

// Checks the (scale, zero_point) outputs of a dynamic op against x.
template <class M>
ffi::Error check_qparam_outputs(const char* op, ffi::AnyBuffer x, ffi::AnyBuffer out, ffi::AnyBuffer scale,
                                ffi::AnyBuffer zp, Rows& shape) {
  if (auto e = check_rows<M>(op, x, out, scale, shape); !e.success()) return e;
  if (zp.element_type() != ffi::DataType::S32 || static_cast<int64_t>(zp.element_count()) != shape.rows)
    return invalid(op, "the zero_point output must be int32 with one value per row");
  return ffi::Error::Success();
}

template <class Base, class M>
Dynamic<Base> make_dynamic_op(bool symmetric, int32_t qmin, int32_t qmax) {
  Dynamic<Base> op;
  op.scale = nullptr;
  op.zero_point = nullptr;
  op.has_zp = !symmetric;
  op.qmin = M(qmin);
  op.qmax = M(qmax);
  return op;
}

// x[..., D] -> (q, scale, zero_point): each row's parameters from its range, in one pass.
template <class Exec>
ffi::Error quantize_dynamic(const Exec& exec, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> q,
                            ffi::Result<ffi::AnyBuffer> scale, ffi::Result<ffi::AnyBuffer> zp, bool symmetric,
                            int32_t qmin, int32_t qmax) {
  constexpr const char* op = "quantize_per_token_dynamic";
  return dispatch_float(op, "x", x.element_type(), [&](auto xt) {
    using T = typename decltype(xt)::type;
    using M = math_t<T>;
    return dispatch_int(op, "the output", q->element_type(), [&](auto qt) {
      using Q = typename decltype(qt)::type;
      Rows s;
      if (auto e = check_qparam_outputs<M>(op, x, *q, *scale, *zp, s); !e.success()) return e;
      if (auto e = check_grid<Q>(op, qmin, qmax); !e.success()) return e;
      return exec.dynamic_rows(make_dynamic_op<QuantizeOp<T, Q>, M>(symmetric, qmin, qmax), s.rows, s.cols,
                               data_of<Q>(*q), data_of<const T>(x), data_of<M>(*scale), data_of<int32_t>(*zp));
    });
  });
}

// x[..., D] -> (dequantize(quantize(x)), scale, zero_point), the fused dynamic fake-quant.
template <class Exec>
ffi::Error fake_quantize_dynamic(const Exec& exec, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y,
                                 ffi::Result<ffi::AnyBuffer> scale, ffi::Result<ffi::AnyBuffer> zp,
                                 bool symmetric, int32_t qmin, int32_t qmax) {
  constexpr const char* op = "fake_quantize_per_token_dynamic";
  return dispatch_float(op, "x", x.element_type(), [&](auto xt) {
    using T = typename decltype(xt)::type;
    using M = math_t<T>;
    Rows s;
    if (auto e = check_qparam_outputs<M>(op, x, *y, *scale, *zp, s); !e.success()) return e;
    if (x.element_type() != y->element_type()) return invalid(op, "the output must have x's dtype");
    if (qmin >= qmax) return invalid(op, "need qmin < qmax");
    return exec.dynamic_rows(make_dynamic_op<FakeQuantizeOp<T>, M>(symmetric, qmin, qmax), s.rows, s.cols,
                             data_of<T>(*y), data_of<const T>(x), data_of<M>(*scale), data_of<int32_t>(*zp));
  });
}

// The FFI signatures, shared by both backends. `B` is ffi::Ffi::Bind() with any
// backend context (the CUDA stream) already bound.
template <class B> auto bind_quantize(B b) {
  return std::move(b).template Arg<ffi::AnyBuffer>().template Arg<ffi::AnyBuffer>().RemainingArgs()
      .template Ret<ffi::AnyBuffer>().template Attr<int32_t>("qmin").template Attr<int32_t>("qmax");
}
template <class B> auto bind_dequantize(B b) {
  return std::move(b).template Arg<ffi::AnyBuffer>().template Arg<ffi::AnyBuffer>().RemainingArgs()
      .template Ret<ffi::AnyBuffer>();
}
template <class B> auto bind_dynamic(B b) {
  return std::move(b).template Arg<ffi::AnyBuffer>().template Ret<ffi::AnyBuffer>().template Ret<ffi::AnyBuffer>()
      .template Ret<ffi::AnyBuffer>().template Attr<bool>("symmetric").template Attr<int32_t>("qmin")
      .template Attr<int32_t>("qmax");
}
template <class B> auto bind_fake_quantize_grad(B b) {
  return bind_quantize(std::move(b).template Arg<ffi::AnyBuffer>());
}
template <class B> auto bind_lsq_grad(B b) {
  return std::move(b).template Arg<ffi::AnyBuffer>().template Arg<ffi::AnyBuffer>().template Arg<ffi::AnyBuffer>()
      .RemainingArgs().template Ret<ffi::AnyBuffer>().template Ret<ffi::AnyBuffer>()
      .template Attr<int32_t>("qmin").template Attr<int32_t>("qmax");
}

}  // namespace baracuda
