// chunk_fused_fwd: the simple-GLA forward (scalar gates g / gamma / none) in one kernel. One CTA
// per (sequence, head, BV-column V tile) walks the chunks of its sequence in order with the
// running state S [K, BV] in fp32 registers, and per chunk c (b = chunk-local cumulative log-gate):
//
//   o_r       = scale * exp(b_r) (q_r S_c) + scale * sum_{j <= r} exp(b_r - b_j) (q_r . k_j) v_j
//   S_{c + 1} = exp(b_L) S_c + sum_j exp(b_L - b_j) k_j^T v_j
//
// which is chunk_state (forward) followed by chunk_output (x = q, y = k, z = v, lower) without the
// states' round trip through global memory. As there, S_c is rounded to the input dtype where it is
// an MMA operand (q S_c) and kept in fp32 otherwise, and every product is the same sequence of
// m16n8k16 MMAs, so the two paths agree to rounding (bit for bit, barring the compiler's FMA choices).
//
// Threads: 128 (4 warps). State: warp w owns the rows 64 m + 16 w .. 64 m + 16 w + 15 of S for
// m < K / 64, all BV columns: K * BV / 128 fp32 registers per thread (64 at K = 128, BV = 64 and at
// K = 256, BV = 32; 32 at K = 64, BV = 64). Output: warp w owns the chunk rows 16 w .. 16 w + 15
// (BV / 2 accumulators, 32 for the 16 x 64 scores, 16 for their 16-bit A fragments).
// Shared memory (16-bit tiles, swizzled): stages of (q 64 x K, k 64 x K, v 64 x BV, 64 raw gates)
// plus S_c as an MMA operand (K x BV):
//   K 64,  BV 64:  2 * (8 + 8 + 8 KB + 256 B) + 8 KB  =  57.5 KB
//   K 128, BV 64:  2 * (16 + 16 + 8 KB + 256 B) + 16 KB = 96.5 KB  (two CTAs per SM on sm90)
//   K 256, BV 32:  1 * (32 + 32 + 4 KB + 256 B) + 16 KB = 84.25 KB (one stage: two CTAs per sm90 SM,
//                  whose 256 CTAs at B 4 x H 8 x V 256 are then one wave on an H100, not two; the
//                  other CTA hides the loads that one stage no longer overlaps; one CTA per sm80 SM)
//
// Per chunk i (with two stages the loads of chunk i + 1 in flight meanwhile, cp.async; with one
// they are issued after step 4):
//   1. wait for chunk i's tiles; warp 0 scans its gates into sb; every thread writes its part of
//      S_c (rounded) into ss; __syncthreads
//   2. o: scores q_w k^T (the causal 16-column blocks only) and q_w S_c over K, the decay mask and
//      the scales in registers, + (P) v; stored straight from the accumulators (rows past the end
//      of the sequence are not written)
//   3. S: decay by exp(b_L), + k^T (w v) with w_j = exp(b_L - b_j) folded into v's B fragments
//   4. __syncthreads (ss, sb and the stage are free for chunk i + 1)
// Steps 2 and 3 are independent (both read only q, k, v, sb and ss), so their MMAs interleave.
//
// Segments (seg_chunks > 0): one CTA per (sequence, head, V tile) has too little parallelism when
// B * H * (V / BV) is below the GPU's CTA slots (long sequences, few heads). Then each sequence is
// cut into segments of seg_chunks chunks (the last one shorter), and two launches run:
//   pass 1 (kStateOnly): the CTA of segment j (all but the last) walks its chunks from a zero state
//          doing step 3 only: its local state L_j = sum_j' exp(b_end - b_j') k_j'^T v_j' over the
//          segment, into seg_state, and the segment's whole log-decay d_j (sum of its gates) into
//          seg_decay;
//   pass 2: the CTA of segment j starts from S = fold over s < j of S <- exp(d_s) S + L_s, from h0
//          (or zeros), which is the state entering the segment, then runs steps 1-4 over its chunks;
//          the last segment writes the final state.
// Every segment boundary is a chunk boundary, so the chunks and their MMAs are those of one pass;
// only the fp32 sums of the states regroup (rounding differences, not a different result).
#pragma once

#include <cstdlib>
#include <cstring>

#include "chunk_fused_sm90.cuh"
#include "chunk_info.cuh"
#include "device_info.h"
#include "mma.cuh"

