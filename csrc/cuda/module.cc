// The CUDA module (_cuda): registrations() of every CUDA handler, the loader of cuBLASLt, and the
// handler counter that the tests read.
#include <nanobind/nanobind.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "cuda/engine.h"
#include "ffi/registrations.h"
#include "gemm/cublaslt_api.h"

namespace nb = nanobind;

NB_MODULE(_cuda, m) {
  m.def(
      "registrations",
      []() {
        return baracuda::registrations({
#define BJ_OP(name, body, bind) {#name, baracuda_##name##_cuda},
#define BJ_CUDA_OP(name, body, bind) BJ_OP(name, body, bind)
#include "ffi/ops.def"
        });
      },
      "The CUDA targets: 'baracuda_<name>' -> handler capsule, one per row of csrc/ffi/ops.def.");
  m.def(
      "load_cublaslt",
      [](const std::vector<std::string>& candidates) {
        std::string error;
        const baracuda::lt::Api* api = baracuda::lt::load(candidates, &error);
        if (api == nullptr) throw std::runtime_error("could not load cuBLASLt:" + error);
        return api->version;
      },
      "Loads libcublasLt from the first of the candidates that opens (once); returns its version.");
  m.def("handler_calls", &baracuda::cuda_handler_calls,
        "How many times a CUDA handler has run; kernels replayed from a command buffer do not count.");
}
