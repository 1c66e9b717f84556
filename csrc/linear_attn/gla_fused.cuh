// gla_fused_fwd: GLA's forward (per-key gates) in one kernel. One CTA per (sequence, head, BV-column
// V tile) walks the chunks of its sequence in order with the running state S [K, BV] in fp32
// registers. With b the chunk-local cumulative per-key log-gate (gla_cumsum; gla_gates.cuh), per
// chunk c:
//
//   o_r       = scale * (q_r * exp(b_r)) S_c + scale * sum_{j <= r} A_rj v_j,
//               A_rj = sum_d q_rd k_jd exp(b_rd - b_jd)
//   S_{c + 1} = diag(exp(b_L)) S_c + sum_j (k_j * exp(b_L - b_j))^T v_j
//
// which is chunk_state (kPerKey, forward) followed by gla_output (lower, inter = intra = scale)
// without the states' round trip through global memory. As there, S_c is rounded to the input
// dtype where it is an MMA operand (q S_c) and kept in fp32 otherwise, and the products are the
// same m16n8k16 MMAs on the same rounded operands in the same order (the weights folded into k^T's
// A fragments for S; q rebased on its sub-chunk's reference row, the diagonal sub-chunk block
// elementwise for o), so the two paths agree to rounding.
//
// Exponents. gla_output.cuh's scheme: warp w owns the rows of sub-chunk w (16 w .. 16 w + 15) and
// its reference row p = 16 w. Then, for the key d and gates <= 0 (b non-increasing down a chunk,
// in fp32 too, since rounding is monotone):
//   q rebased:        exp(b_rd - b_pd),  r >= p        <= 0
//   inter factor:     exp(b_pd)                         <= 0   (exp(b_r) = exp(b_r - b_p) exp(b_p))
//   k, blocks J < w:  exp(b_pd - b_jd),  j < p          <= 0
//   diagonal block:   exp(b_rd - b_jd),  j <= r only    <= 0   (the pairs j > r are never evaluated)
//   state weights:    exp(b_Ld - b_jd),  j <= L         <= 0
//   state decay:      exp(b_Ld)                         <= 0
// Rows past a chunk's end hold zeros in q, k, v and copies of the last row's gates (gla_gates.cuh),
// so they decay nothing and b_L is row 63 whatever the chunk's length. No exponent is ever
// positive, however negative the gates are.
//
// Threads: 128 (4 warps). q, k and the gates are kept as K / 64 slabs of 64 keys each (64 x 64
// 16-bit tiles swizzled as gla_output's, and 64 x 64 fp32 gate tiles), so slab m serves both the
// output's m-th 64-key step and the state's m-th row tile.
//   State: warp w owns the rows 64 m + 16 w .. 64 m + 16 w + 15 of S for m < K / 64, all BV
//   columns: K * BV / 128 fp32 registers per thread (64 at K = 128, BV = 64 and at K = 256,
//   BV = 32; 32 at K = 64, BV = 64).
//   Output: warp w owns the chunk rows 16 w .. 16 w + 15: A (16 x 64 fp32, 32 registers) and o
//   (16 x BV, BV / 2 registers), next to the state.
// Shared memory per stage: q, k (2 x 64 x K x 2 B), v (64 x BV x 2 B), the gates (K / 64 tiles of
// 64 x 68 floats, 17 KB each); plus S_c as an MMA operand (K x BV x 2 B):
//   K 64,  BV 64, 2 stages: 2 * (16 + 8 + 17 KB) + 8 KB  =  90 KB
//   K 128, BV 64, 1 stage:  32 + 8 + 34 KB + 16 KB       =  90 KB  (two CTAs per SM on sm90)
//   K 256, BV 32, 1 stage:  64 + 4 + 68 KB + 16 KB       = 152 KB  (one CTA per SM; sm80 allows 163 KB)
// The fp32 gates double a stage against chunk_fused's, so K >= 128 has a single stage: its loads
// are not overlapped inside the CTA; the second CTA on the SM (K = 128, sm90) hides them.
//
// Per chunk i (with two stages, the loads of chunk i + 1 in flight meanwhile):
//   1. wait for chunk i's tiles; every thread writes its part of S_c (rounded) into ss; __syncthreads
//   2. o, per 64-key slab: A's blocks left of the diagonal (rebased q times rebased k^T) and the
//      inter part (q * exp(b)) S_c as MMAs, A's diagonal block elementwise (gla_diag_scores);
//      then o = scale * inter + (scale * A) v; stored straight from the accumulators (rows past
//      the end of the sequence are not written)
//   3. S: decay each row by exp(b_L), + (k * w)^T v with w_jd = exp(b_Ld - b_jd) folded into
//      k^T's A fragments
//   4. __syncthreads (ss and the stage are free for the next chunk)
#pragma once

