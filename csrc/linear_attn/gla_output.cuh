// gla_output: GLA's per-chunk output, one (chunk, head, BN-column N tile) per CTA, every chunk
// in parallel. With b the chunk-local cumulative per-key gate (gla_gates.cuh):
//
//   lower: out_r = inter_scale * (x_r * exp(b_r)) M       + intra_scale * sum_{c <= r} A_rc z_c
//          A_rc  = sum_d x_rd y_cd exp(b_rd - b_cd)
//   upper: out_r = inter_scale * (x_r * exp(b_L - b_r)) M + intra_scale * sum_{c >= r} A_rc z_c
//          A_rc  = sum_d x_rd y_cd exp(b_cd - b_rd)
// forward o:  x = q, y = k, M = h_c (state entering the chunk),           z = v,  lower, both scales = scale
// dv:         x = k, y = q, M = dH_c (gradient of the state leaving it),  z = do, upper, inter 1, intra scale
//
// The decay depends on the key d, so it cannot be a mask on x y^T. Warp w owns the rows of
// sub-chunk w (16w .. 16w + 15) and its reference row p: the sub-chunk's first row (lower) or
// last row (upper). For a block off the diagonal (columns of sub-chunk J, J < w lower, J > w upper)
//   exp(b_rd - b_cd) = exp(b_rd - b_pd) exp(b_pd - b_cd)    (lower: c < p <= r)
//   exp(b_cd - b_rd) = exp(b_cd - b_pd) exp(b_pd - b_rd)    (upper: r <= p < c)
// both factors <= 1, so the block is an MMA of rebased rows and rebased columns. The diagonal
// block has no such row; it is summed elementwise (gla_diag_scores), each term with its own
// exponent, also <= 0. The inter-chunk factor reuses the rebased rows:
//   exp(b_r) = exp(b_r - b_p) exp(b_p),   exp(b_L - b_r) = exp(b_p - b_r) exp(b_L - b_p).
// No exponent is ever positive, however negative the gates are.
//
// R (the key dim) is walked in 64-column slabs: per slab, x, y, the slab's 64 rows of M and its
// gate tile come into shared memory; A accumulates in registers (16 x 64 per warp) next to
// the output tile (16 x BN per warp). After the last slab, A (bf16) times z is added.
#pragma once

#include "chunk_info.cuh"
#include "gla_gates.cuh"
#include "mma.cuh"

namespace linear_attn {

template <int BN>
constexpr int gla_output_smem_bytes() {
  // x, y slabs: 64 x 64; M slab: 64 x BN; z: 64 x BN (16-bit); one gate tile
  return (2 * kChunk * 64 + 64 * BN + kChunk * BN) * 2 + kGateTileFloats * 4;
}

// 8 consecutive 16-bit elements (row, c8 .. c8 + 7) of a 64-column swizzled tile, as floats
template <typename E, typename T>
__device__ __forceinline__ void load_row8(float (&x)[8], const T* tile, int row, int c8) {
  const uint4 u = *reinterpret_cast<const uint4*>(tile + swz<64>(row, c8));
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 f = E::unpack(w[i]);
    x[2 * i] = f.x;
    x[2 * i + 1] = f.y;
  }
}

// 8 consecutive gates (row, c8 .. c8 + 7) of a gate tile
__device__ __forceinline__ void load_gate8(float (&b)[8], const float* gt, int row, int c8) {
  const float4 lo = *reinterpret_cast<const float4*>(gt + gate_at(row, c8));
  const float4 hi = *reinterpret_cast<const float4*>(gt + gate_at(row, c8 + 4));
  b[0] = lo.x; b[1] = lo.y; b[2] = lo.z; b[3] = lo.w;
  b[4] = hi.x; b[5] = hi.y; b[6] = hi.z; b[7] = hi.w;
}

// sum_e x_e y_e exp(bx_e - by_e) (lower) or exp(by_e - bx_e) (upper): one kept pair, 8 columns
template <bool kUpper>
__device__ __forceinline__ float gla_pair8(const float (&x)[8], const float (&bx)[8], const float (&y)[8],
                                           const float (&by)[8]) {
  float acc = 0.f;
#pragma unroll
  for (int e = 0; e < 8; ++e) acc += x[e] * y[e] * __expf(kUpper ? by[e] - bx[e] : bx[e] - by[e]);
  return acc;
}

