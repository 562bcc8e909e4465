// Handler bodies shared by the CPU and CUDA backends: argument checks, dtype
// dispatch, the construction of the numerics functors, the FFI signatures.
// A backend supplies an `Exec`, built from its FFI context, with one row engine
// (data [N, D] row-major; every call returns an ffi::Error):
//   map_rows(op, rows, cols, out, in...)          out[r, c] = op(op.row(r), in[r, c]...)
//   reduce_rows(op, rows, cols, out, sums, in...) the same, with op adding each element's term
//                                                 to its row's sum (type M): sums[r]
//   dynamic_rows(op, rows, cols, out, scale, zp, in...)
//                                                 h = op.value(in[r, c]...); p = op.params(RowRange
//                                                 of h[r, :]); out[r, c] = op.quantize(p, h[r, c]);
//                                                 scale[r], zp[r] (when not null) from p
// Each row's result depends on that row alone, and a sum on a fixed order.
#pragma once

#include <cstdint>
#include <limits>
#include <optional>
#include <string>
#include <string_view>
#include <type_traits>
#include <utility>

#include "producers.h"
#include "xla/ffi/api/ffi.h"

namespace baracuda {

namespace ffi = xla::ffi;

template <class T> struct Tag { using type = T; };

template <class... Fs>
std::string format_names(FormatList<Fs...>) {
  std::string names;
  ((names += (names.empty() ? "" : ", ") + std::string(Fs::kName)), ...);
  return names;
}

template <class... Fs>
std::string format_name(ffi::DataType t, FormatList<Fs...>) {
  std::string name = "dtype #" + std::to_string(static_cast<int>(t));
  ((t == Fs::kDtype ? void(name = Fs::kName) : void()), ...);
  return name;
}

inline std::string dtype_name(ffi::DataType t) {
  switch (t) {
    case ffi::DataType::F16: return "float16";
    case ffi::DataType::BF16: return "bfloat16";
    case ffi::DataType::F32: return "float32";
    case ffi::DataType::F64: return "float64";
    case ffi::DataType::S32: return "int32";
    default: break;
  }
  return format_name(t, Formats{});
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

// Calls fn(Tag<F>{}) for the first output format F that `is(Tag<F>{})` picks out of
// Formats, or returns missing().
template <class Is, class Fn, class Missing, class... Fs>
ffi::Error find_format(FormatList<Fs...>, Is&& is, Fn&& fn, Missing&& missing) {
  std::optional<ffi::Error> result;
  ((!result && is(Tag<Fs>{}) ? void(result.emplace(fn(Tag<Fs>{}))) : void()), ...);
  return result ? std::move(*result) : missing();
}

// The format of a buffer's dtype (q of dequantize, the output of quantize).
template <class Fn>
ffi::Error dispatch_format(const char* op, const char* arg, ffi::DataType t, Fn&& fn) {
  return find_format(Formats{}, [&](auto f) { return decltype(f)::type::kDtype == t; }, fn, [&] {
    return invalid(op, std::string(arg) + " has dtype " + dtype_name(t) + "; expected one of " +
                           format_names(Formats{}));
  });
}

// The format named by an op's `format` attribute (the ops that store nothing).
template <class Fn>
ffi::Error dispatch_format(const char* op, std::string_view name, Fn&& fn) {
  return find_format(Formats{}, [&](auto f) { return name == decltype(f)::type::kName; }, fn, [&] {
    return invalid(op, "format is " + std::string(name) + "; expected one of " + format_names(Formats{}));
  });
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

// A format's grid: an integer one inside the type's range, or the float8 one,
// [-fmax, fmax] with no zero point.
template <class F>
ffi::Error check_grid(const char* op, int32_t qmin, int32_t qmax, bool has_zp) {
  if constexpr (F::kFloat) {
    if (has_zp) return invalid(op, std::string(F::kName) + " takes no zero_point");
    if (qmin != -F::kMax || qmax != F::kMax)
      return invalid(op, std::string(F::kName) + " has the fixed grid qmin=" + std::to_string(-F::kMax) +
                             ", qmax=" + std::to_string(F::kMax) + "; got qmin=" + std::to_string(qmin) +
                             ", qmax=" + std::to_string(qmax));
  } else if (qmin > qmax || qmin < F::kLowest || qmax > F::kMax) {
    return invalid(op, "need " + std::to_string(F::kLowest) + " <= qmin <= qmax <= " + std::to_string(F::kMax) +
                           " for " + F::kName + ", got qmin=" + std::to_string(qmin) +
                           ", qmax=" + std::to_string(qmax));
  }
  return ffi::Error::Success();
}

template <class Op, class M>
Op make_op(const M* scale, const int32_t* zp, int32_t qmin, int32_t qmax) {
  Op op;
  op.scale = scale;
  op.zero_point = zp;
  op.has_zp = zp != nullptr;
  op.qmin = M(qmin);
  op.qmax = M(qmax);
  return op;
}

template <class T> T* data_of(ffi::AnyBuffer b) { return static_cast<T*>(b.untyped_data()); }

// ---- the handler bodies. Each takes the backend's Exec first (built from the
// FFI context: the CUDA stream, the CPU thread pool), then the FFI operands.

// x[..., D] -> q, in the output's format.
template <class Exec>
ffi::Error quantize(Exec exec, ffi::AnyBuffer x, ffi::AnyBuffer scale, ffi::RemainingArgs rest,
                    ffi::Result<ffi::AnyBuffer> q, int32_t qmin, int32_t qmax) {
  constexpr const char* op = "quantize_per_token";
  return dispatch_float(op, "x", x.element_type(), [&](auto xt) {
    using T = typename decltype(xt)::type;
    using M = math_t<T>;
    return dispatch_format(op, "the output", q->element_type(), [&](auto qt) {
      using F = typename decltype(qt)::type;
      Rows s;
      const int32_t* zp;
      if (auto e = check_static<M>(op, x, *q, scale, rest, s, zp); !e.success()) return e;
      if (auto e = check_grid<F>(op, qmin, qmax, zp != nullptr); !e.success()) return e;
      return exec.map_rows(make_op<QuantizeOp<T, F>>(data_of<const M>(scale), zp, qmin, qmax), s.rows, s.cols,
                           data_of<typename F::storage>(*q), data_of<const T>(x));
    });
  });
}

// q[..., D] -> y (float); the math type follows y.
template <class Exec>
ffi::Error dequantize(Exec exec, ffi::AnyBuffer q, ffi::AnyBuffer scale, ffi::RemainingArgs rest,
                      ffi::Result<ffi::AnyBuffer> y) {
  constexpr const char* op = "dequantize_per_token";
  return dispatch_format(op, "q", q.element_type(), [&](auto qt) {
    using F = typename decltype(qt)::type;
    return dispatch_float(op, "the output", y->element_type(), [&](auto yt) {
      using T = typename decltype(yt)::type;
      using M = math_t<T>;
      Rows s;
      const int32_t* zp;
      if (auto e = check_static<M>(op, q, *y, scale, rest, s, zp); !e.success()) return e;
      if (F::kFloat && zp) return invalid(op, std::string(F::kName) + " takes no zero_point");
      return exec.map_rows(make_op<DequantizeOp<F, T>>(data_of<const M>(scale), zp, 0, 0), s.rows, s.cols,
                           data_of<T>(*y), data_of<const typename F::storage>(q));
    });
  });
}

// x[..., D] -> dequantize(quantize(x)) in x's dtype.
template <class Exec>
ffi::Error fake_quantize(Exec exec, ffi::AnyBuffer x, ffi::AnyBuffer scale, ffi::RemainingArgs rest,
                         ffi::Result<ffi::AnyBuffer> y, std::string_view format, int32_t qmin, int32_t qmax) {
  constexpr const char* op = "fake_quantize_per_token";
  return dispatch_float(op, "x", x.element_type(), [&](auto xt) {
    using T = typename decltype(xt)::type;
    using M = math_t<T>;
    return dispatch_format(op, format, [&](auto ft) {
      using F = typename decltype(ft)::type;
      Rows s;
      const int32_t* zp;
      if (auto e = check_static<M>(op, x, *y, scale, rest, s, zp); !e.success()) return e;
      if (x.element_type() != y->element_type()) return invalid(op, "the output must have x's dtype");
      if (auto e = check_grid<F>(op, qmin, qmax, zp != nullptr); !e.success()) return e;
      return exec.map_rows(make_op<FakeQuantizeOp<T, typename F::grid>>(data_of<const M>(scale), zp, qmin, qmax),
                           s.rows, s.cols, data_of<T>(*y), data_of<const T>(x));
    });
  });
}

// The backward ops' operands: g and dx shaped and typed like x, on the static layout.
template <class F, class M>
ffi::Error check_grad(const char* op, ffi::AnyBuffer g, ffi::AnyBuffer x, ffi::AnyBuffer scale,
                      ffi::RemainingArgs rest, ffi::AnyBuffer dx, int32_t qmin, int32_t qmax, Rows& s,
                      const int32_t*& zp) {
  if (auto e = check_static<M>(op, x, dx, scale, rest, s, zp); !e.success()) return e;
  if (auto e = check_same_dims(op, "g", g, "x", x); !e.success()) return e;
  if (g.element_type() != x.element_type() || dx.element_type() != x.element_type())
    return invalid(op, "g and dx must have x's dtype");
  return check_grid<F>(op, qmin, qmax, zp != nullptr);
}

// (g, x) -> dx, the straight-through estimator of fake_quantize.
template <class Exec>
ffi::Error fake_quantize_grad(Exec exec, ffi::AnyBuffer g, ffi::AnyBuffer x, ffi::AnyBuffer scale,
                              ffi::RemainingArgs rest, ffi::Result<ffi::AnyBuffer> dx, std::string_view format,
                              int32_t qmin, int32_t qmax) {
  constexpr const char* op = "fake_quantize_per_token_grad";
  return dispatch_float(op, "x", x.element_type(), [&](auto xt) {
    using T = typename decltype(xt)::type;
    using M = math_t<T>;
    return dispatch_format(op, format, [&](auto ft) {
      using F = typename decltype(ft)::type;
      Rows s;
      const int32_t* zp;
      if (auto e = check_grad<F, M>(op, g, x, scale, rest, *dx, qmin, qmax, s, zp); !e.success()) return e;
      return exec.map_rows(
          make_op<FakeQuantizeGradOp<T, typename F::grid>>(data_of<const M>(scale), zp, qmin, qmax), s.rows,
          s.cols, data_of<T>(*dx), data_of<const T>(g), data_of<const T>(x));
    });
  });
}

// (g, x) -> (dx, ds): the straight-through dx and the LSQ gradient of the scale, one pass.
template <class Exec>
ffi::Error fake_quantize_lsq_grad(Exec exec, ffi::AnyBuffer g, ffi::AnyBuffer x, ffi::AnyBuffer scale,
                                  ffi::RemainingArgs rest, ffi::Result<ffi::AnyBuffer> dx,
                                  ffi::Result<ffi::AnyBuffer> ds, std::string_view format, int32_t qmin,
                                  int32_t qmax) {
  constexpr const char* op = "fake_quantize_per_token_lsq_grad";
  return dispatch_float(op, "x", x.element_type(), [&](auto xt) {
    using T = typename decltype(xt)::type;
    using M = math_t<T>;
    return dispatch_format(op, format, [&](auto ft) {
      using F = typename decltype(ft)::type;
      Rows s;
      const int32_t* zp;
      if (auto e = check_grad<F, M>(op, g, x, scale, rest, *dx, qmin, qmax, s, zp); !e.success()) return e;
      if (ds->element_type() != ffi_dtype<M>() || static_cast<int64_t>(ds->element_count()) != s.rows)
        return invalid(op, "ds must have scale's dtype and shape");
      return exec.reduce_rows(make_op<LsqGradOp<T, typename F::grid>>(data_of<const M>(scale), zp, qmin, qmax),
                              s.rows, s.cols, data_of<T>(*dx), data_of<M>(*ds), data_of<const T>(g),
                              data_of<const T>(x));
    });
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

// A dynamic op's grid: symmetric (scale_ub and pow2_scale allowed) or with a zero point (integer
// formats only).
template <class F>
ffi::Error check_dynamic(const char* op, bool symmetric, int32_t qmin, int32_t qmax, double scale_ub,
                         bool pow2_scale = false) {
  if (!(scale_ub > 0)) return invalid(op, "scale_ub must be positive (+inf for none), got " + std::to_string(scale_ub));
  if (!symmetric && (scale_ub != std::numeric_limits<double>::infinity() || pow2_scale))
    return invalid(op, "scale_ub and pow2_scale apply to symmetric quantization only");
  if (qmin >= qmax) return invalid(op, "need qmin < qmax");
  return check_grid<F>(op, qmin, qmax, !symmetric);
}

template <class Op, class M>
Op make_dynamic_op(bool symmetric, int32_t qmin, int32_t qmax, double scale_ub, bool pow2_scale = false) {
  Op op;
  op.scale = nullptr;
  op.zero_point = nullptr;
  op.has_zp = !symmetric;
  op.qmin = M(qmin);
  op.qmax = M(qmax);
  op.scale_ub = M(scale_ub);
  op.pow2_scale = pow2_scale;
  return op;
}

// x[..., D] -> (q, scale, zero_point): each row's parameters from its range, in one pass.
template <class Exec>
ffi::Error quantize_dynamic(Exec exec, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> q,
                            ffi::Result<ffi::AnyBuffer> scale, ffi::Result<ffi::AnyBuffer> zp, bool symmetric,
                            int32_t qmin, int32_t qmax, double scale_ub, bool pow2_scale) {
  constexpr const char* op = "quantize_per_token_dynamic";
  return dispatch_float(op, "x", x.element_type(), [&](auto xt) {
    using T = typename decltype(xt)::type;
    using M = math_t<T>;
    return dispatch_format(op, "the output", q->element_type(), [&](auto qt) {
      using F = typename decltype(qt)::type;
      Rows s;
      if (auto e = check_qparam_outputs<M>(op, x, *q, *scale, *zp, s); !e.success()) return e;
      if (auto e = check_dynamic<F>(op, symmetric, qmin, qmax, scale_ub, pow2_scale); !e.success()) return e;
      using Op = Produced<Dynamic<QuantizeOp<T, F>>, Identity>;
      return exec.dynamic_rows(make_dynamic_op<Op, M>(symmetric, qmin, qmax, scale_ub, pow2_scale), s.rows, s.cols,
                               data_of<typename F::storage>(*q), data_of<M>(*scale), data_of<int32_t>(*zp),
                               data_of<const T>(x));
    });
  });
}

// x[..., D] -> (dequantize(quantize(x)), scale, zero_point), the fused dynamic fake-quant.
template <class Exec>
ffi::Error fake_quantize_dynamic(Exec exec, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y,
                                 ffi::Result<ffi::AnyBuffer> scale, ffi::Result<ffi::AnyBuffer> zp,
                                 std::string_view format, bool symmetric, int32_t qmin, int32_t qmax,
                                 double scale_ub, bool pow2_scale) {
  constexpr const char* op = "fake_quantize_per_token_dynamic";
  return dispatch_float(op, "x", x.element_type(), [&](auto xt) {
    using T = typename decltype(xt)::type;
    using M = math_t<T>;
    return dispatch_format(op, format, [&](auto ft) {
      using F = typename decltype(ft)::type;
      Rows s;
      if (auto e = check_qparam_outputs<M>(op, x, *y, *scale, *zp, s); !e.success()) return e;
      if (x.element_type() != y->element_type()) return invalid(op, "the output must have x's dtype");
      if (auto e = check_dynamic<F>(op, symmetric, qmin, qmax, scale_ub, pow2_scale); !e.success()) return e;
      using Op = Produced<Dynamic<FakeQuantizeOp<T, typename F::grid>>, Identity>;
      return exec.dynamic_rows(make_dynamic_op<Op, M>(symmetric, qmin, qmax, scale_ub, pow2_scale), s.rows, s.cols,
                               data_of<T>(*y), data_of<M>(*scale), data_of<int32_t>(*zp), data_of<const T>(x));
    });
  });
}

// ---- the FFI signatures, shared by both backends. `b` is ffi::Ffi::Bind() with
// the backend's context (the CUDA stream, the CPU thread pool) already bound. A
// binding cannot be copied or moved, only extended: each helper takes it by
// reference and returns the extended one.
template <int N, class B> auto args(B&& b) {
  if constexpr (N == 1) return std::move(b).template Arg<ffi::AnyBuffer>();
  else return args<N - 1>(std::move(b).template Arg<ffi::AnyBuffer>());
}
template <int N, class B> auto rets(B&& b) {
  if constexpr (N == 1) return std::move(b).template Ret<ffi::AnyBuffer>();
  else return rets<N - 1>(std::move(b).template Ret<ffi::AnyBuffer>());
}
// (operands..., [zero_point]) -> results
template <int In, int Out, class B> auto static_op(B&& b) { return rets<Out>(args<In>(std::move(b)).RemainingArgs()); }
template <class B> auto grid_attrs(B&& b) {
  return std::move(b).template Attr<int32_t>("qmin").template Attr<int32_t>("qmax");
}
template <class B> auto format_attrs(B&& b) {
  return grid_attrs(std::move(b).template Attr<std::string_view>("format"));
}
template <class B> auto dynamic_attrs(B&& b) {
  return grid_attrs(std::move(b).template Attr<bool>("symmetric"))
      .template Attr<double>("scale_ub")
      .template Attr<bool>("pow2_scale");
}

template <class B> auto bind_quantize(B&& b) { return grid_attrs(static_op<2, 1>(std::move(b))); }
template <class B> auto bind_dequantize(B&& b) { return static_op<2, 1>(std::move(b)); }
template <class B> auto bind_fake_quantize(B&& b) { return format_attrs(static_op<2, 1>(std::move(b))); }
template <class B> auto bind_fake_quantize_grad(B&& b) { return format_attrs(static_op<3, 1>(std::move(b))); }
template <class B> auto bind_lsq_grad(B&& b) { return format_attrs(static_op<3, 2>(std::move(b))); }
template <class B> auto bind_quantize_dynamic(B&& b) { return dynamic_attrs(rets<3>(args<1>(std::move(b)))); }
template <class B> auto bind_fake_quantize_dynamic(B&& b) {
  return dynamic_attrs(rets<3>(args<1>(std::move(b))).template Attr<std::string_view>("format"));
}

}  // namespace baracuda
