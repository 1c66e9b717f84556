// gla_grad: dq, dk and the per-key gate gradient dg of GLA, one (chunk, head, 64-key slab) per
// CTA, every chunk in parallel. Per chunk, with h_c the state entering it, dH_c the gradient of
// the state leaving it (chunk_state forward / reverse), b the cumulative gates, and
// dA_ij = scale do_i . v_j for j <= i:
//
//   dq_i = scale exp(b_i) * (do_i h_c^T) + sum_{j <= i} dA_ij k_j * exp(b_i - b_j)
//   dk_j = exp(b_L - b_j) * (v_j dH_c^T) + sum_{i >= j} dA_ij q_i * exp(b_i - b_j)
//          \------- ks_j (state) ------/   \--------------- ki_j (intra) ---------/
//   dg_l = exp(b_L) * rowsum(dH_c * h_c) + sum_{j < l} k_j * ks_j + sum_{i >= l} (q_i * dq_i - k_i * ki_i)
//
// Where dg comes from: the chunk's gates enter the loss only through b, as q_i exp(b_i) and the
// pairs exp(b_i - b_j) of the outputs and as exp(b_L) h_c + sum_j exp(b_L - b_j) k_j^T v_j in
// h_{c+1}. So dL/db_i = q_i * dq_i - k_i * (ki_i + ks_i), plus rowsum(dH_c * h_{c+1}) at i = L
// (b_L = b at the chunk's last row), and dg_l = sum_{i >= l} dL/db_i. Splitting h_{c+1} into
// exp(b_L) h_c + sum_j (k_j exp(b_L - b_j))^T v_j, whose product with dH_c is sum_j k_j * ks_j,
// leaves the prefix sum_{j < l} k_j * ks_j instead of a total and a suffix that cancel. Every
// term is a chunk-local fp32 sum: no reverse cumsum over the whole sequence, whose terms cancel
// almost entirely (gate_grad.cu says what that did to the scalar gates' dg).
//
// Sub-chunks as in gla_output.cuh: warp w owns rows 16w .. 16w + 15 of dq (reference row p =
// 16w, the sub-chunk's first) and of dk (p = 16w + 15, its last); the blocks of dA off the
// diagonal are MMAs with rebased k (k_j exp(b_p - b_j), j < p) or q (q_i exp(b_i - b_p), i > p)
// and the result times exp(b_i - b_p) or exp(b_p - b_j); the diagonal blocks are elementwise.
//
// Phase 1 walks V in 64-column slabs: dA = do v^T, do h_c^T and v dH_c^T (this CTA's 64 keys) by
// mma.sync, and rowsum(dH_c * h_c). A slab is four 64 x 64 tiles (do, v: chunk rows x v; h_c,
// dH_c: keys x v), 32 KB in 16 bits; with kStages = 2 slab i + 1 is in flight while slab i is
// multiplied, with one stage every slab's load waits for the one before it to be consumed. The
// kernel is latency-bound (two CTAs of 4 warps per SM), so the loads are issued as early as
// they can be: slab 0 (and slab 1 with two stages), then q, k and the gate tile of the key slab
// (used only in phase 2, in regions of their own) in a cp.async group of their own, so that they
// land during phase 1. gla_grad_stages picks kStages by the shared memory per SM.
// Phase 2 shares dA through shared memory (bf16 off the diagonal for the MMAs, fp32 diagonal
// blocks). Phase 3 turns the per-row terms of dg into the prefix / suffix sums down the chunk.
#pragma once

#include "chunk_info.cuh"
#include "device_info.h"
#include "gla_gates.cuh"
#include "gla_output.cuh"
#include "mma.cuh"

