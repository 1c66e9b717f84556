// Forward kernel (FA2 class): one CTA computes a kBlockM x d output tile for one
// (sequence, head), streaming key/value blocks through shared memory with cp.async
// and computing S = Q K^T and O += P V with mma.sync, softmax online in registers.
#pragma once

#include <cmath>
#include <cute/tensor.hpp>
#include <cutlass/array.h>
#include <cutlass/numeric_types.h>

#include "block_info.h"
#include "dropout.h"
#include "flash.h"
#include "kernel_traits.h"
#include "paged_kv.h"
#include "score_mod.h"
#include "softmax.h"
#include "split_kv.h"
#include "utils.h"

namespace flash {

using namespace cute;

// Writes zeros to O and +inf to lse for rows [m0, seqlen_q) of a tile that sees no key.
template <typename Ktraits, typename TensorO>
__forceinline__ __device__ void write_empty_tile(const Flash_fwd_params &p, TensorO &gO, float *lse,
                                                 int rows) {
  using Element = typename Ktraits::Element;
  constexpr int kHeadDim = Ktraits::kHeadDim;
  constexpr int kElemsPerLoad = Ktraits::kGmemElemsPerLoad;
  for (int i = threadIdx.x; i < Ktraits::kBlockM * (kHeadDim / kElemsPerLoad); i += Ktraits::kNThreads) {
    const int row = i / (kHeadDim / kElemsPerLoad);
    const int col = (i % (kHeadDim / kElemsPerLoad)) * kElemsPerLoad;
    if (row < rows) {
      cutlass::Array<Element, kElemsPerLoad> zeros;
      zeros.clear();
      *reinterpret_cast<cutlass::Array<Element, kElemsPerLoad> *>(&gO(row, col)) = zeros;
    }
  }
  for (int row = threadIdx.x; row < rows; row += Ktraits::kNThreads) { lse[row] = INFINITY; }
}

// The K/V stage of the next key block: 0 with one stage, the other one with two, the
// next of three in turn.
template <int kStages>
__forceinline__ __device__ int next_stage(int stage) {
  if constexpr (kStages == 3) {
    return stage == 2 ? 0 : stage + 1;
  } else {
    return stage ^ (kStages - 1);
  }
}

// Is_split: this CTA is key-block share `split` of p.num_splits (split_kv.h) and writes its
// partial O and lse to oaccum/lseaccum instead of O and lse.
// Is_paged: K and V are read through p.block_table (paged_kv.h); everything else is the same.
template <typename Ktraits, bool Has_alibi, bool Is_softcap, bool Is_dropout, bool Is_split = false,
          bool Is_paged = false>
__forceinline__ __device__ void compute_attn_fwd_tile(const Flash_fwd_params &p, int m_block, int bidb,
                                                      int bidh, int split = 0) {
  static_assert(!(Is_split && Is_dropout), "split-KV kernels have no dropout");
  static_assert(!(Is_paged && Is_dropout), "paged-KV kernels have no dropout");
  using Element = typename Ktraits::Element;
  constexpr int kBlockM = Ktraits::kBlockM;
  constexpr int kBlockN = Ktraits::kBlockN;
  constexpr int kHeadDim = Ktraits::kHeadDim;
  const int tidx = threadIdx.x;

  // Paged: key counts from seqused_k or cu_seqlens_k, bounded by the pages (paged_kv.h).
  const SeqInfo seq = Is_paged ? paged_seq_info(p, bidb) : SeqInfo(p, bidb);
  const int m0 = m_block * kBlockM;
  if (m0 >= seq.seqlen_q) { return; }
  const int m1 = min(m0 + kBlockM, seq.seqlen_q);  // rows [m0, m1) are real

  // Key blocks this tile can see: [n_block_min, n_block_max).
  const int shift = seq.seqlen_k - seq.seqlen_q;
  int n_block_min = 0;
  int n_block_max = (seq.seqlen_k + kBlockN - 1) / kBlockN;
  if (p.window_size_left >= 0) { n_block_min = max(0, (m0 + shift - p.window_size_left) / kBlockN); }
  if (p.window_size_right >= 0) {
    const int last_key = m1 - 1 + shift + p.window_size_right;  // inclusive
    n_block_max = min(n_block_max, last_key < 0 ? 0 : last_key / kBlockN + 1);
  }
  if constexpr (Is_split) { split_share(n_block_min, n_block_max, split, p.num_splits); }

  // Global tensors of this (sequence, head).
  Tensor mQ = make_tensor(make_gmem_ptr(reinterpret_cast<Element *>(p.q_ptr) +
                                        seq.q_offset(p.q_batch_stride, p.q_row_stride, bidb) +
                                        bidh * p.q_head_stride),
                          make_shape(seq.seqlen_q, Int<kHeadDim>{}), make_stride(p.q_row_stride, _1{}));
  Tensor mO = make_tensor(make_gmem_ptr(reinterpret_cast<Element *>(p.o_ptr) +
                                        seq.q_offset(p.o_batch_stride, p.o_row_stride, bidb) +
                                        bidh * p.o_head_stride),
                          make_shape(seq.seqlen_q, Int<kHeadDim>{}), make_stride(p.o_row_stride, _1{}));
  const int bidh_kv = bidh / p.h_h_k_ratio;
  // Paged: mK and mV only give the copy's per-row layout; PagedKV finds the rows.
  Tensor mK = make_tensor(make_gmem_ptr(reinterpret_cast<Element *>(p.k_ptr) +
                                        (Is_paged ? 0 : seq.k_offset(p.k_batch_stride, p.k_row_stride, bidb)) +
                                        bidh_kv * p.k_head_stride),
                          make_shape(seq.seqlen_k, Int<kHeadDim>{}), make_stride(p.k_row_stride, _1{}));
  Tensor mV = make_tensor(make_gmem_ptr(reinterpret_cast<Element *>(p.v_ptr) +
                                        (Is_paged ? 0 : seq.k_offset(p.v_batch_stride, p.v_row_stride, bidb)) +
                                        bidh_kv * p.v_head_stride),
                          make_shape(seq.seqlen_k, Int<kHeadDim>{}), make_stride(p.v_row_stride, _1{}));
  // Split kernels write fp32 partials for the combine, except with a single share (no
  // partial buffers, p.oaccum_ptr null): then the output itself, as the unsplit kernel does.
  const bool writes_partial = Is_split && p.oaccum_ptr != nullptr;
  float *lse = writes_partial ? p.lseaccum_ptr + accum_row_offset(p, seq, bidb, bidh, split) + m0
                              : p.softmax_lse_ptr + seq.lse_offset(p, bidb, bidh) + m0;

  Tensor gQ = local_tile(mQ, Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(m_block, 0));  // (BM, D)
  Tensor gO = local_tile(mO, Shape<Int<kBlockM>, Int<kHeadDim>>{}, make_coord(m_block, 0));  // (BM, D)
  Tensor gK = local_tile(mK, Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, 0));  // (BN, D, nblocks)
  Tensor gV = local_tile(mV, Shape<Int<kBlockN>, Int<kHeadDim>>{}, make_coord(_, 0));  // (BN, D, nblocks)

