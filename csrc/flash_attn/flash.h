// Params for the FA2-class (sm80+, mma.sync) kernels: the one struct that crosses
// the host/device line. Raw pointers, int64 strides and sizes only; no torch.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <cuda_runtime_api.h>

namespace flash {

// Torch-free copy of at::PhiloxCudaState (how the host hands the kernel its random stream).
// Outside CUDA-graph capture the seed and offset are values; under capture (and in the
// backward, which reads them from the forward's rng_state) they sit in device memory, so a
// replay sees the values of that replay. The kernel unpacks it with unpack_philox (dropout.h).
struct PhiloxArgs {
  uint64_t seed;                 // by value (from_device == false)
  uint64_t offset;               // by value: first Philox subsequence of this call
  const int64_t *seed_ptr;       // from_device: [1] the seed
  const int64_t *offset_ptr;     // from_device: [1] the base offset, plus offset_intragraph
  uint64_t offset_intragraph;
  bool from_device;
};

struct Flash_fwd_params {
  using index_t = int64_t;

  // Inputs. Batched: [batch, seqlen, nheads, headdim]; varlen: [total, nheads, headdim]
  // (then the batch stride is unused and rows are offset by cu_seqlens).
  void *__restrict__ q_ptr;  // [b, seqlen_q, h, d]
  void *__restrict__ k_ptr;  // [b, seqlen_k, h_k, d]
  void *__restrict__ v_ptr;  // [b, seqlen_k, h_k, d]
  void *__restrict__ o_ptr;  // [b, seqlen_q, h, d] output
  index_t q_batch_stride, k_batch_stride, v_batch_stride, o_batch_stride;
  index_t q_row_stride, k_row_stride, v_row_stride, o_row_stride;
  index_t q_head_stride, k_head_stride, v_head_stride, o_head_stride;

  // [b, h, seqlen_q] (batched) or [h, total_q] (varlen): natural-log sum-exp of the
  // scaled scores per query row; +inf for a row that sees no key.
  float *__restrict__ softmax_lse_ptr;

  int b;              // batch size
  int seqlen_q;       // batched: the query length; varlen: max_seqlen_q
  int seqlen_k;       // batched: the key length; varlen: max_seqlen_k
  int total_q;        // varlen: rows of q (lse row stride); batched: b * seqlen_q
  int total_k;        // varlen: rows of k and v; batched: b * seqlen_k
  int h, h_k;         // query heads, key/value heads (h % h_k == 0)
  int h_h_k_ratio;    // h / h_k: query heads sharing one kv head
  int d;              // head dim (equal to the kernel's compiled head dim)

  // Varlen: [b + 1] cumulative lengths (int32), or nullptr for batched inputs.
  int *__restrict__ cu_seqlens_q;
  int *__restrict__ cu_seqlens_k;
  // [b] keys actually used per sequence, or nullptr; clamped on the device to the cu_seqlens_k
  // length (varlen) or seqlen_k (batched: a KV cache read in place). Paged kernels take it as
  // the key count itself (cu_seqlens_k is then unused; paged_kv.h), required when batched.
  int *__restrict__ seqused_k;

  // Scores s = q.k * scale_softmax, then (with softcap) s = softcap_raw... see below.
  // Without softcap: p = exp2(s_raw * scale_softmax_log2 - max), s_raw = q.k.
  // With softcap c: s_raw = tanh(q.k * softcap_prescale), scale_softmax = c, so that
  // the score is c * tanh(scale * q.k / c).
  float scale_softmax;
  float scale_softmax_log2;
  float softcap_prescale;  // scale / softcap; 0 when softcap is off

  // Window around the bottom-right aligned diagonal; -1 = unbounded. Causal is (-1, 0).
  int window_size_left, window_size_right;

  // ALiBi: [h] or [b, h] fp32 slopes (batch stride 0 for [h]); nullptr when off.
  float *__restrict__ alibi_slopes_ptr;
  index_t alibi_slopes_batch_stride;

  bool is_bf16;

  // Dropout (kernels instantiated with Is_dropout; see dropout.h for the mask). Element
  // (batch b, query head h, query row i, key column j) is kept iff its Philox byte is
  // below keep_threshold; kept probabilities are scaled by rp_keep.
  float p_keep;             // 1 - dropout_p (1 when dropout is off)
  float rp_keep;            // 1 / p_keep
  uint32_t keep_threshold;  // floor(p_keep * 256) clamped to [0, 255]
  PhiloxArgs philox;        // Philox seed and base offset of this call
  // [2] int64 (seed, offset) written by the forward (block (0, 0, 0), thread 0) after
  // unpacking `philox`, so the backward can rebuild the same mask; nullptr = not written.
  int64_t *__restrict__ rng_state;

  // return_softmax: [b, h, s_dmask_rows, s_dmask_cols] in q's dtype (rows/cols are seqlen_q/k,
  // varlen max_seqlen_q/k, rounded up to 128): per visited key block, P = exp(s - running
  // row max) with dropped entries negated; nullptr = not requested. Zero-filled by the host.
  void *__restrict__ s_dmask_ptr;
  index_t s_dmask_batch_stride, s_dmask_head_stride, s_dmask_row_stride;
  int s_dmask_rows, s_dmask_cols;

