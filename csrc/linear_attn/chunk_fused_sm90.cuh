// chunk_fused_fwd on sm90a: the same one-pass simple-GLA forward as chunk_fused.cuh (same grid,
// segments, shared-memory stages, h_out, the same roundings of S_c, P and w v to the input dtype),
// with its products as warpgroup MMAs (wgmma) instead of mma.sync. One CTA = one warpgroup of 128
// threads. Per chunk (b = chunk-local cumulative log-gate, L its last row):
//
//   scores  A   = q k^T                      64 x 64 x K      SS (q, k K-major)
//   inter   O   = q S_c                      64 x BV x K      SS (S_c written by the CTA, read MN-major)
//   state   S  <- exp(b_L) S + k^T (w v)     K x BV x 64      SS (k^T and w v read MN-major)
//   intra   O  <- scale exp(b_r) O + P v     64 x BV x 64     RS: P = scale * D * A, the scores'
//                                                            accumulators rounded in place to the
//                                                            A-register layout, v read MN-major
//
// with w_j = exp(b_L - b_j) and D_rj = exp(b_r - b_j) for j <= r (0 above). The fp32 state lives
// in the wgmma accumulators of the K x BV product: K / 64 tiles of 64 x BV, K * BV / 128 registers
// per thread (64 at K 128, BV 64 and at K 256, BV 32), next to 64 x BV of O and 64 x 64 of A.
// w v is the only operand the CTA builds besides S_c: v's tile scaled row by row into a second
// tile, where the mma.sync kernel scales its B fragments in registers (the same bf16 products).
//
// Shared memory: every 16-bit tile in the 128-byte (64-byte at 32 columns) swizzled layout wgmma
// reads, each row's 16-byte groups permuted; tiles start at multiples of 1024 bytes. The chunk's
// tiles arrive by cp.async (generic proxy), so a proxy fence precedes the barrier that hands them,
// and the CTA's own S_c and w v stores, to the wgmmas (async proxy).
//   [q stages][k stages][v stages][w v][S_c][gate stages][b]
//   K 64,  BV 64, 2 stages:  2 * (8 + 8 + 8 KB) + 8 + 8 KB + 768 B  = 64.75 KB
//   K 128, BV 64, 2 stages:  2 * (16 + 16 + 8 KB) + 8 + 16 KB + 768 B = 104.75 KB (two CTAs per SM)
//   K 256, BV 32, 1 stage:   32 + 32 + 4 + 4 + 16 KB + 512 B        = 88.5 KB (two CTAs per SM)
// Pass 1 of the segments (kStateOnly) has no q tiles, no S_c and no output.
//
// Per chunk i:
//   1. wait for chunk i's tiles; warp 0 scans the gates into b; S_c (rounded) into its tile;
//      fence + barrier
//   2. issue A = q k^T and O = q S_c; meanwhile w v into its tile (exp per row); fence + barrier
//   3. S *= exp(b_L), issue S += k^T (w v)
//   4. wait for A: P in registers; wait for O: rows scaled; issue O += P v; wait for all; store O
//   5. barrier (the stage, S_c, w v and b are free for chunk i + 1)
#pragma once

#include <type_traits>

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/numeric_types.h>

#include "chunk_info.cuh"
#include "mma.cuh"
#include "sm90_mma.cuh"
#include "sm90_tiles.h"

