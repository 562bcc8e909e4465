// The CUDA handlers, defined in cuda_ops.cu (nvcc) and exported by
// cuda_module.cc (the host compiler, which builds nanobind).
#pragma once

#include "xla/ffi/api/api.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(kQuantizeCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kDequantizeCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kFakeQuantizeCuda);
XLA_FFI_DECLARE_HANDLER_SYMBOL(kFakeQuantizeGradCuda);
