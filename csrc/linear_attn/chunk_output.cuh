// chunk_output: one (chunk, head, BN-column N tile) per CTA, every chunk in parallel.
//
//   out_r = rowscale_r * (x_r M) + intra_scale * sum_c D[r, c] (x_r . y_c) z_c
//   rowscale_r = inter_scale * (kUpper ? exp(b_L - b_r) : exp(b_r))
//   D[r, c] = exp(b_r - b_c) for c <= r (lower)  |  exp(b_c - b_r) for c >= r (upper); else 0
// M is the chunk's state slot ([R][N], or [N][R] when kTransM). The four uses:
//   forward o:  x = q,  y = k,  M = h_c,     z = v,  lower, inter = intra = scale
//   dv:         x = k,  y = q,  M = dH_c,    z = do, upper, inter = 1, intra = scale
//   dq:         x = do, y = v,  M = h_c^T,   z = k,  lower, inter = intra = scale
//   dk:         x = v,  y = do, M = dH_c^T,  z = q,  upper, inter = 1, intra = scale
// Warp w owns the chunk rows 16w .. 16w + 15: S = x_w y^T (only the 16-column blocks the
// mask keeps) and x_w M share the x fragments; D and the scales are applied to the fp32
// accumulators, S becomes the A operand of (S * D) z in registers (no shared-memory trip).
// Optional: rowdot_r = sum_n inter_r,n dot_r,n in fp32 with inter_r = rowscale_r * (x_r M), the
// inter-chunk part alone (q . dq_inter and k . dk_inter for the gate gradient, gate_grad.cu).
#pragma once

#include "chunk_info.cuh"
#include "mma.cuh"

namespace linear_attn {

template <int R, int BN>
constexpr int chunk_output_smem_bytes() {
  // x, y: 64 x R; M: R x BN; z: 64 x BN (16-bit), b: 64 floats
  return (2 * kChunk * R + R * BN + kChunk * BN) * 2 + kChunk * 4;
}

template <typename Tag, int R, int BN, bool kTransM, bool kUpper>
__global__ void __launch_bounds__(128) chunk_output_kernel(const ChunkOutputParams p) {
  using E = Elem<Tag>;
  using T = typename E::T;
  constexpr int kThreads = 128;
  constexpr int NT8 = BN / 8;  // output n tiles per warp
  static_assert(R == 64 || R == 128 || R == 256, "R is 64, 128 or 256");
  static_assert(BN == 64 || BN == 128, "N tiles of 64 or 128 columns");

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sx = reinterpret_cast<T*>(smem_raw);  // (chunk row, r)   swizzled
  T* sy = sx + kChunk * R;                  // (chunk col, r)   swizzled
  T* sm = sy + kChunk * R;                  // (r, n) or (n, r) swizzled
  T* sz = sm + R * BN;                      // (chunk col, n)   swizzled
  float* sb = reinterpret_cast<float*>(sz + kChunk * BN);  // [kChunk] chunk-local cumulative log-gate

  const ChunkCoord cc = locate_chunk(p.seq, blockIdx.x);
  if (!cc.valid) return;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const int head = blockIdx.y, H = p.seq.heads;
  const int n0 = blockIdx.z * BN;
  const int64_t ldr = static_cast<int64_t>(H) * R, ldn = static_cast<int64_t>(H) * p.n_dim;
  const int64_t row0 = cc.start;

  {
    const T* xg = static_cast<const T*>(p.x) + row0 * ldr + static_cast<int64_t>(head) * R;
    const T* yg = static_cast<const T*>(p.y) + row0 * ldr + static_cast<int64_t>(head) * R;
    const T* zg = static_cast<const T*>(p.z) + row0 * ldn + static_cast<int64_t>(head) * p.n_dim + n0;
    const T* mg = static_cast<const T*>(p.m) + (static_cast<int64_t>(blockIdx.x) * H + head) * R * p.n_dim;
    load_tile<kChunk, R, kThreads>(sx, xg, ldr, cc.rows, tid);
    load_tile<kChunk, R, kThreads>(sy, yg, ldr, cc.rows, tid);
    if constexpr (kTransM) {
      load_tile<BN, R, kThreads>(sm, mg + static_cast<int64_t>(n0) * R, R, BN, tid);
    } else {
      load_tile<R, BN, kThreads>(sm, mg + n0, p.n_dim, R, tid);
    }
    load_tile<kChunk, BN, kThreads>(sz, zg, ldn, cc.rows, tid);
    cp_async_commit();
  }
  if (warp == 0) chunk_gate_cumsum(p.gate, row0, cc.rows, head, H, sb, lane);
  cp_async_wait<0>();
  __syncthreads();

  // 16-column blocks of the chunk that the mask keeps for this warp's rows
  auto kept = [&](int blk) { return kUpper ? blk >= warp : blk <= warp; };

  float s[8][4];     // scores x_w y^T: (16 rows) x (64 chunk columns)
  float o[NT8][4];   // output tile: (16 rows) x (BN N columns)
  zero_frags(s);
  zero_frags(o);
#pragma unroll
  for (int kk = 0; kk < R / 16; ++kk) {
    uint32_t a[4];
    load_a<R>(a, sx, warp * 16, kk * 16, lane);
#pragma unroll
    for (int np = 0; np < 4; ++np) {
      if (kept(np)) {
        uint32_t b[4];
        load_b_nk<R>(b, sy, kk * 16, np * 16, lane);
        E::mma(s[2 * np], a, b[0], b[1]);
        E::mma(s[2 * np + 1], a, b[2], b[3]);
      }
    }
    mma_b<E, kTransM ? R : BN, kTransM ? BLayout::kNK : BLayout::kKN>(o, a, sm, kk * 16, lane);  // x M
  }

  // Row scales of the inter-chunk part, then the decay mask on the scores.
  const float bl = sb[kChunk - 1];
  float br[2], rs[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    br[half] = sb[warp * 16 + g + 8 * half];
    rs[half] = p.inter_scale * __expf(kUpper ? bl - br[half] : br[half]);
  }
#pragma unroll
  for (int nt = 0; nt < NT8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) o[nt][e] *= rs[e >> 1];
  }
  // row dots of the inter-chunk part, before the intra-chunk part is added, per 64 columns
  float dots[2][BN / 64] = {};
  if (p.rowdot != nullptr) {
    const T* dotg = static_cast<const T*>(p.dot) + row0 * ldn + static_cast<int64_t>(head) * p.n_dim + n0;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = warp * 16 + g + 8 * half;
      if (r < cc.rows) {
#pragma unroll
        for (int nt = 0; nt < NT8; ++nt) {
          const float2 d = E::unpack(*reinterpret_cast<const uint32_t*>(dotg + r * ldn + nt * 8 + 2 * t4));
          dots[half][nt / 8] += o[nt][2 * half] * d.x + o[nt][2 * half + 1] * d.y;
        }
      }
    }
  }
  uint32_t pa[4][4];  // (S * D) as A fragments, one per 16-column block
  decayed_score_frags<E, kUpper>(pa, s, br, sb, p.intra_scale, warp, lane);
