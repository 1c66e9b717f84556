// gate_grad: the gradient of scalar log-gates, every chunk in parallel.
//
// g_s scales the state S_{s-1} into S_s = exp(g_s) S_{s-1} + k_s^T v_s, so
//   dg_s = exp(g_s) <D_s, S_{s-1}>,   D_s = dL/dS_s = scale q_s^T do_s + exp(g_{s+1}) D_{s+1}.
// For row l of chunk c (h_c the state entering it, dH_c the gradient of the state leaving it,
// b the chunk-local cumulative log-gate) this splits into four sums whose exponents are <= 0:
//   dg_l = exp(b_L) <dH_c, h_c>                                      pair (chunk_state, reverse)
//        + sum_{j < l} k_j . dk_inter_j                               rk   (chunk_output, dk)
//        + sum_{i >= l} q_i . dq_inter_i                              rq   (chunk_output, dq)
//        + sum_{i >= l, j < l} A_ij,  A_ij = scale exp(b_i - b_j) (q_i . k_j)(do_i . v_j), j <= i
// and sum_{i >= l, j < l} A_ij = sum_{i >= l} (rowsum_i(A) - colsum_i(A)). Unlike the reverse
// cumsum of q . dq - k . dk over the whole sequence (whose terms cancel almost entirely, so
// that bf16 rounding of the states and of dS became percent-level errors in dg), every term
// here is computed once in fp32; what cancels inside a chunk cancels exactly.
//
// One CTA per (chunk, head), 4 warps of 16 rows: S = q k^T and dP = do v^T by mma.sync over
// 64-column slabs of K and V, then A's row and column sums, then a suffix scan over the chunk.
#include "chunk_info.cuh"
#include "mma.cuh"