namespace linear_attn {

// Stages of (q, k, v, gates): two, except the output pass at K = 256 (one: two CTAs per SM).
template <int K, bool kStateOnly = false>
constexpr int chunk_fused_stages() { return K == 256 && !kStateOnly ? 1 : 2; }

namespace sm90 {

using namespace cute;

// kWG warpgroups per CTA, each with its own V tile of BV columns (its state, S_c, v and w v tiles)
// and sharing the q, k and gate tiles: two at K = 256, whose q and k then fill shared memory once
// for two V tiles and leave room for two stages (one CTA of two warpgroups per SM instead of two
// CTAs of one stage each).
template <int K, bool kStateOnly, int kWG>
constexpr int chunk_fused_sm90_stages() { return kWG == 2 ? 2 : chunk_fused_stages<K, kStateOnly>(); }

template <typename Tag, int K, int BV, bool kStateOnly, int kWG>
struct FusedSm90Traits {
  using TC = typename CuteType<Tag>::type;
  static constexpr int kThreads = 128 * kWG;
  static constexpr int kStages = chunk_fused_sm90_stages<K, kStateOnly, kWG>();
  using Q = StagedTile<TC, kChunk, K, kStages>;        // q, k: (chunk row, key) per stage
  using V = StagedTile<TC, kChunk, BV, kStages * kWG>;  // v: (chunk row, column) per stage and warpgroup
  using Vw = StagedTile<TC, kChunk, BV, kWG>;           // w v per warpgroup
  using St = StagedTile<TC, K, BV, kWG>;                // S_c: (key, column) per warpgroup

  // A = q k^T: (chunk row, chunk row) over the keys
  using MmaScores = decltype(make_tiled_mma(
      GMMA::ss_op_selector<TC, TC, float, Shape<_64, _64, Int<K>>, GMMA::Major::K, GMMA::Major::K>()));
  // O = q S_c: (chunk row, column) over the keys; S_c read as (column, key)
  using MmaInter = decltype(make_tiled_mma(
      GMMA::ss_op_selector<TC, TC, float, Shape<_64, Int<BV>, Int<K>>, GMMA::Major::K, GMMA::Major::MN>()));
  // O += P v: (chunk row, column) over the chunk rows; P from registers, v read as (column, row)
  using MmaIntra = decltype(make_tiled_mma(
      GMMA::rs_op_selector<TC, TC, float, Shape<_64, Int<BV>, _64>, GMMA::Major::K, GMMA::Major::MN>()));
  // S += k^T (w v): (key, column) over the chunk rows; k read as (key, row), w v as (column, row)
  using MmaState = decltype(make_tiled_mma(
      GMMA::ss_op_selector<TC, TC, float, Shape<_64, Int<BV>, _64>, GMMA::Major::MN, GMMA::Major::MN>()));

