// gla_fused_fwd: GLA's forward (per-key gates) in one kernel. One CTA per (sequence, head, BV-column
// V tile) walks the chunks of its sequence in order with the running state S [K, BV] in fp32
// registers. Two kernels (tile_size.h: gla_fused_tile_v picks BV): gla_fused_fwd_kernel, 128
// threads, BV = 64 (K 64, 128) or 32 (K 256), described first; and at K = 128 with V a multiple
// of 128, gla_fused_fwd_wide_kernel, 256 threads, BV = 128, which computes the intra-chunk scores
// A once per 128 V columns instead of once per 64 (A, exponent-heavy, was most of the cost: with
// BV = 64 the one-pass forward took 0.815 ms against 0.731 ms for the three launches at 8 x 2048,
// H 16, K = V = 128), described in its own section further down. With b the chunk-local cumulative per-key log-gate (gla_cumsum; gla_gates.cuh), per
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
//   K 128, BV 64, 1 stage:  32 + 8 + 34 KB + 16 KB       =  90 KB  (two CTAs per SM on sm90; V not a
//                                                                  multiple of 128 only)
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
  static_assert(BV == 32 || BV == 64, "V tiles of 32 or 64 columns (BV 128 at K 128: the wide kernel below)");
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
#pragma unroll 1
      for (int m = 0; m < MT; ++m) {
        const T* qm = qs + m * kSlab;
        const T* km = ks + m * kSlab;
        const float* gt = gs + m * kGateTileFloats;
#pragma unroll 1
        for (int kk = 0; kk < 4; ++kk) {
          uint32_t ai[4];  // q * exp(b), q's A fragments of keys 16 kk ..
          gla_rebased_step<false, E>(s, ai, qm, km, gt, warp, kk, lane);
          // the inter-chunk part: (q * exp(b)) times the slab's 64 rows of S_c
          mma_b<E, BV, BLayout::kKN>(o, ai, ss, 64 * m + kk * 16, lane);
        }
        gla_add_diag<false, E>(s, qm, km, gt, warp, lane);  // A's diagonal block, elementwise
      }
      // o = scale * inter + (scale * A) v, A as 16-bit A fragments per 16-column block
#pragma unroll
      for (int nt = 0; nt < NT8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) o[nt][e] *= p.scale;
      }
      gla_add_scores_times<false, E, BV>(o, s, p.scale, vs, warp, lane);
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

