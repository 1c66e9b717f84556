// The backward kernels on sm90a with warpgroup MMAs (wgmma): dK/dV and the deterministic path's
// dQ at head dims 64, 128 and 256.
//
// Same algorithm as compute_dk_dv_tile (flash_bwd_kernel.h): one CTA per (key block of 128 (64 at
// d = 256, see BwdSm90Traits), sequence, query head) keeps K and V in shared memory and walks the query blocks that see
// them, last first. Two warpgroups; warpgroup w owns keys [64 w, 64 w + 64) of the block.
// Per query block of kBlockM rows:
//   S^T  = K Q^T,  dP^T = V dO^T      SS wgmma (operands in shared memory), (keys, queries)
//   P^T, dS^T in registers            the accumulators of S^T / dP^T, elementwise
//   dV += P^T dO,  dK += dS^T Q       RS wgmma: P^T / dS^T straight from registers (the
//                                     accumulator layout of a 64 x N wgmma is the A-register
//                                     layout of a 64 x . x N one), Q / dO read transposed
//   dQ  = dS K  (Accum_dq)            SS wgmma from dS^T staged in shared memory (the other
//                                     warpgroup's keys are needed), then fp32 atomics.
// The query tiles are loaded with cp.async (two stages) into the 128-byte-swizzled K-major
// layout wgmma reads; the transposed views for dV, dK and dQ are the same bytes read as
// MN-major operands. Loads by cp.async and the dS^T stores are generic-proxy writes, so a
// proxy fence precedes the barrier that hands them to the wgmmas (async proxy).
#pragma once

#include <cmath>
#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>

#include "block_info.h"
#include "dropout.h"
#include "epilogue.h"
#include "flash.h"
#include "flash_bwd_kernel.h"
#include "kernel_traits.h"
#include "score_mod.h"
#include "utils.h"

namespace flash {

using namespace cute;

// kBlockM: queries per step (64 at d = 128, 128 at d = 64: then S^T and dP^T hold 64 fp32 per
// thread each, dK and dV 32; at d = 128 the other way round, 32 and 64).
// d = 256 (kSplitD): 64 x 256 fp32 of dK plus as much of dV would be 256 registers per thread of
// one warpgroup, so the CTA keeps 64 keys and the warpgroups split the products the other way:
// S^T, dP^T by query halves (64 keys x 32 queries each), P^T and dS^T through shared memory, dV
// and dK by halves of d (64 keys x 128 each, SS wgmma): 16 + 16 + 64 + 64 fp32 per thread.
template <int kHeadDim_, typename Element_, int kBlockM_ = kHeadDim_ == 64 ? 128 : 64>
struct BwdSm90Traits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr bool kSplitD = kHeadDim_ == 256;
  static constexpr int kBlockN = kSplitD ? 64 : 128;  // keys per CTA (64 per warpgroup unless kSplitD)
  static constexpr int kBlockM = kBlockM_;
  static constexpr int kNWarps = 8;
  static constexpr int kNThreads = 256;
  static constexpr int kStages = 2;
  static_assert(kHeadDim == 64 || kHeadDim == 128 || kHeadDim == 256);
  static_assert(kBlockM == 64 || kBlockM == 128);
  // Global <-> shared copies and the epilogue: the mma.sync traits' atoms for 256 threads.
  using CopyBase = MmaCopyTraits<kHeadDim, Element, kNWarps>;
  using GmemTiledCopyQKV = typename CopyBase::GmemTiledCopyQKV;
  using GmemTiledCopyO = typename CopyBase::GmemTiledCopyO;
  using SmemCopyAtomO = typename CopyBase::SmemCopyAtomO;

  using Atom = GMMA::Layout_K_SW128_Atom<Element>;  // 8 rows x 64 elements, 128-byte swizzle
  using SmemLayoutK = decltype(tile_to_shape(Atom{}, Shape<Int<kBlockN>, Int<kHeadDim>>{}));  // (N, D)
  using SmemLayoutKt = decltype(composition(
      SmemLayoutK{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockN>>{}, Stride<Int<kBlockN>, _1>{})));  // (D, N)
  using SmemLayoutQ = decltype(tile_to_shape(Atom{}, Shape<Int<kBlockM>, Int<kHeadDim>, Int<kStages>>{}));
  using SmemLayoutQt = decltype(composition(
      SmemLayoutQ{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockM>, Int<kStages>>{},
                                 Stride<Int<kBlockM>, _1, Int<kBlockM * kHeadDim>>{})));  // (D, M, stages)
  using SmemLayoutdSt = decltype(tile_to_shape(Atom{}, Shape<Int<kBlockN>, Int<kBlockM>>{}));  // (N, M)
  using SmemLayoutdS = decltype(composition(
      SmemLayoutdSt{}, make_layout(Shape<Int<kBlockM>, Int<kBlockN>>{}, Stride<Int<kBlockN>, _1>{})));  // (M, N)

