// Per-sequence bookkeeping: lengths and row offsets for batched or varlen inputs.
#pragma once

#include "flash.h"

namespace flash {

struct SeqInfo {
  int seqlen_q;       // query rows of this sequence
  int seqlen_k;       // keys this sequence attends to
  int64_t q_start;    // first row of this sequence in the packed [total, ...] tensors (varlen)
  int64_t k_start;
  bool varlen;

  __device__ SeqInfo(const Flash_fwd_params &p, int bidb) {
    varlen = p.cu_seqlens_q != nullptr;
    if (varlen) {
      // Clamped to the packed tensors, so malformed cu_seqlens (decreasing, negative,
      // past the end) can only make sequences empty or shorter, never reach outside.
      const int q0 = min(max(p.cu_seqlens_q[bidb], 0), p.total_q);
      const int k0 = min(max(p.cu_seqlens_k[bidb], 0), p.total_k);
      seqlen_q = min(max(p.cu_seqlens_q[bidb + 1], q0), p.total_q) - q0;
      seqlen_k = min(max(p.cu_seqlens_k[bidb + 1], k0), p.total_k) - k0;
      q_start = q0;
      k_start = k0;
    } else {
      q_start = k_start = 0;
      seqlen_q = p.seqlen_q;
      seqlen_k = p.seqlen_k;
    }
    if (p.seqused_k != nullptr) { seqlen_k = max(0, min(seqlen_k, p.seqused_k[bidb])); }
  }

  // Element offset of sequence bidb's first row.
  __device__ int64_t q_offset(int64_t batch_stride, int64_t row_stride, int bidb) const {
    return varlen ? q_start * row_stride : int64_t(bidb) * batch_stride;
  }
  __device__ int64_t k_offset(int64_t batch_stride, int64_t row_stride, int bidb) const {
    return varlen ? k_start * row_stride : int64_t(bidb) * batch_stride;
  }
  // Offset of (head, first row) in softmax_lse: [b, h, seqlen_q] or [h, total_q].
  __device__ int64_t lse_offset(const Flash_fwd_params &p, int bidb, int bidh) const {
    return varlen ? int64_t(bidh) * p.total_q + q_start
                  : (int64_t(bidb) * p.h + bidh) * int64_t(p.seqlen_q);
  }
};

}  // namespace flash