#include "chunk_info.cuh"
#include "gla_gates.cuh"
#include "gla_output.cuh"  // gla_diag_scores
#include "mma.cuh"

namespace linear_attn {

constexpr int kGlaFusedThreads = 128;

// Stages of (q, k, v, gates) in flight: two where they fit next to a second CTA's (K = 64).
template <int K>
constexpr int gla_fused_stages() { return K == 64 ? 2 : 1; }

template <int K, int BV>
constexpr int gla_fused_smem_bytes() {
  return gla_fused_stages<K>() * ((2 * kChunk * K + kChunk * BV) * 2 + (K / 64) * kGateTileFloats * 4) + K * BV * 2;
}

static_assert(gla_fused_smem_bytes<64, 64>() == 92160, "K 64, BV 64: 90 KB");
static_assert(gla_fused_smem_bytes<128, 64>() == 92160, "K 128, BV 64: 90 KB (two CTAs per sm90 SM)");
static_assert(gla_fused_smem_bytes<256, 32>() == 155648, "K 256, BV 32: 152 KB");
static_assert(gla_fused_smem_bytes<256, 32>() <= 163 * 1024, "K 256, BV 32 fits an sm80 SM");

template <typename Tag, int K, int BV>
__global__ void __launch_bounds__(kGlaFusedThreads) gla_fused_fwd_kernel(const GlaFusedParams p) {
  using E = Elem<Tag>;
  using T = typename E::T;
  constexpr int kThreads = kGlaFusedThreads;
  constexpr int MT = K / 64;           // 64-key slabs; the state's 16-row m tiles per warp
  constexpr int NT8 = BV / 8;          // n tiles of 8 columns (state and output)
  constexpr int kStages = gla_fused_stages<K>();
  constexpr int kSlab = kChunk * 64;   // elements of a 64 x 64 slab of q or k
  static_assert(K == 64 || K == 128 || K == 256, "K is 64, 128 or 256");
  static_assert(BV == 32 || BV == 64, "V tiles of 32 or 64 columns");
  static_assert(K * BV / kThreads <= 64, "at most 64 fp32 state registers per thread");

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sq = reinterpret_cast<T*>(smem_raw);          // [stage][slab] (chunk row, key) swizzled, 64 x 64
  T* sk = sq + kStages * MT * kSlab;               // [stage][slab] (chunk row, key) swizzled, 64 x 64
  T* sv = sk + kStages * MT * kSlab;               // [stage] (chunk row, n) swizzled, 64 x BV
  T* ss = sv + kStages * kChunk * BV;              // S_c: (key, n) swizzled, K x BV
  float* sg = reinterpret_cast<float*>(ss + K * BV);  // [stage][slab] gate tiles (chunk row, key)

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const int seq = blockIdx.x, head = blockIdx.y, H = p.seq.heads;
  const int n0 = blockIdx.z * BV;
  const SeqRange sr = sequence_range(p.seq, seq);
  const int nchunks = static_cast<int>((sr.eos - sr.bos + kChunk - 1) / kChunk);

  const int64_t ldk = static_cast<int64_t>(H) * K, ldv = static_cast<int64_t>(H) * p.v_dim;
  const T* qg = static_cast<const T*>(p.q) + static_cast<int64_t>(head) * K;
  const T* kg = static_cast<const T*>(p.k) + static_cast<int64_t>(head) * K;
  const float* bg = p.b + static_cast<int64_t>(head) * K;
  const T* vg = static_cast<const T*>(p.v) + static_cast<int64_t>(head) * p.v_dim + n0;
  T* og = static_cast<T*>(p.out) + static_cast<int64_t>(head) * p.v_dim + n0;
  const int64_t state_base = (static_cast<int64_t>(seq) * H + head) * K * p.v_dim;

  // st[m][nt][0..1] = S (64 m + 16 warp + g, n0 + 8 nt + 2 t4 + {0, 1}); [2..3] the row + 8.
  // state_at: where st[m][nt][2 half ..] lives in the fp32 [N, H, K, V] init / final state.
  auto state_at = [&](int m, int nt, int half) {
    return state_base + static_cast<int64_t>(64 * m + 16 * warp + g + 8 * half) * p.v_dim + n0 + 8 * nt + 2 * t4;
  };
  // each_pair(f): f(m, nt, half) for every pair st[m][nt][2 half], st[m][nt][2 half + 1] of this thread
  auto each_pair = [&](auto&& f) {
#pragma unroll
    for (int m = 0; m < MT; ++m) {
#pragma unroll
      for (int nt = 0; nt < NT8; ++nt) {
#pragma unroll
        for (int half = 0; half < 2; ++half) f(m, nt, half);
      }
    }
  };
  float st[MT][NT8][4];
  each_pair([&](int m, int nt, int half) {
    float2 v = make_float2(0.f, 0.f);
    if (p.init != nullptr) v = *reinterpret_cast<const float2*>(p.init + state_at(m, nt, half));
    st[m][nt][2 * half] = v.x;
    st[m][nt][2 * half + 1] = v.y;
  });

  auto chunk_start = [&](int i) { return sr.bos + static_cast<int64_t>(i) * kChunk; };
  auto chunk_rows = [&](int i) {
    return static_cast<int>(min(static_cast<int64_t>(kChunk), sr.eos - chunk_start(i)));
  };
  auto issue = [&](int i) {
    const int stage = i % kStages;
    const int64_t start = chunk_start(i);
    const int rows = chunk_rows(i);
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const int slab = stage * MT + m;
      load_tile<kChunk, 64, kThreads>(sq + slab * kSlab, qg + start * ldk + 64 * m, ldk, rows, tid);
      load_tile<kChunk, 64, kThreads>(sk + slab * kSlab, kg + start * ldk + 64 * m, ldk, rows, tid);
      load_gate_tile<kThreads>(sg + slab * kGateTileFloats, bg + start * ldk + 64 * m, ldk, rows, tid);
    }
    load_tile<kChunk, BV, kThreads>(sv + stage * kChunk * BV, vg + start * ldv, ldv, rows, tid);
  };

#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) {
    if (i < nchunks) issue(i);
    cp_async_commit();
  }
  for (int i = 0; i < nchunks; ++i) {
    const int stage = i % kStages;
    if (i + kStages - 1 < nchunks) issue(i + kStages - 1);  // one stage: chunk i itself
    cp_async_commit();
    const int64_t row0 = chunk_start(i);
    const int rows = chunk_rows(i);
    cp_async_wait<kStages - 1>();  // chunk i's group has landed (this thread's copies)
    // ---- 1. S_c as an MMA operand, in the input dtype
    each_pair([&](int m, int nt, int half) {
      const int r = 64 * m + 16 * warp + g + 8 * half, c = 8 * nt + 2 * t4;
      *reinterpret_cast<uint32_t*>(ss + swz<BV>(r, c)) = E::pack(st[m][nt][2 * half], st[m][nt][2 * half + 1]);
    });
    __syncthreads();  // the stage's tiles (every thread's copies) and ss are visible
    const T* qs = sq + stage * MT * kSlab;
    const T* ks = sk + stage * MT * kSlab;
    const T* vs = sv + stage * kChunk * BV;
    const float* gs = sg + stage * MT * kGateTileFloats;

    // ---- 2. the chunk's output rows 16 warp .. 16 warp + 15
    {
      float s[8][4];   // A: 16 rows x 64 chunk columns
      float o[NT8][4]; // 16 rows x BV
      zero_frags(s);
      zero_frags(o);
      const int pr = warp * kSub;  // the reference row
#pragma unroll 1
      for (int m = 0; m < MT; ++m) {
        const T* qm = qs + m * kSlab;
        const T* km = ks + m * kSlab;
        const float* gt = gs + m * kGateTileFloats;
#pragma unroll 1
        for (int kk = 0; kk < 4; ++kk) {
          // this thread's slab keys in step kk: d = 16 kk + 2 t4 + 8 ch + j
          float bp[2][2], ic[2][2];  // [ch][j]: b at the reference row; exp(b_p), the inter factor
#pragma unroll
          for (int ch = 0; ch < 2; ++ch) {
#pragma unroll
            for (int j = 0; j < 2; ++j) {
              bp[ch][j] = gt[gate_at(pr, kk * 16 + 2 * t4 + 8 * ch + j)];
              ic[ch][j] = __expf(bp[ch][j]);
            }
          }
          // q's A fragment a[i] = (row 16 warp + g + 8 (i & 1), keys 16 kk + 2 t4 + 8 (i >> 1) + {0, 1}),
          // rebased on the reference row (ao) and decayed to the chunk's start (ai)
          uint32_t a[4], ao[4], ai[4];
          load_a<64>(a, qm, warp * kSub, kk * 16, lane);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int r = warp * kSub + g + 8 * (i & 1), ch = i >> 1, d = kk * 16 + 2 * t4 + 8 * ch;
            const float2 f = E::unpack(a[i]);
            const float x0 = f.x * __expf(gt[gate_at(r, d)] - bp[ch][0]);
            const float x1 = f.y * __expf(gt[gate_at(r, d + 1)] - bp[ch][1]);
            ao[i] = E::pack(x0, x1);
            ai[i] = E::pack(x0 * ic[ch][0], x1 * ic[ch][1]);
          }
          // A's blocks left of the diagonal: rebased k
#pragma unroll
          for (int np = 0; np < 4; ++np) {
            if (np >= warp) continue;
            uint32_t kb[4];  // kb[e] = k (chunk row 16 np + g + 8 (e >> 1), keys 16 kk + 2 t4 + 8 (e & 1) + {0, 1})
            load_b_nk<64>(kb, km, kk * 16, np * 16, lane);
#pragma unroll
            for (int e = 0; e < 4; ++e) {
              const int c = np * 16 + g + 8 * (e >> 1), ch = e & 1, d = kk * 16 + 2 * t4 + 8 * ch;
              const float2 f = E::unpack(kb[e]);
              kb[e] = E::pack(f.x * __expf(bp[ch][0] - gt[gate_at(c, d)]),
                              f.y * __expf(bp[ch][1] - gt[gate_at(c, d + 1)]));
            }
            E::mma(s[2 * np], ao, kb[0], kb[1]);
            E::mma(s[2 * np + 1], ao, kb[2], kb[3]);
          }
          // the inter-chunk part: (q * exp(b)) times the slab's 64 rows of S_c
          mma_b<E, BV, BLayout::kKN>(o, ai, ss, 64 * m + kk * 16, lane);
        }
        // A's diagonal block, elementwise
        float d0f[4] = {0.f, 0.f, 0.f, 0.f}, d1f[4] = {0.f, 0.f, 0.f, 0.f};
        gla_diag_scores<false, E>(d0f, d1f, qm, km, gt, warp, g, t4);
#pragma unroll
        for (int blk = 0; blk < 4; ++blk) {
          if (blk != warp) continue;
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            s[2 * blk][e] += d0f[e];
            s[2 * blk + 1][e] += d1f[e];
          }
        }
      }
      // o = scale * inter + (scale * A) v, A as 16-bit A fragments per 16-column block