namespace linear_attn {

constexpr int kFusedThreads = 128;

// Stages of (q, k, v, gates): chunk_fused_stages (chunk_fused_sm90.cuh), the same for both kernels.

// Pass 1 (kStateOnly) has no q tiles and no S_c operand: 48.5 KB at K 128, BV 64.
template <int K, int BV, bool kStateOnly = false>
constexpr int chunk_fused_smem_bytes() {
  return chunk_fused_stages<K, kStateOnly>() * (((kStateOnly ? 1 : 2) * kChunk * K + kChunk * BV) * 2 + kChunk * 4) +
         (kStateOnly ? 0 : K * BV * 2);
}

static_assert(chunk_fused_smem_bytes<128, 64>() == 98816, "K 128, BV 64: 96.5 KB");
static_assert(chunk_fused_smem_bytes<128, 64, true>() == 49664, "pass 1 at K 128, BV 64: 48.5 KB");
static_assert(chunk_fused_smem_bytes<256, 32>() == 86272, "K 256, BV 32: 84.25 KB");
static_assert(2 * (chunk_fused_smem_bytes<256, 32>() + 256 + 1024) <= 228 * 1024,
              "K 256, BV 32: two CTAs (plus the static gate sums and 1 KB reserved each) per sm90 SM");

template <typename Tag, int K, int BV, bool kStateOnly>
__global__ void __launch_bounds__(kFusedThreads) chunk_fused_fwd_kernel(const ChunkFusedParams p) {
  using E = Elem<Tag>;
  using T = typename E::T;
  constexpr int kThreads = kFusedThreads;
  constexpr int MT = K / 64;     // 16-row state m tiles per warp
  constexpr int NT8 = BV / 8;    // n tiles of 8 columns (state and output)
  static_assert(K == 64 || K == 128 || K == 256, "K is 64, 128 or 256");
  static_assert(BV == 32 || BV == 64, "V tiles of 32 or 64 columns");
  static_assert(K * BV / kThreads <= 64, "at most 64 fp32 state registers per thread");
  static_assert(K * BV / 8 % kThreads == 0, "h_out's 16-byte groups split evenly over the threads");

  constexpr int kStages = chunk_fused_stages<K, kStateOnly>();
  constexpr int kQStages = kStateOnly ? 0 : kStages;  // pass 1 reads no q
  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sq = reinterpret_cast<T*>(smem_raw);                   // [stage] (chunk row, k) swizzled
  T* sk = sq + kQStages * kChunk * K;                        // [stage] (chunk row, k) swizzled
  T* sv = sk + kStages * kChunk * K;                         // [stage] (chunk row, n) swizzled
  T* ss = sv + kStages * kChunk * BV;                        // S_c: (k, n) swizzled (not in pass 1)
  float* graw = reinterpret_cast<float*>(ss + (kStateOnly ? 0 : K * BV));  // [stage] [kChunk] raw gates
  __shared__ float sb[kChunk];                               // chunk-local cumulative log-gate

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const int n0 = blockIdx.z * BV;
  // this CTA's chunks [c_begin, c_end) of its sequence: the whole sequence without segments
  const FusedCta<T, K> cta(p, n0);
  if (cta.idle(kStateOnly)) return;

  // st[m][nt][0..1] = S (64 m + 16 warp + g, n0 + 8 nt + 2 t4 + {0, 1}); [2..3] the row + 8;
  // state_at: where st[m][nt][2 half ..] lives in an fp32 [.., K, V] state whose (K, V) matrix
  // starts at `base` (cta.state_base: this sequence and head in an [N, H, K, V] state)
  auto state_at = [&](int m, int nt, int half, int64_t base) {
    return base + static_cast<int64_t>(64 * m + 16 * warp + g + 8 * half) * p.v_dim + n0 + 8 * nt + 2 * t4;
  };
  // each_pair(f): f(m, nt, half) for every pair st[m][nt][2 half], st[m][nt][2 half + 1] this thread holds
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
    if (!kStateOnly && p.init != nullptr) {
      v = *reinterpret_cast<const float2*>(p.init + state_at(m, nt, half, cta.state_base));
    }
    st[m][nt][2 * half] = v.x;
    st[m][nt][2 * half + 1] = v.y;
  });
  if constexpr (!kStateOnly) {
    // the state entering this segment: the earlier segments' pass-1 results folded in order
    for (int s = 0; s < cta.walk.seg; ++s) {
      const float decay = __expf(p.seg_decay[cta.seg_row(s)]);
      const int64_t base = cta.seg_row(s) * K * p.v_dim;
      each_pair([&](int m, int nt, int half) {
        const float2 l = *reinterpret_cast<const float2*>(p.seg_state + state_at(m, nt, half, base));
        st[m][nt][2 * half] = fmaf(decay, st[m][nt][2 * half], l.x);
        st[m][nt][2 * half + 1] = fmaf(decay, st[m][nt][2 * half + 1], l.y);
      });
    }
  }
  float seg_log_decay = 0.f;  // pass 1: the sum of the segment's gates (the b_L of its chunks)

  auto issue = [&](int i) {
    const int stage = (i - cta.c_begin) % kStages;  // as the loop below counts stages
    const int64_t start = cta.chunk_start(i);
    const int rows = cta.chunk_rows(i);
    if constexpr (!kStateOnly) {
      load_tile<kChunk, K, kThreads>(sq + stage * kChunk * K, cta.qg + start * cta.ldk, cta.ldk, rows, tid);
    }
    load_tile<kChunk, K, kThreads>(sk + stage * kChunk * K, cta.kg + start * cta.ldk, cta.ldk, rows, tid);
    load_tile<kChunk, BV, kThreads>(sv + stage * kChunk * BV, cta.vg + start * cta.ldv, cta.ldv, rows, tid);
    if (warp == 0) chunk_gate_load_async(p.gate, start, rows, cta.head, cta.heads, graw + stage * kChunk, lane);
  };

  if (cta.c_begin < cta.c_end) issue(cta.c_begin);
  cp_async_commit();
  for (int i = cta.c_begin; i < cta.c_end; ++i) {
    const int stage = (i - cta.c_begin) % kStages;
    if (kStages > 1 && i + 1 < cta.c_end) issue(i + 1);
    cp_async_commit();  // (one stage: an empty group, so that the wait below counts the same)
    const int64_t row0 = cta.chunk_start(i);
    const int rows = cta.chunk_rows(i);
    cp_async_wait<1>();  // chunk i's group has landed (this thread's copies); the newest may not have
    if (warp == 0) chunk_gate_scan(p.gate, graw + stage * kChunk, rows, cta.head, sb, lane);
    // ---- 1. S_c as an MMA operand, in the input dtype
    if constexpr (!kStateOnly) {
      each_pair([&](int m, int nt, int half) {
        const int r = 64 * m + 16 * warp + g + 8 * half, c = 8 * nt + 2 * t4;
        *reinterpret_cast<uint32_t*>(ss + swz<BV>(r, c)) = E::pack(st[m][nt][2 * half], st[m][nt][2 * half + 1]);
      });
    }
    __syncthreads();  // the stage's tiles (every thread's copies), sb and ss are visible
    if (!kStateOnly && p.h_out != nullptr) {
      // S_c as chunk_state stores it (the state entering chunk i, in the input dtype), for the
      // backward: ss (swizzled 16-byte groups) -> h_out[slot i], this V tile, 16-byte stores; one
      // group in flight per thread (unrolled, the loads ran ahead and cost registers: spills)
      T* hrow = static_cast<T*>(p.h_out) + cta.slot_row(i) * K * p.v_dim + n0;
#pragma unroll 1
      for (int j = 0; j < K * BV / 8 / kThreads; ++j) {
        const int idx = tid + j * kThreads, r = idx / (BV / 8), c = (idx % (BV / 8)) * 8;
        *reinterpret_cast<uint4*>(hrow + static_cast<int64_t>(r) * p.v_dim + c) =
            *reinterpret_cast<const uint4*>(ss + swz<BV>(r, c));
      }
    }
    const T* qs = sq + stage * kChunk * K;
    const T* ks = sk + stage * kChunk * K;
    const T* vs = sv + stage * kChunk * BV;

    // ---- 2. the chunk's output rows 16 warp .. 16 warp + 15
    if constexpr (!kStateOnly) {
      float s[8][4];   // scores q_w k^T: 16 rows x 64 chunk columns
      float o[NT8][4]; // 16 rows x BV
      zero_frags(s);
      zero_frags(o);
#pragma unroll
      for (int kk = 0; kk < K / 16; ++kk) {
        uint32_t a[4];
        load_a<K>(a, qs, warp * 16, kk * 16, lane);
#pragma unroll
        for (int np = 0; np < 4; ++np) {
          if (np <= warp) {
            uint32_t b[4];
            load_b_nk<K>(b, ks, kk * 16, np * 16, lane);
            E::mma(s[2 * np], a, b[0], b[1]);
            E::mma(s[2 * np + 1], a, b[2], b[3]);
          }
        }
        mma_b<E, BV, BLayout::kKN>(o, a, ss, kk * 16, lane);  // q S_c
      }
      float br[2];
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        br[half] = sb[warp * 16 + g + 8 * half];
        const float rs = p.scale * __expf(br[half]);
#pragma unroll
        for (int nt = 0; nt < NT8; ++nt) {
          o[nt][2 * half] *= rs;
          o[nt][2 * half + 1] *= rs;
        }
      }
      uint32_t pa[4][4];  // (scores * D * scale) as A fragments, one per 16-column block
      decayed_score_frags<E, false>(pa, s, br, sb, p.scale, warp, lane);
#pragma unroll
      for (int blk = 0; blk < 4; ++blk) {
        if (blk <= warp) mma_b<E, BV, BLayout::kKN>(o, pa[blk], vs, blk * 16, lane);
      }
      T* orow = cta.og + row0 * cta.ldv;
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int r = warp * 16 + g + 8 * half;
        if (r < rows) {
#pragma unroll
          for (int nt = 0; nt < NT8; ++nt) {
            *reinterpret_cast<uint32_t*>(orow + r * cta.ldv + nt * 8 + 2 * t4) =
                E::pack(o[nt][2 * half], o[nt][2 * half + 1]);
          }
        }
      }
    }

    // ---- 3. the state leaving the chunk
    {
      const float bl = sb[kChunk - 1];
      const float decay = __expf(bl);
      seg_log_decay += bl;
#pragma unroll
      for (int m = 0; m < MT; ++m) {
#pragma unroll
        for (int nt = 0; nt < NT8; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) st[m][nt][e] *= decay;
        }
      }
