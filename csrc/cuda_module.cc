#include "cuda_ops.h"
#include "registrations.h"

NB_MODULE(_cuda, m) {
  m.def("registrations", []() {
    return baracuda::registrations(kQuantizeCuda, kDequantizeCuda, kFakeQuantizeCuda, kFakeQuantizeGradCuda,
                                   kFakeQuantizeLsqGradCuda, kQuantizeDynamicCuda, kFakeQuantizeDynamicCuda);
  });
  m.def("handler_calls", &baracuda_cuda_handler_calls,
        "How many times a CUDA handler has run; kernels replayed from a command buffer do not count.");
}
