// chunk_fused_fwd_wide_kernel: chunk_fused_fwd's forward (scalar gates) at K = 128 with the whole
// 128-column V tile in one CTA of 256 threads, so the chunk's scores q k^T are computed once per
// 128 V columns instead of once per 64 (chunk_fused.cuh has the math and the rounding points,
// which are the same here). Warp w = 4 half + sub (sub, half in 0..3, 0..1):
//   scores: the partial q k^T of sub-chunk sub (rows 16 sub .. + 15) over key half `half` (keys
//           64 half .. + 63), the causal 16-column blocks only, 16 x 64 fp32. The two partials of
//           a sub-chunk are added through shared memory (8 warps x 4 KB in fragment order, over
//           S_c's tile once every warp is done with it) after a barrier of the pair (bar.sync
//           1 + sub, 64 threads); both warps then hold the same sum.
//   o:      rows 16 sub .. + 15, V columns 64 half .. + 63 (32 registers): q S_c over the 128
//           keys (S_c from shared memory, rounded), scaled by scale * exp(b_r), + P v with P the
//           decayed, masked, scaled scores (decayed_score_frags).
//   S:      rows 64 half + 16 sub .. + 15, all 128 columns: 64 fp32 registers.
// No segments: the route takes this kernel only where its B * H * (V / 128) CTAs fill the SMs
// (one CTA per SM: 128.5 KB of shared memory and 256 threads at up to 255 registers).
//
// Shared memory: two stages of q, k (64 x 128 x 2 B each) and v (64 x 128 x 2 B), 48 KB a stage;
// S_c (128 x 128 x 2 B = 32 KB, also the partial-score exchange); two stages of raw gates:
//   2 * 48 KB + 32 KB + 2 * 256 B = 128.5 KB
//
// Per chunk i (chunk i + 1's loads in flight meanwhile):
//   1. wait for chunk i's tiles; warp 0 scans the gates into sb; S_c (this warp's rows, rounded)
//      into ss; __syncthreads; h_out (the state entering the chunk) from ss when asked
//   2. the partial scores; o = q S_c over the 128 keys
//   3. S: decay by exp(b_L), + k^T (w v) for this warp's 16 rows, 128 columns
//   4. __syncthreads (ss free); partial scores into the exchange, pair barrier, sum
//   5. o = scale exp(b_r) o + P v; store; __syncthreads (the stage, sb and ss free)
#pragma once

#include "chunk_info.cuh"
#include "mma.cuh"

namespace linear_attn {

constexpr int kFusedWideThreads = 256;

constexpr int chunk_fused_wide_smem_bytes() { return 2 * (3 * kChunk * 128) * 2 + 128 * 128 * 2 + 2 * kChunk * 4; }

static_assert(chunk_fused_wide_smem_bytes() == 131584, "K 128, BV 128: 128.5 KB");
static_assert(chunk_fused_wide_smem_bytes() <= 163 * 1024, "K 128, BV 128 fits an sm80 SM");
static_assert(8 * 8 * 32 * 16 == 128 * 128 * 2, "the partial-score exchange fills S_c's tile exactly");

template <typename Tag>
__global__ void __launch_bounds__(kFusedWideThreads, 1) chunk_fused_fwd_wide_kernel(const ChunkFusedParams p) {
  using E = Elem<Tag>;
  using T = typename E::T;
  constexpr int K = 128, BV = 128;
  constexpr int kThreads = kFusedWideThreads;
  constexpr int NT8 = BV / 8;  // the state's n tiles (all 128 columns)
  constexpr int NO8 = 64 / 8;  // the output's n tiles (the warp's 64 columns)

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sq = reinterpret_cast<T*>(smem_raw);         // [stage] (chunk row, key) swizzled, 64 x 128
  T* sk = sq + 2 * kChunk * K;                    // [stage] (chunk row, key) swizzled, 64 x 128
  T* sv = sk + 2 * kChunk * K;                    // [stage] (chunk row, n) swizzled, 64 x 128
  T* ss = sv + 2 * kChunk * BV;                   // S_c: (key, n) swizzled, 128 x 128
  float4* sx = reinterpret_cast<float4*>(ss);     // the partial-score exchange: [warp][8][32 lanes]
  float* graw = reinterpret_cast<float*>(ss + K * BV);  // [stage][kChunk] raw gates
  __shared__ float sb[kChunk];                    // chunk-local cumulative log-gate

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int sub = warp & 3, half = warp >> 2;
  const int g = lane >> 2, t4 = lane & 3;
  const int seq = blockIdx.x, head = blockIdx.y, H = p.seq.heads;
  const int n0 = blockIdx.z * BV;
  const SeqRange sr = sequence_range(p.seq, seq);
  const int nchunks = static_cast<int>((sr.eos - sr.bos + kChunk - 1) / kChunk);

  const int64_t ldk = static_cast<int64_t>(H) * K, ldv = static_cast<int64_t>(H) * p.v_dim;
  const T* qg = static_cast<const T*>(p.q) + static_cast<int64_t>(head) * K;
  const T* kg = static_cast<const T*>(p.k) + static_cast<int64_t>(head) * K;
  const T* vg = static_cast<const T*>(p.v) + static_cast<int64_t>(head) * p.v_dim + n0;
  T* og = static_cast<T*>(p.out) + static_cast<int64_t>(head) * p.v_dim + n0 + 64 * half;
  const int64_t state_base = (static_cast<int64_t>(seq) * H + head) * K * p.v_dim;

  // st[nt][0..1] = S (srow, n0 + 8 nt + 2 t4 + {0, 1}); [2..3] the row srow + 8
  const int srow = 64 * half + 16 * sub + g;
  auto state_at = [&](int nt, int h2) {
    return state_base + static_cast<int64_t>(srow + 8 * h2) * p.v_dim + n0 + 8 * nt + 2 * t4;
  };
  float st[NT8][4];
#pragma unroll
  for (int nt = 0; nt < NT8; ++nt) {
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) {
      const float2 v = p.init != nullptr ? *reinterpret_cast<const float2*>(p.init + state_at(nt, h2))
                                         : make_float2(0.f, 0.f);
      st[nt][2 * h2] = v.x;
      st[nt][2 * h2 + 1] = v.y;
    }
  }

