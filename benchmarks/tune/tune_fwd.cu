// Tile-shape tuning harness for the forward kernel, torch-free so each variant
// compiles in well under a minute. Build one binary per variant:
//   nvcc -std=c++20 -O3 --use_fast_math --expt-relaxed-constexpr -gencode arch=compute_90,code=sm_90 \
//        -I csrc/flash_attn -I csrc/common -I $CUTLASS/include -DHDIM=128 -DBM=128 -DBN=64 -DWARPS=4 tune_fwd.cu
// Run: ./tune_fwd  -> one line per shape: hdim, tile, causal, seqlen, ms, TFLOP/s.
// Random bf16 inputs; times are medians of 30 launches after 5 warm-ups (CUDA events).

#include <cuda_bf16.h>

#include "tune_common.cuh"
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

using Element = cutlass::bfloat16_t;
using Ktraits = flash::FwdKernelTraits<HDIM, Element, flash::FwdTile{BM, BN, WARPS, STAGES}>;

int main() {
  const int seqlens[] = {2048, 8192};
  for (int causal = 0; causal < 2; ++causal) {
    for (int s : seqlens) {
      const int h = 2048 / HDIM, b = 16384 / s, d = HDIM;
      const size_t n = size_t(b) * s * h * d;
      Element *q = random_alloc<Element>(n, 1), *k = random_alloc<Element>(n, 2), *v = random_alloc<Element>(n, 3);
      Element *o = device_alloc<Element>(n);
      float *lse = device_alloc<float>(size_t(b) * h * s);

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

      const float med = median_ms([&] { return flash::run_flash_fwd<Ktraits, false, false>(p, 0); }, 5, 30);
      const double flops = 4.0 * b * h * double(s) * s * d / (causal ? 2 : 1);
      std::printf("hdim %d tile %dx%dx%dw%ds causal %d seqlen %5d  %.3f ms  %.1f TFLOP/s\n", HDIM, BM, BN, WARPS, STAGES,
                  causal, s, med, flops / med / 1e9);
      cudaFree(q); cudaFree(k); cudaFree(v); cudaFree(o); cudaFree(lse);
    }
  }
  return 0;
}