// ---------------------------------------------------------------- K = 128, BV = 128: A once per chunk
// gla_fused_fwd_wide_kernel: the same forward with the whole 128-column V tile in one CTA of 256
// threads, so A (the exponent-heavy part) is computed once per (sequence, head, chunk, 128 V
// columns) instead of once per 64 V columns. Warp w = 4 half + sub (sub, half in 0..3, 0..1):
//   A:     the partial A of sub-chunk sub over key slab half (keys 64 half .. 64 half + 63): the
//          blocks left of the diagonal as rebased MMAs and the slab's part of the diagonal block
//          elementwise (gla_diag_scores), 16 x 64 fp32. The two partials of a sub-chunk are
//          added through shared memory (8 x 4 KB, fragment order, aliasing S_c's tile) after a
//          barrier of the pair (bar.sync 1 + sub, 64 threads); both warps hold the same sum.
//   q e^b: the warp writes its rebased-and-decayed q (ai, the 16-bit A fragments of q * exp(b),
//          exactly the old kernel's) over its own quadrant of the q tile (rows of sub, slab half;
//          no other warp reads that quadrant), so after a __syncthreads every warp reads the
//          decayed q of its rows over all 128 keys.
//   o:     rows 16 sub .. 16 sub + 15, V columns 64 half .. 64 half + 63 (32 registers):
//          scale * (q e^b) S_c over the 128 keys (S_c from shared memory, rounded) + scale * A v.
//   S:     rows 64 half + 16 sub .. + 15 (key slab half, the slab this warp's gate tile and k
//          fragments are in), all 128 columns: 64 fp32 registers; the weights exp(b_L - b_j) are
//          then taken once per state row, not once per V half.
// Exponents as in the kernel above (reference row 16 sub, every exponent <= 0); the 16-bit
// rounding points are the same (S_c and q e^b where they are MMA operands, A before A v); only
// A's fp32 sum over the 128 keys is two partial sums of 64 added, instead of one chain.
//
// Shared memory (bytes): q, k two stages of 2 x 64 x 64 x 2 (2 x 16 KB each), v two stages of
// 64 x 128 x 2 (2 x 16 KB), S_c 128 x 128 x 2 = 32 KB (also the partial-A exchange, 8 warps x
// 16 x 64 x 4 = 32 KB, after a __syncthreads), one stage of gates 2 x 64 x 68 x 4 = 34 KB:
//   32 + 32 + 32 + 32 + 34 KB = 165888 B = 162 KB  (sm80 allows 163 KB; one CTA per SM)
// q, k, v of chunk i + 1 are loaded during chunk i (cp.async); the gates of chunk i + 1 are issued
// as soon as the last warp is done with chunk i's (after the state update), so only their tail
// is exposed.
//
// Per chunk i:
//   0. issue q, k, v of chunk i + 1; wait for chunk i's q, k, v and gates
//   1. write S_c (this warp's rows, rounded) into ss; __syncthreads
//   2. A's partial (diagonal block, then per 16-key step the rebased q and the blocks left of the
//      diagonal); the decayed q over this warp's quadrant of the q tile; __syncthreads
//   3. o = (q e^b) S_c over the 128 keys (MMAs; ss)
//   4. S: decay by exp(b_L), + (k * w)^T v for this warp's 16 rows, 128 columns
//   5. __syncthreads (ss and the gates free); issue chunk i + 1's gates; partial A into the
//      exchange (ss), pair barrier, A = own + partner's
//   6. o = scale * o + (scale * A) v; store; __syncthreads (the stage and ss free)
constexpr int kGlaFusedWideThreads = 256;

constexpr int gla_fused_wide_smem_bytes() {
  return (2 * 2 * 2 * kChunk * 64 + 2 * kChunk * 128 + 128 * 128) * 2 + 2 * kGateTileFloats * 4;
}

static_assert(gla_fused_wide_smem_bytes() == 165888, "K 128, BV 128: 162 KB");
static_assert(gla_fused_wide_smem_bytes() <= 163 * 1024, "K 128, BV 128 fits an sm80 SM");
static_assert(8 * 16 * 64 * 4 == 128 * 128 * 2, "the partial-A exchange fills S_c's tile exactly");