namespace linear_attn {

constexpr int kDiagPitch = kSub + 1;  // fp32 diagonal blocks of dA: [4][16][17], conflict-free by row and column

// kStages stages of phase 1's slab (do, v, h, dH: 4 x 64 x 64, 32 KB in 16 bits; phase 3 reuses
// stage 0 as two fp32 64 x 64 tiles), then the regions that phase 1 leaves alone: q and k
// (loaded during phase 1), dA, the gate tile (loaded during phase 1), dA's diagonal blocks and
// the halves of rowsum(dH_c * h_c). 77.75 KB with one stage, 109.75 KB with two.
template <typename T, int kStages>
constexpr int gla_grad_smem_bytes() {
  return kStages * 4 * kChunk * 64 * static_cast<int>(sizeof(T))  // phase 1: do, v, h, dH slabs per stage
         + 2 * kChunk * 64 * static_cast<int>(sizeof(T))          // q, k slabs
         + kChunk * 64 * static_cast<int>(sizeof(T))              // dA off the diagonal
         + kGateTileFloats * 4                                    // gate tile
         + 4 * kSub * kDiagPitch * 4                              // dA diagonal blocks
         + 2 * 64 * 4;                                            // rowsum(dH_c * h_c) halves
}

static_assert(gla_grad_smem_bytes<__half, 1>() == 79616, "one stage: 77.75 KB");
static_assert(gla_grad_smem_bytes<__half, 2>() == 112384, "two stages: 109.75 KB");
static_assert(2 * (gla_grad_smem_bytes<__half, 2>() + 1024) <= 228 * 1024,
              "two stages: two CTAs (plus 1 KB reserved each) per sm90 SM");
static_assert(2 * (gla_grad_smem_bytes<__half, 1>() + 1024) <= 164 * 1024,
              "one stage: two CTAs (plus 1 KB reserved each) per sm80 SM");
static_assert(2 * kChunk * 64 * 4 <= 4 * kChunk * 64 * 2, "phase 3's two fp32 tiles fit in stage 0");

// Two stages where two CTAs of the two-stage kernel fit an SM (sm90: 2 x (109.75 + 1) KB of
// 228 KB), else one, whose 77.75 KB keeps what fitted before: two CTAs per sm80 SM (2 x 110.75 KB
// would be over its 164 KB: one CTA of 4 warps), one per sm86 / sm89 SM (100 KB: the two-stage
// kernel would not launch there at all).
template <typename T>
inline int gla_grad_stages(int device) {
  const int per_sm = flash::cached_device_attribute<cudaDevAttrMaxSharedMemoryPerMultiprocessor>(device);
  const int reserved = flash::cached_device_attribute<cudaDevAttrReservedSharedMemoryPerBlock>(device);
  return per_sm >= 2 * (gla_grad_smem_bytes<T, 2>() + (reserved > 0 ? reserved : 1024)) ? 2 : 1;
}

// fp32 64 x 64 tile, 4-float groups XOR-swizzled by row: a column read by 32 threads (one per
// column) and the C-fragment float2 writes spread over the banks
__device__ __forceinline__ int f32_at(int row, int col) { return row * 64 + (col ^ ((row & 7) << 2)); }

// Two CTAs per SM (sm90: two stages, 109.75 KB of shared memory each; sm80: one stage, 77.75 KB;
// sm86 / sm89 fit one): up to 255 registers per thread, which the three 16 x 64 fp32 accumulator
// sets of phase 1 and the dq / dk passes need without spilling (without the bound, ptxas aimed at
// 168 and spilled on sm90).
template <typename Tag, int kStages>
__global__ void __launch_bounds__(128, 2) gla_grad_kernel(const GlaGradParams p) {
  using E = Elem<Tag>;
  using T = typename E::T;
  constexpr int kThreads = 128;
  constexpr int kTile = kChunk * 64;      // elements of one 64 x 64 tile (chunk rows or keys x 64)
  constexpr int kStageElems = 4 * kTile;  // one stage: do, v, h, dH
  static_assert(kStages == 1 || kStages == 2, "one or two stages of phase 1's slabs");

  extern __shared__ __align__(128) unsigned char smem_raw[];
  // stage s of phase 1 at s1 + s * kStageElems: do (chunk row, v), v (chunk row, v), h_c (key d,
  // v), dH_c (key d, v), each swizzled, at offsets 0, 1, 2, 3 x kTile
  T* s1 = reinterpret_cast<T*>(smem_raw);
  float* sxs = reinterpret_cast<float*>(smem_raw);  // (chunk row, d) f32_at: q*dq - k*ki   phase 2-3 (stage 0)
  float* sys = sxs + kChunk * 64;                   // (chunk row, d) f32_at: k*ks          phase 2-3 (stage 0)
  T* sq = s1 + kStages * kStageElems;        // (chunk row, d) swizzled
  T* sk = sq + kChunk * 64;                  // (chunk row, d) swizzled
  T* sda = sk + kChunk * 64;                 // (i, j) swizzled: dA, blocks below the diagonal
  float* gt = reinterpret_cast<float*>(sda + kChunk * 64);  // (chunk row, d) gate tile
  float* sdiag = gt + kGateTileFloats;       // [warp][i][j] dA's diagonal blocks, j <= i (0 above)
  float* spair = sdiag + 4 * kSub * kDiagPitch;  // [2][64] halves of rowsum(dH_c * h_c)

  const ChunkCoord cc = locate_chunk(p.seq, blockIdx.x);
  if (!cc.valid) return;
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const int head = blockIdx.y, H = p.seq.heads;
  const int d0 = blockIdx.z * 64;
  const int64_t ldk = static_cast<int64_t>(H) * p.k_dim, ldv = static_cast<int64_t>(H) * p.v_dim;
  const int64_t row0 = cc.start;
  const int64_t koff = row0 * ldk + static_cast<int64_t>(head) * p.k_dim + d0;
  const int64_t voff = row0 * ldv + static_cast<int64_t>(head) * p.v_dim;
  const int64_t soff = ((static_cast<int64_t>(blockIdx.x) * H + head) * p.k_dim + d0) * p.v_dim;

  // ------------------------------------------------ loads: phase 1's first slabs, phase 2's operands
  // cp.async groups, oldest first (cp_async_wait<N> leaves the N newest pending):
  //   two stages: slab 0, slab 1 (empty when V = 64), {q, k, gates}, then slab i + 1 committed in
  //               iteration i >= 1 after its barrier; slab i is waited for with <2>, <1>, <0> for
  //               i = 0, 1, >= 2 (nothing newer than slab i >= 2 is committed before its wait)
  //   one stage:  slab 0, {q, k, gates}, then slab i + 1 committed at the end of iteration i;
  //               slab 0 is waited for with <1>, every later one with <0>
  // {q, k, gates} is needed only in phase 2, and the wait before phase 2 covers it.
  auto issue_slab = [&](int i) {  // V columns 64 i .. 64 i + 63 into stage i % kStages
    T* st = s1 + (i % kStages) * kStageElems;
    const int v0 = i * 64;
    load_tile<kChunk, 64, kThreads>(st, static_cast<const T*>(p.dout) + voff + v0, ldv, cc.rows, tid);
    load_tile<kChunk, 64, kThreads>(st + kTile, static_cast<const T*>(p.v) + voff + v0, ldv, cc.rows, tid);
    load_tile<64, 64, kThreads>(st + 2 * kTile, static_cast<const T*>(p.h) + soff + v0, p.v_dim, 64, tid);
    load_tile<64, 64, kThreads>(st + 3 * kTile, static_cast<const T*>(p.dh) + soff + v0, p.v_dim, 64, tid);
  };
  const int nslabs = p.v_dim / 64;
  issue_slab(0);
  cp_async_commit();
  if constexpr (kStages == 2) {
    if (nslabs > 1) issue_slab(1);
    cp_async_commit();
  }
  load_tile<kChunk, 64, kThreads>(sq, static_cast<const T*>(p.q) + koff, ldk, cc.rows, tid);
  load_tile<kChunk, 64, kThreads>(sk, static_cast<const T*>(p.k) + koff, ldk, cc.rows, tid);
  load_gate_tile<kThreads>(gt, p.b + koff, ldk, cc.rows, tid);
  cp_async_commit();

  // ------------------------------------------------ phase 1: reductions over V
  float s[8][4], dqi[8][4], dks[8][4];  // dA (16 rows x 64 chunk columns); do h^T, v dH^T (16 rows x 64 keys)
  zero_frags(s);
  zero_frags(dqi);
  zero_frags(dks);
  float pair = 0.f;  // row d = tid & 63 of rowsum(dH_c * h_c), over the V half tid >> 6
#pragma unroll 1
  for (int i = 0; i < nslabs; ++i) {
    if constexpr (kStages == 2) {
      if (i == 0) {
        cp_async_wait<2>();
      } else if (i == 1) {
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
    } else {
      if (i == 0) {
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
    }
    // slab i (every thread's copies) is visible, and every warp is done with slab i - 1, whose
    // stage slab i + 1 overwrites (two stages)
    __syncthreads();
    if (kStages == 2 && i >= 1 && i + 1 < nslabs) {
      issue_slab(i + 1);
      cp_async_commit();
    }
    const T* sdo = s1 + (i % kStages) * kStageElems;  // (chunk row, v) swizzled
    const T* sv = sdo + kTile;                         // (chunk row, v) swizzled
    const T* sh = sv + kTile;                          // (key d, v) swizzled: h_c
    const T* sdh = sh + kTile;                         // (key d, v) swizzled: dH_c
#pragma unroll
    for (int kk = 0; kk < 4; ++kk) {
      uint32_t ado[4], av[4];
      load_a<64>(ado, sdo, warp * kSub, kk * 16, lane);
      load_a<64>(av, sv, warp * kSub, kk * 16, lane);
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t b[4];
        if (np <= warp) {  // dA at or left of the diagonal
          load_b_nk<64>(b, sv, kk * 16, np * 16, lane);
          E::mma(s[2 * np], ado, b[0], b[1]);
          E::mma(s[2 * np + 1], ado, b[2], b[3]);
        }
        load_b_nk<64>(b, sh, kk * 16, np * 16, lane);
        E::mma(dqi[2 * np], ado, b[0], b[1]);
        E::mma(dqi[2 * np + 1], ado, b[2], b[3]);
        load_b_nk<64>(b, sdh, kk * 16, np * 16, lane);
        E::mma(dks[2 * np], av, b[0], b[1]);
        E::mma(dks[2 * np + 1], av, b[2], b[3]);
      }
    }
    {
      const int d = tid & 63;
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        float hv[8], dv[8];
        const int c8 = (tid >> 6) * 32 + c * 8;
        load_row8<E>(hv, sh, d, c8);
        load_row8<E>(dv, sdh, d, c8);
#pragma unroll
        for (int e = 0; e < 8; ++e) pair += hv[e] * dv[e];
      }
    }
    if (kStages == 1 && i + 1 < nslabs) {
      __syncthreads();  // every warp is done with slab i, whose stage slab i + 1 overwrites
      issue_slab(i + 1);
      cp_async_commit();
    }
  }
  // No barrier here: phase 2's writes below (spair, sda, sdiag) are outside phase 1's stages,
  // which die at the barrier after them (the dq pass then writes sxs over stage 0).

  // ------------------------------------------------ phase 2: dA shared (q, k, gates landing)
  spair[tid] = pair;  // [tid >> 6][tid & 63]
#pragma unroll
  for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
    for (int e = 0; e < 4; ++e) s[nt][e] *= p.scale;
  }
#pragma unroll
  for (int np = 0; np < 4; ++np) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int rl = g + 8 * half;  // row in the warp's sub-chunk
#pragma unroll
      for (int j8 = 0; j8 < 2; ++j8) {
        const int nt = 2 * np + j8;
        if (np < warp) {
          *reinterpret_cast<uint32_t*>(sda + swz<64>(warp * kSub + rl, nt * 8 + 2 * t4)) =
              E::pack(s[nt][2 * half], s[nt][2 * half + 1]);
        } else if (np == warp) {
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            const int cl = j8 * 8 + 2 * t4 + j;
            sdiag[(warp * kSub + rl) * kDiagPitch + cl] = cl <= rl ? s[nt][2 * half + j] : 0.f;
          }
        }
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();