#pragma unroll
  for (int blk = 0; blk < 4; ++blk) {
    if (kept(blk)) mma_b<E, BN, BLayout::kKN>(o, pa[blk], sz, blk * 16, lane);
  }

  // Epilogue: rows past the chunk's end are not written.
  T* og = static_cast<T*>(p.out) + row0 * ldn + static_cast<int64_t>(head) * p.n_dim + n0;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = warp * 16 + g + 8 * half;
    const bool live = r < cc.rows;
    if (live) {
#pragma unroll
      for (int nt = 0; nt < NT8; ++nt) {
        *reinterpret_cast<uint32_t*>(og + r * ldn + nt * 8 + 2 * t4) = E::pack(o[nt][2 * half], o[nt][2 * half + 1]);
      }
    }
    if (p.rowdot != nullptr) {
#pragma unroll
      for (int j = 0; j < BN / 64; ++j) {
        float dot = dots[half][j];
        dot += __shfl_xor_sync(0xffffffffu, dot, 1);
        dot += __shfl_xor_sync(0xffffffffu, dot, 2);
        if (live && t4 == 0) {
          p.rowdot[(static_cast<int64_t>(n0 / 64 + j) * p.seq.tokens + row0 + r) * H + head] = dot;
        }
      }
    }
  }
}

template <typename Tag, int R, int BN, bool kTransM, bool kUpper>
cudaError_t run_chunk_output(const ChunkOutputParams& p, cudaStream_t stream) {
  if (p.seq.num_slots == 0 || p.seq.heads == 0 || p.n_dim == 0) return cudaSuccess;
  constexpr int smem = chunk_output_smem_bytes<R, BN>();
  auto kernel = chunk_output_kernel<Tag, R, BN, kTransM, kUpper>;
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(p.seq.num_slots, p.seq.heads, p.n_dim / BN);
  kernel<<<grid, 128, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace linear_attn