template <typename Tag, bool kStateOnly, bool kReverse>
__global__ void __launch_bounds__(kGlaFusedWideThreads, 1) gla_fused_fwd_wide_kernel(const GlaFusedParams p) {
  using E = Elem<Tag>;
  using T = typename E::T;
  constexpr int K = 128, BV = 128;
  constexpr int kThreads = kGlaFusedWideThreads;
  constexpr int MT = K / 64;           // 64-key slabs
  constexpr int NT8 = BV / 8;          // the state's n tiles (all 128 columns)
  constexpr int NO8 = 64 / 8;          // the output's n tiles (the warp's 64 columns)
  constexpr int kSlab = kChunk * 64;   // elements of a 64 x 64 slab of q or k

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sq = reinterpret_cast<T*>(smem_raw);          // [stage][slab] (chunk row, key) swizzled, 64 x 64
  T* sk = sq + 2 * MT * kSlab;                     // [stage][slab] (chunk row, key) swizzled, 64 x 64
  T* sv = sk + 2 * MT * kSlab;                     // [stage] (chunk row, n) swizzled, 64 x 128
  T* ss = sv + 2 * kChunk * BV;                    // S_c: (key, n) swizzled, 128 x 128
  float* sx = reinterpret_cast<float*>(ss);        // the partial-A exchange: [warp][8][32 lanes][4]
  float* sg = reinterpret_cast<float*>(ss + K * BV);  // [slab] gate tiles (chunk row, key)

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int sub = warp & 3, half = warp >> 2;
  const int g = lane >> 2, t4 = lane & 3;
  const SegmentWalk walk = segment_walk(p.seq, p.max_segs, p.seg_chunks);
  const int seq = walk.seq, seg = walk.seg;
  const int head = blockIdx.y, H = p.seq.heads;
  const int n0 = blockIdx.z * BV;
  const SeqRange sr = walk.sr;
  // this CTA's chunks [c_begin, c_end): the whole sequence without segments
  const SegmentRange segs = walk.segs;
  const int nsegs = segs.count, c_begin = segs.begin, c_end = segs.end;
  // pass 1 never needs the L of the segment the walk ends in (forward: the last; reverse: the first)
  if (seg >= nsegs || (kStateOnly && seg == (kReverse ? 0 : nsegs - 1))) return;

  const int64_t ldk = static_cast<int64_t>(H) * K, ldv = static_cast<int64_t>(H) * p.v_dim;
  const T* qg = static_cast<const T*>(p.q) + static_cast<int64_t>(head) * K;
  const T* kg = static_cast<const T*>(p.k) + static_cast<int64_t>(head) * K;
  // the gates: b, or raw g summed per chunk here (scan_gate_column), b then going to b_out (pass 2)
  const bool raw = !kReverse && p.b == nullptr;
  const float* bg = (raw ? p.g : p.b) + static_cast<int64_t>(head) * K;
  float* bout = !kStateOnly && raw && p.b_out != nullptr ? p.b_out + static_cast<int64_t>(head) * K : nullptr;
  const T* vg = static_cast<const T*>(p.v) + static_cast<int64_t>(head) * p.v_dim + n0;
  T* og = static_cast<T*>(p.out) + static_cast<int64_t>(head) * p.v_dim + n0 + 64 * half;
  const int64_t state_base = (static_cast<int64_t>(seq) * H + head) * K * p.v_dim;
  // segment s of this sequence in seg_state [N * max_segs, H, K, V] and seg_decay [N * max_segs, H, K]
  auto seg_row = [&](int s) { return (static_cast<int64_t>(seq) * p.max_segs + s) * H + head; };

  // st[nt][0..1] = S (srow, n0 + 8 nt + 2 t4 + {0, 1}), srow = 64 half + 16 sub + g; [2..3] row + 8;
  // state_at: where they live in an fp32 [.., K, V] state whose (K, V) matrix starts at `base`
  const int srow = 64 * half + 16 * sub + g;
  auto state_at = [&](int nt, int h2, int64_t base) {
    return base + static_cast<int64_t>(srow + 8 * h2) * p.v_dim + n0 + 8 * nt + 2 * t4;
  };
  float st[NT8][4];
#pragma unroll
  for (int nt = 0; nt < NT8; ++nt) {
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) {
      float2 v = make_float2(0.f, 0.f);
      if (!kStateOnly && p.init != nullptr) v = *reinterpret_cast<const float2*>(p.init + state_at(nt, h2, state_base));
      st[nt][2 * h2] = v.x;
      st[nt][2 * h2 + 1] = v.y;
    }
  }
  if constexpr (!kStateOnly) {
    // the state entering segment seg: the pass-1 results of the segments walked before it folded
    // in walk order (forward: 0 .. seg - 1; reverse: the last one down to seg + 1),
    // S <- exp(d_s) S + L_s with d_s the segment's log-decay of the row's key
    const int nfold = kReverse ? nsegs - 1 - seg : seg;
    for (int f = 0; f < nfold; ++f) {
      const int s = kReverse ? nsegs - 1 - f : f;
      const int64_t base = seg_row(s) * K * p.v_dim;
#pragma unroll
      for (int h2 = 0; h2 < 2; ++h2) {
        const float decay = __expf(p.seg_decay[seg_row(s) * K + srow + 8 * h2]);
#pragma unroll
        for (int nt = 0; nt < NT8; ++nt) {
          const float2 l = *reinterpret_cast<const float2*>(p.seg_state + state_at(nt, h2, base));
          st[nt][2 * h2] = fmaf(decay, st[nt][2 * h2], l.x);
          st[nt][2 * h2 + 1] = fmaf(decay, st[nt][2 * h2 + 1], l.y);
        }
      }
    }
  }
  float seg_log_decay[2] = {0.f, 0.f};  // pass 1: the sums of the segment's b_L for rows srow, srow + 8

  auto chunk_start = [&](int i) { return sr.bos + static_cast<int64_t>(i) * kChunk; };
  auto chunk_rows = [&](int i) {
    return static_cast<int>(min(static_cast<int64_t>(kChunk), sr.eos - chunk_start(i)));
  };
  auto issue_qkv = [&](int i, int stage) {
    const int64_t start = chunk_start(i);
    const int rows = chunk_rows(i);
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      const int slab = stage * MT + m;
      if constexpr (!kStateOnly) {
        load_tile<kChunk, 64, kThreads>(sq + slab * kSlab, qg + start * ldk + 64 * m, ldk, rows, tid);
      }
      load_tile<kChunk, 64, kThreads>(sk + slab * kSlab, kg + start * ldk + 64 * m, ldk, rows, tid);
    }
    load_tile<kChunk, BV, kThreads>(sv + stage * kChunk * BV, vg + start * ldv, ldv, rows, tid);
  };
  auto issue_gates = [&](int i) {
    const int64_t start = chunk_start(i);
    const int rows = chunk_rows(i);
#pragma unroll
    for (int m = 0; m < MT; ++m) {
      if (raw) {
        load_gate_tile<kThreads, true>(sg + m * kGateTileFloats, bg + start * ldk + 64 * m, ldk, rows, tid);
      } else {
        load_gate_tile<kThreads>(sg + m * kGateTileFloats, bg + start * ldk + 64 * m, ldk, rows, tid);
      }
    }
  };

  // the walk: step `it` takes chunk chunk_of(it) (reverse: from the segment's last chunk down)
  const int nwalk = c_end - c_begin;
  auto chunk_of = [&](int it) { return kReverse ? c_end - 1 - it : c_begin + it; };
  if (nwalk > 0) {
    issue_qkv(chunk_of(0), 0);
    issue_gates(chunk_of(0));
  }
  cp_async_commit();
  for (int it = 0; it < nwalk; ++it) {
    const int i = chunk_of(it), stage = it & 1;
    // ---- 0. the next chunk's q, k, v into the other stage (free since the end of the step before)
    if (it + 1 < nwalk) issue_qkv(chunk_of(it + 1), stage ^ 1);
    cp_async_commit();
    const int64_t row0 = chunk_start(i);
    const int rows = chunk_rows(i);
    cp_async_wait<1>();  // all but the group just issued: chunk i's q, k, v and gates (this thread's copies)
    // ---- 1. S_c as an MMA operand, in the input dtype
    if constexpr (!kStateOnly) {
#pragma unroll
      for (int nt = 0; nt < NT8; ++nt) {
#pragma unroll
        for (int h2 = 0; h2 < 2; ++h2) {
          *reinterpret_cast<uint32_t*>(ss + swz<BV>(srow + 8 * h2, 8 * nt + 2 * t4)) =
              E::pack(st[nt][2 * h2], st[nt][2 * h2 + 1]);
        }
      }
    }
    __syncthreads();  // the tiles (every thread's copies) and ss are visible
    if (raw) {  // raw gates: b by one thread per key column (warps 0..3), then visible to all
      if (tid < K) {
        scan_gate_column(sg + (tid >> 6) * kGateTileFloats, tid & 63,
                         bout != nullptr ? bout + row0 * ldk + tid : nullptr, ldk, rows);
      }
      __syncthreads();
    }
    if (!kStateOnly && p.h_out != nullptr) {
      // S_c as chunk_state stores it (the state entering chunk i, in the input dtype), for the
      // backward: ss (swizzled 16-byte groups) -> h_out[slot i] rows, coalesced 16-byte stores
      T* hrow = static_cast<T*>(p.h_out) + (static_cast<int64_t>(sr.first_slot + i) * H + head) * K * p.v_dim + n0;
#pragma unroll
      for (int j = 0; j < K * BV / 8 / kThreads; ++j) {
        const int idx = tid + j * kThreads, r = idx / (BV / 8), c = (idx % (BV / 8)) * 8;
        *reinterpret_cast<uint4*>(hrow + static_cast<int64_t>(r) * p.v_dim + c) =
            *reinterpret_cast<const uint4*>(ss + swz<BV>(r, c));
      }
    }
    T* qs = sq + stage * MT * kSlab;
    const T* ks = sk + stage * MT * kSlab;
    const T* vs = sv + stage * kChunk * BV;

    // ---- 2. A's partial over key slab `half` for the rows of sub-chunk `sub`; q e^b in place
    float s[8][4];  // A: 16 rows x 64 chunk columns (this slab's part)
    zero_frags(s);
    if constexpr (!kStateOnly) {
      T* qm = qs + half * kSlab;
      const T* km = ks + half * kSlab;
      const float* gt = sg + half * kGateTileFloats;
      // the diagonal block, elementwise (before q's quadrant is overwritten below)
      gla_add_diag<kReverse, E>(s, qm, km, gt, sub, lane);
#pragma unroll 1
      for (int kk = 0; kk < 4; ++kk) {
        // the blocks off the diagonal (reverse: right of it); ai: q e^b (reverse: e^(b_L - b))
        uint32_t ai[4];
        gla_rebased_step<kReverse, E>(s, ai, qm, km, gt, sub, kk, lane);
        // q e^b over q's own entries: only this warp reads this quadrant (its rows, this slab)
        __syncwarp();  // every lane's ldmatrix of step kk is done
#pragma unroll
        for (int i4 = 0; i4 < 4; ++i4) {
          const int r = sub * kSub + g + 8 * (i4 & 1), d = kk * 16 + 2 * t4 + 8 * (i4 >> 1);
          *reinterpret_cast<uint32_t*>(qm + swz<64>(r, d)) = ai[i4];
        }
      }
    }
    if constexpr (!kStateOnly) __syncthreads();  // q e^b of both slabs is in the q tile

    // ---- 3. the inter-chunk part: (q e^b) (16 x 128) times S_c (128 x this warp's 64 columns)
    float o[NO8][4];  // 16 rows x 64 columns
    zero_frags(o);
#pragma unroll
    for (int m = 0; m < (kStateOnly ? 0 : MT); ++m) {
#pragma unroll
      for (int kk = 0; kk < 4; ++kk) {
        uint32_t ae[4];
        load_a<64>(ae, qs + m * kSlab, sub * kSub, kk * 16, lane);
        // columns 64 half ..: swz<128>(r, 64 half + c) = swz<128>(r, c) + 64 half
        mma_b<E, BV, BLayout::kKN>(o, ae, ss + 64 * half, 64 * m + kk * 16, lane);
      }
    }

    // ---- 4. the state leaving the chunk: rows srow, srow + 8 (key slab half), all 128 columns
    {
      const float* gt = sg + half * kGateTileFloats;
      const int kr = 16 * sub + g;  // the rows' keys inside the slab
      float blr[2];
#pragma unroll
      for (int h2 = 0; h2 < 2; ++h2) {
        blr[h2] = gt[gate_at(kChunk - 1, kr + 8 * h2)];
        seg_log_decay[h2] += blr[h2];
        const float decay = __expf(blr[h2]);
#pragma unroll
        for (int nt = 0; nt < NT8; ++nt) {
          st[nt][2 * h2] *= decay;
          st[nt][2 * h2 + 1] *= decay;
        }
      }
#pragma unroll 1
      for (int kk = 0; kk < kChunk / 16; ++kk) {
        uint32_t a[4];  // (k * w)^T (state rows srow .., chunk rows 16 kk ..)
        load_a_t<64>(a, ks + half * kSlab, 16 * sub, kk * 16, lane);
#pragma unroll
        for (int i4 = 0; i4 < 4; ++i4) {
          const int r = kr + 8 * (i4 & 1), j = kk * 16 + 2 * t4 + 8 * (i4 >> 1);
          const float2 f = E::unpack(a[i4]);
          const float b0 = gt[gate_at(j, r)], b1 = gt[gate_at(j + 1, r)];
          if constexpr (kReverse) {  // scale * exp(b_j)
            a[i4] = E::pack(f.x * (p.scale * __expf(b0)), f.y * (p.scale * __expf(b1)));
          } else {                   // exp(b_L - b_j)
            a[i4] = E::pack(f.x * __expf(blr[i4 & 1] - b0), f.y * __expf(blr[i4 & 1] - b1));
          }
        }
#pragma unroll
        for (int np = 0; np < NT8 / 2; ++np) {
          uint32_t b[4];
          load_b_kn<BV>(b, vs, kk * 16, np * 16, lane);
          E::mma(st[2 * np], a, b[0], b[1]);
          E::mma(st[2 * np + 1], a, b[2], b[3]);
        }
      }
    }
    __syncthreads();  // every warp is done with ss (step 3) and the gates (steps 2, 4)
    if (it + 1 < nwalk) issue_gates(chunk_of(it + 1));
    cp_async_commit();
    if constexpr (kStateOnly) continue;  // (the barrier above also frees the stage)

    // ---- 5. A = the two slabs' partials, through the exchange (ss's bytes)
    {
      float4* mine = reinterpret_cast<float4*>(sx) + warp * 8 * 32;
      const float4* other = reinterpret_cast<const float4*>(sx) + (warp ^ 4) * 8 * 32;
      // the n tiles of A that can be nonzero: up to the diagonal block (reverse: from it on)
      auto kept = [&](int j) { return kReverse ? j >= 2 * sub : j <= 2 * sub + 1; };
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if (!kept(j)) continue;
        mine[j * 32 + lane] = make_float4(s[j][0], s[j][1], s[j][2], s[j][3]);
      }
      asm volatile("bar.sync %0, %1;\n" ::"r"(1 + sub), "n"(64) : "memory");  // the pair's partials are written
#pragma unroll
      for (int j = 0; j < 8; ++j) {
        if (!kept(j)) continue;
        const float4 x = other[j * 32 + lane];
        s[j][0] += x.x;
        s[j][1] += x.y;
        s[j][2] += x.z;
        s[j][3] += x.w;
      }
    }

    // ---- 6. o = scale * inter + (scale * A) v (reverse: dv = inter + (scale * A^T) do); rows past
    // the end of the sequence are not written
    if constexpr (!kReverse) {
#pragma unroll
      for (int nt = 0; nt < NO8; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) o[nt][e] *= p.scale;
      }
    }
    gla_add_scores_times<kReverse, E, BV>(o, s, p.scale, vs + 64 * half, sub, lane);
    T* orow = og + row0 * ldv;