// Warp w's diagonal block of A over one 64-column slab, elementwise, into C fragments d0 (block
// columns 0..7) and d1 (8..15): this thread's rows g, g + 8 and columns 2 t4 + j, 8 + 2 t4 + j.
// The 8 x 8 quadrant off the block's diagonal is always kept (lower: row g + 8 x column 2 t4 + j;
// upper: row g x column 8 + 2 t4 + j); in the two 8 x 8 blocks on it (row g x column 2 t4 + j,
// row g + 8 x column 8 + 2 t4 + j) the mask keeps 2 t4 + j <= g (lower) or >= g (upper). Pairs
// the mask drops are never evaluated (their exponent would be positive). One row at a time,
// which keeps the working set small next to the accumulators.
template <bool kUpper, typename E, typename T>
__device__ __forceinline__ void gla_diag_scores(float (&d0)[4], float (&d1)[4], const T* sx, const T* sy,
                                                const float* gt, int warp, int g, int t4) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = warp * kSub + g + 8 * half;
    // the row's pairs: block column 8 half + 2 t4 + j (on the diagonal's 8 x 8 block) and
    // 8 (1 - half) + 2 t4 + j (the quadrant off it, kept for lower when half = 1, upper when 0)
    const bool quadrant = kUpper ? half == 0 : half == 1;
#pragma unroll 1
    for (int c8 = 0; c8 < 64; c8 += 8) {
      float x[8], bx[8];
      load_row8<E>(x, sx, r, c8);
      load_gate8(bx, gt, r, c8);
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        const bool on_diag = kUpper ? 2 * t4 + j >= g : 2 * t4 + j <= g;
        float y[8], by[8];
        if (on_diag) {
          const int c = warp * kSub + 8 * half + 2 * t4 + j;
          load_row8<E>(y, sy, c, c8);
          load_gate8(by, gt, c, c8);
          (half == 0 ? d0 : d1)[2 * half + j] += gla_pair8<kUpper>(x, bx, y, by);
        }
        if (quadrant) {
          const int c = warp * kSub + 8 * (1 - half) + 2 * t4 + j;
          load_row8<E>(y, sy, c, c8);
          load_gate8(by, gt, c, c8);
          (half == 0 ? d1 : d0)[2 * half + j] += gla_pair8<kUpper>(x, bx, y, by);
        }
      }
    }
  }
}

// Warp w's step kk (slab columns d = 16 kk + 2 t4 + 8 ch + j) of the scheme above over one
// 64-column slab: x's A fragment a[i] = (row 16 w + g + 8 (i & 1), columns 16 kk + 2 t4 + 8 (i >> 1)
// + {0, 1}) rebased on the reference row p (ao) adds the blocks of A off the diagonal into s (with
// y's rows rebased the other way), and ai gets it decayed to the chunk's start (lower: exp(b_r))
// or end (upper: exp(b_L - b_r)), the inter-chunk MMA operand.
template <bool kUpper, typename E, typename T>
__device__ __forceinline__ void gla_rebased_step(float (&s)[8][4], uint32_t (&ai)[4], const T* sx, const T* sy,
                                                 const float* gt, int w, int kk, int lane) {
  const int g = lane >> 2, t4 = lane & 3;
  const int pr = w * kSub + (kUpper ? kSub - 1 : 0);  // the reference row
  float bp[2][2], ic[2][2];  // [ch][j]: b at the reference row; the inter-chunk column factor
#pragma unroll
  for (int ch = 0; ch < 2; ++ch) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int d = kk * 16 + 2 * t4 + 8 * ch + j;
      bp[ch][j] = gt[gate_at(pr, d)];
      ic[ch][j] = __expf(kUpper ? gt[gate_at(kChunk - 1, d)] - bp[ch][j] : bp[ch][j]);
    }
  }
  uint32_t a[4], ao[4];
  load_a<64>(a, sx, w * kSub, kk * 16, lane);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int r = w * kSub + g + 8 * (i & 1), ch = i >> 1, d = kk * 16 + 2 * t4 + 8 * ch;
    const float2 f = E::unpack(a[i]);
    const float b0 = gt[gate_at(r, d)], b1 = gt[gate_at(r, d + 1)];
    const float x0 = f.x * __expf(kUpper ? bp[ch][0] - b0 : b0 - bp[ch][0]);
    const float x1 = f.y * __expf(kUpper ? bp[ch][1] - b1 : b1 - bp[ch][1]);
    ao[i] = E::pack(x0, x1);
    ai[i] = E::pack(x0 * ic[ch][0], x1 * ic[ch][1]);
  }
