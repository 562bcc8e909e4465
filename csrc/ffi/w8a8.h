// Handler bodies of the fused W8A8 ops at decode sizes (baracuda_jax/w8a8.py): a producer's per-token
// quantizer, then the small-M product with a per-channel weight, in one custom call. The producer is
// the body of its own op (quantize_dynamic, rms_norm_quantize, silu_mul_quantize), so q and the
// scales are those ops' bits; its results are this call's results too (the matmul's operands, and
// a debug path's). The matmul is launched as the producer's programmatic dependent (cuda/pdl.cuh):
// its weight stream starts while the rows are being quantized.
//
// Each op's operands are its producer's, then the weight (w [K, N] column-major, i.e. stored
// [N][K], and w_scale [N]), then the optional residual; its results are y, then the producer's.
#pragma once

#include <optional>
#include <string_view>
#include <utility>

#include "ffi/dispatch.h"
#include "ffi/fused.h"
#include "ffi/per_token.h"
#include "gemm/scaled_matmul.h"

namespace baracuda {

// (x, w, w_scale, [residual]) -> (y, q, scale, zero_point): x quantized per token (symmetric), then
// y = the product, with the residual in its epilogue.
template <class Exec>
ffi::Error w8a8_matmul(Exec exec, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::AnyBuffer w_scale,
                       ffi::RemainingArgs residual, ffi::Result<ffi::AnyBuffer> y, ffi::Result<ffi::AnyBuffer> q,
                       ffi::Result<ffi::AnyBuffer> scale, ffi::Result<ffi::AnyBuffer> zp, int32_t qmin, int32_t qmax,
                       double scale_ub, double min_scale) {
  BJ_TRY(quantize_dynamic(exec, x, q, scale, zp, true, qmin, qmax, scale_ub, min_scale, false));
  return chained_small_m(exec, *q, *scale, w, w_scale, residual, *y);
}

// (x, norm_weight, w, w_scale, [residual]) -> (y, q, inv_rms, scale, [residual_out]): r = x + residual,
// its RMSNorm quantized per token, then y = the product (no epilogue residual: `residual` is the
// norm's).
template <class Exec>
ffi::Error rms_norm_w8a8_matmul(Exec exec, ffi::AnyBuffer x, ffi::AnyBuffer norm_weight, ffi::AnyBuffer w,
                                ffi::AnyBuffer w_scale, ffi::RemainingArgs residual, ffi::Result<ffi::AnyBuffer> y,
                                ffi::Result<ffi::AnyBuffer> q, ffi::Result<ffi::AnyBuffer> inv_rms,
                                ffi::RemainingRets more, std::string_view format, int32_t qmin, int32_t qmax,
                                double eps, bool has_residual, double scale_ub, double min_scale) {
  BJ_TRY(rms_norm_quantize(exec, x, norm_weight, residual, q, inv_rms, more, format, qmin, qmax, eps, has_residual,
                           scale_ub, min_scale));
  std::optional<ffi::AnyBuffer> scale;
  BJ_TRY(remaining(more, 0, scale));
  return chained_small_m(exec, *q, *scale, w, w_scale, no_operands(), *y);
}

// (gate, up, w, w_scale, [residual]) -> (y, q, scale): silu(gate) * up quantized per token, then
// y = the product, with the residual in its epilogue.
template <class Exec>
ffi::Error silu_mul_w8a8_matmul(Exec exec, ffi::AnyBuffer gate, ffi::AnyBuffer up, ffi::AnyBuffer w,
                                ffi::AnyBuffer w_scale, ffi::RemainingArgs residual, ffi::Result<ffi::AnyBuffer> y,
                                ffi::Result<ffi::AnyBuffer> q, ffi::RemainingRets more, std::string_view format,
                                int32_t qmin, int32_t qmax, double scale_ub, double min_scale) {
  BJ_TRY(silu_mul_quantize(exec, gate, up, no_operands(), q, more, format, qmin, qmax, scale_ub, min_scale));
  std::optional<ffi::AnyBuffer> scale;
  BJ_TRY(remaining(more, 0, scale));
  return chained_small_m(exec, *q, *scale, w, w_scale, residual, *y);
}

// ---- the FFI signatures: the producer's operands, w, w_scale, then the optional residual --------

template <class B> auto bind_w8a8_matmul(B&& b) {
  return grid_attrs(rets<4>(args<3>(std::move(b)).RemainingArgs()))
      .template Attr<double>("scale_ub")
      .template Attr<double>("min_scale");
}
template <class B> auto bind_rms_norm_w8a8_matmul(B&& b) {
  return format_attrs(rets<3>(args<4>(std::move(b)).RemainingArgs()).RemainingRets())
      .template Attr<double>("eps")
      .template Attr<bool>("has_residual")
      .template Attr<double>("scale_ub")
      .template Attr<double>("min_scale");
}
template <class B> auto bind_silu_mul_w8a8_matmul(B&& b) {
  return format_attrs(rets<2>(args<4>(std::move(b)).RemainingArgs()).RemainingRets())
      .template Attr<double>("scale_ub")
      .template Attr<double>("min_scale");
}

}  // namespace baracuda
