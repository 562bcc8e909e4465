// The CUDA handlers, defined in cuda_ops.cu (nvcc) and exported by
// cuda_module.cc (the host compiler, which builds nanobind).
#pragma once

#include <atomic>
#include <cstdint>

#include "xla/ffi/api/api.h"

// How many times a CUDA handler body has run (since the module was loaded).
int64_t baracuda_cuda_handler_calls();
namespace baracuda {
extern std::atomic<int64_t> handler_calls;
}

#define BJ_OP(name, body, bind) XLA_FFI_DECLARE_HANDLER_SYMBOL(name##_cuda);
#include "ops.def"
#undef BJ_OP