  if (n_block_max <= n_block_min) {  // no key visible to any row of this tile (or share)
    if (writes_partial) {
      write_empty_split_tile<Ktraits>(p.oaccum_ptr + (accum_row_offset(p, seq, bidb, bidh, split) + m0) * kHeadDim,
                                      lse, m1 - m0);
    } else {
      write_empty_tile<Ktraits>(p, gO, lse, m1 - m0);
    }
    return;
  }

  // Shared memory: Q | K stages | V stages. With one stage, the V load overlaps
  // S = Q K^T and the next K load overlaps softmax and P V (two barriers per step);
  // with two, K and V of the next step load during the whole current step (one barrier).
  constexpr int kStages = Ktraits::kStages;
  extern __shared__ char smem[];
  Tensor sQ = make_tensor(make_smem_ptr(reinterpret_cast<Element *>(smem)), typename Ktraits::SmemLayoutQ{});
  Tensor sK = make_tensor(sQ.data() + size(sQ), typename Ktraits::SmemLayoutKV{});  // (BN, D, stages)
  Tensor sV = make_tensor(sK.data() + size(sK), typename Ktraits::SmemLayoutKV{});  // (BN, D, stages)
  Tensor sVt = make_tensor(sV.data(), typename Ktraits::SmemLayoutVt{});            // (D, BN, stages)
  Tensor sO = make_tensor(sQ.data(), typename Ktraits::SmemLayoutO{});

