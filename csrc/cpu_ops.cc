// CPU backend: the handlers of handlers.h over a plain row loop, exported to
// Python as FFI capsules.
#include "handlers.h"
#include "registrations.h"

namespace baracuda {
namespace {

struct CpuExec {
  template <class Op, class Out, class... In>
  ffi::Error map_rows(const Op& op, int64_t rows, int64_t cols, Out* out, const In*... in) const {
    for (int64_t r = 0; r < rows; ++r) {
      const auto p = op.row(r);
      const int64_t base = r * cols;
      for (int64_t c = base; c < base + cols; ++c) out[c] = op(p, in[c]...);
    }
    return ffi::Error::Success();
  }
};

ffi::Error QuantizeCpu(ffi::AnyBuffer x, ffi::AnyBuffer scale, ffi::RemainingArgs zp,
                       ffi::Result<ffi::AnyBuffer> q, int32_t qmin, int32_t qmax) {
  return quantize(CpuExec{}, x, scale, zp, q, qmin, qmax);
}
ffi::Error DequantizeCpu(ffi::AnyBuffer q, ffi::AnyBuffer scale, ffi::RemainingArgs zp,
                         ffi::Result<ffi::AnyBuffer> y) {
  return dequantize(CpuExec{}, q, scale, zp, y);
}
ffi::Error FakeQuantizeCpu(ffi::AnyBuffer x, ffi::AnyBuffer scale, ffi::RemainingArgs zp,
                           ffi::Result<ffi::AnyBuffer> y, int32_t qmin, int32_t qmax) {
  return fake_quantize(CpuExec{}, x, scale, zp, y, qmin, qmax);
}
ffi::Error FakeQuantizeGradCpu(ffi::AnyBuffer g, ffi::AnyBuffer x, ffi::AnyBuffer scale,
                               ffi::RemainingArgs zp, ffi::Result<ffi::AnyBuffer> dx, int32_t qmin,
                               int32_t qmax) {
  return fake_quantize_grad(CpuExec{}, g, x, scale, zp, dx, qmin, qmax);
}

}  // namespace
}  // namespace baracuda

using namespace baracuda;
XLA_FFI_DEFINE_HANDLER_SYMBOL(kQuantize, QuantizeCpu, bind_quantize(ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(kDequantize, DequantizeCpu, bind_dequantize(ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(kFakeQuantize, FakeQuantizeCpu, bind_quantize(ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(kFakeQuantizeGrad, FakeQuantizeGradCpu,
                              bind_fake_quantize_grad(ffi::Ffi::Bind()));

NB_MODULE(_cpu, m) {
  m.def("registrations", []() {
    return registrations(kQuantize, kDequantize, kFakeQuantize, kFakeQuantizeGrad);
  });
}
