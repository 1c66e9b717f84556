// Shared by the tuning harnesses: error checking, device buffers, random inputs, median timing.
#pragma once

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include <cuda_runtime_api.h>
#include <cutlass/numeric_types.h>

#define CUDA_OK(x)                                                                  \
  do {                                                                              \
    cudaError_t e = (x);                                                            \
    if (e != cudaSuccess) {                                                         \
      std::fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); \
      std::exit(1);                                                                 \
    }                                                                               \
  } while (0)

// Hash-based values in [-1, 1): random enough for timing, no RNG state.
template <typename Element>
__global__ void fill_random(Element *x, size_t n, unsigned seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    unsigned h = unsigned(i) * 2654435761u ^ seed;
    h ^= h >> 13; h *= 0x5bd1e995u; h ^= h >> 15;
    x[i] = Element(float(h & 0xffff) / 32768.f - 1.f);
  }
}

// n elements of device memory; the harness frees them with cudaFree.
template <typename T>
T *device_alloc(size_t n) {
  T *ptr = nullptr;
  CUDA_OK(cudaMalloc(&ptr, n * sizeof(T)));
  return ptr;
}

// n elements of device memory filled by fill_random with seed.
template <typename Element>
Element *random_alloc(size_t n, unsigned seed) {
  Element *ptr = device_alloc<Element>(n);
  fill_random<<<1024, 256>>>(ptr, n, seed);
  return ptr;
}

// Median time in ms of `launch` over `iters` runs after `warmup` runs (CUDA events).
template <typename Launch>
float median_ms(Launch &&launch, int warmup, int iters) {
  cudaEvent_t e0, e1;
  CUDA_OK(cudaEventCreate(&e0));
  CUDA_OK(cudaEventCreate(&e1));
  std::vector<float> ms;
  for (int it = 0; it < warmup + iters; ++it) {
    CUDA_OK(cudaEventRecord(e0));
    CUDA_OK(launch());
    CUDA_OK(cudaEventRecord(e1));
    CUDA_OK(cudaEventSynchronize(e1));
    float t;
    CUDA_OK(cudaEventElapsedTime(&t, e0, e1));
    if (it >= warmup) { ms.push_back(t); }
  }
  CUDA_OK(cudaEventDestroy(e0));
  CUDA_OK(cudaEventDestroy(e1));
  std::sort(ms.begin(), ms.end());
  return ms[ms.size() / 2];
}
