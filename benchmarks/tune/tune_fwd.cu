// Tile-shape tuning harness for the forward kernel, torch-free so each variant
// compiles in well under a minute. Build one binary per variant:
//   nvcc -std=c++20 -O3 --use_fast_math --expt-relaxed-constexpr -gencode arch=compute_90,code=sm_90 \
//        -I csrc/flash_attn -I $CUTLASS/include -DHDIM=128 -DBM=128 -DBN=64 -DWARPS=4 tune_fwd.cu
// Run: ./tune_fwd  -> one line per shape: hdim, tile, causal, seqlen, ms, TFLOP/s.
// Random bf16 inputs; times are medians of 30 launches after 5 warm-ups (CUDA events).
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include <cuda_bf16.h>

#include "flash_fwd_launch_template.h"

#ifndef HDIM
#define HDIM 128
#endif
#ifndef BM
#define BM 128
#endif
#ifndef BN
#define BN 64
#endif
#ifndef STAGES
#define STAGES 1
#endif
#ifndef WARPS
#define WARPS 4
#endif

#define CUDA_OK(x)                                                                  \
  do {                                                                              \
    cudaError_t e = (x);                                                            \
    if (e != cudaSuccess) {                                                         \
      std::fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e)); \
      std::exit(1);                                                                 \
    }                                                                               \
  } while (0)

using Element = cutlass::bfloat16_t;
using Ktraits = flash::FwdKernelTraits<HDIM, Element, flash::FwdTile{BM, BN, WARPS, STAGES}>;

__global__ void fill_random(Element *x, size_t n, unsigned seed) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    unsigned h = unsigned(i) * 2654435761u ^ seed;
    h ^= h >> 13; h *= 0x5bd1e995u; h ^= h >> 15;
    x[i] = Element(float(h & 0xffff) / 32768.f - 1.f);
  }
}

int main() {
  const int seqlens[] = {2048, 8192};
  for (int causal = 0; causal < 2; ++causal) {
    for (int s : seqlens) {
      const int h = 2048 / HDIM, b = 16384 / s, d = HDIM;
      const size_t n = size_t(b) * s * h * d;
      Element *q, *k, *v, *o;
      float *lse;
      CUDA_OK(cudaMalloc(&q, n * sizeof(Element)));
      CUDA_OK(cudaMalloc(&k, n * sizeof(Element)));
      CUDA_OK(cudaMalloc(&v, n * sizeof(Element)));
      CUDA_OK(cudaMalloc(&o, n * sizeof(Element)));
      CUDA_OK(cudaMalloc(&lse, size_t(b) * h * s * sizeof(float)));
      fill_random<<<1024, 256>>>(q, n, 1);
      fill_random<<<1024, 256>>>(k, n, 2);
      fill_random<<<1024, 256>>>(v, n, 3);

      flash::Flash_fwd_params p = {};
      p.q_ptr = q; p.k_ptr = k; p.v_ptr = v; p.o_ptr = o; p.softmax_lse_ptr = lse;
      p.q_row_stride = p.k_row_stride = p.v_row_stride = p.o_row_stride = int64_t(h) * d;
      p.q_head_stride = p.k_head_stride = p.v_head_stride = p.o_head_stride = d;
      p.q_batch_stride = p.k_batch_stride = p.v_batch_stride = p.o_batch_stride = int64_t(s) * h * d;
      p.b = b; p.seqlen_q = p.seqlen_k = s; p.total_q = p.total_k = b * s;
      p.h = p.h_k = h; p.h_h_k_ratio = 1; p.d = d;
      p.scale_softmax = 1.f / std::sqrt(float(d));
      p.scale_softmax_log2 = p.scale_softmax * 1.4426950408889634f;
      p.window_size_left = -1;
      p.window_size_right = causal ? 0 : -1;
      p.is_bf16 = true;

      cudaEvent_t e0, e1;
      CUDA_OK(cudaEventCreate(&e0));
      CUDA_OK(cudaEventCreate(&e1));
      std::vector<float> ms;
      for (int it = 0; it < 35; ++it) {
        CUDA_OK(cudaEventRecord(e0));
        CUDA_OK((flash::run_flash_fwd<Ktraits, false, false>(p, 0)));
        CUDA_OK(cudaEventRecord(e1));
        CUDA_OK(cudaEventSynchronize(e1));
        float t;
        CUDA_OK(cudaEventElapsedTime(&t, e0, e1));
        if (it >= 5) ms.push_back(t);
      }
      std::sort(ms.begin(), ms.end());
      const float med = ms[ms.size() / 2];
      const double flops = 4.0 * b * h * double(s) * s * d / (causal ? 2 : 1);
      std::printf("hdim %d tile %dx%dx%dw%ds causal %d seqlen %5d  %.3f ms  %.1f TFLOP/s\n", HDIM, BM, BN, WARPS, STAGES,
                  causal, s, med, flops / med / 1e9);
      cudaFree(q); cudaFree(k); cudaFree(v); cudaFree(o); cudaFree(lse);
    }
  }
  return 0;
}