  auto chunk_start = [&](int i) { return sr.bos + static_cast<int64_t>(i) * kChunk; };
  auto chunk_rows = [&](int i) {
    return static_cast<int>(min(static_cast<int64_t>(kChunk), sr.eos - chunk_start(i)));
  };
  auto issue = [&](int i) {
    const int stage = i & 1;
    const int64_t start = chunk_start(i);
    const int rows = chunk_rows(i);
    load_tile<kChunk, K, kThreads>(sq + stage * kChunk * K, qg + start * ldk, ldk, rows, tid);
    load_tile<kChunk, K, kThreads>(sk + stage * kChunk * K, kg + start * ldk, ldk, rows, tid);
    load_tile<kChunk, BV, kThreads>(sv + stage * kChunk * BV, vg + start * ldv, ldv, rows, tid);
    if (warp == 0) chunk_gate_load_async(p.gate, start, rows, head, H, graw + stage * kChunk, lane);
  };

  if (nchunks > 0) issue(0);
  cp_async_commit();
  for (int i = 0; i < nchunks; ++i) {
    const int stage = i & 1;
    if (i + 1 < nchunks) issue(i + 1);
    cp_async_commit();
    const int64_t row0 = chunk_start(i);
    const int rows = chunk_rows(i);
    cp_async_wait<1>();  // chunk i's group has landed (this thread's copies)
    if (warp == 0) chunk_gate_scan(p.gate, graw + stage * kChunk, rows, head, sb, lane);
    // ---- 1. S_c as an MMA operand, in the input dtype
#pragma unroll
    for (int nt = 0; nt < NT8; ++nt) {
#pragma unroll
      for (int h2 = 0; h2 < 2; ++h2) {
        *reinterpret_cast<uint32_t*>(ss + swz<BV>(srow + 8 * h2, 8 * nt + 2 * t4)) =
            E::pack(st[nt][2 * h2], st[nt][2 * h2 + 1]);
      }
    }
    __syncthreads();  // the stage's tiles (every thread's copies), sb and ss are visible
    if (p.h_out != nullptr) {
      // S_c as chunk_state stores it (the state entering chunk i), for the backward: 16-byte groups
      T* hrow = static_cast<T*>(p.h_out) + (static_cast<int64_t>(sr.first_slot + i) * H + head) * K * p.v_dim + n0;
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

    // ---- 2. the partial scores (keys of half `half`) and q S_c (all keys, this warp's 64 columns)
    float s[8][4];  // 16 rows x 64 chunk columns
    float o[NO8][4];
    zero_frags(s);
    zero_frags(o);
#pragma unroll
    for (int kk = 0; kk < K / 16; ++kk) {
      uint32_t a[4];
      load_a<K>(a, qs, sub * 16, kk * 16, lane);
      if (kk / 4 == half) {
#pragma unroll
        for (int np = 0; np < 4; ++np) {
          if (np <= sub) {
            uint32_t b[4];
            load_b_nk<K>(b, ks, kk * 16, np * 16, lane);
            E::mma(s[2 * np], a, b[0], b[1]);
            E::mma(s[2 * np + 1], a, b[2], b[3]);
          }
        }
      }
      // columns 64 half ..: swz<128>(r, 64 half + c) = swz<128>(r, c) + 64 half
      mma_b<E, BV, BLayout::kKN>(o, a, ss + 64 * half, kk * 16, lane);
    }

    // ---- 3. the state leaving the chunk: rows srow, srow + 8, all 128 columns
    {
      const float bl = sb[kChunk - 1];
      const float decay = __expf(bl);
#pragma unroll
      for (int nt = 0; nt < NT8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) st[nt][e] *= decay;
      }
#pragma unroll
      for (int kk = 0; kk < kChunk / 16; ++kk) {
        uint32_t a[4];  // k^T (state rows 64 half + 16 sub .., chunk rows 16 kk ..)
        load_a_t<K>(a, ks, 64 * half + 16 * sub, kk * 16, lane);
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
          E::mma(st[2 * np], a, b[0], b[1]);
          E::mma(st[2 * np + 1], a, b[2], b[3]);
        }
      }
    }
    __syncthreads();  // every warp is done with ss (step 2): it becomes the exchange

