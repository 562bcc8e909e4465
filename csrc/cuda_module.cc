#include "cuda_ops.h"
#include "registrations.h"

NB_MODULE(_cuda, m) {
  m.def("registrations", []() {
    return baracuda::registrations({
#define BJ_OP(name, body, bind) {#name, name##_cuda},
#include "ops.def"
#undef BJ_OP
    });
  });
  m.def("handler_calls", &baracuda_cuda_handler_calls,
        "How many times a CUDA handler has run; kernels replayed from a command buffer do not count.");
}
