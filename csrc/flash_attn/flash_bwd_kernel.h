// Backward kernels (mma.sync):
// - dK/dV: one CTA per (key block, sequence, query head) keeps K, V stationary and
//   streams query blocks: S^T = K Q^T, P^T = exp(S^T - lse), dP^T = V dO^T,
//   dS^T = P^T (dP^T - D), dV += P^T dO, dK += dS^T Q. With Accum_dq (the default,
//   non-deterministic path) it also adds dQ += dS K of each step into an fp32
//   accumulator with atomics: 5 matrix products per tile pair, as in FlashAttention-2.
// - dQ (deterministic path): one CTA per (query block, sequence, head) keeps Q, dO
//   stationary and streams key blocks: S = Q K^T, P, dP = dO V^T, dS, dQ += dS K.
//   With it, no atomics anywhere: every gradient is bitwise reproducible.
// D = rowsum(dO * O) per query row and the forward's lse come precomputed. The score
// modifiers match the forward (score_mod.h); with softcap, dS carries the tanh
// derivative. dQ and dK are scaled by the softmax scale at the end.
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

// Column (within the tile) of element (r, c) of a (rows, cols) accumulator view of the
// dQ kernel: n-atom * 8 + 2 * (lane % 4) + j, with c = j + 2 * n-atom.
__forceinline__ __device__ int acc_col(int c) { return (c / 2) * 8 + (threadIdx.x % 4) * 2 + c % 2; }
// Row (within the tile) of row r = i + 2 * m-tile of a (rows, cols) accumulator view of
// the 1-D (warps along rows) MMA of the dQ kernel.
template <int kNWarps>
__forceinline__ __device__ int acc_row(int r) {
  return (r / 2) * 16 * kNWarps + (threadIdx.x / 32) * 16 + (threadIdx.x % 32) / 4 + 8 * (r % 2);
}

// P = exp(score - lse) and dS = P (Z dP - D) [* (1 - t^2) with softcap, t = tanh value],
// in place: s becomes P, dp becomes dS. lse_of / d_of give (row, col) -> lse * log2(e), D; with
// dropout, z_of gives Z = 1 / p_keep for a kept element and 0 for a dropped one.
template <bool Is_softcap, bool Is_dropout, typename TensorS, typename TensorDP, typename TensorT, typename LseOf,
          typename DOf, typename ZOf>
__forceinline__ __device__ void probs_and_dscores(TensorS &s, TensorDP &dp, TensorT const &t, float scale_log2,
                                                  LseOf lse_of, DOf d_of, ZOf z_of) {
  CUTE_UNROLL
  for (int r = 0; r < size<0>(s); ++r) {
    CUTE_UNROLL
    for (int c = 0; c < size<1>(s); ++c) {
      const float p = exp2f(s(r, c) * scale_log2 - lse_of(r, c));
      float dpz = dp(r, c);
      if constexpr (Is_dropout) { dpz *= z_of(r, c); }
      float ds = p * (dpz - d_of(r, c));
      if constexpr (Is_softcap) { ds *= 1.f - t(r, c) * t(r, c); }
      s(r, c) = p;
      dp(r, c) = ds;
    }
  }
}

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
template <bool Has_alibi, bool Mask, typename ScoreModT>
__forceinline__ __device__ void mask_score(const ScoreModT &sm, float &score, int query, int key) {
  const int diag = query + sm.seqlen_k - sm.seqlen_q;  // the key aligned with this query
  if constexpr (Has_alibi) { score -= sm.alibi_slope * float(abs(diag - key)); }
  if constexpr (Mask) {
    const bool visible = key < sm.seqlen_k && (sm.window_left < 0 || key >= diag - sm.window_left) &&
                         (sm.window_right < 0 || key <= diag + sm.window_right);
    if (!visible) { score = -INFINITY; }
  }
}

template <bool Has_alibi, bool Mask, typename ScoreModT, typename TensorS, typename TensorC>
__forceinline__ __device__ void mask_scores_transposed(const ScoreModT &sm, TensorS &st, TensorC const &coord, int n0,
                                                       int m0) {
  CUTE_UNROLL
  for (int i = 0; i < size(st); ++i) {
    mask_score<Has_alibi, Mask>(sm, st(i), m0 + get<1>(coord(i)), n0 + get<0>(coord(i)));
  }
}

