// mask_grad: the mask's gradient of masked linear attention,
//
//   dM[b, h, i, j] = scale * (do_i . v_j) (q_i . k_j)     (query head h, kv head h / (H / HK))
//
// summed over every dimension the mask broadcasts. One CTA owns one 64 x 64 tile of dM in the
// mask's own shape [mask_batch, mask_heads, mask_rows, mask_cols] (a broadcast dimension has one
// index, so a broadcast row or column makes the tile one row or one column) and walks every
// contribution to it: each (b, h, 64-row i tile, 64-column j tile) that maps onto it. Per
// contribution, warp w accumulates in fp32 the 16 x 64 tiles
//   S  = q_w k^T   over K in 64-wide slices,   dP = do_w v^T   over V in 64-wide slices,
// then adds S * dP into its dM tile. The slices stream through a two-stage cp.async pipeline
// (two 64 x 64 tiles per stage). At the end the tile goes through shared memory, is summed
// over the broadcast rows / columns in a fixed order, and is written once: no atomics, the
// result is bitwise reproducible, and nothing beyond the mask's size (in fp32) is allocated.
// Rows and columns past seqlen are zero-filled, so they add nothing.
#pragma once

#include "masked_device.cuh"
#include "masked_params.h"
#include "mma.cuh"

namespace linear_attn {

constexpr int mask_grad_smem_bytes() {
  // 2 stages x (a: 64 x 64, b: 64 x 64) 16-bit; reused as a 64 x 65 fp32 tile at the end
  return 2 * 2 * kMaskedTile * 64 * 2;
}
static_assert(kMaskedTile * (kMaskedTile + 1) * 4 <= mask_grad_smem_bytes(), "the fp32 tile fits the stages");

template <typename Tag>
__global__ void __launch_bounds__(128) mask_grad_kernel(const MaskGradParams p) {
  using E = Elem<Tag>;
  using T = typename E::T;
  constexpr int kThreads = 128;
  constexpr int kTile = kMaskedTile;
  constexpr int kSlice = 64;  // head-dim columns per pipeline step
  static_assert(kTile == 64, "4 warps of 16 rows, 64-column tiles");

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sa = reinterpret_cast<T*>(smem_raw);  // [2] x (i row, slice col)  swizzled: q or do
  T* sb = sa + 2 * kTile * kSlice;          // [2] x (j row, slice col)  swizzled: k or v

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const int n_tiles = (p.seqlen + kTile - 1) / kTile;
  const bool bcast_b = p.mask_batch == 1, bcast_h = p.mask_heads == 1;
  const bool bcast_i = p.mask_rows == 1, bcast_j = p.mask_cols == 1;
  // this CTA's tile of dM: blockIdx.x = ((bm * mask_heads + hm) * out_i + ti) * out_j + tj
  const int out_i = bcast_i ? 1 : n_tiles, out_j = bcast_j ? 1 : n_tiles;
  int rest = static_cast<int>(blockIdx.x);
  const int tj = rest % out_j;
  rest /= out_j;
  const int ti = rest % out_i;
  rest /= out_i;
  const int hm = rest % p.mask_heads;
  const int bm = rest / p.mask_heads;
  // contributions: every index of each broadcast dimension, the CTA's own index of the others
  const int nb = bcast_b ? p.batch : 1, nh = bcast_h ? p.heads : 1;
  const int ni = bcast_i ? n_tiles : 1, nj = bcast_j ? n_tiles : 1;
  const int k_slices = p.k_dim / kSlice, v_slices = p.v_dim / kSlice;
  const int per = k_slices + v_slices;  // pipeline steps per contribution
  const int64_t steps = static_cast<int64_t>(nb) * nh * ni * nj * per;
  const int group = p.heads / p.kv_heads;
  const int64_t ldq = static_cast<int64_t>(p.heads) * p.k_dim, ldk = static_cast<int64_t>(p.kv_heads) * p.k_dim;
  const int64_t ldo = static_cast<int64_t>(p.heads) * p.v_dim, ldv = static_cast<int64_t>(p.kv_heads) * p.v_dim;

  // The pipeline's steps: per contribution (j tile fastest, then i tile, head, batch over
  // their ranges), k_slices steps of q k^T then v_slices steps of do v^T. A cursor walks them
  // (no divisions in the loop).
  struct Cursor {
    int sl = 0, j = 0, i = 0, h = 0, b = 0;  // slice; indices within nj, ni, nh, nb
  };
  auto advance = [&](Cursor& c) {
    if (++c.sl < per) return;
    c.sl = 0;
    if (++c.j < nj) return;
    c.j = 0;
    if (++c.i < ni) return;
    c.i = 0;
    if (++c.h < nh) return;
    c.h = 0;
    ++c.b;
  };
  auto load_step = [&](const Cursor& c, int stage) {
    const int ltid = loop_tid();
    const int jt = bcast_j ? c.j : tj, it = bcast_i ? c.i : ti;
    const int h = bcast_h ? c.h : hm, b = bcast_b ? c.b : bm;
    const int i0 = it * kTile, j0 = jt * kTile;
    const int64_t ti0 = static_cast<int64_t>(b) * p.seqlen + i0, tj0 = static_cast<int64_t>(b) * p.seqlen + j0;
    const int hk = h / group;
    const T *ag, *bg;
    int64_t lda, ldb;
    if (c.sl < k_slices) {
      ag = static_cast<const T*>(p.q) + ti0 * ldq + static_cast<int64_t>(h) * p.k_dim + c.sl * kSlice;
      bg = static_cast<const T*>(p.k) + tj0 * ldk + static_cast<int64_t>(hk) * p.k_dim + c.sl * kSlice;
      lda = ldq;
      ldb = ldk;
    } else {
      const int col = (c.sl - k_slices) * kSlice;
      ag = static_cast<const T*>(p.dout) + ti0 * ldo + static_cast<int64_t>(h) * p.v_dim + col;
      bg = static_cast<const T*>(p.v) + tj0 * ldv + static_cast<int64_t>(hk) * p.v_dim + col;
      lda = ldo;
      ldb = ldv;
    }
    load_tile<kTile, kSlice, kThreads>(sa + stage * kTile * kSlice, ag, lda, p.seqlen - i0, ltid);
    load_tile<kTile, kSlice, kThreads>(sb + stage * kTile * kSlice, bg, ldb, p.seqlen - j0, ltid);
  };

  float cur[8][4], s_keep[8][4], acc[8][4];  // the running product, S of this contribution, dM
  zero_frags(cur);
  zero_frags(s_keep);
  zero_frags(acc);

  Cursor next;  // the step the next load_step fetches
  load_step(next, 0);
  cp_async_commit();
  advance(next);
  int sl = 0;  // this step's slice
  for (int64_t s = 0; s < steps; ++s) {
    const int stage = static_cast<int>(s & 1);
    if (s + 1 < steps) {
      load_step(next, stage ^ 1);
      advance(next);
    }
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const T* sas = sa + stage * kTile * kSlice;
    const T* sbs = sb + stage * kTile * kSlice;
#pragma unroll
    for (int kk = 0; kk < kSlice / 16; ++kk) {
      uint32_t a[4];
      load_a<kSlice>(a, sas, warp * 16, kk * 16, lane);
      mma_b<E, kSlice, BLayout::kNK>(cur, a, sbs, kk * 16, lane);
    }
    if (sl == k_slices - 1) {  // S is complete: keep it, start dP
#pragma unroll
      for (int i = 0; i < 8; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s_keep[i][e] = cur[i][e];
          cur[i][e] = 0.f;
        }
      }
    } else if (sl == per - 1) {  // dP is complete: dM += S * dP
#pragma unroll
      for (int i = 0; i < 8; ++i) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          acc[i][e] += s_keep[i][e] * cur[i][e];
          cur[i][e] = 0.f;
        }
      }
    }
    sl = sl + 1 < per ? sl + 1 : 0;
    __syncthreads();  // this stage is free for step s + 2
  }
  cp_async_wait<0>();

  // The tile through shared memory (fp32, rows padded to 65 floats), then the broadcast sums.
  float* red = reinterpret_cast<float*>(smem_raw);  // (row, col) at row * 65 + col
  constexpr int kLd = kTile + 1;
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      red[(warp * 16 + g + 8 * (e >> 1)) * kLd + nt * 8 + 2 * t4 + (e & 1)] = p.scale * acc[nt][e];
    }
  }
  __syncthreads();
  float* out = p.dmask + ((static_cast<int64_t>(bm) * p.mask_heads + hm) * p.mask_rows) * p.mask_cols;
  const int i0 = ti * kTile, j0 = tj * kTile;
  if (!bcast_i && !bcast_j) {
    for (int idx = tid; idx < kTile * kTile; idx += kThreads) {
      const int r = idx / kTile, c = idx % kTile;
      if (i0 + r < p.seqlen && j0 + c < p.seqlen) {
        out[static_cast<int64_t>(i0 + r) * p.mask_cols + j0 + c] = red[r * kLd + c];
      }
    }
  } else if (bcast_i && !bcast_j) {  // column sums
    if (tid < kTile && j0 + tid < p.seqlen) {
      float sum = 0.f;
      for (int r = 0; r < kTile; ++r) sum += red[r * kLd + tid];
      out[j0 + tid] = sum;
    }
  } else if (!bcast_i && bcast_j) {  // row sums
    if (tid < kTile && i0 + tid < p.seqlen) {
      float sum = 0.f;
      for (int c = 0; c < kTile; ++c) sum += red[tid * kLd + c];
      out[i0 + tid] = sum;
    }
  } else {  // everything: row sums, then their sum
    float sum = 0.f;
    if (tid < kTile) {
      for (int c = 0; c < kTile; ++c) sum += red[tid * kLd + c];
    }
    __syncthreads();
    if (tid < kTile) red[tid] = sum;
    __syncthreads();
    if (tid == 0) {
      float total = 0.f;
      for (int r = 0; r < kTile; ++r) total += red[r];
      out[0] = total;
    }
  }
}

template <typename Tag>
cudaError_t run_mask_grad(const MaskGradParams& p, cudaStream_t stream) {
  if (p.mask_batch == 0 || p.mask_heads == 0 || p.mask_rows == 0 || p.mask_cols == 0) return cudaSuccess;
  constexpr int smem = mask_grad_smem_bytes();
  static_assert(smem <= 48 * 1024, "no opt-in shared memory needed");
  const int64_t n_tiles = (p.seqlen + kMaskedTile - 1) / kMaskedTile;
  const int64_t out_i = p.mask_rows == 1 ? 1 : n_tiles, out_j = p.mask_cols == 1 ? 1 : n_tiles;
  const int64_t ctas = static_cast<int64_t>(p.mask_batch) * p.mask_heads * out_i * out_j;
  mask_grad_kernel<Tag><<<static_cast<unsigned>(ctas), 128, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace linear_attn