#pragma unroll
      for (int kk = 0; kk < kChunk / 16; ++kk) {
        uint32_t a[MT][4];  // k^T (state rows 64 m + 16 warp .., chunk rows 16 kk ..)
#pragma unroll
        for (int m = 0; m < MT; ++m) load_a_t<K>(a[m], ks, 64 * m + 16 * warp, kk * 16, lane);
        // weights of the chunk rows this thread's B fragments hold: 16 kk + 2 t4 + {0, 1, 8, 9}
        float w[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) w[e] = __expf(bl - sb[kk * 16 + 2 * t4 + (e & 1) + 8 * (e >> 1)]);
#pragma unroll
        for (int np = 0; np < NT8 / 2; ++np) {
          uint32_t b[4];
          load_b_kn<BV>(b, vs, kk * 16, np * 16, lane);
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float2 f = E::unpack(b[e]);
            const int wi = (e & 1) * 2;  // b[0], b[2]: rows 2 t4, 2 t4 + 1; b[1], b[3]: those + 8
            b[e] = E::pack(f.x * w[wi], f.y * w[wi + 1]);
          }
#pragma unroll
          for (int m = 0; m < MT; ++m) {
            E::mma(st[m][2 * np], a[m], b[0], b[1]);
            E::mma(st[m][2 * np + 1], a[m], b[2], b[3]);
          }
        }
      }
    }
    __syncthreads();  // everyone is done with ss, sb and this stage before they are rewritten
    if (kStages == 1 && i + 1 < cta.c_end) {  // one stage: chunk i + 1's loads now that it is free
      issue(i + 1);
      cp_async_commit();
    }
  }
  cp_async_wait<0>();

  if constexpr (kStateOnly) {
    const int64_t base = cta.seg_row(cta.walk.seg) * K * p.v_dim;
    each_pair([&](int m, int nt, int half) {
      *reinterpret_cast<float2*>(p.seg_state + state_at(m, nt, half, base)) =
          make_float2(st[m][nt][2 * half], st[m][nt][2 * half + 1]);
    });
    // (the same in every V tile)
    if (blockIdx.z == 0 && tid == 0) p.seg_decay[cta.seg_row(cta.walk.seg)] = seg_log_decay;
  } else if (p.final_state != nullptr && cta.walk.seg == cta.nsegs - 1) {
    each_pair([&](int m, int nt, int half) {
      *reinterpret_cast<float2*>(p.final_state + state_at(m, nt, half, cta.state_base)) =
          make_float2(st[m][nt][2 * half], st[m][nt][2 * half + 1]);
    });
  }
}