  static constexpr int kOffQ = 0;
  static constexpr int kOffK = kOffQ + (kStateOnly ? 0 : Q::kBytes);
  static constexpr int kOffV = kOffK + Q::kBytes;
  static constexpr int kOffVw = kOffV + V::kBytes;
  static constexpr int kOffS = kOffVw + Vw::kBytes;
  static constexpr int kOffGate = kOffS + (kStateOnly ? 0 : St::kBytes);
  static constexpr int kOffB = kOffGate + kStages * kChunk * 4;
  // two warpgroups: each computes the scores over half of the keys and hands its fp32 partial
  // (64 x 64) to the other through here
  static constexpr bool kSplitScores = kWG == 2 && !kStateOnly;
  static constexpr int kOffX = kOffB + kChunk * 4;
  static constexpr int kSmemBytes = kOffX + (kSplitScores ? kWG * kChunk * kChunk * 4 : 0);
};

static_assert(FusedSm90Traits<Bf16, 128, 64, false, 1>::kSmemBytes == 107264, "K 128, BV 64: 104.75 KB");
static_assert(FusedSm90Traits<Bf16, 256, 32, false, 1>::kSmemBytes == 90624, "K 256, BV 32: 88.5 KB");
static_assert(FusedSm90Traits<Bf16, 256, 32, false, 2>::kSmemBytes == 221952, "K 256, 2 x BV 32: 216.75 KB");
static_assert(2 * (FusedSm90Traits<Bf16, 128, 64, false, 1>::kSmemBytes + 1024) <= 228 * 1024,
              "K 128, BV 64: two CTAs (1 KB reserved each) per SM");

template <typename Tag, int K, int BV, bool kStateOnly, int kWG>
__device__ __forceinline__ void chunk_fused_fwd_sm90_body(const ChunkFusedParams& p) {
  using Tr = FusedSm90Traits<Tag, K, BV, kStateOnly, kWG>;
  using E = Elem<Tag>;
  using T = typename E::T;
  using TC = typename Tr::TC;
  constexpr int kThreads = Tr::kThreads;
  constexpr int kStages = Tr::kStages;
  constexpr int MT = K / 64;  // 64-row tiles of the state
  static_assert(K == 64 || K == 128 || K == 256, "K is 64, 128 or 256");
  static_assert(BV == 32 || BV == 64, "V tiles of 32 or 64 columns");
  static_assert(K * BV / 8 % 128 == 0, "h_out's 16-byte groups split evenly over a warpgroup");
  // warpgroup wg of the CTA; per-warpgroup thread indices are tid_here() & 127 (wtid outside the loop)
  const int wg = kWG == 1 ? 0 : threadIdx.x >> 7;

  extern __shared__ __align__(1024) unsigned char smem_raw[];
  T* sq = reinterpret_cast<T*>(smem_raw + Tr::kOffQ);   // [stage] (chunk row, key)
  T* sk = reinterpret_cast<T*>(smem_raw + Tr::kOffK);   // [stage] (chunk row, key)
  T* sv = reinterpret_cast<T*>(smem_raw + Tr::kOffV) + wg * kChunk * BV;    // [stage][warpgroup] (chunk row, column)
  T* svw = reinterpret_cast<T*>(smem_raw + Tr::kOffVw) + wg * kChunk * BV;  // this warpgroup's (chunk row, column)
  T* ss = reinterpret_cast<T*>(smem_raw + Tr::kOffS) + wg * K * BV;         // S_c: (key, column)
  float* graw = reinterpret_cast<float*>(smem_raw + Tr::kOffGate);  // [stage][kChunk] raw gates
  float* sb = reinterpret_cast<float*>(smem_raw + Tr::kOffB);       // chunk-local cumulative log-gate
  // the same tiles as CuTe tensors, for the wgmma descriptors
  auto tile = [&](int offset, auto layout) {
    return make_tensor(make_smem_ptr(reinterpret_cast<TC*>(smem_raw + offset)), layout);
  };
  Tensor sQ = tile(Tr::kOffQ, typename Tr::Q::Layout{});     // (row, key, stage)
  Tensor sK = tile(Tr::kOffK, typename Tr::Q::Layout{});     // (row, key, stage)
  Tensor sKt = tile(Tr::kOffK, typename Tr::Q::LayoutT{});   // (key, row, stage)
  Tensor sVt = tile(Tr::kOffV, typename Tr::V::LayoutT{});   // (column, row, stage * kWG + warpgroup)
  Tensor sVwt = tile(Tr::kOffVw, typename Tr::Vw::LayoutT{})(_, _, wg);  // (column, row)
  Tensor sSt = tile(Tr::kOffS, typename Tr::St::LayoutT{})(_, _, wg);    // (column, key)

  const int tid = threadIdx.x, wtid = tid & 127;
  const int n0 = (blockIdx.z * kWG + wg) * BV;
  const FusedCta<T, K> cta(p, n0);
  if (cta.idle(kStateOnly)) return;

  // The state: MT accumulator tiles of 64 x BV (for_acc_pairs<MT, BV> gives their coordinates).
  typename Tr::MmaState mma_h;
  auto thr_h = mma_h.get_thread_slice(wtid);
  Tensor acc_h = partition_fragment_C(mma_h, Shape<Int<K>, Int<BV>>{});
  static_assert(decltype(size(acc_h))::value == K * BV / 128, "one warpgroup holds the state");
  Tensor tHrK = thr_h.partition_fragment_A(sKt);   // descriptors (MMA, MT, 4, stage)
  Tensor tHrVw = thr_h.partition_fragment_B(sVwt);  // (MMA, 1, 4)
  auto at = [&](int64_t base, int r, int c) { return base + static_cast<int64_t>(r) * p.v_dim + n0 + c; };

  for_acc_pairs<MT, BV>(wtid, [&](int i, int r, int c) {
    float2 v = make_float2(0.f, 0.f);
    if (!kStateOnly && p.init != nullptr) v = *reinterpret_cast<const float2*>(p.init + at(cta.state_base, r, c));
    acc_h(i) = v.x;
    acc_h(i + 1) = v.y;
  });
  if constexpr (!kStateOnly) {
    for (int s = 0; s < cta.walk.seg; ++s) {  // the state entering this segment (chunk_fused.cuh)
      const float decay = __expf(p.seg_decay[cta.seg_row(s)]);
      const int64_t base = cta.seg_row(s) * K * p.v_dim;
      for_acc_pairs<MT, BV>(wtid, [&](int i, int r, int c) {
        const float2 l = *reinterpret_cast<const float2*>(p.seg_state + at(base, r, c));
        acc_h(i) = fmaf(decay, acc_h(i), l.x);
        acc_h(i + 1) = fmaf(decay, acc_h(i + 1), l.y);
      });
    }
  }
  float seg_log_decay = 0.f;

  auto issue = [&](int i) {
    const int t = tid_here();
    const int stage = (i - cta.c_begin) % kStages;
    const int64_t start = cta.chunk_start(i);
    const int rows = cta.chunk_rows(i);
    if constexpr (!kStateOnly) {
      load_rows_async<K, kThreads>(sq + stage * kChunk * K, cta.qg + start * cta.ldk, cta.ldk, rows, t);
    }
    load_rows_async<K, kThreads>(sk + stage * kChunk * K, cta.kg + start * cta.ldk, cta.ldk, rows, t);
    load_rows_async<BV, 128>(sv + stage * kWG * kChunk * BV, cta.vg + start * cta.ldv, cta.ldv, rows, t & 127);
    if (t < 32) chunk_gate_load_async(p.gate, start, rows, cta.head, cta.heads, graw + stage * kChunk, t);
  };

  // S *= exp(b_L) before any wgmma of the chunk is in flight (ptxas serializes the wgmmas when
  // accumulator registers are touched while others run), then S += k^T (w v) (step 3)
  auto decay_state = [&](float decay) {
    CUTE_UNROLL
    for (int i = 0; i < size(acc_h); ++i) acc_h(i) *= decay;
    warpgroup_fence_operand(acc_h);  // (keeps the compiler from sinking the products past the next issue)
  };
  auto update_state = [&](int stage) { wgmma_issue<false>(mma_h, tHrK(_, _, _, stage), tHrVw, acc_h); };
  auto v_tile = [&](int stage) { return stage * kWG + wg; };  // this warpgroup's v tile in sv / sVt
  // w v (step 2): v's rows scaled by w_r = exp(b_L - b_r), 16-byte groups, GroupWalk's order
  auto write_wv = [&](int stage, float bl) {
    using W = GroupWalk<BV, 128>;
    const int t = tid_here() & 127;
    const int r0 = t / W::G, off0 = tile_offset<kChunk, BV>(r0, (t % W::G) * 8);
    const T* src = sv + stage * kWG * kChunk * BV + off0;
#pragma unroll
    for (int it = 0; it < W::kRows; ++it) {
      const int off = it * W::kRowStep * W::kRowStride;
      const float w = __expf(bl - sb[r0 + it * W::kRowStep]);
      uint4 u = *reinterpret_cast<const uint4*>(src + off);
      uint32_t* e = reinterpret_cast<uint32_t*>(&u);
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        const float2 f = E::unpack(e[q]);
        e[q] = E::pack(f.x * w, f.y * w);
      }
      *reinterpret_cast<uint4*>(svw + off0 + off) = u;
    }
  };