  // Global -> shared copies (16 bytes per thread per step).
  typename Ktraits::GmemTiledCopyQKV gmem_copy;
  auto gmem_thr = gmem_copy.get_thread_slice(tidx);
  Tensor tQgQ = gmem_thr.partition_S(gQ);  // (CPY, CPY_M, CPY_D)
  Tensor tQsQ = gmem_thr.partition_D(sQ);
  Tensor tKgK = gmem_thr.partition_S(gK);  // (CPY, CPY_N, CPY_D, nblocks)
  Tensor tKsK = gmem_thr.partition_D(sK);  // (CPY, CPY_N, CPY_D, stages)
  Tensor tVgV = gmem_thr.partition_S(gV);
  Tensor tVsV = gmem_thr.partition_D(sV);
  // Row coordinates of each copied element, for guarding rows past the sequence end.
  Tensor tQcQ = gmem_thr.partition_S(make_identity_tensor(make_shape(Int<kBlockM>{}, Int<kHeadDim>{})));
  Tensor tKVcKV = gmem_thr.partition_S(make_identity_tensor(make_shape(Int<kBlockN>{}, Int<kHeadDim>{})));
  // Paged: where this thread's K/V rows of the tile being loaded sit (fetched one tile
  // ahead, see paged_kv.h). (CPY, CPY_D) row layouts of one K and one V row.
  [[maybe_unused]] PagedKVOrNone<Ktraits, Is_paged> paged(p, bidb, bidh_kv, get<0>(tKVcKV(0, 0, 0)),
                                                          get<1>(tKVcKV(0, 0, 0)));
  // Paged: the copy's partitions of the smem tiles with rows permuted (PagedKV::smem_view).
  auto paged_partition = [&](auto const &smem_tile) {
    if constexpr (Is_paged) {
      return gmem_thr.partition_D(PagedKV<Ktraits>::smem_view(smem_tile));
    } else {
      return gmem_thr.partition_D(smem_tile);
    }
  };
  [[maybe_unused]] Tensor tKsKp = paged_partition(sK);  // (CPY, CPY_N, CPY_D, stages)
  [[maybe_unused]] Tensor tVsVp = paged_partition(sV);
  [[maybe_unused]] const auto k_row = tKgK(_, 0, _, 0).layout();
  [[maybe_unused]] const auto v_row = tVgV(_, 0, _, 0).layout();

