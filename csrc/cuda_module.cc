#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include "cublaslt_api.h"
#include "cuda_ops.h"
#include "registrations.h"
#include "scaled_matmul.h"

namespace nb = nanobind;

NB_MODULE(_cuda, m) {
  m.def("registrations", []() {
    return baracuda::registrations({
#define BJ_OP(name, body, bind) {#name, name##_cuda},
#include "ops.def"
#undef BJ_OP
    });
  });
  m.def("gemm_registrations", []() { return baracuda::registrations({{"scaled_matmul", baracuda_scaled_matmul_cuda}}); },
        "The cuBLASLt targets (CUDA only; the CPU lowers them to XLA's dot).");
  m.def(
      "load_cublaslt",
      [](const std::vector<std::string>& candidates) {
        std::string error;
        const baracuda::lt::Api* api = baracuda::lt::load(candidates, &error);
        if (api == nullptr) throw std::runtime_error("could not load cuBLASLt:" + error);
        return api->version;
      },
      "Loads libcublasLt from the first of the candidates that opens (once); returns its version.");
  m.def("handler_calls", &baracuda_cuda_handler_calls,
        "How many times a CUDA handler has run; kernels replayed from a command buffer do not count.");
}