  if (cta.c_begin < cta.c_end) issue(cta.c_begin);
  cp_async_commit();
  for (int i = cta.c_begin; i < cta.c_end; ++i) {
    const int stage = (i - cta.c_begin) % kStages;
    if (kStages > 1 && i + 1 < cta.c_end) issue(i + 1);
    cp_async_commit();  // (one stage: an empty group, so that the wait below counts the same)
    const int64_t row0 = cta.chunk_start(i);
    const int rows = cta.chunk_rows(i);
    cp_async_wait<1>();
    {
      const int t = tid_here();
      if (t < 32) chunk_gate_scan(p.gate, graw + stage * kChunk, rows, cta.head, sb, t);
    }

    if constexpr (kStateOnly) {
      cutlass::arch::fence_view_async_shared();
      __syncthreads();  // the stage's tiles and b
      const float bl = sb[kChunk - 1];
      seg_log_decay += bl;
      decay_state(__expf(bl));
      write_wv(stage, bl);
      cutlass::arch::fence_view_async_shared();
      __syncthreads();  // w v
      update_state(stage);
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc_h);
    } else {
      // ---- 1. S_c, rounded, as the B operand of q S_c
      for_acc_pairs<MT, BV>(tid_here() & 127, [&](int j, int r, int c) {
        *reinterpret_cast<uint32_t*>(ss + tile_offset<K, BV>(r, c)) = E::pack(acc_h(j), acc_h(j + 1));
      });
      cutlass::arch::fence_view_async_shared();
      __syncthreads();  // the stage's tiles, b and S_c
      const float bl = sb[kChunk - 1];
      decay_state(__expf(bl));
      // ---- 2. A = q k^T and O = q S_c; h_out and w v meanwhile
      typename Tr::MmaScores mma_a;
      typename Tr::MmaInter mma_o;
      typename Tr::MmaIntra mma_pv;
      auto thr_a = mma_a.get_thread_slice(wtid);
      auto thr_o = mma_o.get_thread_slice(wtid);
      auto thr_pv = mma_pv.get_thread_slice(wtid);
      Tensor acc_a = partition_fragment_C(mma_a, Shape<_64, _64>{});
      Tensor acc_o = partition_fragment_C(mma_o, Shape<_64, Int<BV>>{});
      if constexpr (Tr::kSplitScores) {  // keys [wg K / 2, (wg + 1) K / 2): half the K slices
        wgmma_issue<true, K / 32>(mma_a, thr_a.partition_fragment_A(sQ)(_, _, _, stage),
                                  thr_a.partition_fragment_B(sK)(_, _, _, stage), acc_a, wg * (K / 32));
      } else {
        wgmma_issue<true>(mma_a, thr_a.partition_fragment_A(sQ)(_, _, _, stage),
                          thr_a.partition_fragment_B(sK)(_, _, _, stage), acc_a);
      }
      wgmma_issue<true>(mma_o, thr_o.partition_fragment_A(sQ)(_, _, _, stage), thr_o.partition_fragment_B(sSt),
                        acc_o);
      if (p.h_out != nullptr) {
        // S_c as chunk_state stores it (the state entering chunk i), for the backward
        T* hrow = static_cast<T*>(p.h_out) + cta.slot_row(i) * K * p.v_dim + n0;
        const int t = tid_here() & 127;
#pragma unroll 1
        for (int j = 0; j < K * BV / 8 / 128; ++j) {
          const int idx = t + j * 128, r = idx / (BV / 8), c = (idx % (BV / 8)) * 8;
          *reinterpret_cast<uint4*>(hrow + static_cast<int64_t>(r) * p.v_dim + c) =
              *reinterpret_cast<const uint4*>(ss + tile_offset<K, BV>(r, c));
        }
      }
      write_wv(stage, bl);
      cutlass::arch::fence_view_async_shared();
      __syncthreads();  // w v
      // ---- 3. the state leaving the chunk
      update_state(stage);
      // ---- 4. P = scale * D * A in the A-register layout of P v (the accumulator's element order)
      Tensor tPa = p_fragment<TC>(thr_pv);
      uint32_t* pa = p_words(tPa);
      warpgroup_wait<2>();  // A (O and the state may still run)
      warpgroup_fence_operand(acc_a);
      if constexpr (Tr::kSplitScores) {
        // this warpgroup's partial scores out, the other's in: [warpgroup][element][thread], so
        // that a warp's 32 threads touch 32 consecutive floats
        float* xs = reinterpret_cast<float*>(smem_raw + Tr::kOffX);
        constexpr int kElems = kChunk * kChunk / 128;
        const int t = tid_here() & 127;
        CUTE_UNROLL
        for (int e = 0; e < kElems; ++e) xs[(wg * kElems + e) * 128 + t] = acc_a(e);
        __syncthreads();  // both partials
        CUTE_UNROLL
        for (int e = 0; e < kElems; ++e) acc_a(e) += xs[((1 - wg) * kElems + e) * 128 + t];
      }
      {
        const int t = tid_here() & 127;
        const int warp_last_row = 16 * (t >> 5) + 15;
        for_acc_pairs<1, 64>(t, [&](int j, int r, int c) {
          float p0 = 0.f, p1 = 0.f;
          if ((c & ~7) <= warp_last_row) {  // (whole 8-column blocks above the warp's rows are 0)
            const float br = sb[r];
            if (c <= r) p0 = acc_a(j) * p.scale * __expf(br - sb[c]);
            if (c + 1 <= r) p1 = acc_a(j + 1) * p.scale * __expf(br - sb[c + 1]);
          }
          pa[j / 2] = E::pack(p0, p1);
        });
      }
      warpgroup_wait<1>();  // q S_c
      warpgroup_fence_operand(acc_o);
      {
        const int t = tid_here() & 127;
        const int r0 = 16 * (t >> 5) + ((t & 31) >> 2);
        const float rs[2] = {p.scale * __expf(sb[r0]), p.scale * __expf(sb[r0 + 8])};
        for_acc_pairs<1, BV>(t, [&](int j, int r, int c) {
          acc_o(j) *= rs[r != r0];
          acc_o(j + 1) *= rs[r != r0];
        });
      }
      wgmma_issue<false>(mma_pv, tPa, thr_pv.partition_fragment_B(sVt)(_, _, _, v_tile(stage)), acc_o);
      warpgroup_wait<0>();
      warpgroup_fence_operand(acc_o);
      warpgroup_fence_operand(acc_h);
      T* orow = cta.og + row0 * cta.ldv;
      for_acc_pairs<1, BV>(tid_here() & 127, [&](int j, int r, int c) {
        if (r < rows) *reinterpret_cast<uint32_t*>(orow + r * cta.ldv + c) = E::pack(acc_o(j), acc_o(j + 1));
      });
    }
    __syncthreads();  // the stage, S_c, w v and b are free
    if (kStages == 1 && i + 1 < cta.c_end) {
      issue(i + 1);
      cp_async_commit();
    }
  }
  cp_async_wait<0>();