#pragma unroll
  for (int np = 0; np < 4; ++np) {
    if (kUpper ? np <= w : np >= w) continue;  // blocks off the diagonal only
    uint32_t yb[4];  // yb[e] = y (chunk row 16 np + g + 8 (e >> 1), columns 16 kk + 2 t4 + 8 (e & 1) + {0, 1})
    load_b_nk<64>(yb, sy, kk * 16, np * 16, lane);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int c = np * 16 + g + 8 * (e >> 1), ch = e & 1, d = kk * 16 + 2 * t4 + 8 * ch;
      const float2 f = E::unpack(yb[e]);
      const float b0 = gt[gate_at(c, d)], b1 = gt[gate_at(c, d + 1)];
      yb[e] = E::pack(f.x * __expf(kUpper ? b0 - bp[ch][0] : bp[ch][0] - b0),
                      f.y * __expf(kUpper ? b1 - bp[ch][1] : bp[ch][1] - b1));
    }
    E::mma(s[2 * np], ao, yb[0], yb[1]);
    E::mma(s[2 * np + 1], ao, yb[2], yb[3]);
  }
}

// Warp w's diagonal block of A over one slab (gla_diag_scores) added into s.
template <bool kUpper, typename E, typename T>
__device__ __forceinline__ void gla_add_diag(float (&s)[8][4], const T* sx, const T* sy, const float* gt, int w,
                                             int lane) {
  float d0f[4] = {0.f, 0.f, 0.f, 0.f}, d1f[4] = {0.f, 0.f, 0.f, 0.f};
  gla_diag_scores<kUpper, E>(d0f, d1f, sx, sy, gt, w, lane >> 2, lane & 3);
#pragma unroll
  for (int blk = 0; blk < 4; ++blk) {
    if (blk != w) continue;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      s[2 * blk][e] += d0f[e];
      s[2 * blk + 1][e] += d1f[e];
    }
  }
}

// o += (scale * A) z for warp w's rows: A's kept 16-column blocks (lower: up to the diagonal;
// upper: from it on) rounded to 16-bit A fragments, z the chunk rows x the tile's columns
// ([k][n], COLS wide).
template <bool kUpper, typename E, int COLS, int NT, typename T>
__device__ __forceinline__ void gla_add_scores_times(float (&o)[NT][4], const float (&s)[8][4], float scale,
                                                     const T* z, int w, int lane) {
#pragma unroll
  for (int blk = 0; blk < 4; ++blk) {
    if (kUpper ? blk < w : blk > w) continue;
    uint32_t pa[4];
    pa[0] = E::pack(s[2 * blk][0] * scale, s[2 * blk][1] * scale);
    pa[1] = E::pack(s[2 * blk][2] * scale, s[2 * blk][3] * scale);
    pa[2] = E::pack(s[2 * blk + 1][0] * scale, s[2 * blk + 1][1] * scale);
    pa[3] = E::pack(s[2 * blk + 1][2] * scale, s[2 * blk + 1][3] * scale);
    mma_b<E, COLS, BLayout::kKN>(o, pa, z, blk * 16, lane);
  }
}