#pragma unroll
      for (int nt = 0; nt < NT8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) o[nt][e] *= p.scale;
      }
#pragma unroll
      for (int blk = 0; blk < 4; ++blk) {
        if (blk > warp) continue;
        uint32_t pa[4];
        pa[0] = E::pack(s[2 * blk][0] * p.scale, s[2 * blk][1] * p.scale);
        pa[1] = E::pack(s[2 * blk][2] * p.scale, s[2 * blk][3] * p.scale);
        pa[2] = E::pack(s[2 * blk + 1][0] * p.scale, s[2 * blk + 1][1] * p.scale);
        pa[3] = E::pack(s[2 * blk + 1][2] * p.scale, s[2 * blk + 1][3] * p.scale);
        mma_b<E, BV, BLayout::kKN>(o, pa, vs, blk * 16, lane);
      }
      T* orow = og + row0 * ldv;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = warp * kSub + g + 8 * half;
        if (r < rows) {
#pragma unroll
          for (int nt = 0; nt < NT8; ++nt) {
            *reinterpret_cast<uint32_t*>(orow + r * ldv + nt * 8 + 2 * t4) =
                E::pack(o[nt][2 * half], o[nt][2 * half + 1]);
          }
        }
      }
    }

    // ---- 3. the state leaving the chunk
    {
      float blr[MT][2];  // b_L of this thread's state rows 64 m + 16 warp + g + {0, 8}
#pragma unroll
      for (int m = 0; m < MT; ++m) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          blr[m][half] = gs[m * kGateTileFloats + gate_at(kChunk - 1, warp * 16 + g + 8 * half)];
          const float decay = __expf(blr[m][half]);
#pragma unroll
          for (int nt = 0; nt < NT8; ++nt) {
            st[m][nt][2 * half] *= decay;
            st[m][nt][2 * half + 1] *= decay;
          }
        }
      }