#pragma unroll
    for (int h2 = 0; h2 < 2; ++h2) {
      const int r = sub * kSub + g + 8 * h2;
      if (r < rows) {
#pragma unroll
        for (int nt = 0; nt < NO8; ++nt) {
          *reinterpret_cast<uint32_t*>(orow + r * ldv + nt * 8 + 2 * t4) = E::pack(o[nt][2 * h2], o[nt][2 * h2 + 1]);
        }
      }
    }
    __syncthreads();  // the stage's q, k, v and the exchange are free before they are rewritten
  }
  cp_async_wait<0>();

  if constexpr (kStateOnly) {  // this segment's local state and per-key log-decay
    const int64_t base = seg_row(seg) * K * p.v_dim;
#pragma unroll
    for (int nt = 0; nt < NT8; ++nt) {
#pragma unroll
      for (int h2 = 0; h2 < 2; ++h2) {
        *reinterpret_cast<float2*>(p.seg_state + state_at(nt, h2, base)) = make_float2(st[nt][2 * h2], st[nt][2 * h2 + 1]);
      }
    }
    if (blockIdx.z == 0 && t4 == 0) {  // the same in every V tile
      p.seg_decay[seg_row(seg) * K + srow] = seg_log_decay[0];
      p.seg_decay[seg_row(seg) * K + srow + 8] = seg_log_decay[1];
    }
  } else if (p.final_state != nullptr && seg == (kReverse ? 0 : nsegs - 1)) {
#pragma unroll
    for (int nt = 0; nt < NT8; ++nt) {
#pragma unroll
      for (int h2 = 0; h2 < 2; ++h2) {
        *reinterpret_cast<float2*>(p.final_state + state_at(nt, h2, state_base)) =
            make_float2(st[nt][2 * h2], st[nt][2 * h2 + 1]);
      }
    }
  }
}