  if constexpr (kStateOnly) {
    const int64_t base = cta.seg_row(cta.walk.seg) * K * p.v_dim;
    for_acc_pairs<MT, BV>(wtid, [&](int i, int r, int c) {
      *reinterpret_cast<float2*>(p.seg_state + at(base, r, c)) = make_float2(acc_h(i), acc_h(i + 1));
    });
    if (blockIdx.z == 0 && tid == 0) p.seg_decay[cta.seg_row(cta.walk.seg)] = seg_log_decay;
  } else if (p.final_state != nullptr && cta.walk.seg == cta.nsegs - 1) {
    for_acc_pairs<MT, BV>(wtid, [&](int i, int r, int c) {
      *reinterpret_cast<float2*>(p.final_state + at(cta.state_base, r, c)) = make_float2(acc_h(i), acc_h(i + 1));
    });
  }
}

// The body exists only in sm90a code; launch_chunk_fused runs it only where the device executes
// that code (chunk_fused_sm90_runs).
template <typename Tag, int K, int BV, bool kStateOnly, int kWG>
__global__ void __launch_bounds__(128 * kWG) chunk_fused_fwd_sm90_kernel(const __grid_constant__ ChunkFusedParams p) {
#if defined(__CUDA_ARCH__) && defined(CUTE_ARCH_MMA_SM90A_ENABLED)
  chunk_fused_fwd_sm90_body<Tag, K, BV, kStateOnly, kWG>(p);
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

}  // namespace sm90
}  // namespace linear_attn