  // Split-KV (kernels instantiated with Is_split; flash_fwd_combine.h merges the partials).
  // Kept last so that the offsets of the fields above, and so the code of the kernels
  // without Is_split, do not change. A query row's "accum row" is its row in the packed
  // [total_q] order: varlen q_start + i, batched bidb * seqlen_q + i.
  // key-block shares per (query block, sequence, head): 0 = the unsplit kernel; n >= 1 = the
  // split kernel (one share: it writes O and lse itself, and oaccum_ptr is null)
  int num_splits;
  // [num_splits, h, total_q, d] fp32: each split's output, normalized by its own row sum
  // (0 for a row that sees no key in that split). Null with one share.
  float *__restrict__ oaccum_ptr;
  // [num_splits, h, total_q] fp32: each split's natural-log sum-exp (-inf: no key seen).
  float *__restrict__ lseaccum_ptr;

  // Paged KV (kernels instantiated with Is_paged; paged_kv.h), kept last like the split
  // fields. k_ptr / v_ptr then point to caches [num_pages, page_size, h_k, kv_d] (the batch
  // strides are page strides) and key j of sequence b is slot pos % page_size of page
  // block_table[b][pos / page_size], pos = leftpad_k[b] + j. The kernel clamps every index
  // it reads: a table entry outside [0, num_pages) reads page 0.
  int *__restrict__ block_table;   // [b, max_blocks_per_seq] int32 physical page of each logical page
  index_t block_table_batch_stride;
  int max_blocks_per_seq;          // >= 1
  int page_size;                   // rows per page, a positive multiple of 16
  int num_pages;                   // pages in k_ptr / v_ptr, >= 1
  int kv_d;                        // head dim of the caches: a multiple of 8, <= d; columns [kv_d, d) read as 0
  int *__restrict__ leftpad_k;     // [b] first logical position of each sequence's keys, or nullptr (0)
};

// Backward: the forward's params (q, k, v, o = the forward output, softmax_lse) plus
// gradients. dk/dv are per query head; the host reduces them over GQA groups.
struct Flash_bwd_params : public Flash_fwd_params {
  void *__restrict__ do_ptr;  // [b, seqlen_q, h, d] gradient of the output
  void *__restrict__ dq_ptr;  // [b, seqlen_q, h, d]
  void *__restrict__ dk_ptr;  // [b, seqlen_k, h, d] (per query head)
  void *__restrict__ dv_ptr;  // [b, seqlen_k, h, d] (per query head)
  index_t do_batch_stride, do_row_stride, do_head_stride;
  index_t dq_batch_stride, dq_row_stride, dq_head_stride;
  index_t dk_batch_stride, dk_row_stride, dk_head_stride;
  index_t dv_batch_stride, dv_row_stride, dv_head_stride;
  // Same layout as softmax_lse: rowsum(dO * O) per query row, fp32.
  float *__restrict__ softmax_d_ptr;
  float scale_qk;  // the softmax scale applied to q.k (d score / d (q.k) without softcap)

  // Default (non-deterministic) path: an fp32 dQ accumulator, head-major ([b, h, sq, d] or
  // [h, total_q, d], so dq_accum_row_stride must equal the kernel's head dim), zeroed by
  // the host, into which the dK/dV kernel adds dS K with atomics (so dQ's summation order
  // varies; dK, dV do not); the host multiplies by scale_qk when it converts it to dq.
  // nullptr: deterministic path, the separate dQ kernel writes dq_ptr.
  float *__restrict__ dq_accum_ptr;
  index_t dq_accum_batch_stride, dq_accum_row_stride, dq_accum_head_stride;
};

template <typename Element, int kHeadDim, bool Has_alibi, bool Is_softcap, bool Is_dropout>
cudaError_t run_mha_bwd_(Flash_bwd_params &params, cudaStream_t stream);

// Which dK/dV kernel the last backward launched: 90 the wgmma one (flash_bwd_kernel_sm90.h),
// 80 the mma.sync one, 0 none yet. Read by the binding last_bwd_kernel (tests check the route).
inline std::atomic<int> last_dk_dv_kernel{0};

// FLASH_ATTN_BWD_SM90=0 in a build that kept the mma.sync backward kernels in sm90 code
// (setup.py's FLASH_ATTN_SM90_MMA_SYNC_BWD=1): run those instead of the wgmma ones. Read by the
// host's choice of the dQ path (flash_api.cpp) and by the launcher (flash_bwd_launch_template.h).
inline bool wgmma_bwd_switched_off() {
#ifdef FLASH_ATTN_SM90_MMA_SYNC_BWD
  const char *env = std::getenv("FLASH_ATTN_BWD_SM90");
  return env != nullptr && std::strcmp(env, "0") == 0;
#else
  return false;
#endif
}

// One explicit instantiation per (dtype, head dim, variant) lives in instantiations/,
// generated by generate_kernels.py. Is_dropout kernels exist only with Has_alibi (ALiBi is
// then optional at run time: alibi_slopes_ptr == nullptr) and without softcap. Is_split
// kernels (split-KV, head dims 64/128/256) exist only with Has_alibi and Is_softcap, both
// optional at run time (softcap_prescale == 0: no softcap), and without dropout; they run
// the forward into oaccum/lseaccum and then the combine kernel into o and softmax_lse.
// Is_paged kernels (paged KV, head dims 64/128/256) exist as the split variant's flags with
// and without Is_split; they read K and V through block_table.
template <typename Element, int kHeadDim, bool Has_alibi, bool Is_softcap, bool Is_dropout, bool Is_split = false,
          bool Is_paged = false>
cudaError_t run_mha_fwd_(Flash_fwd_params &params, cudaStream_t stream);

}  // namespace flash
