// Tile tuning harness for the backward kernels (dK/dV and dQ), torch-free like
// tune_fwd.cu. One binary per variant:
//   nvcc -std=c++20 -O3 --use_fast_math --expt-relaxed-constexpr -gencode arch=compute_90,code=sm_90 \
//        -I csrc/flash_attn -I csrc/common -I $CUTLASS/include -DHDIM=128 -DROWS=64 -DCOLS=32 -DWARPS=4 -DSTAGES=2 tune_bwd.cu
// -DATOMIC=1 (default) times the default path (dK/dV kernel with atomic dQ, the timed
// call includes zeroing the fp32 accumulator); -DATOMIC=0 the deterministic kernel pair.
// Both include the D = rowsum(dO * O) pass. The fp32 -> bf16 conversion of dQ (a torch
// copy on the host side) is not included.
// Prints one line per shape: hdim, tile, causal, seqlen, ms, TFLOP/s (2.5 x forward FLOPs).
// Inputs are random bf16; lse and D are set to fixed finite values (timing only, the
// numbers are not checked: tests/test_flash_attn_bwd_gpu.py does that).
#include <cmath>

#include "tune_common.cuh"
#include "flash_bwd_launch_template.h"

#ifndef HDIM
#define HDIM 128
#endif
#ifndef ROWS
#define ROWS 64
#endif
#ifndef COLS
#define COLS 32
#endif
#ifndef STAGES
#define STAGES 1
#endif
#ifndef WARPS
#define WARPS 4
#endif
#ifndef ATOMIC
#define ATOMIC 1
#endif

using Element = cutlass::bfloat16_t;
using Ktraits = flash::BwdKernelTraits<HDIM, Element, flash::BwdTile{ROWS, COLS, WARPS, STAGES}>;

__global__ void fill_value(float *x, size_t n, float value) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    x[i] = value;
  }
}

int main() {
  if (ATOMIC && !flash::bwd_atomic_dq(HDIM)) {
    std::printf("hdim %d has no atomic backward kernel (tile_size.h bwd_atomic_dq): time it with -DATOMIC=0\n", HDIM);
    return 1;
  }
  const int seqlens[] = {2048, 8192};
  for (int causal = 0; causal < 2; ++causal) {
    for (int s : seqlens) {
      const int h = 2048 / HDIM, b = 16384 / s, d = HDIM;
      const size_t n = size_t(b) * s * h * d, rows = size_t(b) * h * s;
      std::vector<Element *> bufs(8);  // q k v o do (random) dq dk dv
      for (int i = 0; i < 8; ++i) { bufs[i] = i < 5 ? random_alloc<Element>(n, 7 + i) : device_alloc<Element>(n); }
      float *dq_accum = device_alloc<float>(n), *lse = device_alloc<float>(rows), *dsum = device_alloc<float>(rows);
      fill_value<<<1024, 256>>>(lse, rows, 6.f);
      fill_value<<<1024, 256>>>(dsum, rows, 0.1f);

      flash::Flash_bwd_params p = {};
      p.q_ptr = bufs[0]; p.k_ptr = bufs[1]; p.v_ptr = bufs[2]; p.o_ptr = bufs[3];
      p.do_ptr = bufs[4]; p.dq_ptr = bufs[5]; p.dk_ptr = bufs[6]; p.dv_ptr = bufs[7];
      p.softmax_lse_ptr = lse;
      p.softmax_d_ptr = dsum;
      const int64_t row = int64_t(h) * d, batch = int64_t(s) * h * d;
      p.q_row_stride = p.k_row_stride = p.v_row_stride = p.o_row_stride = row;
      p.do_row_stride = p.dq_row_stride = p.dk_row_stride = p.dv_row_stride = row;
      p.q_head_stride = p.k_head_stride = p.v_head_stride = p.o_head_stride = d;
      p.do_head_stride = p.dq_head_stride = p.dk_head_stride = p.dv_head_stride = d;
      p.q_batch_stride = p.k_batch_stride = p.v_batch_stride = p.o_batch_stride = batch;
      p.do_batch_stride = p.dq_batch_stride = p.dk_batch_stride = p.dv_batch_stride = batch;
      p.b = b; p.seqlen_q = p.seqlen_k = s; p.total_q = p.total_k = b * s;
      p.h = p.h_k = h; p.h_h_k_ratio = 1; p.d = d;
      p.scale_softmax = p.scale_qk = 1.f / std::sqrt(float(d));
      p.scale_softmax_log2 = p.scale_softmax * 1.4426950408889634f;
      p.window_size_left = -1;
      p.window_size_right = causal ? 0 : -1;
      p.is_bf16 = true;
      if (ATOMIC) {
        p.dq_accum_ptr = dq_accum;
        p.dq_accum_row_stride = d;  // head-major, as flash_api.cpp allocates it
        p.dq_accum_head_stride = int64_t(s) * d;
        p.dq_accum_batch_stride = batch;
      }

      const float med = median_ms(
          [&] {
            if (ATOMIC) { cudaMemsetAsync(dq_accum, 0, n * sizeof(float), 0); }
            return flash::run_flash_bwd<Ktraits, false, false>(p, 0);
          },
          5, 20);
      const double flops = 2.5 * 4.0 * b * h * double(s) * s * d / (causal ? 2 : 1);
      std::printf("bwd%s hdim %d tile %dx%dx%dw%ds causal %d seqlen %5d  %.3f ms  %.1f TFLOP/s\n",
                  ATOMIC ? "" : "-det", HDIM, ROWS, COLS, WARPS, STAGES, causal, s, med, flops / med / 1e9);
      for (auto ptr : bufs) { cudaFree(ptr); }
      cudaFree(lse);
      cudaFree(dsum);
      cudaFree(dq_accum);
    }
  }
  return 0;
}
