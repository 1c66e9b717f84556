// Backward kernel (mma.sync): one CTA per (key block, sequence, query head) keeps K, V
// stationary and streams query blocks: S^T = K Q^T, P^T = exp(S^T - lse), dP^T = V dO^T,
// dS^T = P^T (dP^T - D), dV += P^T dO, dK += dS^T Q, and dQ += dS K of each step added
// into an fp32 accumulator with atomics: 5 matrix products per tile pair, as in
// FlashAttention-2. dK and dV are bitwise reproducible (one CTA owns each key block).
// dQ's atomics are reproducible too with splits (deterministic=True): the grid then has
// dq_accum_splits CTAs along the key blocks, CTA x walks the key blocks x, x + splits, ...
// in order and adds into its own copy x of the accumulator, so every address receives its
// terms from one thread in a fixed order; the host sums the copies in a fixed order. Without
// splits each key block has its own CTA and all add into one copy (fastest, order varies).
// D = rowsum(dO * O) per query row and the forward's lse come precomputed. The score
// modifiers match the forward (score_mod.h); with softcap, dS carries the tanh
// derivative. dK is scaled by the softmax scale at the end; the host scales dQ.
#pragma once

#include <cmath>
#include <cute/tensor.hpp>

#include "block_info.h"
#include "dropout.h"
#include "epilogue.h"
#include "flash.h"
#include "kernel_traits.h"
#include "score_mod.h"
#include "utils.h"

