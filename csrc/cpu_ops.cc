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
  CpuExec(ffi::ThreadPool) {}

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

}  // namespace
}  // namespace baracuda

using namespace baracuda;

#define BJ_OP(name, body, bind) \
  XLA_FFI_DEFINE_HANDLER_SYMBOL(name##_cpu, body<CpuExec>, bind(ffi::Ffi::Bind().Ctx<ffi::ThreadPool>()));
#include "ops.def"
#undef BJ_OP

NB_MODULE(_cpu, m) {
  m.def("registrations", []() {
    return registrations({
#define BJ_OP(name, body, bind) {#name, name##_cpu},
#include "ops.def"
#undef BJ_OP
    });
  });
}