template <typename Tag, int BN, bool kUpper>
__global__ void __launch_bounds__(128) gla_output_kernel(const GlaOutputParams p) {
  using E = Elem<Tag>;
  using T = typename E::T;
  constexpr int kThreads = 128;
  constexpr int NT8 = BN / 8;  // output n tiles per warp
  static_assert(BN == 64 || BN == 128, "N tiles of 64 or 128 columns");

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sx = reinterpret_cast<T*>(smem_raw);  // (chunk row, d) swizzled: the slab of x
  T* sy = sx + kChunk * 64;                 // (chunk col, d) swizzled: the slab of y
  T* sm = sy + kChunk * 64;                 // (d, n) swizzled: the slab's 64 rows of M, this N tile
  T* sz = sm + 64 * BN;                     // (chunk col, n) swizzled
  float* gt = reinterpret_cast<float*>(sz + kChunk * BN);  // (chunk row, d) gate tile of the slab

  const ChunkCoord cc = locate_chunk(p.seq, blockIdx.x);
  if (!cc.valid) return;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const int head = blockIdx.y, H = p.seq.heads;
  const int n0 = blockIdx.z * BN;
  const int64_t ldr = static_cast<int64_t>(H) * p.r_dim, ldn = static_cast<int64_t>(H) * p.n_dim;
  const int64_t row0 = cc.start;
  const int64_t roff = row0 * ldr + static_cast<int64_t>(head) * p.r_dim;
  const T* xg = static_cast<const T*>(p.x) + roff;
  const T* yg = static_cast<const T*>(p.y) + roff;
  const float* bg = p.b + roff;
  const T* zg = static_cast<const T*>(p.z) + row0 * ldn + static_cast<int64_t>(head) * p.n_dim + n0;
  const T* mg = static_cast<const T*>(p.m) + (static_cast<int64_t>(blockIdx.x) * H + head) * p.r_dim * p.n_dim + n0;

  float s[8][4];    // A: (16 rows) x (64 chunk columns)
  float o[NT8][4];  // output tile: (16 rows) x (BN N columns)
  zero_frags(s);
  zero_frags(o);

#pragma unroll 1
  for (int d0 = 0; d0 < p.r_dim; d0 += 64) {
    if (d0 > 0) __syncthreads();  // every warp is done with the previous slab
    load_tile<kChunk, 64, kThreads>(sx, xg + d0, ldr, cc.rows, tid);
    load_tile<kChunk, 64, kThreads>(sy, yg + d0, ldr, cc.rows, tid);
    load_tile<64, BN, kThreads>(sm, mg + static_cast<int64_t>(d0) * p.n_dim, p.n_dim, 64, tid);
    load_gate_tile<kThreads>(gt, bg + d0, ldr, cc.rows, tid);
    if (d0 == 0) load_tile<kChunk, BN, kThreads>(sz, zg, ldn, cc.rows, tid);
    cp_async_commit();
    cp_async_wait<0>();
    __syncthreads();

#pragma unroll 1
    for (int kk = 0; kk < 4; ++kk) {
      uint32_t ai[4];
      gla_rebased_step<kUpper, E>(s, ai, sx, sy, gt, warp, kk, lane);
      // the inter-chunk part: (decayed x) times the slab's rows of M
      mma_b<E, BN, BLayout::kKN>(o, ai, sm, kk * 16, lane);
    }
    // the diagonal block, elementwise
    gla_add_diag<kUpper, E>(s, sx, sy, gt, warp, lane);
  }

  // out = inter_scale * inter + (intra_scale * A) z, A as 16-bit A fragments per 16-column block
#pragma unroll
  for (int nt = 0; nt < NT8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) o[nt][e] *= p.inter_scale;
  }
  gla_add_scores_times<kUpper, E, BN>(o, s, p.intra_scale, sz, warp, lane);

  // Epilogue: rows past the chunk's end are not written.
  T* og = static_cast<T*>(p.out) + row0 * ldn + static_cast<int64_t>(head) * p.n_dim + n0;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = warp * kSub + g + 8 * half;
    if (r >= cc.rows) continue;
#pragma unroll
    for (int nt = 0; nt < NT8; ++nt) {
      *reinterpret_cast<uint32_t*>(og + r * ldn + nt * 8 + 2 * t4) = E::pack(o[nt][2 * half], o[nt][2 * half + 1]);
    }
  }
}

template <typename Tag, int BN, bool kUpper>
cudaError_t run_gla_output(const GlaOutputParams& p, cudaStream_t stream) {
  if (p.seq.num_slots == 0 || p.seq.heads == 0 || p.n_dim == 0 || p.r_dim == 0) return cudaSuccess;
  if (p.r_dim % 64 != 0 || p.n_dim % BN != 0) return cudaErrorInvalidValue;
  constexpr int smem = gla_output_smem_bytes<BN>();
  auto kernel = gla_output_kernel<Tag, BN, kUpper>;
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(p.seq.num_slots, p.seq.heads, p.n_dim / BN);
  kernel<<<grid, 128, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace linear_attn
