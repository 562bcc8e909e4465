#include "cuda_ops.h"
#include "registrations.h"

NB_MODULE(_cuda, m) {
  m.def("registrations", []() {
    return baracuda::registrations(kQuantizeCuda, kDequantizeCuda, kFakeQuantizeCuda, kFakeQuantizeGradCuda);
  });
}