  const float* dA = sdiag + warp * kSub * kDiagPitch;  // this warp's diagonal block [i][j]
  // this thread's C-fragment positions: rows warp * 16 + g + 8 (e >> 1), keys nt * 8 + 2 t4 + (e & 1)
  auto frag_row = [&](int e) { return warp * kSub + g + 8 * (e >> 1); };
  auto frag_col = [&](int nt, int e) { return nt * 8 + 2 * t4 + (e & 1); };

  // ------------------------------------------------ dq
  {
    const int pq = warp * kSub;  // reference row: the sub-chunk's first
    float tmp[8][4];
    zero_frags(tmp);
#pragma unroll
    for (int J = 0; J < 3; ++J) {
      if (J >= warp) continue;
      uint32_t pa[4];  // dA block (rows of this sub-chunk, columns of sub-chunk J) as an A fragment
      load_a<64>(pa, sda, warp * kSub, J * 16, lane);
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t bk[4];  // bk[e] = k (chunk rows 16 J + 2 t4 + 8 (e & 1) + {0, 1}, key 16 np + g + 8 (e >> 1))
        load_b_kn<64>(bk, sk, J * 16, np * 16, lane);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int c = J * 16 + 2 * t4 + 8 * (e & 1), d = np * 16 + g + 8 * (e >> 1);
          const float2 f = E::unpack(bk[e]);
          const float bpd = gt[gate_at(pq, d)];
          bk[e] = E::pack(f.x * __expf(bpd - gt[gate_at(c, d)]), f.y * __expf(bpd - gt[gate_at(c + 1, d)]));
        }
        E::mma(tmp[2 * np], pa, bk[0], bk[1]);
        E::mma(tmp[2 * np + 1], pa, bk[2], bk[3]);
      }
    }
    // dq = exp(b_i - b_p) * (scale exp(b_p) (do h^T) + tmp) + the diagonal block
    float br[8][4];  // b at this thread's positions
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int d = frag_col(nt, e);
        const float bpd = gt[gate_at(pq, d)];
        br[nt][e] = gt[gate_at(frag_row(e), d)];
        dqi[nt][e] = __expf(br[nt][e] - bpd) * (p.scale * __expf(bpd) * dqi[nt][e] + tmp[nt][e]);
      }
    }
    // diagonal: dq_i += sum_{c <= i} dA_ic k_c exp(b_i - b_c) over the block's columns c; rows
    // g (columns 0..g) and g + 8 (columns 0..g + 8) of the block; two columns a step, so that
    // the second's shared-memory loads overlap the first's math (same sums, same order)
