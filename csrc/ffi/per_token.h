// Handler bodies of the eight per-token ops (quantize, dequantize, fake_quantize, its gradient,
// the LSQ gradient, the dynamic quantize and fake-quantize, and the rows-and-columns quantize) and their FFI
// signatures, shared by the CPU and CUDA backends. Each body checks its operands, builds its functor of
// contract/numerics.h and runs it on its backend's row engine, the Exec (cpu/engine.h,
// cuda/engine.cu), whose calls (data [N, D] row-major; each returns an ffi::Error) are:
//   map_rows(op, rows, cols, out, in...)          out[r, c] = op(op.row(r), in[r, c]...)
//   reduce_rows(op, rows, cols, out, sums, in...) the same, with op adding each element's term
//                                                 to its row's sum (type M): sums[r]
//   dynamic_rows(op, rows, cols, out, scale, zp, in...)
//                                                 h = op.value(in[r, c]...); p = op.params(RowRange
//                                                 of h[r, :]); out[r, c] = op.quantize(p, h[r, c]);
//                                                 scale[r], zp[r] (when not null) from p
//   dynamic_rows_and_columns(op, rows, cols, padded, q, scale, q_t, scale_t, x)
//                                                 dynamic_rows of x (symmetric) into q, scale, and
//                                                 of x.T with padded - rows zero tokens into q_t,
//                                                 scale_t
// Each row's result depends on that row alone, and a sum on a fixed order.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>
#include <utility>

#include "contract/numerics.h"
#include "ffi/dispatch.h"