// The query blocks [m_block_min, m_block_max) of block_m rows that see any key of [n0, n1):
// key j is visible to query i for j in [i + shift - left, i + shift + right].
__forceinline__ __device__ void query_blocks_seeing_keys(const Flash_bwd_params &p, const SeqInfo &seq, int n0,
                                                         int n1, int block_m, int &m_block_min, int &m_block_max) {
  const int shift = seq.seqlen_k - seq.seqlen_q;
  int m_lo = 0, m_hi = seq.seqlen_q;
  if (p.window_size_right >= 0) { m_lo = max(0, n0 - shift - p.window_size_right); }
  if (p.window_size_left >= 0) { m_hi = min(m_hi, n1 - 1 - shift + p.window_size_left + 1); }
  m_block_min = m_lo / block_m;
  m_block_max = m_hi > m_lo ? (m_hi + block_m - 1) / block_m : m_block_min;
}

// The key blocks [n_block_min, n_block_max) of block_n keys that queries [m0, m1) see.
__forceinline__ __device__ void key_blocks_seen_by_queries(const Flash_bwd_params &p, const SeqInfo &seq, int m0,
                                                           int m1, int block_n, int &n_block_min, int &n_block_max) {
  const int shift = seq.seqlen_k - seq.seqlen_q;
  n_block_min = 0;
  n_block_max = (seq.seqlen_k + block_n - 1) / block_n;
  if (p.window_size_left >= 0) { n_block_min = max(0, (m0 + shift - p.window_size_left) / block_n); }
  if (p.window_size_right >= 0) {
    const int last_key = m1 - 1 + shift + p.window_size_right;
    n_block_max = min(n_block_max, last_key < 0 ? 0 : last_key / block_n + 1);
  }
}

// The global tensors of one backward CTA at (sequence bidb, query head bidh): the query-side
// rows (Q, dO, dQ) as (seqlen_q, d); the key-side rows as (seqlen_k, d), K and V of the KV head,
// dK and dV of the query head (the host reduces them over GQA groups); lse, D and the fp32 dQ
// accumulator of this (sequence, head).
template <typename Element, int kHeadDim>
struct BwdRows {
  const Flash_bwd_params &p;
  const SeqInfo &seq;
  int bidb, bidh;

  __device__ auto query_side(void *ptr, int64_t batch_stride, int64_t row_stride, int64_t head_stride) const {
    return make_tensor(make_gmem_ptr(reinterpret_cast<Element *>(ptr) + seq.q_offset(batch_stride, row_stride, bidb) +
                                     bidh * head_stride),
                       make_shape(seq.seqlen_q, Int<kHeadDim>{}), make_stride(row_stride, _1{}));
  }
  __device__ auto key_side(void *ptr, int64_t batch_stride, int64_t row_stride, int64_t head_stride,
                           int head) const {
    return make_tensor(make_gmem_ptr(reinterpret_cast<Element *>(ptr) + seq.k_offset(batch_stride, row_stride, bidb) +
                                     head * head_stride),
                       make_shape(seq.seqlen_k, Int<kHeadDim>{}), make_stride(row_stride, _1{}));
  }
  __device__ auto q() const { return query_side(p.q_ptr, p.q_batch_stride, p.q_row_stride, p.q_head_stride); }
  __device__ auto dout() const { return query_side(p.do_ptr, p.do_batch_stride, p.do_row_stride, p.do_head_stride); }
  __device__ auto dq() const { return query_side(p.dq_ptr, p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride); }
  __device__ auto k() const {
    return key_side(p.k_ptr, p.k_batch_stride, p.k_row_stride, p.k_head_stride, bidh / p.h_h_k_ratio);
  }
  __device__ auto v() const {
    return key_side(p.v_ptr, p.v_batch_stride, p.v_row_stride, p.v_head_stride, bidh / p.h_h_k_ratio);
  }
  __device__ auto dk() const { return key_side(p.dk_ptr, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride, bidh); }
  __device__ auto dv() const { return key_side(p.dv_ptr, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride, bidh); }
  __device__ const float *lse() const { return p.softmax_lse_ptr + seq.lse_offset(p, bidb, bidh); }
  __device__ const float *dsum() const { return p.softmax_d_ptr + seq.lse_offset(p, bidb, bidh); }
  __device__ float *dq_accum() const {
    return p.dq_accum_ptr + seq.q_offset(p.dq_accum_batch_stride, p.dq_accum_row_stride, bidb) +
           bidh * p.dq_accum_head_stride;
  }
};

