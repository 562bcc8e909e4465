// The scaled matmul's CUDA handler body (scaled_matmul.cu) and its FFI signature, for the
// BJ_CUDA_OP row of ffi/ops.def that cuda/engine.cu expands: registered for the CUDA platform
// only, while on the CPU the primitive lowers to XLA's dot.
#pragma once

#include <cuda_runtime_api.h>

#include <string_view>
#include <utility>

#include "xla/ffi/api/ffi.h"

namespace baracuda {

namespace ffi = xla::ffi;

// What the generated handler hands a CUDA-only row's body: the op's name and XLA's stream.
struct GemmExec {
  const char* op;
  cudaStream_t stream;
};

ffi::Error scaled_matmul(GemmExec exec, ffi::AnyBuffer a, ffi::AnyBuffer a_scale, ffi::AnyBuffer b,
                         ffi::AnyBuffer b_scale, ffi::RemainingArgs residual_arg, ffi::Result<ffi::AnyBuffer> out,
                         ffi::Result<ffi::AnyBuffer> workspace, ffi::RemainingRets rest, std::string_view route);

// The small-M product as the dependent of the kernel enqueued just before it on exec.stream, which
// writes a and a_scale (the fused W8A8 ops, ffi/w8a8.h): per-channel scales, the residual (the first
// of `residual`, if any) in the epilogue.
ffi::Error chained_small_m(GemmExec exec, ffi::AnyBuffer a, ffi::AnyBuffer a_scale, ffi::AnyBuffer b,
                           ffi::AnyBuffer b_scale, ffi::RemainingArgs residual, ffi::AnyBuffer out);

template <class B> auto bind_scaled_matmul(B&& b) {
  return std::move(b)
      .template Arg<ffi::AnyBuffer>()              // a [..., K]
      .template Arg<ffi::AnyBuffer>()              // a_scale [...] or [..., K/128], float32
      .template Arg<ffi::AnyBuffer>()              // b [K, N], column-major
      .template Arg<ffi::AnyBuffer>()              // b_scale [N] or [K/128, N/128], float32
      .RemainingArgs()                             // residual [..., N], optional
      .template Ret<ffi::AnyBuffer>()              // out [..., N]
      .template Ret<ffi::AnyBuffer>()              // cuBLASLt's workspace (bytes)
      .RemainingRets()                             // int8: the int32 accumulator
      .template Attr<std::string_view>("route");  // auto, cublaslt or small_m: the kernel
}

}  // namespace baracuda