namespace linear_attn {

template <typename Tag>
__global__ void __launch_bounds__(128) gate_grad_kernel(const GateGradParams p) {
  using E = Elem<Tag>;
  using T = typename E::T;
  constexpr int kThreads = 128;
  __shared__ __align__(128) T sa[kChunk * 64];  // (chunk row, 64 columns) swizzled: q or do slab
  __shared__ __align__(128) T sc[kChunk * 64];  // (chunk col, 64 columns) swizzled: k or v slab
  __shared__ float sb[kChunk];                  // chunk-local cumulative log-gate
  __shared__ float colpart[4][kChunk];          // per-warp column sums of A
  __shared__ float rowsum[kChunk];
  __shared__ float totals[4];                   // suffix-scan and rk totals of warps 0 and 1

  const ChunkCoord cc = locate_chunk(p.seq, blockIdx.x);
  if (!cc.valid) return;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const int head = blockIdx.y, H = p.seq.heads;
  const int64_t row0 = cc.start;
  if (warp == 0) chunk_gate_cumsum(p.gate, row0, cc.rows, head, H, sb, lane);

  // s = q k^T, dp = do v^T for this warp's 16 rows (only the blocks at or left of the diagonal)
  float s[8][4], dp[8][4];
#pragma unroll
  for (int i = 0; i < 8; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) s[i][e] = dp[i][e] = 0.f;
  }
  auto accumulate = [&](float (&acc)[8][4], const void* a_ptr, const void* c_ptr, int dim) {
    const int64_t ld = static_cast<int64_t>(H) * dim;
    const T* ag = static_cast<const T*>(a_ptr) + row0 * ld + static_cast<int64_t>(head) * dim;
    const T* cg = static_cast<const T*>(c_ptr) + row0 * ld + static_cast<int64_t>(head) * dim;
    for (int c0 = 0; c0 < dim; c0 += 64) {
      load_tile<kChunk, 64, kThreads>(sa, ag + c0, ld, cc.rows, tid);
      load_tile<kChunk, 64, kThreads>(sc, cg + c0, ld, cc.rows, tid);
      cp_async_commit();
      cp_async_wait<0>();
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        uint32_t a[4];
        load_a<64>(a, sa, warp * 16, kk * 16, lane);
#pragma unroll
        for (int np = 0; np < 4; ++np) {
          if (np > warp) continue;
          uint32_t b[4];
          load_b_nk<64>(b, sc, kk * 16, np * 16, lane);
          E::mma(acc[2 * np], a, b[0], b[1]);
          E::mma(acc[2 * np + 1], a, b[2], b[3]);
        }
      }
      __syncthreads();  // the slab is consumed before the next one lands
    }
  };
  accumulate(s, p.q, p.k, p.k_dim);
  accumulate(dp, p.dout, p.v, p.v_dim);

  // A's row sums (rows g, g + 8 of the warp) and this warp's column sums
  float rs[2] = {0.f, 0.f}, cs[8][2];
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
    cs[nt][0] = cs[nt][1] = 0.f;
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = warp * 16 + g + 8 * (e >> 1);
      const int c = nt * 8 + 2 * t4 + (e & 1);
      const float a = c <= r ? p.scale * s[nt][e] * dp[nt][e] * __expf(sb[r] - sb[c]) : 0.f;
      rs[e >> 1] += a;
      cs[nt][e & 1] += a;
    }
  }
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    rs[half] += __shfl_xor_sync(0xffffffffu, rs[half], 1);
    rs[half] += __shfl_xor_sync(0xffffffffu, rs[half], 2);
  }
  if (t4 == 0) {
    rowsum[warp * 16 + g] = rs[0];
    rowsum[warp * 16 + g + 8] = rs[1];
  }
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
#pragma unroll
      for (int o = 4; o < 32; o <<= 1) cs[nt][j] += __shfl_xor_sync(0xffffffffu, cs[nt][j], o);
    }
    if (g == 0) {
      colpart[warp][nt * 8 + 2 * t4] = cs[nt][0];
      colpart[warp][nt * 8 + 2 * t4 + 1] = cs[nt][1];
    }
  }
  __syncthreads();

  // Rows r = tid < 64: x_r = rq_r - rk_r + rowsum_r - colsum_r, suffix-summed over the chunk.
  if (tid < kChunk) {
    const int r = tid;
    float x = 0.f, rk = 0.f;
    if (r < cc.rows) {
      float rq = 0.f;
      for (int tile = 0; tile < p.k_dim / 64; ++tile) {
        const int64_t off = (static_cast<int64_t>(tile) * p.seq.tokens + row0 + r) * H + head;
        rq += p.rq[off];
        rk += p.rk[off];
      }
      x = rq - rk + rowsum[r] - (colpart[0][r] + colpart[1][r] + colpart[2][r] + colpart[3][r]);
    }
    // inclusive suffix sum inside the warp, then warp 1's total added to warp 0
#pragma unroll
    for (int d = 1; d < 32; d <<= 1) {
      const float y = __shfl_down_sync(0xffffffffu, x, d);
      if (lane + d < 32) x += y;
    }
    float rk_total = rk;
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) rk_total += __shfl_xor_sync(0xffffffffu, rk_total, o);
    if (lane == 0) {
      totals[warp] = x;  // warp's whole sum (lane 0 holds the suffix from its first row)
      totals[2 + warp] = rk_total;
    }
    asm volatile("bar.sync 1, 64;\n" ::);  // warps 0 and 1 only
    float pair = 0.f;
    const float* pp = p.pair + (static_cast<int64_t>(blockIdx.x) * H + head) * p.pair_tiles;
    for (int t = 0; t < p.pair_tiles; ++t) pair += pp[t];
    const float dg = x + (warp == 0 ? totals[1] : 0.f) + totals[2] + totals[3] + pair;
    if (r < cc.rows) p.dg[(row0 + r) * H + head] = dg;
  }
}

template <typename Tag>
cudaError_t run_gate_grad(const GateGradParams& p, cudaStream_t stream) {
  if (p.seq.num_slots == 0 || p.seq.heads == 0) return cudaSuccess;
  gate_grad_kernel<Tag><<<dim3(p.seq.num_slots, p.seq.heads), 128, 0, stream>>>(p);
  return cudaGetLastError();
}

template cudaError_t run_gate_grad<Fp16>(const GateGradParams&, cudaStream_t);
template cudaError_t run_gate_grad<Bf16>(const GateGradParams&, cudaStream_t);

}  // namespace linear_attn