// lse * log2(e) (for exp2) and D of the query rows [m0, m0 + kCount) into s_lse / s_d, by the
// kThreads threads of the CTA; rows at or past seqlen_q get lse = +inf (so P = 0) and D = 0.
template <int kCount, int kThreads>
__forceinline__ __device__ void load_row_stats(float *s_lse, float *s_d, const float *lse, const float *dsum, int m0,
                                               int seqlen_q) {
  for (int i = threadIdx.x; i < kCount; i += kThreads) {
    const bool real = m0 + i < seqlen_q;
    s_lse[i] = real ? lse[m0 + i] * float(M_LOG2E) : INFINITY;
    s_d[i] = real ? dsum[m0 + i] : 0.f;
  }
}

// The score modifiers of one (keys, queries) step in the key-stationary view: the window /
// key-tail mask where the tile needs it (block_needs_mask), ALiBi everywhere.
template <bool Has_alibi, typename ScoreModT, typename TensorS, typename TensorC>
__forceinline__ __device__ void mask_tile_transposed(const ScoreModT &sm, TensorS &st, TensorC const &coord, int n0,
                                                     int m0, bool needs_mask) {
  if (needs_mask) {
    mask_scores_transposed<Has_alibi, true>(sm, st, coord, n0, m0);
  } else if constexpr (Has_alibi) {
    mask_scores_transposed<true, false>(sm, st, coord, n0, m0);
  }
}

// P^T = exp(S^T - lse), dS^T = P^T (dP^T - D) [* (1 - t^2) with softcap], per query column, in
// place of the S^T / dP^T accumulators; coord gives each element's (key, query) within the tile,
// st_lse / st_d the column statistics. With dropout (mask Z, 1 / p_keep where kept, 0 where
// dropped): dV takes (Z P)^T and dS^T = P^T (Z dP^T - D).
template <bool Is_softcap, bool Is_dropout, typename AccS, typename AccDP, typename TensorT, typename TensorC,
          typename DropoutT>