#pragma unroll 2
    for (int c = 0; c < kSub; ++c) {
      const int row_c = warp * kSub + c;
      const bool lo = c <= g, hi = c <= g + 8;
      const float pa = dA[g * kDiagPitch + c], pb = dA[(g + 8) * kDiagPitch + c];
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        const int d = nt * 8 + 2 * t4;
        const float2 kv = E::unpack(*reinterpret_cast<const uint32_t*>(sk + swz<64>(row_c, d)));
        const float2 bc = *reinterpret_cast<const float2*>(gt + gate_at(row_c, d));
        if (lo) {
          dqi[nt][0] += pa * kv.x * __expf(br[nt][0] - bc.x);
          dqi[nt][1] += pa * kv.y * __expf(br[nt][1] - bc.y);
        }
        if (hi) {
          dqi[nt][2] += pb * kv.x * __expf(br[nt][2] - bc.x);
          dqi[nt][3] += pb * kv.y * __expf(br[nt][3] - bc.y);
        }
      }
    }
    // write dq, and q * dq into the dg row terms
    T* dqg = static_cast<T*>(p.dq) + koff;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = warp * kSub + g + 8 * half;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        const int d = nt * 8 + 2 * t4;
        const float2 qv = E::unpack(*reinterpret_cast<const uint32_t*>(sq + swz<64>(r, d)));
        *reinterpret_cast<float2*>(sxs + f32_at(r, d)) =
            make_float2(qv.x * dqi[nt][2 * half], qv.y * dqi[nt][2 * half + 1]);
        if (r < cc.rows) {
          *reinterpret_cast<uint32_t*>(dqg + r * ldk + d) = E::pack(dqi[nt][2 * half], dqi[nt][2 * half + 1]);
        }
      }
    }
  }

  // ------------------------------------------------ dk
  {
    const int pk = warp * kSub + kSub - 1;  // reference row: the sub-chunk's last
    float tmp[8][4];
    zero_frags(tmp);
#pragma unroll
    for (int I = 1; I < 4; ++I) {
      if (I <= warp) continue;
      uint32_t a[4];  // dA^T block (rows of this sub-chunk, columns of sub-chunk I)
      load_a_t<64>(a, sda, warp * kSub, I * 16, lane);
#pragma unroll
      for (int np = 0; np < 4; ++np) {
        uint32_t bq[4];  // bq[e] = q (chunk rows 16 I + 2 t4 + 8 (e & 1) + {0, 1}, key 16 np + g + 8 (e >> 1))
        load_b_kn<64>(bq, sq, I * 16, np * 16, lane);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int i = I * 16 + 2 * t4 + 8 * (e & 1), d = np * 16 + g + 8 * (e >> 1);
          const float2 f = E::unpack(bq[e]);
          const float bpd = gt[gate_at(pk, d)];
          bq[e] = E::pack(f.x * __expf(gt[gate_at(i, d)] - bpd), f.y * __expf(gt[gate_at(i + 1, d)] - bpd));
        }
        E::mma(tmp[2 * np], a, bq[0], bq[1]);
        E::mma(tmp[2 * np + 1], a, bq[2], bq[3]);
      }
    }
    // ks = exp(b_p - b_j) exp(b_L - b_p) (v dH^T), ki = exp(b_p - b_j) tmp + the diagonal block
    float br[8][4];
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int d = frag_col(nt, e);
        const float bpd = gt[gate_at(pk, d)];
        br[nt][e] = gt[gate_at(frag_row(e), d)];
        const float ek = __expf(bpd - br[nt][e]);
        dks[nt][e] *= ek * __expf(gt[gate_at(kChunk - 1, d)] - bpd);
        tmp[nt][e] *= ek;
      }
    }
    // diagonal: ki_j += sum_{i >= j} dA_ij q_i exp(b_i - b_j) over the block's rows i; rows j = g
    // (i = g..15) and g + 8 (i = g + 8..15) of the block; two rows a step, as for dq