  // MMA fragments and shared -> register copies (ldmatrix).
  typename Ktraits::TiledMma tiled_mma;
  auto thr_mma = tiled_mma.get_thread_slice(tidx);
  Tensor tSrQ = thr_mma.partition_fragment_A(sQ);                 // (MMA, MMA_M, MMA_D)
  Tensor tSrK = thr_mma.partition_fragment_B(sK(_, _, 0));        // (MMA, MMA_N, MMA_D)
  Tensor tOrVt = thr_mma.partition_fragment_B(
      make_tensor(sV.data(), make_layout(Shape<Int<kHeadDim>, Int<kBlockN>>{})));  // (MMA, MMA_D, MMA_N)
  Tensor acc_o = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kHeadDim>>{});  // (MMA, MMA_M, MMA_D)

  auto smem_copy_Q = make_tiled_copy_A(typename Ktraits::SmemCopyAtom{}, tiled_mma);
  Tensor tSsQ = smem_copy_Q.get_thread_slice(tidx).partition_S(sQ);
  auto smem_copy_K = make_tiled_copy_B(typename Ktraits::SmemCopyAtom{}, tiled_mma);
  Tensor tSsK = smem_copy_K.get_thread_slice(tidx).partition_S(sK);  // (CPY, CPY_N, CPY_D, stages)
  auto smem_copy_V = make_tiled_copy_B(typename Ktraits::SmemCopyAtomTransposed{}, tiled_mma);
  Tensor tOsVt = smem_copy_V.get_thread_slice(tidx).partition_S(sVt);  // (CPY, CPY_D, CPY_N, stages)

  // Prologue: Q and the last K (and V, with two stages) block: the only one that can
  // be partial, since key blocks are visited last to first.
  copy_rows_guarded(gmem_copy, tQgQ, tQsQ, tQcQ, m1 - m0);
  int n_block = n_block_max - 1;
  const int last_rows = seq.seqlen_k - n_block * kBlockN;
  if constexpr (Is_paged) {
    paged.fetch(n_block);
    paged.advance();
    paged.copy_k(gmem_copy, k_row, tKsKp(_, _, _, 0), tKVcKV, last_rows);
    if constexpr (kStages >= 2) { paged.copy_v(gmem_copy, v_row, tVsVp(_, _, _, 0), tKVcKV, last_rows); }
    paged.fetch(n_block - 1);  // the next tile's pages, in flight during this one
  } else {
    copy_rows_guarded(gmem_copy, tKgK(_, _, _, n_block), tKsK(_, _, _, 0), tKVcKV, last_rows);
    if constexpr (kStages >= 2) {
      copy_rows_guarded(gmem_copy, tVgV(_, _, _, n_block), tVsV(_, _, _, 0), tKVcKV, last_rows);
    }
  }
  cute::cp_async_fence();
  // Three stages: the next block too, into stage 1 (its own group), so two blocks are in
  // flight from the start.
  if constexpr (kStages == 3) {
    if (n_block - 1 >= n_block_min) {
      if constexpr (Is_paged) {
        paged.advance();
        paged.copy_k(gmem_copy, k_row, tKsKp(_, _, _, 1), tKVcKV, kBlockN);
        paged.copy_v(gmem_copy, v_row, tVsVp(_, _, _, 1), tKVcKV, kBlockN);
      } else {
        copy(gmem_copy, tKgK(_, _, _, n_block - 1), tKsK(_, _, _, 1));
        copy(gmem_copy, tVgV(_, _, _, n_block - 1), tVsV(_, _, _, 1));
      }
      cute::cp_async_fence();
    }
    if constexpr (Is_paged) { paged.fetch(n_block - 2); }
  }

  clear(acc_o);
  Tensor acc_o_rc = make_tensor(acc_o.data(), acc_layout_rowcol(acc_o.layout()));
  constexpr int kNRows = decltype(size<0>(acc_o_rc))::value;
  OnlineSoftmax<kNRows> softmax;
  const ScoreMod<Has_alibi, Is_softcap, /*Alibi_optional=*/Is_dropout || Is_split || Is_paged,
                 /*Softcap_optional=*/Is_split || Is_paged>
      score_mod(p, seq.seqlen_q, seq.seqlen_k, bidb, bidh);
  [[maybe_unused]] const DropoutOrNone<Is_dropout> dropout(p, bidb, bidh);

  // Block n_max - 1 - i sits in stage i % kStages.
  for (int stage = 0; n_block >= n_block_min; --n_block, stage = next_stage<kStages>(stage)) {
    Tensor acc_s = partition_fragment_C(tiled_mma, Shape<Int<kBlockM>, Int<kBlockN>>{});  // (MMA, MMA_M, MMA_N)
    clear(acc_s);
    if constexpr (kStages == 3) {
      // Groups complete in order: with block n_block - 1 loading (issued a step ago, or
      // in the prologue) one group may stay in flight.
      if (n_block > n_block_min) {
        cute::cp_async_wait<1>();
      } else {
        cute::cp_async_wait<0>();
      }
    } else {
      cute::cp_async_wait<0>();
    }
    // Two or three stages: K and V(n_block) are in smem, and every thread is done with
    // the stage read in the previous step, which is refilled right away (with the block
    // after the next one, for three).
    // One stage: K(n_block) is in smem and every thread is done reading V.
    __syncthreads();
    if constexpr (kStages == 3) {
      if (n_block - 2 >= n_block_min) {
        const int refill = stage == 0 ? 2 : stage - 1;  // the previous step's stage
        if constexpr (Is_paged) {
          paged.advance();  // fetched one step ago
          paged.copy_k(gmem_copy, k_row, tKsKp(_, _, _, refill), tKVcKV, kBlockN);
          paged.copy_v(gmem_copy, v_row, tVsVp(_, _, _, refill), tKVcKV, kBlockN);
          paged.fetch(n_block - 3);
        } else {
          copy(gmem_copy, tKgK(_, _, _, n_block - 2), tKsK(_, _, _, refill));
          copy(gmem_copy, tVgV(_, _, _, n_block - 2), tVsV(_, _, _, refill));
        }
        cute::cp_async_fence();
      }
    } else if constexpr (kStages == 2) {
      if (n_block > n_block_min) {
        if constexpr (Is_paged) {
          paged.advance();  // fetched one step ago
          paged.copy_k(gmem_copy, k_row, tKsKp(_, _, _, stage ^ 1), tKVcKV, kBlockN);
          paged.copy_v(gmem_copy, v_row, tVsVp(_, _, _, stage ^ 1), tKVcKV, kBlockN);
          paged.fetch(n_block - 2);
        } else {
          copy(gmem_copy, tKgK(_, _, _, n_block - 1), tKsK(_, _, _, stage ^ 1));
          copy(gmem_copy, tVgV(_, _, _, n_block - 1), tVsV(_, _, _, stage ^ 1));
        }
        cute::cp_async_fence();
      }
    } else {
      if constexpr (Is_paged) {  // advanced to n_block for its K copy
        paged.copy_v(gmem_copy, v_row, tVsVp(_, _, _, 0), tKVcKV,
                     n_block == n_block_max - 1 ? last_rows : kBlockN);
      } else if (n_block == n_block_max - 1) {
        copy_rows_guarded(gmem_copy, tVgV(_, _, _, n_block), tVsV(_, _, _, 0), tKVcKV, last_rows);
      } else {
        copy(gmem_copy, tVgV(_, _, _, n_block), tVsV(_, _, _, 0));
      }
      cute::cp_async_fence();
    }

    gemm_smem_smem(tiled_mma, acc_s, tSrQ, tSrK, tSsQ, tSsK(_, _, _, stage), smem_copy_Q, smem_copy_K);

    score_mod.transform(acc_s);
    Tensor scores = make_tensor(acc_s.data(), acc_layout_rowcol(acc_s.layout()));  // (rows, cols)
    const int n0 = n_block * kBlockN;
    score_mod.template apply<Ktraits::kNWarps>(scores, m0, n0, score_mod.block_needs_mask(m0, m1, n0, kBlockN));

    if constexpr (kStages == 1) {
      cute::cp_async_wait<0>();
      __syncthreads();  // V(n_block) is in smem; all threads are done reading K(n_block)
      if (n_block > n_block_min) {
        if constexpr (Is_paged) {
          paged.advance();  // fetched one step ago; copy_v of the next step reuses it
          paged.copy_k(gmem_copy, k_row, tKsKp(_, _, _, 0), tKVcKV, kBlockN);
          paged.fetch(n_block - 2);
        } else {
          copy(gmem_copy, tKgK(_, _, _, n_block - 1), tKsK(_, _, _, 0));
        }
        cute::cp_async_fence();
      }
    }

    softmax.step(scores, acc_o_rc, p.scale_softmax_log2);

    // Dropout on P, after the row max and sum took the undropped P (as in flash-attn);
    // kept values are scaled by 1 / p_keep once, in the epilogue.
    if constexpr (Is_dropout) {
      if (p.s_dmask_ptr != nullptr) {
        dropout.template apply<Ktraits::kNWarps, /*kEncodeSign=*/true>(scores, m0, n0);
        write_s_dmask<Ktraits::kNWarps, Element>(p, scores, bidb, bidh, m0, n0, seq.seqlen_q, seq.seqlen_k);
        CUTE_UNROLL
        for (int i = 0; i < size(scores); ++i) { scores(i) = fmaxf(scores(i), 0.f); }  // -P (dropped) -> 0
      } else {
        dropout.template apply<Ktraits::kNWarps, /*kEncodeSign=*/false>(scores, m0, n0);
      }
    }

    // P (fp32 accumulator) -> Element, re-viewed as the A operand of P V.
    Tensor rP = convert_type<Element>(acc_s);
    Tensor tOrP = make_tensor(rP.data(), acc_layout_as_A(rP.layout()));
    gemm_reg_smem(tiled_mma, acc_o, tOrP, tOrVt, tOsVt(_, _, _, stage), smem_copy_V);
  }

  // Epilogue: normalize, stage O through shared memory (Q's space), then store rows
  // of 16-byte vectors and the lse.
  float row_lse[kNRows];
  softmax.finalize(acc_o_rc, p.scale_softmax, row_lse);
  if (writes_partial) {
    // fp32 partial straight from registers (no smem staging: decode tiles are few rows).
    Tensor tOcO = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
    Tensor tOcO_rc = make_tensor(tOcO.data(), acc_layout_rowcol(tOcO.layout()));
    store_split_partial(p.oaccum_ptr + (accum_row_offset(p, seq, bidb, bidh, split) + m0) * kHeadDim, lse,
                        acc_o_rc, tOcO_rc, row_lse, m1 - m0, kHeadDim);
    return;
  }
  if constexpr (Is_dropout) {
    CUTE_UNROLL
    for (int i = 0; i < size(acc_o); ++i) { acc_o(i) *= p.rp_keep; }
  }
  // With one stage, every thread finished its last read of sQ before the loop's second
  // barrier; with two, a slower warp may still be in its last Q K^T.
  if constexpr (kStages >= 2) { __syncthreads(); }

  // Same steps as epilogue.h's store_acc_tile (which the backward uses), kept inline
  // here so this kernel stays identical to the one the full GPU suite passed at a8686a2;
  // switch it to store_acc_tile with the next full GPU run.
  Tensor rO = convert_type<Element>(acc_o);
  auto smem_copy_O = make_tiled_copy_C(typename Ktraits::SmemCopyAtomO{}, tiled_mma);
  auto smem_thr_O = smem_copy_O.get_thread_slice(tidx);
  Tensor taccOrO = smem_thr_O.retile_S(rO);
  Tensor taccOsO = smem_thr_O.partition_D(sO);
  copy(smem_copy_O, taccOrO, taccOsO);

  // lse: the thread at quad position 0 owns each of its rows.
  Tensor tOcO = thr_mma.partition_C(make_identity_tensor(Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  Tensor tOcO_rc = make_tensor(tOcO.data(), acc_layout_rowcol(tOcO.layout()));
  if (tidx % 4 == 0) {
    CUTE_UNROLL
    for (int r = 0; r < kNRows; ++r) {
      const int row = get<0>(tOcO_rc(r, 0));
      if (row < m1 - m0) { lse[row] = row_lse[r]; }
    }
  }

  __syncthreads();
  typename Ktraits::GmemTiledCopyO gmem_copy_O;
  auto gmem_thr_O = gmem_copy_O.get_thread_slice(tidx);
  Tensor tOsO = gmem_thr_O.partition_S(sO);  // (CPY, CPY_M, CPY_D)
  Tensor tOgO = gmem_thr_O.partition_D(gO);
  Tensor tOrO = make_tensor<Element>(shape(tOgO));
  copy(gmem_copy_O, tOsO, tOrO);
  Tensor tOcO_g = gmem_thr_O.partition_D(make_identity_tensor(make_shape(Int<kBlockM>{}, Int<kHeadDim>{})));
  CUTE_UNROLL
  for (int m = 0; m < size<1>(tOgO); ++m) {
    if (get<0>(tOcO_g(0, m, 0)) < m1 - m0) { copy(gmem_copy_O, tOrO(_, m, _), tOgO(_, m, _)); }
  }
}

// Grid: (query blocks, batch, heads), or with Is_split (query blocks, batch, heads *
// num_splits), blockIdx.z = head * num_splits + split. Query blocks are visited in reverse
// so that, under a causal mask, the CTAs with the most key blocks start first.
template <typename Ktraits, bool Has_alibi, bool Is_softcap, bool Is_dropout, bool Is_split = false,
          bool Is_paged = false>
__global__ void __launch_bounds__(Ktraits::kNThreads, 1) flash_fwd_kernel(__grid_constant__ const Flash_fwd_params p) {
  if constexpr (Is_dropout) { write_rng_state(p); }
  const int m_block = gridDim.x - 1 - blockIdx.x;
  if constexpr (Is_split) {
    allow_dependent_launch();  // the combine may launch once every CTA here runs (it waits for the results)
    compute_attn_fwd_tile<Ktraits, Has_alibi, Is_softcap, Is_dropout, Is_split, Is_paged>(
        p, m_block, blockIdx.y, blockIdx.z / p.num_splits, blockIdx.z % p.num_splits);
  } else {
    compute_attn_fwd_tile<Ktraits, Has_alibi, Is_softcap, Is_dropout, false, Is_paged>(p, m_block, blockIdx.y,
                                                                                         blockIdx.z);
  }
}

}  // namespace flash
