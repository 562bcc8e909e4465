// Programmatic dependent launch (sm_90 and newer), for a row kernel followed by the small-M matmul
// in one custom call (the fused W8A8 ops): the matmul is launched with programmatic stream
// serialization, so its CTAs start while the row kernel still runs, stream the weight, and wait
// for the quantized rows only where they first read them. Both calls are no-ops before sm_90 and
// in a kernel launched the ordinary way, which starts after its predecessor has finished anyway.
#pragma once

namespace baracuda {

// In a producer: the next kernel may start now (it still waits for this one's writes).
__device__ __forceinline__ void let_dependents_start() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// In a dependent kernel: waits until the kernels before it have finished and their writes are
// visible.
__device__ __forceinline__ void wait_for_producers() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

}  // namespace baracuda