  // How the warpgroups split the (N, M) score tiles and the (N, D) gradient tiles.
  using WgLayout = std::conditional_t<kSplitD, Layout<Shape<_1, _2, _1>>, Layout<Shape<_2, _1, _1>>>;
  // S^T, dP^T: (N, M) over K = D; each warpgroup 64 keys (kSplitD: 32 queries).
  using TiledMmaSdP = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kSplitD ? kBlockM / 2 : kBlockM>, Int<kHeadDim>>,
                           GMMA::Major::K, GMMA::Major::K>(),
      WgLayout{}));
  // dV, dK: (N, D) over K = M; B = dO^T / Q^T (MN-major); A = P^T / dS^T from registers, or
  // (kSplitD) from shared memory (K-major).
  using AtomDkvShape = Shape<_64, Int<kSplitD ? kHeadDim / 2 : kHeadDim>, Int<kBlockM>>;
  using TiledMmaDkv = decltype(make_tiled_mma(
      std::conditional_t<kSplitD,
                         decltype(GMMA::ss_op_selector<Element, Element, float, AtomDkvShape, GMMA::Major::K,
                                                       GMMA::Major::MN>()),
                         decltype(GMMA::rs_op_selector<Element, Element, float, AtomDkvShape, GMMA::Major::K,
                                                       GMMA::Major::MN>())>{},
      WgLayout{}));
  // dQ: (M, D) over K = N; the warpgroups split M when it is 128, else D.
  static constexpr int kDqWgM = kBlockM == 128 ? 2 : 1;
  static constexpr int kDqWgN = 2 / kDqWgM;
  using TiledMmaDq = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<Int<kBlockM / kDqWgM>, Int<kHeadDim / kDqWgN>, Int<kBlockN>>,
                           GMMA::Major::MN, GMMA::Major::MN>(),
      Layout<Shape<Int<kDqWgM>, Int<kDqWgN>, _1>>{}));

  // Shared memory: [K][V][Q stages][dO stages][dS^T][P^T (kSplitD)][lse stages][D stages].
  // Every swizzled tile starts at a multiple of 1024 bytes (the 128-byte swizzle repeats every
  // 8 rows).
  static constexpr int kKBytes = int(cosize_v<SmemLayoutK>) * int(sizeof(Element));
  static constexpr int kQBytes = int(cosize_v<SmemLayoutQ>) * int(sizeof(Element));  // all stages
  static constexpr int kdSBytes = int(cosize_v<SmemLayoutdSt>) * int(sizeof(Element));
  static_assert(kKBytes % 1024 == 0 && kQBytes % 1024 == 0 && kdSBytes % 1024 == 0);
  static constexpr int kOffV = kKBytes;
  static constexpr int kOffQ = 2 * kKBytes;
  static constexpr int kOffdO = kOffQ + kQBytes;
  static constexpr int kOffdS = kOffdO + kQBytes;
  static constexpr int kOffPt = kOffdS + kdSBytes;
  static constexpr int kOffStats = kOffPt + (kSplitD ? kdSBytes : 0);
  static constexpr int kSmemBytes = kOffStats + 2 * kStages * kBlockM * int(sizeof(float));
};