namespace baracuda {

// ---- the checks of the static ops: a per-row scale in, an optional zero point ----------------

// The optional zero point: none (symmetric) or int32, one per row.
inline ffi::Error decode_zero_point(const char* op, ffi::RemainingArgs rest, int64_t rows, const int32_t*& zp) {
  zp = nullptr;
  if (rest.size() > 1) return invalid(op, "expected at most one zero_point operand");
  if (rest.size() == 0) return ffi::Error::Success();
  std::optional<ffi::AnyBuffer> buf;
  BJ_TRY(remaining(rest, 0, buf));
  if (buf->element_type() != ffi::DataType::S32)
    return invalid(op, "zero_point has dtype " + dtype_name(buf->element_type()) + "; expected int32");
  if (static_cast<int64_t>(buf->element_count()) != rows)
    return invalid(op, "zero_point has " + std::to_string(buf->element_count()) + " elements; expected one per row (" +
                           std::to_string(rows) + ")");
  zp = data_of<const int32_t>(*buf);
  return ffi::Error::Success();
}

template <class M>
ffi::Error check_static(const char* op, ffi::AnyBuffer data, ffi::AnyBuffer out, ffi::AnyBuffer scale,
                        ffi::RemainingArgs rest, Rows& shape, const int32_t*& zp) {
  BJ_TRY(check_rows<M>(op, data, out, scale, shape));
  return decode_zero_point(op, rest, shape.rows, zp);
}

// The backward ops' operands: g and dx shaped and typed like x, on the static layout.
template <class F, class M>
ffi::Error check_grad(const char* op, ffi::AnyBuffer g, ffi::AnyBuffer x, ffi::AnyBuffer scale, ffi::RemainingArgs rest,
                      ffi::AnyBuffer dx, int32_t qmin, int32_t qmax, Rows& s, const int32_t*& zp) {
  BJ_TRY(check_static<M>(op, x, dx, scale, rest, s, zp));
  BJ_TRY(check_same_dims(op, "g", g, "x", x));
  if (g.element_type() != x.element_type() || dx.element_type() != x.element_type())
    return invalid(op, "g and dx must have x's dtype");
  return check_grid<F>(op, qmin, qmax, zp != nullptr);
}

// The (scale, zero_point) outputs of a dynamic op, against x.
template <class M>
ffi::Error check_qparam_outputs(const char* op, ffi::AnyBuffer x, ffi::AnyBuffer out, ffi::AnyBuffer scale,
                                ffi::AnyBuffer zp, Rows& shape) {
  BJ_TRY(check_rows<M>(op, x, out, scale, shape));
  if (zp.element_type() != ffi::DataType::S32 || static_cast<int64_t>(zp.element_count()) != shape.rows)
    return invalid(op, "the zero_point output must be int32 with one value per row");
  return ffi::Error::Success();
}

// ---- the handler bodies: the backend's Exec first, then the FFI operands ----------------------

// x[..., D] -> q, in the output's format.
template <class Exec>
ffi::Error quantize(Exec exec, ffi::AnyBuffer x, ffi::AnyBuffer scale, ffi::RemainingArgs rest,
                    ffi::Result<ffi::AnyBuffer> q, int32_t qmin, int32_t qmax) {
  return dispatch(exec.op, dtype_of<Floats>("x", x), dtype_of<Formats>("the output", *q), [&](auto t, auto f) {
    using T = typename decltype(t)::type;
    using F = typename decltype(f)::type;
    using M = math_t<T>;
    Rows s;
    const int32_t* zp;
    BJ_TRY(check_static<M>(exec.op, x, *q, scale, rest, s, zp));
    BJ_TRY(check_grid<F>(exec.op, qmin, qmax, zp != nullptr));
    return exec.map_rows(make_op<QuantizeOp<T, F>>(data_of<const M>(scale), zp, qmin, qmax), s.rows, s.cols,
                         data_of<typename F::storage>(*q), data_of<const T>(x));
  });
}

// q[..., D] -> y (float); the math type follows y.
template <class Exec>
ffi::Error dequantize(Exec exec, ffi::AnyBuffer q, ffi::AnyBuffer scale, ffi::RemainingArgs rest,
                      ffi::Result<ffi::AnyBuffer> y) {
  return dispatch(exec.op, dtype_of<Formats>("q", q), dtype_of<Floats>("the output", *y), [&](auto f, auto t) {
    using F = typename decltype(f)::type;
    using T = typename decltype(t)::type;
    using M = math_t<T>;
    Rows s;
    const int32_t* zp;
    BJ_TRY(check_static<M>(exec.op, q, *y, scale, rest, s, zp));
    if (F::kFloat && zp) return invalid(exec.op, std::string(F::kName) + " takes no zero_point");
    return exec.map_rows(make_op<DequantizeOp<F, T>>(data_of<const M>(scale), zp, 0, 0), s.rows, s.cols, data_of<T>(*y),
                         data_of<const typename F::storage>(q));
  });
}

// x[..., D] -> dequantize(quantize(x)) in x's dtype.
template <class Exec>
ffi::Error fake_quantize(Exec exec, ffi::AnyBuffer x, ffi::AnyBuffer scale, ffi::RemainingArgs rest,
                         ffi::Result<ffi::AnyBuffer> y, std::string_view format, int32_t qmin, int32_t qmax) {
  return dispatch(exec.op, dtype_of<Floats>("x", x), named<Formats>(format), [&](auto t, auto f) {
    using T = typename decltype(t)::type;
    using F = typename decltype(f)::type;
    using M = math_t<T>;
    Rows s;
    const int32_t* zp;
    BJ_TRY(check_static<M>(exec.op, x, *y, scale, rest, s, zp));
    if (x.element_type() != y->element_type()) return invalid(exec.op, "the output must have x's dtype");
    BJ_TRY(check_grid<F>(exec.op, qmin, qmax, zp != nullptr));
    return exec.map_rows(make_op<FakeQuantizeOp<T, typename F::grid>>(data_of<const M>(scale), zp, qmin, qmax), s.rows,
                         s.cols, data_of<T>(*y), data_of<const T>(x));
  });
}

// (g, x) -> dx, the straight-through estimator of fake_quantize.
template <class Exec>
ffi::Error fake_quantize_grad(Exec exec, ffi::AnyBuffer g, ffi::AnyBuffer x, ffi::AnyBuffer scale,
                              ffi::RemainingArgs rest, ffi::Result<ffi::AnyBuffer> dx, std::string_view format,
                              int32_t qmin, int32_t qmax) {
  return dispatch(exec.op, dtype_of<Floats>("x", x), named<Formats>(format), [&](auto t, auto f) {
    using T = typename decltype(t)::type;
    using F = typename decltype(f)::type;
    using M = math_t<T>;
    Rows s;
    const int32_t* zp;
    BJ_TRY((check_grad<F, M>(exec.op, g, x, scale, rest, *dx, qmin, qmax, s, zp)));
    return exec.map_rows(make_op<FakeQuantizeGradOp<T, typename F::grid>>(data_of<const M>(scale), zp, qmin, qmax),
                         s.rows, s.cols, data_of<T>(*dx), data_of<const T>(g), data_of<const T>(x));
  });
}

// (g, x) -> (dx, ds): the straight-through dx and the LSQ gradient of the scale, one pass.
template <class Exec>
ffi::Error fake_quantize_lsq_grad(Exec exec, ffi::AnyBuffer g, ffi::AnyBuffer x, ffi::AnyBuffer scale,
                                  ffi::RemainingArgs rest, ffi::Result<ffi::AnyBuffer> dx,
                                  ffi::Result<ffi::AnyBuffer> ds, std::string_view format, int32_t qmin, int32_t qmax) {
  return dispatch(exec.op, dtype_of<Floats>("x", x), named<Formats>(format), [&](auto t, auto f) {
    using T = typename decltype(t)::type;
    using F = typename decltype(f)::type;
    using M = math_t<T>;
    Rows s;
    const int32_t* zp;
    BJ_TRY((check_grad<F, M>(exec.op, g, x, scale, rest, *dx, qmin, qmax, s, zp)));
    if (ds->element_type() != ffi_dtype_of<M>() || static_cast<int64_t>(ds->element_count()) != s.rows)
      return invalid(exec.op, "ds must have scale's dtype and shape");
    return exec.reduce_rows(make_op<LsqGradOp<T, typename F::grid>>(data_of<const M>(scale), zp, qmin, qmax), s.rows,
                            s.cols, data_of<T>(*dx), data_of<M>(*ds), data_of<const T>(g), data_of<const T>(x));
  });
}

// x[..., D] -> (q, scale, zero_point): each row's parameters from its range, in one pass.
template <class Exec>
ffi::Error quantize_dynamic(Exec exec, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> q,
                            ffi::Result<ffi::AnyBuffer> scale, ffi::Result<ffi::AnyBuffer> zp, bool symmetric,
                            int32_t qmin, int32_t qmax, double scale_ub, double min_scale, bool pow2_scale) {
  return dispatch(exec.op, dtype_of<Floats>("x", x), dtype_of<Formats>("the output", *q), [&](auto t, auto f) {
    using T = typename decltype(t)::type;
    using F = typename decltype(f)::type;
    using M = math_t<T>;
    Rows s;
    BJ_TRY(check_qparam_outputs<M>(exec.op, x, *q, *scale, *zp, s));
    BJ_TRY(check_dynamic<F>(exec.op, symmetric, qmin, qmax, scale_ub, min_scale, pow2_scale));
    using Op = Produced<Dynamic<QuantizeOp<T, F>>, Identity>;
    return exec.dynamic_rows(make_dynamic_op<Op, M>(symmetric, qmin, qmax, scale_ub, min_scale, pow2_scale), s.rows,
                             s.cols, data_of<typename F::storage>(*q), data_of<M>(*scale), data_of<int32_t>(*zp),
                             data_of<const T>(x));
  });
}

// x[..., D] -> (dequantize(quantize(x)), scale, zero_point), the fused dynamic fake-quant.
template <class Exec>
ffi::Error fake_quantize_dynamic(Exec exec, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y,
                                 ffi::Result<ffi::AnyBuffer> scale, ffi::Result<ffi::AnyBuffer> zp,
                                 std::string_view format, bool symmetric, int32_t qmin, int32_t qmax, double scale_ub,
                                 double min_scale, bool pow2_scale) {
  return dispatch(exec.op, dtype_of<Floats>("x", x), named<Formats>(format), [&](auto t, auto f) {
    using T = typename decltype(t)::type;
    using F = typename decltype(f)::type;
    using M = math_t<T>;
    Rows s;
    BJ_TRY(check_qparam_outputs<M>(exec.op, x, *y, *scale, *zp, s));
    if (x.element_type() != y->element_type()) return invalid(exec.op, "the output must have x's dtype");
    BJ_TRY(check_dynamic<F>(exec.op, symmetric, qmin, qmax, scale_ub, min_scale, pow2_scale));
    using Op = Produced<Dynamic<FakeQuantizeOp<T, typename F::grid>>, Identity>;
    return exec.dynamic_rows(make_dynamic_op<Op, M>(symmetric, qmin, qmax, scale_ub, min_scale, pow2_scale), s.rows,
                             s.cols, data_of<T>(*y), data_of<M>(*scale), data_of<int32_t>(*zp), data_of<const T>(x));
  });
}

// x[..., D] (N rows) -> (q, scale, q_t, scale_t): x's rows quantized as quantize_dynamic quantizes them, and
// its columns (over the tokens) written transposed, q_t[D, N'] and scale_t[D]: the rows of x.T
// with N' - N zero tokens after them (a zero token changes no column's range). Symmetric grids
// only (each scale from one amax, which a backend may reduce in any order: a max is exact).
template <class Exec>
ffi::Error quantize_rows_and_columns(Exec exec, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> q,
                                     ffi::Result<ffi::AnyBuffer> scale, ffi::Result<ffi::AnyBuffer> q_t,
                                     ffi::Result<ffi::AnyBuffer> scale_t, int32_t qmin, int32_t qmax, double scale_ub,
                                     double min_scale, bool pow2_scale) {
  const auto formats = dtype_of<SymmetricFormats>("the output", *q);
  return dispatch(exec.op, dtype_of<FusedFloats>("x", x), formats, [&](auto t, auto f) {
    using T = typename decltype(t)::type;
    using F = typename decltype(f)::type;
    using M = math_t<T>;
    Rows s;
    BJ_TRY(check_rows<M>(exec.op, x, *q, *scale, s));
    const auto dims_t = q_t->dimensions();
    if (dims_t.size() != 2 || dims_t[0] != s.cols || dims_t[1] < s.rows)
      return invalid(exec.op, "q_t must be [D, N'] for x [N, D] (N the rows), with N' >= N");
    if (q_t->element_type() != q->element_type()) return invalid(exec.op, "q_t must have q's dtype");
    BJ_TRY(check_count(exec.op, "scale_t", *scale_t, ffi_dtype_of<M>(), s.cols, "one value per column"));
    BJ_TRY(check_dynamic<F>(exec.op, true, qmin, qmax, scale_ub, min_scale, pow2_scale));
    using Op = Produced<Dynamic<QuantizeOp<T, F>>, Identity>;
    using Q = typename F::storage;
    return exec.dynamic_rows_and_columns(make_dynamic_op<Op, M>(true, qmin, qmax, scale_ub, min_scale, pow2_scale),
                                         s.rows, s.cols, dims_t[1], data_of<Q>(*q), data_of<M>(*scale),
                                         data_of<Q>(*q_t), data_of<M>(*scale_t), data_of<const T>(x));
  });
}

// ---- the FFI signatures (ffi/dispatch.h's binders) ---------------------------------------------

// (operands..., [zero_point]) -> results
template <int In, int Out, class B> auto static_op(B&& b) { return rets<Out>(args<In>(std::move(b)).RemainingArgs()); }
template <class B> auto dynamic_attrs(B&& b) {
  return grid_attrs(std::move(b).template Attr<bool>("symmetric"))
      .template Attr<double>("scale_ub")
      .template Attr<double>("min_scale")
      .template Attr<bool>("pow2_scale");
}

template <class B> auto bind_quantize(B&& b) { return grid_attrs(static_op<2, 1>(std::move(b))); }
template <class B> auto bind_dequantize(B&& b) { return static_op<2, 1>(std::move(b)); }
template <class B> auto bind_fake_quantize(B&& b) { return format_attrs(static_op<2, 1>(std::move(b))); }
template <class B> auto bind_fake_quantize_grad(B&& b) { return format_attrs(static_op<3, 1>(std::move(b))); }
template <class B> auto bind_lsq_grad(B&& b) { return format_attrs(static_op<3, 2>(std::move(b))); }
template <class B> auto bind_quantize_dynamic(B&& b) { return dynamic_attrs(rets<3>(args<1>(std::move(b)))); }
template <class B> auto bind_rows_and_columns(B&& b) {
  return grid_attrs(rets<4>(args<1>(std::move(b))))
      .template Attr<double>("scale_ub")
      .template Attr<double>("min_scale")
      .template Attr<bool>("pow2_scale");
}
template <class B> auto bind_fake_quantize_dynamic(B&& b) {
  return dynamic_attrs(rets<3>(args<1>(std::move(b))).template Attr<std::string_view>("format"));
}

}  // namespace baracuda