template <typename Kernel>
cudaError_t launch_gla_fused(Kernel kernel, int smem, int threads, dim3 grid, const GlaFusedParams& p,
                             cudaStream_t stream) {
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, threads, smem, stream>>>(p);
  return cudaGetLastError();
}

// The 256-thread kernel's launches (grid: sequences x segments, heads, V tiles; with segments,
// pass 1 first), forward or reverse.
template <typename Tag, bool kReverse>
cudaError_t launch_gla_fused_wide(const GlaFusedParams& p, cudaStream_t stream) {
  const dim3 grid(p.seq.num_seqs * p.max_segs, p.seq.heads, p.v_dim / 128);
  constexpr int smem = gla_fused_wide_smem_bytes();
  if (p.max_segs > 1) {  // segments: pass 1, the local states
    if (p.seg_chunks < 1 || p.seg_state == nullptr || p.seg_decay == nullptr) return cudaErrorInvalidValue;
    const cudaError_t err = launch_gla_fused(gla_fused_fwd_wide_kernel<Tag, true, kReverse>, smem,
                                             kGlaFusedWideThreads, grid, p, stream);
    if (err != cudaSuccess) return err;
  }
  return launch_gla_fused(gla_fused_fwd_wide_kernel<Tag, false, kReverse>, smem, kGlaFusedWideThreads, grid, p,
                          stream);
}

