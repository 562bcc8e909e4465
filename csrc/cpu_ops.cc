// CPU backend: the handlers of handlers.h over a plain row loop, exported to
// Python as FFI capsules.
#include "handlers.h"
#include "registrations.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <xmmintrin.h>
#endif

namespace baracuda {
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

struct CpuExec {
  template <class Op, class Out, class... In>
  ffi::Error map_rows(const Op& op, int64_t rows, int64_t cols, Out* out, const In*... in) const {
    IeeeSubnormals ieee;
    for (int64_t r = 0; r < rows; ++r) {
      const auto p = op.row(r);
      const int64_t base = r * cols;
      for (int64_t c = base; c < base + cols; ++c) out[c] = op(p, in[c]...);
    }
    return ffi::Error::Success();
  }

  template <class Op, class Out, class M, class... In>
  ffi::Error reduce_rows(const Op& op, int64_t rows, int64_t cols, Out* out, M* sums, const In*... in) const {
    IeeeSubnormals ieee;
    for (int64_t r = 0; r < rows; ++r) {
      const auto p = op.row(r);
      M sum = 0;
      for (int64_t c = r * cols; c < (r + 1) * cols; ++c) out[c] = op(p, in[c]..., sum);
      sums[r] = sum;
    }
    return ffi::Error::Success();
  }

  template <class Op, class Out, class T, class M>
  ffi::Error dynamic_rows(const Op& op, int64_t rows, int64_t cols, Out* out, const T* x, M* scale,
                          int32_t* zp) const {
    IeeeSubnormals ieee;
    for (int64_t r = 0; r < rows; ++r) {
      const T* xr = x + r * cols;
      RowRange<M> range;
      for (int64_t c = 0; c < cols; ++c) range.add(to_math(xr[c]));
      const auto p = op.params(range);
      scale[r] = p.scale;
      zp[r] = static_cast<int32_t>(p.zp);
      for (int64_t c = 0; c < cols; ++c) out[r * cols + c] = op(p, xr[c]);
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

ffi::Error FakeQuantizeLsqGradCpu(ffi::AnyBuffer g, ffi::AnyBuffer x, ffi::AnyBuffer scale, ffi::RemainingArgs zp,
                                  ffi::Result<ffi::AnyBuffer> dx, ffi::Result<ffi::AnyBuffer> ds, int32_t qmin,
                                  int32_t qmax) {
  return fake_quantize_lsq_grad(CpuExec{}, g, x, scale, zp, dx, ds, qmin, qmax);
}
ffi::Error QuantizeDynamicCpu(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> q, ffi::Result<ffi::AnyBuffer> scale,
                              ffi::Result<ffi::AnyBuffer> zp, bool symmetric, int32_t qmin, int32_t qmax) {
  return quantize_dynamic(CpuExec{}, x, q, scale, zp, symmetric, qmin, qmax);
}
ffi::Error FakeQuantizeDynamicCpu(ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y,
                                  ffi::Result<ffi::AnyBuffer> scale, ffi::Result<ffi::AnyBuffer> zp,
                                  bool symmetric, int32_t qmin, int32_t qmax) {
  return fake_quantize_dynamic(CpuExec{}, x, y, scale, zp, symmetric, qmin, qmax);
}

}  // namespace
}  // namespace baracuda

using namespace baracuda;
XLA_FFI_DEFINE_HANDLER_SYMBOL(kQuantize, QuantizeCpu, bind_quantize(ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(kDequantize, DequantizeCpu, bind_dequantize(ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(kFakeQuantize, FakeQuantizeCpu, bind_quantize(ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(kFakeQuantizeGrad, FakeQuantizeGradCpu,
                              bind_fake_quantize_grad(ffi::Ffi::Bind()));

XLA_FFI_DEFINE_HANDLER_SYMBOL(kFakeQuantizeLsqGrad, FakeQuantizeLsqGradCpu, bind_lsq_grad(ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(kQuantizeDynamic, QuantizeDynamicCpu, bind_dynamic(ffi::Ffi::Bind()));
XLA_FFI_DEFINE_HANDLER_SYMBOL(kFakeQuantizeDynamic, FakeQuantizeDynamicCpu, bind_dynamic(ffi::Ffi::Bind()));

NB_MODULE(_cpu, m) {
  m.def("registrations", []() {
    return registrations(kQuantize, kDequantize, kFakeQuantize, kFakeQuantizeGrad, kFakeQuantizeLsqGrad,
                         kQuantizeDynamic, kFakeQuantizeDynamic);
  });
}