// Whether the wgmma kernel (chunk_fused_sm90.cuh) runs for this call: the build has sm_90a code
// (setup.py's FLASH_ATTN_HAS_SM90A), the device executes the kernel's sm90 code (PTX version 90, the
// only code with its body), and FLASH_ATTN_LINEAR_SM90 is not "0" (which runs the mma.sync kernel
// instead: A/B timings, and its tests on sm90).
template <typename Kernel>
bool chunk_fused_sm90_runs(Kernel kernel) {
  const char* env = std::getenv("FLASH_ATTN_LINEAR_SM90");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  return flash::runs_sm90a_code(kernel);
}

template <typename Kernel>
cudaError_t launch_with_smem(Kernel kernel, dim3 grid, int threads, int smem, const ChunkFusedParams& p,
                             cudaStream_t stream) {
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, threads, smem, stream>>>(p);
  return cudaGetLastError();
}

// Whether the wgmma kernel takes two V tiles per CTA (two warpgroups sharing q and k,
// chunk_fused_sm90.cuh) at this K: by default at K = 256 (two stages instead of one);
// FLASH_ATTN_LINEAR_SM90_PAIR=0 never, =1 also at K = 128 (A/B timings). V must hold two tiles.
template <int K, int BV>
bool chunk_fused_sm90_pairs(const ChunkFusedParams& p) {
  if (K == 64 || p.v_dim % (2 * BV) != 0) return false;
  const char* env = std::getenv("FLASH_ATTN_LINEAR_SM90_PAIR");
  if (env != nullptr && std::strcmp(env, "0") == 0) return false;
  if (env != nullptr && std::strcmp(env, "1") == 0) return true;
  return K == 256;
}