// K = 128 with BV = 128 (tile_size.h: gla_fused_tile_v) takes gla_fused_fwd_wide_kernel, every
// other (K, BV) gla_fused_fwd_kernel (grid: sequences, heads, V tiles; b only, no segments).
template <typename Tag, int K, int BV>
cudaError_t run_gla_fused_fwd(const GlaFusedParams& p, cudaStream_t stream) {
  if (p.seq.num_seqs == 0 || p.seq.heads == 0 || p.v_dim == 0) return cudaSuccess;
  if (p.k_dim != K || p.v_dim % BV != 0 || (p.b == nullptr) == (p.g == nullptr) || p.max_segs < 1) {
    return cudaErrorInvalidValue;
  }
  if constexpr (K == 128 && BV == 128) {
    return launch_gla_fused_wide<Tag, false>(p, stream);
  } else {
    if (p.b == nullptr || p.max_segs > 1) return cudaErrorInvalidValue;
    return launch_gla_fused(gla_fused_fwd_kernel<Tag, K, BV>, gla_fused_smem_bytes<K, BV>(), kGlaFusedThreads,
                            dim3(p.seq.num_seqs, p.seq.heads, p.v_dim / BV), p, stream);
  }
}

// GLA's backward reverse pass in one kernel (the 256-thread kernel with kReverse, K = 128, V a
// multiple of 128), given the roles q = k, k = q, v = do, b = the forward's cumulative gates
// (raw gates are not taken), init = dh_T, out = dv, final_state = dh_0, h_out = dH:
//   dv_j = sum_{r >= j} scale A_rj do_r + (k_j * exp(b_L - b_j)) dH_c
//   dH_{c-1} = diag(exp(b_L)) dH_c + scale * sum_r (q_r * exp(b_r))^T do_r
// which is chunk_state (reverse, gk_cum = b) + gla_output (upper, inter 1, intra scale) with the
// states kept in registers; h_out gets dH_c at chunk c's slot as chunk_state stores it.
template <typename Tag>
cudaError_t run_gla_fused_reverse(const GlaFusedParams& p, cudaStream_t stream) {
  if (p.seq.num_seqs == 0 || p.seq.heads == 0 || p.v_dim == 0) return cudaSuccess;
  if (p.k_dim != 128 || p.v_dim % 128 != 0 || p.b == nullptr || p.g != nullptr || p.b_out != nullptr ||
      p.max_segs < 1) {
    return cudaErrorInvalidValue;
  }
  return launch_gla_fused_wide<Tag, true>(p, stream);
}

}  // namespace linear_attn
