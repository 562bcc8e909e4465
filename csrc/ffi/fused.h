// Handler bodies of the four fused ops (contract/producers.h) and their FFI signatures: RMSNorm
// (with a residual add) or a SiLU-gated product, then the per-token quantizer, forward and
// backward. Symmetric grids only (int8 and the float8 formats), float16/bfloat16/float32 data, a
// static per-row scale or a dynamic one.
//
// The engine calls they add to those of ffi/per_token.h:
//   norm_rows(io, rows, cols)        NormQuantizeRows: one pass a row (r, its sum of squares,
//                                    h, for a dynamic op h's range, then the quantizer)
//   norm_grad_rows(io, rows, cols)   NormGradRows: dx a row, dw per group of rows, then dw
// and map_rows / dynamic_rows take several inputs and a Produced op (h = value(inputs)), and
// map_rows a Split output for a Pair-valued op.
#pragma once

#include <cstdint>
#include <optional>
#include <string_view>
#include <type_traits>
#include <utility>

#include "contract/producers.h"
#include "ffi/dispatch.h"

namespace baracuda {

// A norm's weight: [D], in the data's dtype.
inline ffi::Error check_weight(const char* op, ffi::AnyBuffer weight, ffi::AnyBuffer data, int64_t cols) {
  if (weight.element_type() != data.element_type() || weight.dimensions().size() != 1 || weight.dimensions()[0] != cols)
    return invalid(op, "weight must be [D] = [" + std::to_string(cols) + "] with the data's dtype");
  return ffi::Error::Success();
}

// The output: F's storage (quantize) or x's dtype (fake-quantize). Sets `fake`.
template <class F>
ffi::Error check_output(const char* op, ffi::AnyBuffer out, ffi::AnyBuffer x, bool& fake) {
  fake = out.element_type() == x.element_type();
  if (!fake && out.element_type() != ffi_dtype_of<F>())
    return invalid(op, "the output has dtype " + dtype_name(out.element_type()) + "; expected " + F::kName +
                           " (quantize) or x's dtype (fake-quantize)");
  return check_same_dims(op, "the output", out, "x", x);
}

// The quantizer after a producer, built from the call's grid: static (the per-row `scale`, or
// dynamic when null), quantizing to F's storage or fake-quantizing to T (`fake`). Calls
// run(quantizer, output pointer).
template <class T, class F, class Run>
ffi::Error with_quantizer(const char* op, const float* scale, bool fake, ffi::AnyBuffer out, int32_t qmin, int32_t qmax,
                          double scale_ub, double min_scale, Run&& run) {
  using M = math_t<T>;
  using G = typename F::grid;
  if (scale) {
    BJ_TRY(check_grid<F>(op, qmin, qmax, false));
    if (fake) return run(make_op<FakeQuantizeOp<T, G>>(scale, nullptr, qmin, qmax), data_of<T>(out));
    return run(make_op<QuantizeOp<T, F>>(scale, nullptr, qmin, qmax), data_of<typename F::storage>(out));
  }
  BJ_TRY(check_dynamic<F>(op, true, qmin, qmax, scale_ub, min_scale));
  if (fake)
    return run(make_dynamic_op<Dynamic<FakeQuantizeOp<T, G>>, M>(true, qmin, qmax, scale_ub, min_scale),
               data_of<T>(out));
  return run(make_dynamic_op<Dynamic<QuantizeOp<T, F>>, M>(true, qmin, qmax, scale_ub, min_scale),
             data_of<typename F::storage>(out));
}

// ---- the handler bodies: the backend's Exec first, then the FFI operands ----------------------

// (x, weight, [residual], [scale]) -> (out, inv_rms, [scale], [residual_out]): the residual add,
// RMSNorm and the per-token quantizer in one pass a row. `scale` in: static; out: dynamic.
template <class Exec>
ffi::Error rms_norm_quantize(Exec exec, ffi::AnyBuffer x, ffi::AnyBuffer weight, ffi::RemainingArgs rest,
                             ffi::Result<ffi::AnyBuffer> out, ffi::Result<ffi::AnyBuffer> inv_rms,
                             ffi::RemainingRets more, std::string_view format, int32_t qmin, int32_t qmax, double eps,
                             bool has_residual, double scale_ub, double min_scale) {
  return dispatch(exec.op, dtype_of<FusedFloats>("x", x), named<SymmetricFormats>(format), [&](auto t, auto f) {
    using T = typename decltype(t)::type;
    using F = typename decltype(f)::type;
    using M = math_t<T>;
    Rows s;
    BJ_TRY(rows_of(exec.op, "x", x, s));
    if (!(eps > 0)) return invalid(exec.op, "eps must be positive, got " + std::to_string(eps));
    const size_t n_res = has_residual ? 1 : 0;
    if (rest.size() != n_res && rest.size() != n_res + 1)
      return invalid(exec.op, "expected x, weight, then the residual if has_residual, then a static scale or none");
    const bool dynamic = rest.size() == n_res;
    if (more.size() != size_t(dynamic) + n_res)
      return invalid(exec.op, "expected the results out, inv_rms, then the scale if dynamic, then residual_out");
    BJ_TRY(check_weight(exec.op, weight, x, s.cols));
    bool fake;
    BJ_TRY(check_output<F>(exec.op, *out, x, fake));
    BJ_TRY(check_count(exec.op, "inv_rms", *inv_rms, ffi::DataType::F32, s.rows, "one value per row"));
    const T* residual = nullptr;
    T* r_out = nullptr;
    if (has_residual) {
      std::optional<ffi::AnyBuffer> res, res_out;
      BJ_TRY(remaining(rest, 0, res));
      BJ_TRY(remaining(more, more.size() - 1, res_out));
      BJ_TRY(check_like(exec.op, "residual", *res, "x", x));
      BJ_TRY(check_like(exec.op, "residual_out", *res_out, "x", x));
      residual = data_of<const T>(*res);
      r_out = data_of<T>(*res_out);
    }
    std::optional<ffi::AnyBuffer> sc;  // the scale: a result if dynamic, else an operand
    BJ_TRY(dynamic ? remaining(more, 0, sc) : remaining(rest, n_res, sc));
    BJ_TRY(check_count(exec.op, "scale", *sc, ffi::DataType::F32, s.rows, "one value per row"));
    const float* scale_in = dynamic ? nullptr : data_of<const float>(*sc);
    float* scale_out = dynamic ? data_of<float>(*sc) : nullptr;
    const RmsNorm<T> norm{M(eps), M(1) / M(s.cols)};
    return with_quantizer<T, F>(
        exec.op, scale_in, fake, *out, qmin, qmax, scale_ub, min_scale, [&](auto quant, auto* out_ptr) {
          using Q = Produced<decltype(quant), Identity>;
          using Out = std::remove_pointer_t<decltype(out_ptr)>;
          NormQuantizeRows<T, Q, Out> io{
              norm,    Q{quant},  data_of<const T>(x), residual, data_of<const T>(weight), r_out,
              out_ptr, scale_out, data_of<M>(*inv_rms)};
          return exec.norm_rows(io, s.rows, s.cols);
        });
  });
}

// (g, r, weight, scale, inv_rms, [g_residual]) -> (dx, dw, dw_groups): the backward of
// rms_norm_fake_quantize through the straight-through quantizer, one pass a row.
template <class Exec>
ffi::Error rms_norm_grad(Exec exec, ffi::AnyBuffer g, ffi::AnyBuffer r, ffi::AnyBuffer weight, ffi::AnyBuffer scale,
                         ffi::AnyBuffer inv_rms, ffi::RemainingArgs rest, ffi::Result<ffi::AnyBuffer> dx,
                         ffi::Result<ffi::AnyBuffer> dw, ffi::Result<ffi::AnyBuffer> dw_groups, std::string_view format,
                         int32_t qmin, int32_t qmax) {
  return dispatch(exec.op, dtype_of<FusedFloats>("r", r), named<SymmetricFormats>(format), [&](auto t, auto f) {
    using T = typename decltype(t)::type;
    using F = typename decltype(f)::type;
    using M = math_t<T>;
    Rows s;
    BJ_TRY(rows_of(exec.op, "r", r, s));
    BJ_TRY(check_grid<F>(exec.op, qmin, qmax, false));
    BJ_TRY(check_like(exec.op, "g", g, "r", r));
    BJ_TRY(check_like(exec.op, "dx", *dx, "r", r));
    BJ_TRY(check_like(exec.op, "dw", *dw, "weight", weight));
    BJ_TRY(check_weight(exec.op, weight, r, s.cols));
    BJ_TRY(check_count(exec.op, "scale", scale, ffi::DataType::F32, s.rows, "one value per row"));
    BJ_TRY(check_count(exec.op, "inv_rms", inv_rms, ffi::DataType::F32, s.rows, "one value per row"));
    const auto gd = dw_groups->dimensions();
    if (dw_groups->element_type() != ffi::DataType::F32 || gd.size() != 2 || gd[1] != s.cols || gd[0] < 1 ||
        (s.rows > 0 && gd[0] > s.rows))
      return invalid(exec.op, "dw_groups must be float32 [groups, D] with 1 <= groups <= rows");
    if (rest.size() > 1) return invalid(exec.op, "expected at most one g_residual operand");
    const T* g_residual = nullptr;
    if (rest.size() == 1) {
      std::optional<ffi::AnyBuffer> gr;
      BJ_TRY(remaining(rest, 0, gr));
      BJ_TRY(check_like(exec.op, "g_residual", *gr, "r", r));
      g_residual = data_of<const T>(*gr);
    }
    NormGradRows<T, typename F::grid> io;
    io.grad.inv_cols = M(1) / M(s.cols);
    io.mask = make_op<FakeQuantizeGradOp<T, typename F::grid>>(data_of<const M>(scale), nullptr, qmin, qmax);
    io.g = data_of<const T>(g);
    io.r = data_of<const T>(r);
    io.weight = data_of<const T>(weight);
    io.g_residual = g_residual;
    io.inv_rms = data_of<const M>(inv_rms);
    io.dx = data_of<T>(*dx);
    io.dw = data_of<T>(*dw);
    io.dw_groups = data_of<M>(*dw_groups);
    io.groups = gd[0];
    return exec.norm_grad_rows(io, s.rows, s.cols);
  });
}

// (a, b, [scale]) -> (out, [scale]): h = silu(a) * b, then the per-token quantizer; `scale` in:
// static (a map over the elements); out: dynamic (one pass a row).
template <class Exec>
ffi::Error silu_mul_quantize(Exec exec, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::RemainingArgs rest,
                             ffi::Result<ffi::AnyBuffer> out, ffi::RemainingRets more, std::string_view format,
                             int32_t qmin, int32_t qmax, double scale_ub, double min_scale) {
  return dispatch(exec.op, dtype_of<FusedFloats>("a", a), named<SymmetricFormats>(format), [&](auto t, auto f) {
    using T = typename decltype(t)::type;
    using F = typename decltype(f)::type;
    Rows s;
    BJ_TRY(rows_of(exec.op, "a", a, s));
    BJ_TRY(check_like(exec.op, "b", b, "a", a));
    bool fake;
    BJ_TRY(check_output<F>(exec.op, *out, a, fake));
    if (rest.size() + more.size() != 1)
      return invalid(exec.op, "expected either a static scale operand or a scale result");
    const bool dynamic = rest.size() == 0;
    std::optional<ffi::AnyBuffer> sc;  // the scale: a result if dynamic, else an operand
    BJ_TRY(dynamic ? remaining(more, 0, sc) : remaining(rest, 0, sc));
    BJ_TRY(check_count(exec.op, "scale", *sc, ffi::DataType::F32, s.rows, "one value per row"));
    const float* scale_in = dynamic ? nullptr : data_of<const float>(*sc);
    float* scale_out = dynamic ? data_of<float>(*sc) : nullptr;
    const T *pa = data_of<const T>(a), *pb = data_of<const T>(b);
    return with_quantizer<T, F>(
        exec.op, scale_in, fake, *out, qmin, qmax, scale_ub, min_scale, [&](auto quant, auto* out_ptr) {
          using Op = Produced<decltype(quant), SiluMul<T>>;
          if constexpr (decltype(quant)::kDynamic)
            return exec.dynamic_rows(Op{quant}, s.rows, s.cols, out_ptr, scale_out, nullptr, pa, pb);
          else
            return exec.map_rows(Op{quant}, s.rows, s.cols, out_ptr, pa, pb);
        });
  });
}

// (g, a, b, scale) -> (da, db): the backward of silu_mul_fake_quantize through the
// straight-through quantizer, one map over the elements.
template <class Exec>
ffi::Error silu_mul_grad(Exec exec, ffi::AnyBuffer g, ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::AnyBuffer scale,
                         ffi::Result<ffi::AnyBuffer> da, ffi::Result<ffi::AnyBuffer> db, std::string_view format,
                         int32_t qmin, int32_t qmax) {
  return dispatch(exec.op, dtype_of<FusedFloats>("a", a), named<SymmetricFormats>(format), [&](auto t, auto f) {
    using T = typename decltype(t)::type;
    using F = typename decltype(f)::type;
    Rows s;
    BJ_TRY(rows_of(exec.op, "a", a, s));
    BJ_TRY(check_grid<F>(exec.op, qmin, qmax, false));
    for (auto [name, buf] : {std::pair{"b", b}, std::pair{"g", g}, std::pair{"da", *da}, std::pair{"db", *db}})
      BJ_TRY(check_like(exec.op, name, buf, "a", a));
    BJ_TRY(check_count(exec.op, "scale", scale, ffi::DataType::F32, s.rows, "one value per row"));
    const auto grad = make_op<SiluMulGradOp<T, typename F::grid>>(data_of<const float>(scale), nullptr, qmin, qmax);
    return exec.map_rows(grad, s.rows, s.cols, Split<T>{data_of<T>(*da), data_of<T>(*db)}, data_of<const T>(g),
                         data_of<const T>(a), data_of<const T>(b));
  });
}

// ---- the FFI signatures (ffi/dispatch.h's binders) ---------------------------------------------

template <class B> auto bind_rms_norm(B&& b) {
  return format_attrs(rets<2>(args<2>(std::move(b)).RemainingArgs()).RemainingRets())
      .template Attr<double>("eps")
      .template Attr<bool>("has_residual")
      .template Attr<double>("scale_ub")
      .template Attr<double>("min_scale");
}
template <class B> auto bind_rms_norm_grad(B&& b) {
  return format_attrs(rets<3>(args<5>(std::move(b)).RemainingArgs()));
}
template <class B> auto bind_silu_mul(B&& b) {
  return format_attrs(rets<1>(args<2>(std::move(b)).RemainingArgs()).RemainingRets())
      .template Attr<double>("scale_ub")
      .template Attr<double>("min_scale");
}
template <class B> auto bind_silu_mul_grad(B&& b) { return format_attrs(rets<2>(args<4>(std::move(b)))); }

}  // namespace baracuda
