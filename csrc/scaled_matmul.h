// The scaled matmul's CUDA handler (scaled_matmul.cu), registered by cuda_module.cc under
// "baracuda_scaled_matmul" for the CUDA platform only: on the CPU the primitive lowers to XLA's dot.
#pragma once

#include "xla/ffi/api/api.h"

XLA_FFI_DECLARE_HANDLER_SYMBOL(baracuda_scaled_matmul_cuda);