__forceinline__ __device__ void probs_and_dscores_transposed(AccS &acc_st, AccDP &acc_dpt, TensorT const &t_st,
                                                             TensorC const &coord, const float *st_lse,
                                                             const float *st_d, const Flash_bwd_params &p,
                                                             const DropoutT &dropout, int m0, int n0) {
  CUTE_UNROLL
  for (int i = 0; i < size(acc_st); ++i) {
    const int col = get<1>(coord(i));
    const float pr = exp2f(acc_st(i) * p.scale_softmax_log2 - st_lse[col]);
    float dpz = acc_dpt(i), pz = pr;
    if constexpr (Is_dropout) {
      const float z = dropout.keep(m0 + col, n0 + get<0>(coord(i))) ? p.rp_keep : 0.f;
      dpz *= z;
      pz *= z;
    }
    float ds = pr * (dpz - st_d[col]);
    if constexpr (Is_softcap) { ds *= 1.f - t_st(i) * t_st(i); }
    acc_st(i) = pz;
    acc_dpt(i) = ds;
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

template <typename Ktraits, bool Has_alibi, bool Is_softcap, bool Is_dropout, bool Accum_dq>
__forceinline__ __device__ void compute_dk_dv_tile(const Flash_bwd_params &p, int n_block, int bidb, int bidh) {
  using Element = typename Ktraits::Element;
  constexpr int kRows = Ktraits::kBlockRows;  // keys
  constexpr int kCols = Ktraits::kBlockCols;  // queries
  constexpr int kHeadDim = Ktraits::kHeadDim;
  const int tidx = threadIdx.x;

  const SeqInfo seq(p, bidb);
  const int n0 = n_block * kRows;
  if (n0 >= seq.seqlen_k) { return; }
  const int n1 = min(n0 + kRows, seq.seqlen_k);
  int m_block_min, m_block_max;
  query_blocks_seeing_keys(p, seq, n0, n1, kCols, m_block_min, m_block_max);

  const BwdRows<Element, kHeadDim> rows{p, seq, bidb, bidh};
  const float *lse = rows.lse();
  const float *dsum = rows.dsum();
  float *dq_accum = nullptr;
  if constexpr (Accum_dq) { dq_accum = rows.dq_accum(); }

  Tensor gK = local_tile(rows.k(), Shape<Int<kRows>, Int<kHeadDim>>{}, make_coord(n_block, 0));   // (R, D)
  Tensor gV = local_tile(rows.v(), Shape<Int<kRows>, Int<kHeadDim>>{}, make_coord(n_block, 0));
  Tensor gdK = local_tile(rows.dk(), Shape<Int<kRows>, Int<kHeadDim>>{}, make_coord(n_block, 0));
  Tensor gdV = local_tile(rows.dv(), Shape<Int<kRows>, Int<kHeadDim>>{}, make_coord(n_block, 0));
  Tensor gQ = local_tile(rows.q(), Shape<Int<kCols>, Int<kHeadDim>>{}, make_coord(_, 0));   // (C, D, mblocks)
  Tensor gdO = local_tile(rows.dout(), Shape<Int<kCols>, Int<kHeadDim>>{}, make_coord(_, 0));

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
    load_row_stats<kCols, Ktraits::kNThreads>(s_lse + stage * kCols, s_d + stage * kCols, lse, dsum, m0, seq.seqlen_q);
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
    mask_tile_transposed<Has_alibi>(score_mod, acc_st, tScS, n0, m0,
                                    score_mod.block_needs_mask(m0, m0 + kCols, n0, kRows));

    Tensor acc_dpt = partition_fragment_C(mma_sdp, Shape<Int<kRows>, Int<kCols>>{});
    clear(acc_dpt);
    gemm_smem_smem(mma_sdp, acc_dpt, tSrV, tSrdO, tSsV, tSsdO(_, _, _, stage), sdp_copy_A, sdp_copy_B);
    probs_and_dscores_transposed<Is_softcap, Is_dropout>(acc_st, acc_dpt, t_st, tScS, st_lse, st_d, p, dropout, m0, n0);
    acc_to_smem<Ktraits>(mma_sdp, acc_st, sP);
    acc_to_smem<Ktraits>(mma_sdp, acc_dpt, sdS);
    __syncthreads();  // P^T and dS^T are complete in shared memory

    gemm_smem_smem(mma_dkv, acc_dv, tdVrP, tdVrdOt, tdVsP, tdVsdOt(_, _, _, stage), dkv_copy_A, dkv_copy_Bt);
    gemm_smem_smem(mma_dkv, acc_dk, tdKrdS, tdKrQt, tdKsdS, tdKsQt(_, _, _, stage), dkv_copy_A, dkv_copy_Bt);
    if constexpr (Accum_dq) {
      accumulate_dq<Ktraits>(sdSt, sKt, dq_accum + int64_t(m0) * kHeadDim, seq.seqlen_q - m0);
    }
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

template <typename Ktraits, bool Has_alibi, bool Is_softcap, bool Is_dropout>
__forceinline__ __device__ void compute_dq_tile(const Flash_bwd_params &p, int m_block, int bidb, int bidh) {
  using Element = typename Ktraits::Element;
  constexpr int kRows = Ktraits::kBlockRows;  // queries
  constexpr int kCols = Ktraits::kBlockCols;  // keys
  constexpr int kHeadDim = Ktraits::kHeadDim;
  constexpr int kNWarps = Ktraits::kNWarps;
  static_assert(kRows % (16 * kNWarps) == 0, "the 1-D MMA stacks 16-row warp tiles along the queries: "
                "launch this kernel with traits of bwd_dq_tile(tile)");
  const int tidx = threadIdx.x;

  const SeqInfo seq(p, bidb);
  const int m0 = m_block * kRows;
  if (m0 >= seq.seqlen_q) { return; }
  const int m1 = min(m0 + kRows, seq.seqlen_q);
  int n_block_min, n_block_max;
  key_blocks_seen_by_queries(p, seq, m0, m1, kCols, n_block_min, n_block_max);

  const BwdRows<Element, kHeadDim> rows{p, seq, bidb, bidh};
  const float *lse = rows.lse();
  const float *dsum = rows.dsum();

  Tensor gQ = local_tile(rows.q(), Shape<Int<kRows>, Int<kHeadDim>>{}, make_coord(m_block, 0));   // (R, D)
  Tensor gdO = local_tile(rows.dout(), Shape<Int<kRows>, Int<kHeadDim>>{}, make_coord(m_block, 0));
  Tensor gdQ = local_tile(rows.dq(), Shape<Int<kRows>, Int<kHeadDim>>{}, make_coord(m_block, 0));
  Tensor gK = local_tile(rows.k(), Shape<Int<kCols>, Int<kHeadDim>>{}, make_coord(_, 0));  // (C, D, nblocks)
  Tensor gV = local_tile(rows.v(), Shape<Int<kCols>, Int<kHeadDim>>{}, make_coord(_, 0));

  extern __shared__ char smem[];
  using SmemRows = typename Ktraits::SmemLayoutRows;
  using SmemCols = typename Ktraits::SmemLayoutCols;
  Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<Element *>(smem)), SmemRows{})(_, _, 0);  // (R, D)
  Tensor sdO = make_tensor(sQ.data() + cosize(SmemRows{}), SmemRows{})(_, _, 0);
  constexpr int kStages = Ktraits::kStages;
  Tensor sK = make_tensor(sdO.data() + cosize(SmemRows{}), SmemCols{});  // (C, D, stages)
  Tensor sV = make_tensor(sK.data() + cosize(SmemCols{}), SmemCols{});
  Tensor sKt = make_tensor(sK.data(), typename Ktraits::SmemLayoutColsT{});  // (D, C, stages)

  typename Ktraits::GmemTiledCopyQKV gmem_copy;
  auto gmem_thr = gmem_copy.get_thread_slice(tidx);
  Tensor tQgQ = gmem_thr.partition_S(gQ);
  Tensor tQsQ = gmem_thr.partition_D(sQ);
  Tensor tdOgdO = gmem_thr.partition_S(gdO);
  Tensor tdOsdO = gmem_thr.partition_D(sdO);
  Tensor tKgK = gmem_thr.partition_S(gK);  // (CPY, CPY_C, CPY_D, nblocks)
  Tensor tKsK = gmem_thr.partition_D(sK);  // (CPY, CPY_C, CPY_D, stages)
  Tensor tVgV = gmem_thr.partition_S(gV);
  Tensor tVsV = gmem_thr.partition_D(sV);
  Tensor tRc = gmem_thr.partition_S(make_identity_tensor(make_shape(Int<kRows>{}, Int<kHeadDim>{})));
  Tensor tCc = gmem_thr.partition_S(make_identity_tensor(make_shape(Int<kCols>{}, Int<kHeadDim>{})));

  typename Ktraits::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tidx);
  Tensor tSrQ = thr_mma.partition_fragment_A(sQ);    // (MMA, MMA_R, MMA_D)
  Tensor tSrdO = thr_mma.partition_fragment_A(sdO);
  Tensor tSrK = thr_mma.partition_fragment_B(sK(_, _, 0));    // (MMA, MMA_C, MMA_D)
  Tensor tSrV = thr_mma.partition_fragment_B(sV(_, _, 0));
  Tensor tdQrKt = thr_mma.partition_fragment_B(
      make_tensor(sK.data(), make_layout(Shape<Int<kHeadDim>, Int<kCols>>{})));  // (MMA, MMA_D, MMA_C)
  Tensor acc_dq = partition_fragment_C(tiled_mma, Shape<Int<kRows>, Int<kHeadDim>>{});
  clear(acc_dq);

  auto smem_copy_A = make_tiled_copy_A(typename Ktraits::SmemCopyAtom{}, tiled_mma);
  auto smem_copy_B = make_tiled_copy_B(typename Ktraits::SmemCopyAtom{}, tiled_mma);
  auto smem_copy_Bt = make_tiled_copy_B(typename Ktraits::SmemCopyAtomTransposed{}, tiled_mma);
  Tensor tSsQ = smem_copy_A.get_thread_slice(tidx).partition_S(sQ);
  Tensor tSsdO = smem_copy_A.get_thread_slice(tidx).partition_S(sdO);
  Tensor tSsK = smem_copy_B.get_thread_slice(tidx).partition_S(sK);  // (CPY, CPY_C, CPY_D, stages)
  Tensor tSsV = smem_copy_B.get_thread_slice(tidx).partition_S(sV);
  Tensor tOsKt = smem_copy_Bt.get_thread_slice(tidx).partition_S(sKt);  // (CPY, CPY_D, CPY_C, stages)

  copy_rows_guarded(gmem_copy, tQgQ, tQsQ, tRc, m1 - m0);
  copy_rows_guarded(gmem_copy, tdOgdO, tdOsdO, tRc, m1 - m0);
  cute::cp_async_fence();

  // lse * log2(e) and D of this thread's query rows (rows past seqlen_q: P = 0).
  Tensor acc_shape = partition_fragment_C(tiled_mma, Shape<Int<kRows>, Int<kCols>>{});
  constexpr int kNRows = decltype(size<0>(acc_layout_rowcol(acc_shape.layout())))::value;
  float row_lse[kNRows], row_d[kNRows];
  CUTE_UNROLL
  for (int r = 0; r < kNRows; ++r) {
    const int row = m0 + acc_row<kNWarps>(r);
    row_lse[r] = row < m1 ? lse[row] * float(M_LOG2E) : INFINITY;
    row_d[r] = row < m1 ? dsum[row] : 0.f;
  }

  const ScoreMod<Has_alibi, Is_softcap, Is_dropout> score_mod(p, seq.seqlen_q, seq.seqlen_k, bidb, bidh);
  const DropoutOrNone<Is_dropout> dropout(p, bidb, bidh);
  // Issues the loads of key block n_block (rows guarded against seqlen_k) into `stage`.
  auto load_key_block = [&](int n_block, int stage) {
    const int n0 = n_block * kCols;
    copy_rows_guarded(gmem_copy, tKgK(_, _, _, n_block), tKsK(_, _, _, stage), tCc, seq.seqlen_k - n0);
    copy_rows_guarded(gmem_copy, tVgV(_, _, _, n_block), tVsV(_, _, _, stage), tCc, seq.seqlen_k - n0);
    cute::cp_async_fence();
  };
  if (kStages == 2 && n_block_max > n_block_min) { load_key_block(n_block_max - 1, 0); }
  for (int n_block = n_block_max - 1, stage = 0; n_block >= n_block_min; --n_block, stage ^= (kStages - 1)) {
    const int n0 = n_block * kCols;
    if constexpr (kStages == 1) { load_key_block(n_block, 0); }
    cute::cp_async_wait<0>();
    __syncthreads();  // as in the dK/dV kernel
    if (kStages == 2 && n_block > n_block_min) { load_key_block(n_block - 1, stage ^ 1); }

    Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kRows>, Int<kCols>>{});  // (MMA, MMA_R, MMA_C)
    clear(acc_s);
    gemm_smem_smem(tiled_mma, acc_s, tSrQ, tSrK, tSsQ, tSsK(_, _, _, stage), smem_copy_A, smem_copy_B);
    score_mod.transform(acc_s);
    Tensor t_s = make_fragment_like(acc_s);
    if constexpr (Is_softcap) { copy(acc_s, t_s); }
    Tensor s = make_tensor(acc_s.data(), acc_layout_rowcol(acc_s.layout()));  // (queries, keys)
    score_mod.template apply<kNWarps>(s, m0, n0, score_mod.block_needs_mask(m0, m1, n0, kCols));

    Tensor acc_dp = partition_fragment_C(tiled_mma, Shape<Int<kRows>, Int<kCols>>{});
    clear(acc_dp);
    gemm_smem_smem(tiled_mma, acc_dp, tSrdO, tSrV, tSsdO, tSsV(_, _, _, stage), smem_copy_A, smem_copy_B);
    Tensor dp = make_tensor(acc_dp.data(), acc_layout_rowcol(acc_dp.layout()));
    Tensor tt = make_tensor(t_s.data(), acc_layout_rowcol(t_s.layout()));
    probs_and_dscores<Is_softcap, Is_dropout>(
        s, dp, tt, p.scale_softmax_log2, [&](int r, int) { return row_lse[r]; }, [&](int r, int) { return row_d[r]; },
        [&](int r, int c) {
          if constexpr (Is_dropout) {
            return dropout.keep(m0 + acc_row<kNWarps>(r), n0 + acc_col(c)) ? p.rp_keep : 0.f;
          } else {
            return 1.f;
          }
        });

    Tensor rdS = convert_type<Element>(acc_dp);
    Tensor tOrdS = make_tensor(rdS.data(), acc_layout_as_A(rdS.layout()));
    gemm_reg_smem(tiled_mma, acc_dq, tOrdS, tdQrKt, tOsKt(_, _, _, stage), smem_copy_Bt);
    if constexpr (kStages == 1) { __syncthreads(); }  // every thread is done with sK, sV
  }

  CUTE_UNROLL
  for (int i = 0; i < size(acc_dq); ++i) { acc_dq(i) *= p.scale_qk; }
  // Stage dQ in Q's space once every thread is past its last read of it (and, with no
  // key block at all, once Q's loads have landed).
  cute::cp_async_wait<0>();
  __syncthreads();
  store_acc_tile<Ktraits>(tiled_mma, acc_dq, sQ, gdQ, m1 - m0);
}

