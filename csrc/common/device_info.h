// Device attributes asked of the driver once per (attribute, device) and cached: a decode
// step chooses its split count (the SM count) and how to launch the combine (the compute
// capability) on every call, and its host time is what a decode step is short of; the
// linear-attention launchers size their grids by the SM count.
// Host-only, torch-free (flash_api.cpp, the kernel launchers and linear_api.cpp use it).
#pragma once

#include <atomic>

#include <cuda_runtime_api.h>

namespace flash {

// Whether the device executes `kernel`'s sm90 code (PTX version 90). setup.py builds sm90 code as
// sm_90a and then defines FLASH_ATTN_HAS_SM90A: the warpgroup-MMA kernels have bodies only there.
// Other builds (benchmarks/tune's plain sm_90 harnesses) never take them.
template <typename Kernel>
inline bool runs_sm90a_code(Kernel kernel) {
#ifndef FLASH_ATTN_HAS_SM90A
  (void)kernel;
  return false;
#else
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, kernel) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return attr.ptxVersion == 90;
#endif
}

// The attribute kAttr of device `device`, or -1 when the driver cannot say.
template <cudaDeviceAttr kAttr>
inline int cached_device_attribute(int device) {
  constexpr int kCachedDevices = 64;
  static std::atomic<int> cache[kCachedDevices] = {};  // value + 1; 0: not asked yet
  const auto ask = [device] {
    int value = 0;
    return cudaDeviceGetAttribute(&value, kAttr, device) == cudaSuccess ? value : -1;
  };
  if (device < 0 || device >= kCachedDevices) { return ask(); }
  int v = cache[device].load(std::memory_order_relaxed);
  if (v == 0) {
    const int value = ask();
    if (value < 0) { return -1; }
    v = value + 1;
    cache[device].store(v, std::memory_order_relaxed);
  }
  return v - 1;
}

// Whether the current device has programmatic dependent launch (compute capability 9.0+).
inline bool current_device_has_pdl() {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) { return false; }
  return cached_device_attribute<cudaDevAttrComputeCapabilityMajor>(device) >= 9;
}

}  // namespace flash