    // ---- 4. the scores = the two key halves' partials
    {
      float4* mine = sx + warp * 8 * 32;
      const float4* other = sx + (warp ^ 4) * 8 * 32;
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if (j > 2 * sub + 1) continue;  // blocks right of the diagonal are zero
        mine[j * 32 + lane] = make_float4(s[j][0], s[j][1], s[j][2], s[j][3]);
      }
      asm volatile("bar.sync %0, %1;\n" ::"r"(1 + sub), "n"(64) : "memory");  // the pair's partials are written
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if (j > 2 * sub + 1) continue;
        const float4 x = other[j * 32 + lane];
        s[j][0] += x.x;
        s[j][1] += x.y;
        s[j][2] += x.z;
        s[j][3] += x.w;
      }
    }

    // ---- 5. o = scale exp(b_r) (q S_c) + P v; rows past the end of the sequence are not written
    float br[2];
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) {
      br[h2] = sb[sub * 16 + g + 8 * h2];
      const float rs = p.scale * __expf(br[h2]);
#pragma unroll
      for (int nt = 0; nt < NO8; ++nt) {
        o[nt][2 * h2] *= rs;
        o[nt][2 * h2 + 1] *= rs;
      }
    }
    uint32_t pa[4][4];  // (scores * D * scale) as A fragments, one per 16-column block
    decayed_score_frags<E, false>(pa, s, br, sb, p.scale, sub, lane);
#pragma unroll
    for (int blk = 0; blk < 4; ++blk) {
      if (blk <= sub) mma_b<E, BV, BLayout::kKN>(o, pa[blk], vs + 64 * half, blk * 16, lane);
    }
    T* orow = og + row0 * ldv;
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) {
      const int r = sub * 16 + g + 8 * h2;
      if (r < rows) {
#pragma unroll
        for (int nt = 0; nt < NO8; ++nt) {
          *reinterpret_cast<uint32_t*>(orow + r * ldv + nt * 8 + 2 * t4) = E::pack(o[nt][2 * h2], o[nt][2 * h2 + 1]);
        }
      }
    }
    __syncthreads();  // the stage, sb and the exchange are free before they are rewritten
  }
  cp_async_wait<0>();

  if (p.final_state != nullptr) {
#pragma unroll
    for (int nt = 0; nt < NT8; ++nt) {
#pragma unroll
      for (int h2 = 0; h2 < 2; ++h2) {
        *reinterpret_cast<float2*>(p.final_state + state_at(nt, h2)) = make_float2(st[nt][2 * h2], st[nt][2 * h2 + 1]);
      }
    }
  }
}

// K = 128, V a multiple of 128, no segments (tile_size.h: chunk_fused_wide_ok); grid: sequences,
// heads, V / 128.
template <typename Tag>
cudaError_t run_chunk_fused_wide(const ChunkFusedParams& p, cudaStream_t stream) {
  if (p.seq.num_seqs == 0 || p.seq.heads == 0 || p.v_dim == 0) return cudaSuccess;
  if (p.k_dim != 128 || p.v_dim % 128 != 0 || p.max_segs != 1 || p.seg_chunks != 0) return cudaErrorInvalidValue;
  constexpr int smem = chunk_fused_wide_smem_bytes();
  auto kernel = chunk_fused_fwd_wide_kernel<Tag>;
  const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  if (err != cudaSuccess) return err;
  kernel<<<dim3(p.seq.num_seqs, p.seq.heads, p.v_dim / 128), kFusedWideThreads, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace linear_attn
