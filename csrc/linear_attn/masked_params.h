// The host/device line of masked linear attention (TransnormerLLM-style, DESIGN.md):
//
//   o_i = scale * sum_j (q_i . k_j) M[b, h, i, j] v_j
//
// with an arbitrary mask M broadcastable to [B, H, T, T]. Two kernels, neither of which
// allocates or forms a T x T product beyond 64 x 64 tiles in registers:
//
//   masked_attn (masked_attn.cuh), one generic pass, out_i = scale * sum_{g, j} (x_i . y_j) M_ij z_j,
//   run four times with the operands in different roles (query heads h, kv heads h / G):
//     forward o:  x = q (h),   y = k (h / G),  z = v (h / G),   M
//     dq:         x = do (h),  y = v (h / G),  z = k (h / G),   M
//     dk:         x = v (kv),  y = do (kv * G + g),  z = q (kv * G + g),  M^T   (g < G: MQA sum)
//     dv:         x = k (kv),  y = q (kv * G + g),   z = do (kv * G + g), M^T
//   M^T is M with its row and column strides swapped; every output row is written by one CTA
//   (no atomics, bitwise reproducible), and dk / dv sum over the G query heads of their group
//   inside the CTA.
//
//   mask_grad (mask_grad.cuh): dM[b, h, i, j] = scale * (do_i . v_j) (q_i . k_j), summed over
//   every dimension the mask broadcasts (size 1 in the mask's own shape). One CTA owns one
//   64 x 64 tile of dM in the mask's shape and loops over every (b, h, i tile, j tile) that
//   contributes to it, so dM is an fp32 buffer of exactly the mask's shape, written once per
//   element (no atomics, no [B, H, T, T] buffer when the mask is broadcast).
//
// Token tensors are row-major [B, T, heads, dim] (contiguous); dims are multiples of 64
// (Python pads). No torch, no CUDA types beyond cudaError_t / cudaStream_t.
#pragma once

#include <cstdint>

#include <cuda_runtime_api.h>

#include "linear_params.h"  // the dtype tags Fp16 / Bf16

namespace linear_attn {

constexpr int kMaskedTile = 64;  // rows of x (and of y, per step) per CTA

// The mask's element type, a runtime value: read and converted to fp32 in the kernel.
enum class MaskDtype : int { kFp32 = 0, kFp16 = 1, kBf16 = 2 };

struct MaskedParams {
  const void* x = nullptr;   // [batch, seqlen, x_heads, r_dim] row operand
  const void* y = nullptr;   // [batch, seqlen, yz_heads, r_dim] column operand of the scores
  const void* z = nullptr;   // [batch, seqlen, yz_heads, n_dim] value operand
  void* out = nullptr;       // [batch, seqlen, x_heads, n_dim]
  // The mask in the pass's orientation: element (b, head, i = x row, j = y row) at
  // mask + b * mask_stride[0] + head * mask_stride[1] + i * mask_stride[2] + j * mask_stride[3]
  // (elements, not bytes; 0 on broadcast dimensions, any other non-negative values).
  const void* mask = nullptr;
  int64_t mask_stride[4] = {0, 0, 0, 0};
  MaskDtype mask_dtype = MaskDtype::kFp32;
  int batch = 0;
  int seqlen = 0;
  int x_heads = 0;
  int yz_heads = 0;
  // Heads: for x head hx and g < group, y / z head = (hx / x_div) * group + g; the mask's head
  // is that y / z head when mask_head_from_y, else hx (the query head either way).
  int x_div = 1;
  int group = 1;
  bool mask_head_from_y = false;
  int r_dim = 0;             // 64, 128 or 256 (a template parameter)
  int n_dim = 0;             // multiple of BN (masked_tile_n, tile_size.h)
  float scale = 1.f;
};

struct MaskGradParams {
  const void* q = nullptr;     // [batch, seqlen, heads, k_dim]
  const void* k = nullptr;     // [batch, seqlen, kv_heads, k_dim]
  const void* v = nullptr;     // [batch, seqlen, kv_heads, v_dim]
  const void* dout = nullptr;  // [batch, seqlen, heads, v_dim]
  float* dmask = nullptr;      // [mask_batch, mask_heads, mask_rows, mask_cols] fp32, contiguous
  int batch = 0;
  int seqlen = 0;
  int heads = 0;
  int kv_heads = 0;            // heads % kv_heads == 0: head h reads kv head h / (heads / kv_heads)
  int k_dim = 0;               // multiple of 64
  int v_dim = 0;               // multiple of 64
  // The mask's own sizes: each either 1 (broadcast: dM sums over it) or batch / heads / seqlen.
  int mask_batch = 1;
  int mask_heads = 1;
  int mask_rows = 1;
  int mask_cols = 1;
  float scale = 1.f;
};

template <typename Dtype, int R, int BN>
cudaError_t run_masked_attn(const MaskedParams& p, cudaStream_t stream);

template <typename Dtype>
cudaError_t run_mask_grad(const MaskGradParams& p, cudaStream_t stream);

}  // namespace linear_attn
