// masked_attn: one pass of masked linear attention (masked_params.h lists the four uses),
//
//   out_i = scale * sum_{g < group} sum_j (x_i . y_j) M[b, head, i, j] z_j
//
// a flash-attention forward without the softmax. One CTA per (64-row x tile, batch, x head,
// BN-column N tile); 4 warps, warp w owns the x rows 16w .. 16w + 15. The CTA walks the y / z
// tiles of 64 rows (of each of its group heads) with a two-stage cp.async pipeline:
//   S   = x_w y^T          16 x 64, fp32 (tensor cores, R / 16 k steps)
//   P   = S * M            the mask tile read from global memory into the same C layout
//                          (masked_device.cuh, issued before S so its latency hides behind it)
//   out += P z             P packed to 16-bit A fragments in registers, z from shared memory
// The scale multiplies the fp32 accumulator once, at the end. x rows, y rows and mask entries
// past seqlen are zeros (zero-filled copies, guarded mask reads), so partial tiles need no
// other care; rows of out past seqlen are not written.
#pragma once

#include "masked_device.cuh"
#include "masked_params.h"
#include "mma.cuh"

namespace linear_attn {

template <int R, int BN>
constexpr int masked_attn_smem_bytes() {
  // x: 64 x R once; y: 2 stages of 64 x R; z: 2 stages of 64 x BN (16-bit elements)
  return (3 * kMaskedTile * R + 2 * kMaskedTile * BN) * 2;
}

template <typename Tag, int R, int BN>
__global__ void __launch_bounds__(128) masked_attn_kernel(const MaskedParams p) {
  using E = Elem<Tag>;
  using T = typename E::T;
  constexpr int kThreads = 128;
  constexpr int kTile = kMaskedTile;
  constexpr int NT8 = BN / 8;  // n tiles of 8 columns per warp
  static_assert(kTile == 64, "4 warps of 16 rows, 64-column score tiles");
  static_assert(R == 64 || R == 128 || R == 256, "R is 64, 128 or 256");
  static_assert(BN == 64 || BN == 128, "N tiles of 64 or 128 columns");

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sx = reinterpret_cast<T*>(smem_raw);  // (x row, r)            swizzled
  T* sy = sx + kTile * R;                   // [2] x (y row, r)      swizzled
  T* sz = sy + 2 * kTile * R;               // [2] x (y row, n)      swizzled

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const int n_tiles = (p.seqlen + kTile - 1) / kTile;  // 64-row tiles of a sequence (x and y alike)
  const int row_tile = static_cast<int>(blockIdx.x % n_tiles);
  const int bh = static_cast<int>(blockIdx.x / n_tiles);
  const int b = bh / p.x_heads, hx = bh % p.x_heads;
  const int n0 = blockIdx.y * BN;
  const int i0 = row_tile * kTile;
  const int rows = min(kTile, p.seqlen - i0);

  const int64_t ldx = static_cast<int64_t>(p.x_heads) * R;        // token stride of x
  const int64_t ldy = static_cast<int64_t>(p.yz_heads) * R;       // of y
  const int64_t ldz = static_cast<int64_t>(p.yz_heads) * p.n_dim;  // of z
  const int64_t ldo = static_cast<int64_t>(p.x_heads) * p.n_dim;   // of out
  const int64_t tok0 = static_cast<int64_t>(b) * p.seqlen;        // token row of (b, 0)
  const int hy0 = (hx / p.x_div) * p.group;                       // first y / z head
  const int steps = p.group * n_tiles;                            // (group head, y tile) pairs

  // step s: y / z head hy0 + s / n_tiles, rows (s % n_tiles) * 64 ..
  auto load_step = [&](int s, int stage) {
    const int ltid = loop_tid();
    const int hy = hy0 + s / n_tiles;
    const int j0 = (s % n_tiles) * kTile;
    const T* yg = static_cast<const T*>(p.y) + (tok0 + j0) * ldy + static_cast<int64_t>(hy) * R;
    const T* zg = static_cast<const T*>(p.z) + (tok0 + j0) * ldz + static_cast<int64_t>(hy) * p.n_dim + n0;
    load_tile<kTile, R, kThreads>(sy + stage * kTile * R, yg, ldy, p.seqlen - j0, ltid);
    load_tile<kTile, BN, kThreads>(sz + stage * kTile * BN, zg, ldz, p.seqlen - j0, ltid);
  };

  {
    const T* xg = static_cast<const T*>(p.x) + (tok0 + i0) * ldx + static_cast<int64_t>(hx) * R;
    load_tile<kTile, R, kThreads>(sx, xg, ldx, rows, tid);
    load_step(0, 0);
    cp_async_commit();
  }

  const int64_t mask_b = static_cast<int64_t>(b) * p.mask_stride[0];
  float o[NT8][4];  // out tile: (16 rows) x (BN columns)
  zero_frags(o);

  for (int s = 0; s < steps; ++s) {
    const int stage = s & 1;
    // the other stage was released by the __syncthreads ending step s - 1
    if (s + 1 < steps) load_step(s + 1, stage ^ 1);
    cp_async_commit();  // possibly empty: one group per step keeps wait<1> exact

    const int hy = hy0 + s / n_tiles;
    const int j0 = (s % n_tiles) * kTile;
    const int mh = p.mask_head_from_y ? hy : hx;
    float mk[8][4];  // mask tile in the C layout of s_acc
    load_mask_frag(mk, p.mask_dtype, p.mask, mask_b + static_cast<int64_t>(mh) * p.mask_stride[1],
                   p.mask_stride[2], p.mask_stride[3], i0 + warp * 16, p.seqlen, j0, p.seqlen, lane);

    cp_async_wait<1>();  // this step's group (and x's) has landed, for this thread's copies
    __syncthreads();     // ... and for everyone's
    const T* sys = sy + stage * kTile * R;
    const T* szs = sz + stage * kTile * BN;

    float s_acc[8][4];  // S = x_w y^T: (16 rows) x (64 y rows)
    zero_frags(s_acc);
#pragma unroll
    for (int kk = 0; kk < R / 16; ++kk) {
      uint32_t a[4];
      load_a<R>(a, sx, warp * 16, kk * 16, lane);
      mma_b<E, R, BLayout::kNK>(s_acc, a, sys, kk * 16, lane);
    }

    // P = S * M as A fragments, one per 16 y rows: a[0] (g, 2t..), a[1] (g + 8, 2t..),
    // a[2] (g, 2t + 8..), a[3] (g + 8, 2t + 8..)
    uint32_t pa[4][4];
#pragma unroll
    for (int blk = 0; blk < 4; ++blk) {
      const int lo = 2 * blk, hi = 2 * blk + 1;
      pa[blk][0] = E::pack(s_acc[lo][0] * mk[lo][0], s_acc[lo][1] * mk[lo][1]);
      pa[blk][1] = E::pack(s_acc[lo][2] * mk[lo][2], s_acc[lo][3] * mk[lo][3]);
      pa[blk][2] = E::pack(s_acc[hi][0] * mk[hi][0], s_acc[hi][1] * mk[hi][1]);
      pa[blk][3] = E::pack(s_acc[hi][2] * mk[hi][2], s_acc[hi][3] * mk[hi][3]);
    }
#pragma unroll
    for (int blk = 0; blk < 4; ++blk) mma_b<E, BN, BLayout::kKN>(o, pa[blk], szs, blk * 16, lane);
    __syncthreads();  // every warp is done with this stage before step s + 1 refills it
  }

  // Epilogue: the scale, then rows below seqlen only.
  T* og = static_cast<T*>(p.out) + (tok0 + i0) * ldo + static_cast<int64_t>(hx) * p.n_dim + n0;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = warp * 16 + g + 8 * half;
    if (r < rows) {
#pragma unroll
      for (int nt = 0; nt < NT8; ++nt) {
        *reinterpret_cast<uint32_t*>(og + r * ldo + nt * 8 + 2 * t4) =
            E::pack(p.scale * o[nt][2 * half], p.scale * o[nt][2 * half + 1]);
      }
    }
  }
}

template <typename Tag, int R, int BN>
cudaError_t run_masked_attn(const MaskedParams& p, cudaStream_t stream) {
  if (p.batch == 0 || p.seqlen == 0 || p.x_heads == 0 || p.n_dim == 0) return cudaSuccess;
  constexpr int smem = masked_attn_smem_bytes<R, BN>();
  auto kernel = masked_attn_kernel<Tag, R, BN>;
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
  }
  const int64_t n_tiles = (p.seqlen + kMaskedTile - 1) / kMaskedTile;
  const dim3 grid(static_cast<unsigned>(n_tiles * p.batch * p.x_heads), static_cast<unsigned>(p.n_dim / BN));
  kernel<<<grid, 128, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace linear_attn