// Whether this is sm90a code that leaves out the mma.sync kernels the wgmma ones replace
// (flash_bwd_kernel_sm90.h: dK/dV and dQ at every head dim with a backward kernel). The host never
// launches them there; setup.py's FLASH_ATTN_SM90_MMA_SYNC_BWD=1 keeps them (for the
// FLASH_ATTN_BWD_SM90=0 switch). Leaving them out saves ~25% of a full sm90 build.
#if defined(__CUDA_ARCH__) && defined(CUTE_ARCH_MMA_SM90A_ENABLED) && !defined(FLASH_ATTN_SM90_MMA_SYNC_BWD)
constexpr bool kWgmmaReplacesMmaSyncBwd = true;
#else
constexpr bool kWgmmaReplacesMmaSyncBwd = false;
#endif

// Grids: (key blocks, batch, query heads) and (query blocks, batch, query heads).
template <typename Ktraits, bool Has_alibi, bool Is_softcap, bool Is_dropout, bool Accum_dq>
__global__ void __launch_bounds__(Ktraits::kNThreads, 1)
    flash_bwd_dk_dv_kernel(__grid_constant__ const Flash_bwd_params p) {
  if constexpr (kWgmmaReplacesMmaSyncBwd) {
    __trap();
  } else {
    compute_dk_dv_tile<Ktraits, Has_alibi, Is_softcap, Is_dropout, Accum_dq>(p, blockIdx.x, blockIdx.y, blockIdx.z);
  }
}