#pragma unroll 2
    for (int i = 0; i < kSub; ++i) {
      const int row_i = warp * kSub + i;
      const bool lo = i >= g, hi = i >= g + 8;
      const float pa = dA[i * kDiagPitch + g], pb = dA[i * kDiagPitch + g + 8];
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        const int d = nt * 8 + 2 * t4;
        const float2 qv = E::unpack(*reinterpret_cast<const uint32_t*>(sq + swz<64>(row_i, d)));
        const float2 bi = *reinterpret_cast<const float2*>(gt + gate_at(row_i, d));
        if (lo) {
          tmp[nt][0] += pa * qv.x * __expf(bi.x - br[nt][0]);
          tmp[nt][1] += pa * qv.y * __expf(bi.y - br[nt][1]);
        }
        if (hi) {
          tmp[nt][2] += pb * qv.x * __expf(bi.x - br[nt][2]);
          tmp[nt][3] += pb * qv.y * __expf(bi.y - br[nt][3]);
        }
      }
    }
    // write dk = ks + ki; the dg row terms k * ks and q * dq - k * ki (same thread, same positions)
    T* dkg = static_cast<T*>(p.dk) + koff;
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = warp * kSub + g + 8 * half;
#pragma unroll
      for (int nt = 0; nt < 8; ++nt) {
        const int d = nt * 8 + 2 * t4;
        const float2 kv = E::unpack(*reinterpret_cast<const uint32_t*>(sk + swz<64>(r, d)));
        const float ks0 = dks[nt][2 * half], ks1 = dks[nt][2 * half + 1];
        const float ki0 = tmp[nt][2 * half], ki1 = tmp[nt][2 * half + 1];
        float2* xs = reinterpret_cast<float2*>(sxs + f32_at(r, d));
        const float2 x = *xs;
        *xs = make_float2(x.x - kv.x * ki0, x.y - kv.y * ki1);
        *reinterpret_cast<float2*>(sys + f32_at(r, d)) = make_float2(kv.x * ks0, kv.y * ks1);
        if (r < cc.rows) *reinterpret_cast<uint32_t*>(dkg + r * ldk + d) = E::pack(ks0 + ki0, ks1 + ki1);
      }
    }
  }
  __syncthreads();

  // ------------------------------------------------ phase 3: dg down the chunk, one key per thread
  if (tid < 64) {  // exclusive prefix of k * ks
    float run = 0.f;
#pragma unroll 8
    for (int r = 0; r < kChunk; ++r) {
      const float y = sys[f32_at(r, tid)];
      sys[f32_at(r, tid)] = run;
      run += y;
    }
  } else {  // inclusive suffix of q * dq - k * ki (rows past the end hold 0)
    const int d = tid - 64;
    float run = 0.f;
#pragma unroll 8
    for (int r = kChunk - 1; r >= 0; --r) {
      run += sxs[f32_at(r, d)];
      sxs[f32_at(r, d)] = run;
    }
  }
  __syncthreads();
  float* dgg = p.dg + koff;
  const int d = tid & 63;
  const float pair_d = __expf(gt[gate_at(kChunk - 1, d)]) * (spair[d] + spair[64 + d]);
  for (int r = tid >> 6; r < cc.rows; r += 2) dgg[r * ldk + d] = pair_d + sxs[f32_at(r, d)] + sys[f32_at(r, d)];
}

template <typename Tag, int kStages>
cudaError_t launch_gla_grad(const GlaGradParams& p, cudaStream_t stream) {
  constexpr int smem = gla_grad_smem_bytes<typename Elem<Tag>::T, kStages>();
  auto kernel = gla_grad_kernel<Tag, kStages>;
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
  }
  kernel<<<dim3(p.seq.num_slots, p.seq.heads, p.k_dim / 64), 128, smem, stream>>>(p);
  return cudaGetLastError();
}

template <typename Tag>
cudaError_t run_gla_grad(const GlaGradParams& p, cudaStream_t stream) {
  if (p.seq.num_slots == 0 || p.seq.heads == 0 || p.k_dim == 0) return cudaSuccess;
  if (p.k_dim % 64 != 0 || p.v_dim % 64 != 0 || p.v_dim == 0) return cudaErrorInvalidValue;
  int device = 0;
  const cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  return gla_grad_stages<typename Elem<Tag>::T>(device) == 2 ? launch_gla_grad<Tag, 2>(p, stream)
                                                             : launch_gla_grad<Tag, 1>(p, stream);
}

}  // namespace linear_attn
