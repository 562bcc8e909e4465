// What the CUDA engine (engine.cu, compiled by nvcc) exports to module.cc (compiled by the host
// compiler, which builds nanobind): a handler symbol baracuda_<name>_cuda for every row of
// ffi/ops.def, the CUDA-only ones included, and the count of handler calls.
#pragma once

#include <cstdint>

#include "xla/ffi/api/api.h"

#define BJ_OP(name, body, bind) XLA_FFI_DECLARE_HANDLER_SYMBOL(baracuda_##name##_cuda);
#define BJ_CUDA_OP(name, body, bind) BJ_OP(name, body, bind)
#include "ffi/ops.def"

namespace baracuda {

// How many times a CUDA handler has been called since the module was loaded; kernels replayed
// from a command buffer do not count.
int64_t cuda_handler_calls();

}  // namespace baracuda