// The dK/dV kernel with a tile per architecture: Ktraits90 where the code was compiled for
// sm90 or later (__CUDA_ARCH__, so the PTX that actually runs decides), Ktraits elsewhere.
// One symbol for both, so the host launches it once and passes the shared memory of the
// traits that match the binary (run_flash_bwd reads the kernel's PTX version).
template <typename Ktraits, typename Ktraits90, bool Has_alibi, bool Is_softcap, bool Is_dropout, bool Accum_dq>
__global__ void __launch_bounds__(Ktraits::kNThreads, 1)
    flash_bwd_dk_dv_kernel_by_arch(__grid_constant__ const Flash_bwd_params p) {
  static_assert(Ktraits::kNThreads == Ktraits90::kNThreads && Ktraits::kBlockRows == Ktraits90::kBlockRows,
                "the host's grid and block must fit both tiles");
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if constexpr (kWgmmaReplacesMmaSyncBwd) {
    __trap();
  } else {
    compute_dk_dv_tile<Ktraits90, Has_alibi, Is_softcap, Is_dropout, Accum_dq>(p, blockIdx.x, blockIdx.y,
                                                                               blockIdx.z);
  }
#else
  compute_dk_dv_tile<Ktraits, Has_alibi, Is_softcap, Is_dropout, Accum_dq>(p, blockIdx.x, blockIdx.y, blockIdx.z);
#endif
}

template <typename Ktraits, bool Has_alibi, bool Is_softcap, bool Is_dropout>
__global__ void __launch_bounds__(Ktraits::kNThreads, 1)
    flash_bwd_dq_kernel(__grid_constant__ const Flash_bwd_params p) {
  if constexpr (kWgmmaReplacesMmaSyncBwd) {
    __trap();
  } else {
    compute_dq_tile<Ktraits, Has_alibi, Is_softcap, Is_dropout>(p, blockIdx.x, blockIdx.y, blockIdx.z);
  }
}

}  // namespace flash
