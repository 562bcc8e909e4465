// The attributes of the current device that the launch policies read (cuda/engine.cu, and the
// gemm's rescale), queried once per device: a handler asks on every call, cudaGetDevice is cheap,
// and cudaDeviceGetAttribute is not.
#pragma once

#include <cuda_runtime.h>

#include <atomic>
#include <cstdint>

namespace baracuda {

struct DeviceAttributes { int sms = 0, threads_per_sm = 0, major = 0; };  // major: compute capability

// The current device's attributes. False, with CUDA's error state cleared and `out` zero, where a
// query fails; nothing is cached then, so the next call asks again.
inline bool current_device(DeviceAttributes& out) {
  constexpr int kDevices = 64;  // devices numbered past this are queried on every call
  // Each device's attributes packed as major << 48 | sms << 24 | threads_per_sm, 0 until known.
  // Threads that race on a device's first call store the same value.
  static std::atomic<uint64_t> known[kDevices];
  out = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  const bool cached = dev >= 0 && dev < kDevices;
  if (cached) {
    if (const uint64_t packed = known[dev].load(std::memory_order_relaxed)) {
      out.major = static_cast<int>(packed >> 48);
      out.sms = static_cast<int>(packed >> 24 & 0xFFFFFFu);
      out.threads_per_sm = static_cast<int>(packed & 0xFFFFFFu);
      return true;
    }
  }
  DeviceAttributes queried;
  if (cudaDeviceGetAttribute(&queried.sms, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&queried.threads_per_sm, cudaDevAttrMaxThreadsPerMultiProcessor, dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&queried.major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  if (cached)
    known[dev].store(uint64_t{static_cast<uint32_t>(queried.major)} << 48 |
                         uint64_t{static_cast<uint32_t>(queried.sms)} << 24 |
                         static_cast<uint32_t>(queried.threads_per_sm),
                     std::memory_order_relaxed);
  out = queried;
  return true;
}

}  // namespace baracuda