// One launch of the kernel (grid: sequences x segments, heads, V tiles or pairs of them): the wgmma
// one where it runs, else the mma.sync one. last_chunk_fused_kernel records which (90 / 80).
template <typename Tag, int K, int BV, bool kStateOnly>
cudaError_t launch_chunk_fused(const ChunkFusedParams& p, cudaStream_t stream) {
  const dim3 grid(p.seq.num_seqs * p.max_segs, p.seq.heads, p.v_dim / BV);
  auto sm90_kernel = sm90::chunk_fused_fwd_sm90_kernel<Tag, K, BV, kStateOnly, 1>;
  if (chunk_fused_sm90_runs(sm90_kernel)) {
    last_chunk_fused_kernel.store(90);
    if constexpr (K != 64) {
      if (chunk_fused_sm90_pairs<K, BV>(p)) {
        using Tr2 = sm90::FusedSm90Traits<Tag, K, BV, kStateOnly, 2>;
        const dim3 grid2(grid.x, grid.y, grid.z / 2);
        return launch_with_smem(sm90::chunk_fused_fwd_sm90_kernel<Tag, K, BV, kStateOnly, 2>, grid2, Tr2::kThreads,
                                Tr2::kSmemBytes, p, stream);
      }
    }
    using Tr = sm90::FusedSm90Traits<Tag, K, BV, kStateOnly, 1>;
    return launch_with_smem(sm90_kernel, grid, Tr::kThreads, Tr::kSmemBytes, p, stream);
  }
  last_chunk_fused_kernel.store(80);
  return launch_with_smem(chunk_fused_fwd_kernel<Tag, K, BV, kStateOnly>, grid, kFusedThreads,
                          chunk_fused_smem_bytes<K, BV, kStateOnly>(), p, stream);
}

template <typename Tag, int K, int BV>
cudaError_t run_chunk_fused_fwd(const ChunkFusedParams& p, cudaStream_t stream) {
  if (p.seq.num_seqs == 0 || p.seq.heads == 0 || p.v_dim == 0) return cudaSuccess;
  if (p.k_dim != K || p.v_dim % BV != 0 || p.max_segs < 1) return cudaErrorInvalidValue;
  if (p.max_segs > 1) {  // segments: pass 1, the local states
    if (p.seg_chunks < 1 || p.seg_state == nullptr || p.seg_decay == nullptr) return cudaErrorInvalidValue;
    const cudaError_t err = launch_chunk_fused<Tag, K, BV, true>(p, stream);
    if (err != cudaSuccess) return err;
  }
  return launch_chunk_fused<Tag, K, BV, false>(p, stream);
}

}  // namespace linear_attn