#pragma unroll
      for (int kk = 0; kk < kChunk / 16; ++kk) {
        uint32_t a[MT][4];  // (k * w)^T (state rows 64 m + 16 warp .., chunk rows 16 kk ..)
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          const float* gt = gs + m * kGateTileFloats;
          load_a_t<64>(a[m], ks + m * kSlab, 16 * warp, kk * 16, lane);
          // a[m][i] holds k^T (state row 16 warp + g + 8 (i & 1), chunk rows 16 kk + 2 t4 + 8 (i >> 1) + {0, 1})
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int r = warp * 16 + g + 8 * (i & 1), j = kk * 16 + 2 * t4 + 8 * (i >> 1);
            const float2 f = E::unpack(a[m][i]);
            a[m][i] = E::pack(f.x * __expf(blr[m][i & 1] - gt[gate_at(j, r)]),
                              f.y * __expf(blr[m][i & 1] - gt[gate_at(j + 1, r)]));
          }
        }
#pragma unroll
        for (int np = 0; np < NT8 / 2; ++np) {
          uint32_t b[4];
          load_b_kn<BV>(b, vs, kk * 16, np * 16, lane);
#pragma unroll
          for (int m = 0; m < MT; ++m) {
            E::mma(st[m][2 * np], a[m], b[0], b[1]);
            E::mma(st[m][2 * np + 1], a[m], b[2], b[3]);
          }
        }
      }
    }
    __syncthreads();  // everyone is done with ss and this stage before they are rewritten
  }
  cp_async_wait<0>();

  if (p.final_state != nullptr) {
    each_pair([&](int m, int nt, int half) {
      *reinterpret_cast<float2*>(p.final_state + state_at(m, nt, half)) =
          make_float2(st[m][nt][2 * half], st[m][nt][2 * half + 1]);
    });
  }
}

// One launch (grid: sequences, heads, V tiles).
template <typename Tag, int K, int BV>
cudaError_t run_gla_fused_fwd(const GlaFusedParams& p, cudaStream_t stream) {
  if (p.seq.num_seqs == 0 || p.seq.heads == 0 || p.v_dim == 0) return cudaSuccess;
  if (p.k_dim != K || p.v_dim % BV != 0 || p.b == nullptr) return cudaErrorInvalidValue;
  constexpr int smem = gla_fused_smem_bytes<K, BV>();
  auto kernel = gla_fused_fwd_kernel<Tag, K, BV>;
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(p.seq.num_seqs, p.seq.heads, p.v_dim / BV);
  kernel<<<grid, kGlaFusedThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace linear_attn
