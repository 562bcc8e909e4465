// The target names, shared by the CPU and CUDA modules so that one primitive
// lowers to the same custom call on either platform.
#pragma once

#include <nanobind/nanobind.h>

#include "xla/ffi/api/c_api.h"

namespace baracuda {

inline nanobind::dict registrations(XLA_FFI_Handler* quantize, XLA_FFI_Handler* dequantize,
                                    XLA_FFI_Handler* fake_quantize, XLA_FFI_Handler* fake_quantize_grad,
                                    XLA_FFI_Handler* fake_quantize_lsq_grad, XLA_FFI_Handler* quantize_dynamic,
                                    XLA_FFI_Handler* fake_quantize_dynamic) {
  auto capsule = [](XLA_FFI_Handler* h) { return nanobind::capsule(reinterpret_cast<void*>(h)); };
  nanobind::dict d;
  d["baracuda_quantize_per_token"] = capsule(quantize);
  d["baracuda_dequantize_per_token"] = capsule(dequantize);
  d["baracuda_fake_quantize_per_token"] = capsule(fake_quantize);
  d["baracuda_fake_quantize_per_token_grad"] = capsule(fake_quantize_grad);
  d["baracuda_fake_quantize_per_token_lsq_grad"] = capsule(fake_quantize_lsq_grad);
  d["baracuda_quantize_per_token_dynamic"] = capsule(quantize_dynamic);
  d["baracuda_fake_quantize_per_token_dynamic"] = capsule(fake_quantize_dynamic);
  return d;
}

}  // namespace baracuda