// acc (+)= A B over the K mode for a warpgroup MMA; issued and committed, not waited for.
// Zero_init: the first K slice overwrites the accumulator.
template <bool Zero_init, typename TiledMma, typename FragA, typename FragB, typename Acc>
__forceinline__ __device__ void wgmma_issue(TiledMma &mma, FragA const &a, FragB const &b, Acc &acc) {
  constexpr bool kAInRegs = std::is_same_v<typename FragA::value_type, typename TiledMma::ValTypeA>;
  if constexpr (kAInRegs) { warpgroup_fence_operand(const_cast<FragA &>(a)); }
  warpgroup_fence_operand(acc);
  warpgroup_arrive();
  if constexpr (Zero_init) { mma.accumulate_ = GMMA::ScaleOut::Zero; }
  CUTE_UNROLL
  for (int k = 0; k < size<2>(a); ++k) {
    cute::gemm(mma, a(_, _, k), b(_, _, k), acc);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  warpgroup_fence_operand(acc);
  if constexpr (kAInRegs) { warpgroup_fence_operand(const_cast<FragA &>(a)); }
}

template <typename Ktraits, bool Has_alibi, bool Is_softcap, bool Is_dropout, bool Accum_dq>
__forceinline__ __device__ void compute_dk_dv_tile_sm90(const Flash_bwd_params &p, int n_block, int bidb,
                                                        int bidh) {
  using Element = typename Ktraits::Element;
  constexpr int kN = Ktraits::kBlockN;  // keys
  constexpr int kM = Ktraits::kBlockM;  // queries
  constexpr int kHeadDim = Ktraits::kHeadDim;
  constexpr int kStages = Ktraits::kStages;
  const int tidx = threadIdx.x;

  const SeqInfo seq(p, bidb);
  const int n0 = n_block * kN;
  if (n0 >= seq.seqlen_k) { return; }
  const int n1 = min(n0 + kN, seq.seqlen_k);
  int m_block_min, m_block_max;
  query_blocks_seeing_keys(p, seq, n0, n1, kM, m_block_min, m_block_max);

  const BwdRows<Element, kHeadDim> rows{p, seq, bidb, bidh};
  const float *lse = rows.lse();
  const float *dsum = rows.dsum();
  float *dq_accum = nullptr;
  if constexpr (Accum_dq) { dq_accum = rows.dq_accum(); }

  Tensor gK = local_tile(rows.k(), Shape<Int<kN>, Int<kHeadDim>>{}, make_coord(n_block, 0));  // (N, D)
  Tensor gV = local_tile(rows.v(), Shape<Int<kN>, Int<kHeadDim>>{}, make_coord(n_block, 0));
  Tensor gdK = local_tile(rows.dk(), Shape<Int<kN>, Int<kHeadDim>>{}, make_coord(n_block, 0));
  Tensor gdV = local_tile(rows.dv(), Shape<Int<kN>, Int<kHeadDim>>{}, make_coord(n_block, 0));
  Tensor gQ = local_tile(rows.q(), Shape<Int<kM>, Int<kHeadDim>>{}, make_coord(_, 0));  // (M, D, mblocks)
  Tensor gdO = local_tile(rows.dout(), Shape<Int<kM>, Int<kHeadDim>>{}, make_coord(_, 0));

  extern __shared__ char smem[];
  auto smem_tile = [&](int offset, auto layout) {
    return make_tensor(make_smem_ptr(reinterpret_cast<Element *>(smem + offset)), layout);
  };
  Tensor sK = smem_tile(0, typename Ktraits::SmemLayoutK{});  // (N, D)
  Tensor sV = smem_tile(Ktraits::kOffV, typename Ktraits::SmemLayoutK{});
  Tensor sKt = smem_tile(0, typename Ktraits::SmemLayoutKt{});  // (D, N)
  Tensor sQ = smem_tile(Ktraits::kOffQ, typename Ktraits::SmemLayoutQ{});  // (M, D, stages)
  Tensor sdO = smem_tile(Ktraits::kOffdO, typename Ktraits::SmemLayoutQ{});
  Tensor sQt = smem_tile(Ktraits::kOffQ, typename Ktraits::SmemLayoutQt{});  // (D, M, stages)
  Tensor sdOt = smem_tile(Ktraits::kOffdO, typename Ktraits::SmemLayoutQt{});
  Tensor sdSt = smem_tile(Ktraits::kOffdS, typename Ktraits::SmemLayoutdSt{});  // (N, M)
  Tensor sdS = smem_tile(Ktraits::kOffdS, typename Ktraits::SmemLayoutdS{});    // (M, N)
  Tensor sPt = smem_tile(Ktraits::kOffPt, typename Ktraits::SmemLayoutdSt{});   // (N, M), kSplitD only
  // lse (times log2(e), for exp2) and D of the streamed queries: [stages][M] each.
  float *s_lse = reinterpret_cast<float *>(smem + Ktraits::kOffStats);
  float *s_d = s_lse + kStages * kM;

  typename Ktraits::GmemTiledCopyQKV gmem_copy;
  auto gmem_thr = gmem_copy.get_thread_slice(tidx);
  Tensor tKgK = gmem_thr.partition_S(gK);
  Tensor tKsK = gmem_thr.partition_D(sK);
  Tensor tVgV = gmem_thr.partition_S(gV);
  Tensor tVsV = gmem_thr.partition_D(sV);
  Tensor tQgQ = gmem_thr.partition_S(gQ);  // (CPY, CPY_M, CPY_D, mblocks)
  Tensor tQsQ = gmem_thr.partition_D(sQ);  // (CPY, CPY_M, CPY_D, stages)
  Tensor tdOgdO = gmem_thr.partition_S(gdO);
  Tensor tdOsdO = gmem_thr.partition_D(sdO);
  Tensor tNc = gmem_thr.partition_S(make_identity_tensor(make_shape(Int<kN>{}, Int<kHeadDim>{})));
  Tensor tMc = gmem_thr.partition_S(make_identity_tensor(make_shape(Int<kM>{}, Int<kHeadDim>{})));

  typename Ktraits::TiledMmaSdP mma_sdp;
  auto thr_sdp = mma_sdp.get_thread_slice(tidx);
  Tensor tSrK = thr_sdp.partition_fragment_A(sK);  // descriptors (MMA, MMA_N, MMA_D)
  Tensor tSrV = thr_sdp.partition_fragment_A(sV);
  Tensor tSrQ = thr_sdp.partition_fragment_B(sQ);  // (MMA, MMA_M, MMA_D, stages)
  Tensor tSrdO = thr_sdp.partition_fragment_B(sdO);
  Tensor tScS = thr_sdp.partition_C(make_identity_tensor(Shape<Int<kN>, Int<kM>>{}));  // (key, query)

  typename Ktraits::TiledMmaDkv mma_dkv;
  auto thr_dkv = mma_dkv.get_thread_slice(tidx);
  Tensor tdVrdOt = thr_dkv.partition_fragment_B(sdOt);  // (MMA, MMA_D, MMA_M, stages)
  Tensor tdKrQt = thr_dkv.partition_fragment_B(sQt);
  // The A operand of dV / dK: with RS wgmmas, registers laid out as this fragment (same
  // element order as the S^T accumulator); with kSplitD, descriptors of sPt / sdSt.
  using ALayout = decltype(thr_dkv.partition_fragment_A(sdSt).layout());
  Tensor tdVsP = thr_dkv.partition_fragment_A(sPt);
  Tensor tdKsdS = thr_dkv.partition_fragment_A(sdSt);
  Tensor acc_dk = partition_fragment_C(mma_dkv, Shape<Int<kN>, Int<kHeadDim>>{});
  Tensor acc_dv = partition_fragment_C(mma_dkv, Shape<Int<kN>, Int<kHeadDim>>{});
  clear(acc_dk);
  clear(acc_dv);

  typename Ktraits::TiledMmaDq mma_dq;
  auto thr_dq = mma_dq.get_thread_slice(tidx);
  Tensor tdQrdS = thr_dq.partition_fragment_A(sdS);  // (MMA, MMA_M, MMA_N)
  Tensor tdQrKt = thr_dq.partition_fragment_B(sKt);  // (MMA, MMA_D, MMA_N)
  Tensor tdQcdQ = thr_dq.partition_C(make_identity_tensor(Shape<Int<kM>, Int<kHeadDim>>{}));

  copy_rows_guarded(gmem_copy, tKgK, tKsK, tNc, n1 - n0);
  copy_rows_guarded(gmem_copy, tVgV, tVsV, tNc, n1 - n0);
  cute::cp_async_fence();

  // Issues the loads of query block m_block (rows past seqlen_q zero-filled) and writes its
  // lse and D (padded queries: lse = +inf so P = 0, D = 0) into `stage`.
  auto load_query_block = [&](int m_block, int stage) {
    const int m0 = m_block * kM;
    copy_rows_guarded(gmem_copy, tQgQ(_, _, _, m_block), tQsQ(_, _, _, stage), tMc, seq.seqlen_q - m0);
    copy_rows_guarded(gmem_copy, tdOgdO(_, _, _, m_block), tdOsdO(_, _, _, stage), tMc, seq.seqlen_q - m0);
    cute::cp_async_fence();
    load_row_stats<kM, Ktraits::kNThreads>(s_lse + stage * kM, s_d + stage * kM, lse, dsum, m0, seq.seqlen_q);
  };

  const ScoreMod<Has_alibi, Is_softcap, Is_dropout> score_mod(p, seq.seqlen_q, seq.seqlen_k, bidb, bidh);
  const DropoutOrNone<Is_dropout> dropout(p, bidb, bidh);
  if (m_block_max > m_block_min) { load_query_block(m_block_max - 1, 0); }
  for (int m_block = m_block_max - 1, stage = 0; m_block >= m_block_min; --m_block, stage ^= 1) {
    const int m0 = m_block * kM;
    cute::cp_async_wait<0>();
    cutlass::arch::fence_view_async_shared();  // cp.async / zero-fill writes -> wgmma reads
    // This block's tiles and stats are in place; every warpgroup is done with the other
    // stage and with sdS^T (each waited for its wgmmas), so both are refilled from here on.
    __syncthreads();
    if (m_block > m_block_min) { load_query_block(m_block - 1, stage ^ 1); }
    const float *st_lse = s_lse + stage * kM;
    const float *st_d = s_d + stage * kM;

    Tensor acc_st = partition_fragment_C(mma_sdp, Shape<Int<kN>, Int<kM>>{});  // (MMA, MMA_N, MMA_M)
    Tensor acc_dpt = partition_fragment_C(mma_sdp, Shape<Int<kN>, Int<kM>>{});
    wgmma_issue<true>(mma_sdp, tSrK, tSrQ(_, _, _, stage), acc_st);
    wgmma_issue<true>(mma_sdp, tSrV, tSrdO(_, _, _, stage), acc_dpt);
    warpgroup_wait<1>();  // S^T is ready; dP^T may still run
    score_mod.transform(acc_st);
    Tensor t_st = make_fragment_like(acc_st);  // tanh values, for the softcap derivative
    if constexpr (Is_softcap) { copy(acc_st, t_st); }
    mask_tile_transposed<Has_alibi>(score_mod, acc_st, tScS, n0, m0, score_mod.block_needs_mask(m0, m0 + kM, n0, kN));
    warpgroup_wait<0>();
    probs_and_dscores_transposed<Is_softcap, Is_dropout>(acc_st, acc_dpt, t_st, tScS, st_lse, st_d, p, dropout, m0, n0);
    Tensor rP = convert_type<Element>(acc_st);
    Tensor rdS = convert_type<Element>(acc_dpt);
    auto copy_c = make_tiled_copy_C(Copy_Atom<AutoVectorizingCopyWithAssumedAlignment<32>, Element>{}, mma_sdp);
    auto thr_c = copy_c.get_thread_slice(tidx);
    if constexpr (Ktraits::kSplitD) {
      // Each warpgroup holds P^T / dS^T of half the queries and needs all of them for its
      // half of d: through shared memory.
      static_assert(!Accum_dq, "d = 256 runs the deterministic pair");
      copy(copy_c, thr_c.retile_S(rP), thr_c.partition_D(sPt));
      copy(copy_c, thr_c.retile_S(rdS), thr_c.partition_D(sdSt));
      cutlass::arch::fence_view_async_shared();
      __syncthreads();
      wgmma_issue<false>(mma_dkv, tdVsP, tdVrdOt(_, _, _, stage), acc_dv);
      wgmma_issue<false>(mma_dkv, tdKsdS, tdKrQt(_, _, _, stage), acc_dk);
    } else {
      Tensor tdVrP = make_tensor(rP.data(), ALayout{});
      Tensor tdKrdS = make_tensor(rdS.data(), ALayout{});
      wgmma_issue<false>(mma_dkv, tdVrP, tdVrdOt(_, _, _, stage), acc_dv);
      wgmma_issue<false>(mma_dkv, tdKrdS, tdKrQt(_, _, _, stage), acc_dk);
    }
    if constexpr (Accum_dq) {
      // dS^T to shared memory, for dQ = dS K over all 128 keys of both warpgroups.
      copy(copy_c, thr_c.retile_S(rdS), thr_c.partition_D(sdSt));
      cutlass::arch::fence_view_async_shared();
      __syncthreads();
      Tensor acc_dq = partition_fragment_C(mma_dq, Shape<Int<kM>, Int<kHeadDim>>{});
      wgmma_issue<true>(mma_dq, tdQrdS, tdQrKt, acc_dq);
      warpgroup_wait<0>();
      // Elements (i, i + 1), i even, are columns (c, c + 1) of one row: one 8-byte atomic.
      float *dq_blk = dq_accum + int64_t(m0) * kHeadDim;
      const int rows = seq.seqlen_q - m0;
      CUTE_UNROLL
      for (int i = 0; i < size(acc_dq); i += 2) {
        const int r = get<0>(tdQcdQ(i));
        if (rows >= kM || r < rows) {
          atomicAdd(reinterpret_cast<float2 *>(dq_blk + r * kHeadDim + get<1>(tdQcdQ(i))),
                    make_float2(acc_dq(i), acc_dq(i + 1)));
        }
      }
    } else {
      warpgroup_wait<0>();
    }
  }

  CUTE_UNROLL
  for (int i = 0; i < size(acc_dk); ++i) { acc_dk(i) *= p.scale_qk; }
  // Stage dK, dV in K's and V's space once every thread is past its last read of them
  // (and, with no step at all, once their loads have landed).
  cute::cp_async_wait<0>();
  __syncthreads();
  store_acc_tile<Ktraits>(mma_dkv, acc_dk, sK, gdK, n1 - n0);
  store_acc_tile<Ktraits>(mma_dkv, acc_dv, sV, gdV, n1 - n0);
}

// The dQ kernel of the deterministic path on sm90a: one CTA per (block of 128 queries, sequence,
// query head) keeps Q and dO in shared memory and walks the key blocks its queries see, last
// first; warpgroup w owns queries [64 w, 64 w + 64) and needs nothing from the other one.
//   S = Q K^T, dP = dO V^T   SS wgmma, (queries, keys)
//   dS in registers          as in the dK/dV kernel, per query row
//   dQ += dS K               RS wgmma, K read as (d, keys) (MN-major)
// No atomics: dQ is written once, bf16, so it is bitwise reproducible.
// kBlockN keys per step: 128 at d = 64, 64 at d = 128, 32 at d = 256 (dQ holds 32 / 64 / 128
// fp32 per thread; at d = 256, Q and dO take 128 KB and two stages of K and V 64 KB).
template <int kHeadDim_, typename Element_, int kBlockN_ = kHeadDim_ <= 64 ? 128 : kHeadDim_ <= 128 ? 64 : 32>
struct BwdSm90DqTraits {
  using Element = Element_;
  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kBlockM = 128;  // queries per CTA, 64 per warpgroup
  static constexpr int kBlockN = kBlockN_;
  static constexpr int kNWarps = 8;
  static constexpr int kNThreads = 256;
  static constexpr int kStages = 2;
  static_assert(kHeadDim == 64 || kHeadDim == 128 || kHeadDim == 256);
  using CopyBase = MmaCopyTraits<kHeadDim, Element, kNWarps>;
  using GmemTiledCopyQKV = typename CopyBase::GmemTiledCopyQKV;
  using GmemTiledCopyO = typename CopyBase::GmemTiledCopyO;
  using SmemCopyAtomO = typename CopyBase::SmemCopyAtomO;

  using Atom = GMMA::Layout_K_SW128_Atom<Element>;
  using SmemLayoutQ = decltype(tile_to_shape(Atom{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));  // (M, D)
  using SmemLayoutK = decltype(tile_to_shape(Atom{}, Shape<Int<kBlockN>, Int<kHeadDim>, Int<kStages>>{}));
  using SmemLayoutKt = decltype(composition(
      SmemLayoutK{}, make_layout(Shape<Int<kHeadDim>, Int<kBlockN>, Int<kStages>>{},
                                 Stride<Int<kBlockN>, _1, Int<kBlockN * kHeadDim>>{})));  // (D, N, stages)
  // S, dP: (M, N) over K = D.
  using TiledMmaSdP = decltype(make_tiled_mma(
      GMMA::ss_op_selector<Element, Element, float, Shape<_64, Int<kBlockN>, Int<kHeadDim>>, GMMA::Major::K,
                           GMMA::Major::K>(),
      Layout<Shape<_2, _1, _1>>{}));
  // dQ: (M, D) over K = N; A = dS from registers, B = K^T (MN-major).
  using TiledMmaDq = decltype(make_tiled_mma(
      GMMA::rs_op_selector<Element, Element, float, Shape<_64, Int<kHeadDim>, Int<kBlockN>>, GMMA::Major::K,
                           GMMA::Major::MN>(),
      Layout<Shape<_2, _1, _1>>{}));

  // Shared memory: [Q][dO][K stages][V stages][lse][D].
  static constexpr int kQBytes = int(cosize_v<SmemLayoutQ>) * int(sizeof(Element));
  static constexpr int kKBytes = int(cosize_v<SmemLayoutK>) * int(sizeof(Element));  // all stages
  static_assert(kQBytes % 1024 == 0 && kKBytes % 1024 == 0);
  static constexpr int kOffdO = kQBytes;
  static constexpr int kOffK = 2 * kQBytes;
  static constexpr int kOffV = kOffK + kKBytes;
  static constexpr int kOffStats = kOffV + kKBytes;
  static constexpr int kSmemBytes = kOffStats + 2 * kBlockM * int(sizeof(float));
};

template <typename Ktraits, bool Has_alibi, bool Is_softcap, bool Is_dropout>
__forceinline__ __device__ void compute_dq_tile_sm90(const Flash_bwd_params &p, int m_block, int bidb, int bidh) {
  using Element = typename Ktraits::Element;
  constexpr int kM = Ktraits::kBlockM;  // queries
  constexpr int kN = Ktraits::kBlockN;  // keys
  constexpr int kHeadDim = Ktraits::kHeadDim;
  const int tidx = threadIdx.x;

  const SeqInfo seq(p, bidb);
  const int m0 = m_block * kM;
  if (m0 >= seq.seqlen_q) { return; }
  const int m1 = min(m0 + kM, seq.seqlen_q);
  int n_block_min, n_block_max;
  key_blocks_seen_by_queries(p, seq, m0, m1, kN, n_block_min, n_block_max);

  const BwdRows<Element, kHeadDim> rows{p, seq, bidb, bidh};
  Tensor gQ = local_tile(rows.q(), Shape<Int<kM>, Int<kHeadDim>>{}, make_coord(m_block, 0));  // (M, D)
  Tensor gdO = local_tile(rows.dout(), Shape<Int<kM>, Int<kHeadDim>>{}, make_coord(m_block, 0));
  Tensor gdQ = local_tile(rows.dq(), Shape<Int<kM>, Int<kHeadDim>>{}, make_coord(m_block, 0));
  Tensor gK = local_tile(rows.k(), Shape<Int<kN>, Int<kHeadDim>>{}, make_coord(_, 0));  // (N, D, nblocks)
  Tensor gV = local_tile(rows.v(), Shape<Int<kN>, Int<kHeadDim>>{}, make_coord(_, 0));

  extern __shared__ char smem[];
  auto smem_tile = [&](int offset, auto layout) {
    return make_tensor(make_smem_ptr(reinterpret_cast<Element *>(smem + offset)), layout);
  };
  Tensor sQ = smem_tile(0, typename Ktraits::SmemLayoutQ{});  // (M, D)
  Tensor sdO = smem_tile(Ktraits::kOffdO, typename Ktraits::SmemLayoutQ{});
  Tensor sK = smem_tile(Ktraits::kOffK, typename Ktraits::SmemLayoutK{});  // (N, D, stages)
  Tensor sV = smem_tile(Ktraits::kOffV, typename Ktraits::SmemLayoutK{});
  Tensor sKt = smem_tile(Ktraits::kOffK, typename Ktraits::SmemLayoutKt{});  // (D, N, stages)
  float *s_lse = reinterpret_cast<float *>(smem + Ktraits::kOffStats);  // lse * log2(e) per query row
  float *s_d = s_lse + kM;

  typename Ktraits::GmemTiledCopyQKV gmem_copy;
  auto gmem_thr = gmem_copy.get_thread_slice(tidx);
  Tensor tQgQ = gmem_thr.partition_S(gQ);
  Tensor tQsQ = gmem_thr.partition_D(sQ);
  Tensor tdOgdO = gmem_thr.partition_S(gdO);
  Tensor tdOsdO = gmem_thr.partition_D(sdO);
  Tensor tKgK = gmem_thr.partition_S(gK);  // (CPY, CPY_N, CPY_D, nblocks)
  Tensor tKsK = gmem_thr.partition_D(sK);  // (CPY, CPY_N, CPY_D, stages)
  Tensor tVgV = gmem_thr.partition_S(gV);
  Tensor tVsV = gmem_thr.partition_D(sV);
  Tensor tMc = gmem_thr.partition_S(make_identity_tensor(make_shape(Int<kM>{}, Int<kHeadDim>{})));
  Tensor tNc = gmem_thr.partition_S(make_identity_tensor(make_shape(Int<kN>{}, Int<kHeadDim>{})));

  typename Ktraits::TiledMmaSdP mma_sdp;
  auto thr_sdp = mma_sdp.get_thread_slice(tidx);
  Tensor tSrQ = thr_sdp.partition_fragment_A(sQ);  // descriptors (MMA, MMA_M, MMA_D)
  Tensor tSrdO = thr_sdp.partition_fragment_A(sdO);
  Tensor tSrK = thr_sdp.partition_fragment_B(sK);  // (MMA, MMA_N, MMA_D, stages)
  Tensor tSrV = thr_sdp.partition_fragment_B(sV);
  Tensor tScS = thr_sdp.partition_C(make_identity_tensor(Shape<Int<kM>, Int<kN>>{}));  // (query, key)

  typename Ktraits::TiledMmaDq mma_dq;
  auto thr_dq = mma_dq.get_thread_slice(tidx);
  Tensor tdQrKt = thr_dq.partition_fragment_B(sKt);  // (MMA, MMA_D, MMA_N, stages)
  // The A-register layout of dS: same element order as the S accumulator.
  using ALayout = decltype(thr_dq.partition_fragment_A(smem_tile(0, Layout<Shape<Int<kM>, Int<kN>>>{})).layout());
  Tensor acc_dq = partition_fragment_C(mma_dq, Shape<Int<kM>, Int<kHeadDim>>{});
  clear(acc_dq);

  copy_rows_guarded(gmem_copy, tQgQ, tQsQ, tMc, m1 - m0);
  copy_rows_guarded(gmem_copy, tdOgdO, tdOsdO, tMc, m1 - m0);
  load_row_stats<kM, Ktraits::kNThreads>(s_lse, s_d, rows.lse(), rows.dsum(), m0, seq.seqlen_q);
  auto load_key_block = [&](int n_block, int stage) {
    const int n0 = n_block * kN;
    copy_rows_guarded(gmem_copy, tKgK(_, _, _, n_block), tKsK(_, _, _, stage), tNc, seq.seqlen_k - n0);
    copy_rows_guarded(gmem_copy, tVgV(_, _, _, n_block), tVsV(_, _, _, stage), tNc, seq.seqlen_k - n0);
    cute::cp_async_fence();
  };

  const ScoreMod<Has_alibi, Is_softcap, Is_dropout> score_mod(p, seq.seqlen_q, seq.seqlen_k, bidb, bidh);
  const DropoutOrNone<Is_dropout> dropout(p, bidb, bidh);
  if (n_block_max > n_block_min) { load_key_block(n_block_max - 1, 0); }  // (Q, dO join this group)
  for (int n_block = n_block_max - 1, stage = 0; n_block >= n_block_min; --n_block, stage ^= 1) {
    const int n0 = n_block * kN;
    cute::cp_async_wait<0>();
    cutlass::arch::fence_view_async_shared();
    __syncthreads();  // as in the dK/dV kernel
    if (n_block > n_block_min) { load_key_block(n_block - 1, stage ^ 1); }

    Tensor acc_s = partition_fragment_C(mma_sdp, Shape<Int<kM>, Int<kN>>{});  // (MMA, MMA_M, MMA_N)
    Tensor acc_dp = partition_fragment_C(mma_sdp, Shape<Int<kM>, Int<kN>>{});
    wgmma_issue<true>(mma_sdp, tSrQ, tSrK(_, _, _, stage), acc_s);
    wgmma_issue<true>(mma_sdp, tSrdO, tSrV(_, _, _, stage), acc_dp);
    warpgroup_wait<1>();
    score_mod.transform(acc_s);
    Tensor t_s = make_fragment_like(acc_s);
    if constexpr (Is_softcap) { copy(acc_s, t_s); }
    if (score_mod.block_needs_mask(m0, m1, n0, kN)) {
      CUTE_UNROLL
      for (int i = 0; i < size(acc_s); ++i) {
        mask_score<Has_alibi, true>(score_mod, acc_s(i), m0 + get<0>(tScS(i)), n0 + get<1>(tScS(i)));
      }
    } else if constexpr (Has_alibi) {
      CUTE_UNROLL
      for (int i = 0; i < size(acc_s); ++i) {
        mask_score<true, false>(score_mod, acc_s(i), m0 + get<0>(tScS(i)), n0 + get<1>(tScS(i)));
      }
    }
    warpgroup_wait<0>();
    CUTE_UNROLL
    for (int i = 0; i < size(acc_s); ++i) {
      const int row = get<0>(tScS(i));
      const float pr = exp2f(acc_s(i) * p.scale_softmax_log2 - s_lse[row]);
      float dpz = acc_dp(i);
      if constexpr (Is_dropout) {
        dpz *= dropout.keep(m0 + row, n0 + get<1>(tScS(i))) ? p.rp_keep : 0.f;
      }
      float ds = pr * (dpz - s_d[row]);
      if constexpr (Is_softcap) { ds *= 1.f - t_s(i) * t_s(i); }
      acc_dp(i) = ds;
    }
    Tensor rdS = convert_type<Element>(acc_dp);
    Tensor tdQrdS = make_tensor(rdS.data(), ALayout{});
    wgmma_issue<false>(mma_dq, tdQrdS, tdQrKt(_, _, _, stage), acc_dq);
    warpgroup_wait<0>();
  }

  CUTE_UNROLL
  for (int i = 0; i < size(acc_dq); ++i) { acc_dq(i) *= p.scale_qk; }
  cute::cp_async_wait<0>();
  __syncthreads();
  store_acc_tile<Ktraits>(mma_dq, acc_dq, sQ, gdQ, m1 - m0);
}

template <typename Ktraits, bool Has_alibi, bool Is_softcap, bool Is_dropout>
__global__ void __launch_bounds__(Ktraits::kNThreads, 1)
    flash_bwd_dq_kernel_sm90(__grid_constant__ const Flash_bwd_params p) {
#if defined(__CUDA_ARCH__) && defined(CUTE_ARCH_MMA_SM90A_ENABLED)
  compute_dq_tile_sm90<Ktraits, Has_alibi, Is_softcap, Is_dropout>(p, blockIdx.x, blockIdx.y, blockIdx.z);
#elif defined(__CUDA_ARCH__)
  __trap();  // not sm90a code: the host never launches it here
#endif
}

// Grid: (key blocks of kBlockN, batch, query heads), 256 threads. The body exists only in sm90a
// code (wgmma); run_flash_bwd launches it only where the running binary is that code.
template <typename Ktraits, bool Has_alibi, bool Is_softcap, bool Is_dropout, bool Accum_dq>
__global__ void __launch_bounds__(Ktraits::kNThreads, 1)
    flash_bwd_dk_dv_kernel_sm90(__grid_constant__ const Flash_bwd_params p) {
#if defined(__CUDA_ARCH__) && defined(CUTE_ARCH_MMA_SM90A_ENABLED)
  compute_dk_dv_tile_sm90<Ktraits, Has_alibi, Is_softcap, Is_dropout, Accum_dq>(p, blockIdx.x, blockIdx.y,
                                                                               blockIdx.z);
#elif defined(__CUDA_ARCH__)
  __trap();  // not sm90a code: the host never launches it here
#endif
}

}  // namespace flash