namespace flash {

using namespace cute;

// dQ_partial (queries x d) = dS K for one (key block, query block) step, added into the
// fp32 accumulator, whose rows are kHeadDim floats apart (the host lays it out head-major,
// (b, h, seqlen_q, d), and applies the softmax scale when it converts it to dq): every
// address is this thread's base plus a compile-time offset. sdSt: dS as (queries, keys) in
// shared memory; sKt: the stationary K as (d, keys). Query rows at or past `rows`
// (padding of the last query block) are skipped.
template <typename Ktraits, typename SdSt, typename SKt>
__forceinline__ __device__ void accumulate_dq(SdSt const &sdSt, SKt const &sKt, float *dq_accum, int rows) {
  constexpr int kCols = Ktraits::kBlockCols;
  constexpr int kHeadDim = Ktraits::kHeadDim;
  typename Ktraits::TiledMmaDq mma;
  auto thr = mma.get_thread_slice(threadIdx.x);
  Tensor acc = partition_fragment_C(mma, Shape<Int<kCols>, Int<kHeadDim>>{});  // (MMA, MMA_C, MMA_D)
  clear(acc);
  Tensor rdS = thr.partition_fragment_A(sdSt);  // (MMA, MMA_C, MMA_R)
  Tensor rKt = thr.partition_fragment_B(sKt);   // (MMA, MMA_D, MMA_R)
  auto copy_a = make_tiled_copy_A(typename Ktraits::SmemCopyAtomTransposed{}, mma);
  auto copy_b = make_tiled_copy_B(typename Ktraits::SmemCopyAtomTransposed{}, mma);
  Tensor sA = copy_a.get_thread_slice(threadIdx.x).partition_S(sdSt);
  Tensor sB = copy_b.get_thread_slice(threadIdx.x).partition_S(sKt);
  gemm_smem_smem(mma, acc, rdS, rKt, sA, sB, copy_a, copy_b);
  Tensor coord = thr.partition_C(make_identity_tensor(Shape<Int<kCols>, Int<kHeadDim>>{}));
  // Accumulator elements (i, i + 1), i even, are columns (c, c + 1) of one row: sm90 adds
  // them with one 8-byte vector atomic (half the atomic operations and L2 sectors).
  static_assert(decltype(size<0>(acc))::value == 4);
  auto add = [&](int i) {
    float *dst = dq_accum + get<0>(coord(i)) * kHeadDim + get<1>(coord(i));
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    atomicAdd(reinterpret_cast<float2 *>(dst), make_float2(acc(i), acc(i + 1)));
#else
    atomicAdd(dst, acc(i));
    atomicAdd(dst + 1, acc(i + 1));
#endif
  };
  if (rows >= kCols) {
    CUTE_UNROLL
    for (int i = 0; i < size(acc); i += 2) { add(i); }
  } else {
    CUTE_UNROLL
    for (int i = 0; i < size(acc); i += 2) {
      if (get<0>(coord(i)) < rows) { add(i); }
    }
  }
}

// The key-stationary view of the score modifiers for any fragment layout: st and coord
// are one thread's (keys, queries) accumulator and its coordinates within the tile, whose
// first key is n0 and first query m0. Adds the ALiBi bias and, with Mask, sets keys past
// seqlen_k and (key, query) pairs outside the window to -inf. The caller runs it with
// Mask only for tiles that block_needs_mask flags: the per-element test costs about as
// many instructions as the rest of the step's elementwise work.
template <bool Has_alibi, bool Mask, typename ScoreModT, typename TensorS, typename TensorC>
__forceinline__ __device__ void mask_scores_transposed(const ScoreModT &sm, TensorS &st, TensorC const &coord, int n0,
                                                       int m0) {
  const int shift = sm.seqlen_k - sm.seqlen_q;
  CUTE_UNROLL
  for (int i = 0; i < size(st); ++i) {
    const int key = n0 + get<0>(coord(i));
    const int diag = m0 + get<1>(coord(i)) + shift;  // the key aligned with this query
    if constexpr (Has_alibi) { st(i) -= sm.alibi_slope * float(abs(diag - key)); }
    if constexpr (Mask) {
      const bool visible = key < sm.seqlen_k && (sm.window_left < 0 || key >= diag - sm.window_left) &&
                           (sm.window_right < 0 || key <= diag + sm.window_right);
      if (!visible) { st(i) = -INFINITY; }
    }
  }
}

// Stores a (rows, cols) accumulator of `mma`, converted to Element, into a shared tile.
template <typename Ktraits, typename TiledMma, typename Acc, typename STile>
__forceinline__ __device__ void acc_to_smem(TiledMma const &mma, Acc const &acc, STile &s_tile) {
  Tensor r = convert_type<typename Ktraits::Element>(acc);
  auto copy_c = make_tiled_copy_C(typename Ktraits::SmemCopyAtomP{}, mma);
  auto thr = copy_c.get_thread_slice(threadIdx.x);
  Tensor src = thr.retile_S(r);
  Tensor dst = thr.partition_D(s_tile);
  copy(copy_c, src, dst);
}

// dq_accum_split: the offset (floats) of this CTA's copy of the dQ accumulator.
template <typename Ktraits, bool Has_alibi, bool Is_softcap, bool Is_dropout>
__forceinline__ __device__ void compute_dk_dv_tile(const Flash_bwd_params &p, int n_block, int bidb, int bidh,
                                                   int64_t dq_accum_split) {
  using Element = typename Ktraits::Element;
  constexpr int kRows = Ktraits::kBlockRows;  // keys
  constexpr int kCols = Ktraits::kBlockCols;  // queries
  constexpr int kHeadDim = Ktraits::kHeadDim;
  const int tidx = threadIdx.x;

  const SeqInfo seq(p, bidb);
  const int n0 = n_block * kRows;
  if (n0 >= seq.seqlen_k) { return; }
  const int n1 = min(n0 + kRows, seq.seqlen_k);
  // Queries that see any key of [n0, n1): key j is visible to query i for
  // j in [i + shift - left, i + shift + right].
  const int shift = seq.seqlen_k - seq.seqlen_q;
  int m_lo = 0, m_hi = seq.seqlen_q;
  if (p.window_size_right >= 0) { m_lo = max(0, n0 - shift - p.window_size_right); }
  if (p.window_size_left >= 0) { m_hi = min(m_hi, n1 - 1 - shift + p.window_size_left + 1); }
  const int m_block_min = m_lo / kCols;
  const int m_block_max = m_hi > m_lo ? (m_hi + kCols - 1) / kCols : m_block_min;

  const int bidh_kv = bidh / p.h_h_k_ratio;
  const int64_t q_off = seq.q_offset(p.q_batch_stride, p.q_row_stride, bidb) + bidh * p.q_head_stride;
  const int64_t do_off = seq.q_offset(p.do_batch_stride, p.do_row_stride, bidb) + bidh * p.do_head_stride;
  Tensor mQ = make_tensor(make_gmem_ptr(reinterpret_cast<Element *>(p.q_ptr) + q_off),
                          make_shape(seq.seqlen_q, Int<kHeadDim>{}), make_stride(p.q_row_stride, _1{}));
  Tensor mdO = make_tensor(make_gmem_ptr(reinterpret_cast<Element *>(p.do_ptr) + do_off),
                           make_shape(seq.seqlen_q, Int<kHeadDim>{}), make_stride(p.do_row_stride, _1{}));
  auto kv_tensor = [&](void *ptr, int64_t batch_stride, int64_t row_stride, int64_t head_stride, int head) {
    return make_tensor(make_gmem_ptr(reinterpret_cast<Element *>(ptr) + seq.k_offset(batch_stride, row_stride, bidb) +
                                     head * head_stride),
                       make_shape(seq.seqlen_k, Int<kHeadDim>{}), make_stride(row_stride, _1{}));
  };
  Tensor mK = kv_tensor(p.k_ptr, p.k_batch_stride, p.k_row_stride, p.k_head_stride, bidh_kv);
  Tensor mV = kv_tensor(p.v_ptr, p.v_batch_stride, p.v_row_stride, p.v_head_stride, bidh_kv);
  Tensor mdK = kv_tensor(p.dk_ptr, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride, bidh);
  Tensor mdV = kv_tensor(p.dv_ptr, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride, bidh);
  const int64_t stat_off = seq.lse_offset(p, bidb, bidh);
  const float *lse = p.softmax_lse_ptr + stat_off;
  const float *dsum = p.softmax_d_ptr + stat_off;
  float *dq_accum = p.dq_accum_ptr + dq_accum_split +
                    seq.q_offset(p.dq_accum_batch_stride, p.dq_accum_row_stride, bidb) + bidh * p.dq_accum_head_stride;

  Tensor gK = local_tile(mK, Shape<Int<kRows>, Int<kHeadDim>>{}, make_coord(n_block, 0));   // (R, D)
  Tensor gV = local_tile(mV, Shape<Int<kRows>, Int<kHeadDim>>{}, make_coord(n_block, 0));
  Tensor gdK = local_tile(mdK, Shape<Int<kRows>, Int<kHeadDim>>{}, make_coord(n_block, 0));
  Tensor gdV = local_tile(mdV, Shape<Int<kRows>, Int<kHeadDim>>{}, make_coord(n_block, 0));
  Tensor gQ = local_tile(mQ, Shape<Int<kCols>, Int<kHeadDim>>{}, make_coord(_, 0));   // (C, D, mblocks)
  Tensor gdO = local_tile(mdO, Shape<Int<kCols>, Int<kHeadDim>>{}, make_coord(_, 0));

  extern __shared__ char smem[];
  using SmemRows = typename Ktraits::SmemLayoutRows;
  using SmemCols = typename Ktraits::SmemLayoutCols;
  Tensor sK = make_tensor(make_smem_ptr(reinterpret_cast<Element *>(smem)), SmemRows{})(_, _, 0);  // (R, D)
  Tensor sV = make_tensor(sK.data() + cosize(SmemRows{}), SmemRows{})(_, _, 0);
  Tensor sKt = make_tensor(sK.data(), typename Ktraits::SmemLayoutRowsT{})(_, _, 0);  // (D, R)
  constexpr int kStages = Ktraits::kStages;
  Tensor sQ = make_tensor(sV.data() + cosize(SmemRows{}), SmemCols{});  // (C, D, stages)
  Tensor sdO = make_tensor(sQ.data() + cosize(SmemCols{}), SmemCols{});
  Tensor sQt = make_tensor(sQ.data(), typename Ktraits::SmemLayoutColsT{});    // (D, C, stages)
  Tensor sdOt = make_tensor(sdO.data(), typename Ktraits::SmemLayoutColsT{});  // (D, C, stages)
  // lse (times log2(e), for exp2) and D of the streamed queries: [stages][C] each.
  float *s_lse = reinterpret_cast<float *>(smem + 2 * Ktraits::kSmemRowsBytes + 2 * Ktraits::kSmemColsBytes);
  float *s_d = s_lse + kStages * kCols;
  Tensor sP = make_tensor(make_smem_ptr(reinterpret_cast<Element *>(smem + Ktraits::kSmemPOffset)),
                          typename Ktraits::SmemLayoutP{});  // P^T (R, C)
  Tensor sdS = make_tensor(sP.data() + cosize(typename Ktraits::SmemLayoutP{}), typename Ktraits::SmemLayoutP{});
  Tensor sdSt = make_tensor(sdS.data(), typename Ktraits::SmemLayoutPT{});  // dS (C, R)

  typename Ktraits::GmemTiledCopyQKV gmem_copy;
  auto gmem_thr = gmem_copy.get_thread_slice(tidx);
  Tensor tKgK = gmem_thr.partition_S(gK);
  Tensor tKsK = gmem_thr.partition_D(sK);
  Tensor tVgV = gmem_thr.partition_S(gV);
  Tensor tVsV = gmem_thr.partition_D(sV);
  Tensor tQgQ = gmem_thr.partition_S(gQ);  // (CPY, CPY_C, CPY_D, mblocks)
  Tensor tQsQ = gmem_thr.partition_D(sQ);  // (CPY, CPY_C, CPY_D, stages)
  Tensor tdOgdO = gmem_thr.partition_S(gdO);
  Tensor tdOsdO = gmem_thr.partition_D(sdO);
  Tensor tRc = gmem_thr.partition_S(make_identity_tensor(make_shape(Int<kRows>{}, Int<kHeadDim>{})));
  Tensor tCc = gmem_thr.partition_S(make_identity_tensor(make_shape(Int<kCols>{}, Int<kHeadDim>{})));

  // S^T and dP^T: (R, C) with K-dim D, both operands from shared memory.
  typename Ktraits::TiledMmaSdP mma_sdp;
  auto thr_sdp = mma_sdp.get_thread_slice(tidx);
  Tensor tSrK = thr_sdp.partition_fragment_A(sK);            // (MMA, MMA_R, MMA_D)
  Tensor tSrV = thr_sdp.partition_fragment_A(sV);
  Tensor tSrQ = thr_sdp.partition_fragment_B(sQ(_, _, 0));   // (MMA, MMA_C, MMA_D)
  Tensor tSrdO = thr_sdp.partition_fragment_B(sdO(_, _, 0));
  auto sdp_copy_A = make_tiled_copy_A(typename Ktraits::SmemCopyAtom{}, mma_sdp);
  auto sdp_copy_B = make_tiled_copy_B(typename Ktraits::SmemCopyAtom{}, mma_sdp);
  Tensor tSsK = sdp_copy_A.get_thread_slice(tidx).partition_S(sK);
  Tensor tSsV = sdp_copy_A.get_thread_slice(tidx).partition_S(sV);
  Tensor tSsQ = sdp_copy_B.get_thread_slice(tidx).partition_S(sQ);  // (CPY, CPY_C, CPY_D, stages)
  Tensor tSsdO = sdp_copy_B.get_thread_slice(tidx).partition_S(sdO);
  // This thread's (key, query) coordinates within a (R, C) tile, same shape as acc_st.
  Tensor tScS = thr_sdp.partition_C(make_identity_tensor(Shape<Int<kRows>, Int<kCols>>{}));

  // dV += P^T dO, dK += dS^T Q: (R, D) with K-dim C; A from sP / sdS, B transposed.
  typename Ktraits::TiledMmaDkv mma_dkv;
  auto thr_dkv = mma_dkv.get_thread_slice(tidx);
  Tensor tdVrP = thr_dkv.partition_fragment_A(sP);                  // (MMA, MMA_R, MMA_C)
  Tensor tdKrdS = thr_dkv.partition_fragment_A(sdS);
  Tensor tdVrdOt = thr_dkv.partition_fragment_B(sdOt(_, _, 0));    // (MMA, MMA_D, MMA_C)
  Tensor tdKrQt = thr_dkv.partition_fragment_B(sQt(_, _, 0));
  auto dkv_copy_A = make_tiled_copy_A(typename Ktraits::SmemCopyAtom{}, mma_dkv);
  auto dkv_copy_Bt = make_tiled_copy_B(typename Ktraits::SmemCopyAtomTransposed{}, mma_dkv);
  Tensor tdVsP = dkv_copy_A.get_thread_slice(tidx).partition_S(sP);
  Tensor tdKsdS = dkv_copy_A.get_thread_slice(tidx).partition_S(sdS);
  Tensor tdVsdOt = dkv_copy_Bt.get_thread_slice(tidx).partition_S(sdOt);  // (CPY, CPY_D, CPY_C, stages)
  Tensor tdKsQt = dkv_copy_Bt.get_thread_slice(tidx).partition_S(sQt);
  Tensor acc_dk = partition_fragment_C(mma_dkv, Shape<Int<kRows>, Int<kHeadDim>>{});  // (MMA, MMA_R, MMA_D)
  Tensor acc_dv = partition_fragment_C(mma_dkv, Shape<Int<kRows>, Int<kHeadDim>>{});
  clear(acc_dk);
  clear(acc_dv);

  copy_rows_guarded(gmem_copy, tKgK, tKsK, tRc, n1 - n0);
  copy_rows_guarded(gmem_copy, tVgV, tVsV, tRc, n1 - n0);
  cute::cp_async_fence();

  // Issues the loads of query block m_block (Q, dO rows guarded against seqlen_q) and
  // writes its lse and D (padded queries: lse = +inf so P = 0, D = 0) into `stage`.
  auto load_query_block = [&](int m_block, int stage) {
    const int m0 = m_block * kCols;
    copy_rows_guarded(gmem_copy, tQgQ(_, _, _, m_block), tQsQ(_, _, _, stage), tCc, seq.seqlen_q - m0);
    copy_rows_guarded(gmem_copy, tdOgdO(_, _, _, m_block), tdOsdO(_, _, _, stage), tCc, seq.seqlen_q - m0);
    cute::cp_async_fence();
    for (int i = tidx; i < kCols; i += Ktraits::kNThreads) {
      const bool real = m0 + i < seq.seqlen_q;
      s_lse[stage * kCols + i] = real ? lse[m0 + i] * float(M_LOG2E) : INFINITY;
      s_d[stage * kCols + i] = real ? dsum[m0 + i] : 0.f;
    }
  };

  // With dropout, ALiBi is optional at run time (the one dropout variant).
  const ScoreMod<Has_alibi, Is_softcap, Is_dropout> score_mod(p, seq.seqlen_q, seq.seqlen_k, bidb, bidh);
  const DropoutOrNone<Is_dropout> dropout(p, bidb, bidh);
  if (kStages == 2 && m_block_max > m_block_min) { load_query_block(m_block_max - 1, 0); }
  for (int m_block = m_block_max - 1, stage = 0; m_block >= m_block_min; --m_block, stage ^= (kStages - 1)) {
    const int m0 = m_block * kCols;
    if constexpr (kStages == 1) { load_query_block(m_block, 0); }
    cute::cp_async_wait<0>();
    // This block's tiles and stats are in place; every thread is done with the previous
    // step's sP / sdS and (two stages) with the other stage, which is refilled right away.
    __syncthreads();
    if (kStages == 2 && m_block > m_block_min) { load_query_block(m_block - 1, stage ^ 1); }
    const float *st_lse = s_lse + stage * kCols;
    const float *st_d = s_d + stage * kCols;

    Tensor acc_st = partition_fragment_C(mma_sdp, Shape<Int<kRows>, Int<kCols>>{});  // (MMA, MMA_R, MMA_C)
    clear(acc_st);
    gemm_smem_smem(mma_sdp, acc_st, tSrK, tSrQ, tSsK, tSsQ(_, _, _, stage), sdp_copy_A, sdp_copy_B);
    score_mod.transform(acc_st);
    Tensor t_st = make_fragment_like(acc_st);  // tanh values, for the softcap derivative
    if constexpr (Is_softcap) { copy(acc_st, t_st); }
    // Keys past seqlen_k or pairs outside the window exist only in a few tiles (the last key
    // block, the diagonal band); everywhere else only ALiBi (if any) is added.
    if (score_mod.block_needs_mask(m0, m0 + kCols, n0, kRows)) {
      mask_scores_transposed<Has_alibi, true>(score_mod, acc_st, tScS, n0, m0);
    } else if constexpr (Has_alibi) {
      mask_scores_transposed<true, false>(score_mod, acc_st, tScS, n0, m0);
    }

    Tensor acc_dpt = partition_fragment_C(mma_sdp, Shape<Int<kRows>, Int<kCols>>{});
    clear(acc_dpt);
    gemm_smem_smem(mma_sdp, acc_dpt, tSrV, tSrdO, tSsV, tSsdO(_, _, _, stage), sdp_copy_A, sdp_copy_B);
    // P^T = exp(S^T - lse), dS^T = P^T (dP^T - D) [* (1 - t^2) with softcap], per query
    // column. With dropout (mask Z, 1 / p_keep where kept, 0 where dropped): dV takes
    // (Z P)^T and dS^T = P^T (Z dP^T - D).
    CUTE_UNROLL
    for (int i = 0; i < size(acc_st); ++i) {
      const int col = get<1>(tScS(i));
      const float pr = exp2f(acc_st(i) * p.scale_softmax_log2 - st_lse[col]);
      float dpz = acc_dpt(i), pz = pr;
      if constexpr (Is_dropout) {
        const float z = dropout.keep(m0 + col, n0 + get<0>(tScS(i))) ? p.rp_keep : 0.f;
        dpz *= z;
        pz *= z;
      }
      float ds = pr * (dpz - st_d[col]);
      if constexpr (Is_softcap) { ds *= 1.f - t_st(i) * t_st(i); }
      acc_st(i) = pz;
      acc_dpt(i) = ds;
    }
    acc_to_smem<Ktraits>(mma_sdp, acc_st, sP);
    acc_to_smem<Ktraits>(mma_sdp, acc_dpt, sdS);
    __syncthreads();  // P^T and dS^T are complete in shared memory

    gemm_smem_smem(mma_dkv, acc_dv, tdVrP, tdVrdOt, tdVsP, tdVsdOt(_, _, _, stage), dkv_copy_A, dkv_copy_Bt);
    gemm_smem_smem(mma_dkv, acc_dk, tdKrdS, tdKrQt, tdKsdS, tdKsQt(_, _, _, stage), dkv_copy_A, dkv_copy_Bt);
    accumulate_dq<Ktraits>(sdSt, sKt, dq_accum + int64_t(m0) * kHeadDim, seq.seqlen_q - m0);
    // One stage: every thread is done with sQ, sdO and the stats before the next loads.
    if constexpr (kStages == 1) { __syncthreads(); }
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

// The key blocks of CTA blockIdx.x: that one block (Split = false: one CTA per key block, the
// shared accumulator), or every dq_accum_splits-th block from it, in order, into its own
// accumulator copy (Split = true, deterministic). Two kernels rather than one with both
// paths: registers are allocated per kernel, and the loop's live state made the single-block
// path spill (d = 128 with ALiBi and softcap: 200 bytes).
template <typename Ktraits, bool Has_alibi, bool Is_softcap, bool Is_dropout, bool Split>
__forceinline__ __device__ void compute_dk_dv_blocks(const Flash_bwd_params &p) {
  if constexpr (!Split) {
    compute_dk_dv_tile<Ktraits, Has_alibi, Is_softcap, Is_dropout>(p, blockIdx.x, blockIdx.y, blockIdx.z, 0);
  } else {
    const int n_blocks = (p.seqlen_k + Ktraits::kBlockRows - 1) / Ktraits::kBlockRows;
    const int64_t split = int64_t(blockIdx.x) * p.dq_accum_split_stride;
    for (int n_block = blockIdx.x; n_block < n_blocks; n_block += gridDim.x) {
      compute_dk_dv_tile<Ktraits, Has_alibi, Is_softcap, Is_dropout>(p, n_block, blockIdx.y, blockIdx.z, split);
      __syncthreads();  // the block's epilogue read K's and V's shared memory; the next one refills it
    }
  }
}

// Grid: (key blocks, or dq_accum_splits with Split, batch, query heads).
template <typename Ktraits, bool Has_alibi, bool Is_softcap, bool Is_dropout, bool Split>
__global__ void __launch_bounds__(Ktraits::kNThreads, 1)
    flash_bwd_dk_dv_kernel(__grid_constant__ const Flash_bwd_params p) {
  compute_dk_dv_blocks<Ktraits, Has_alibi, Is_softcap, Is_dropout, Split>(p);
}

// The dK/dV kernel with a tile per architecture: Ktraits90 where the code was compiled for
// sm90 or later (__CUDA_ARCH__, so the PTX that actually runs decides), Ktraits elsewhere.
// One symbol for both, so the host launches it once and passes the shared memory of the
// traits that match the binary (run_flash_bwd reads the kernel's PTX version).
template <typename Ktraits, typename Ktraits90, bool Has_alibi, bool Is_softcap, bool Is_dropout, bool Split>
__global__ void __launch_bounds__(Ktraits::kNThreads, 1)
    flash_bwd_dk_dv_kernel_by_arch(__grid_constant__ const Flash_bwd_params p) {
  static_assert(Ktraits::kNThreads == Ktraits90::kNThreads && Ktraits::kBlockRows == Ktraits90::kBlockRows,
                "the host's grid and block must fit both tiles");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  compute_dk_dv_blocks<Ktraits90, Has_alibi, Is_softcap, Is_dropout, Split>(p);
#else
  compute_dk_dv_blocks<Ktraits, Has_alibi, Is_softcap, Is_dropout, Split>(p);
#endif
}

}  // namespace flash
