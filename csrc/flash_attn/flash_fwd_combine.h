// Split-KV combine: merges the num_splits partial results of the split forward kernel
// (split_kv.h) into O (input dtype, the caller's strides) and softmax_lse.
//
// Per query row, with lse_s and O_s the partials (O_s normalized by its own row sum):
//   m = max_s lse_s;  lse = m + log(sum_s exp(lse_s - m));  O = sum_s exp(lse_s - lse) O_s.
// m == -inf means no split saw a key: O = 0 and lse = +inf (flash-attn's no-key output).
#pragma once

#include <cmath>
#include <cutlass/array.h>
#include <cutlass/numeric_conversion.h>

#include "block_info.h"
#include "flash.h"
#include "split_kv.h"
#include "tile_size.h"

namespace flash {

constexpr int kCombineThreads = 128;

// Query rows per combine CTA: each row is kHeadDim / 4 threads of 4 columns (float4).
template <int kHeadDim>
constexpr int combine_rows_per_cta() {
  static_assert(kHeadDim % 4 == 0 && kCombineThreads % (kHeadDim / 4) == 0);
  return kCombineThreads / (kHeadDim / 4);
}

// Grid: (ceil(round_up(seqlen_q, kBlockM) / rows per CTA), batch, heads). kBlockM: the
// split kernel's query tile, to skip rows its grid did not cover (a varlen sequence longer
// than max_seqlen_q), exactly as the unsplit kernel leaves them unwritten.
template <typename Element, int kHeadDim, int kBlockM>
__global__ void __launch_bounds__(kCombineThreads) flash_fwd_combine_kernel(__grid_constant__ const Flash_fwd_params p) {
  constexpr int kThreadsPerRow = kHeadDim / 4;
  constexpr int kRows = combine_rows_per_cta<kHeadDim>();
  // Every split's lse of this CTA's rows, loaded by all threads at once: a decode step has
  // few combine CTAs and each row's splits are read several times (max, sum, weights), so
  // one round trip for all of them instead of one per few splits in each pass.
  __shared__ float s_lse[kRows][kMaxSplits];
  const int bidb = blockIdx.y, bidh = blockIdx.z;
  const SeqInfo seq(p, bidb);
  const int row0 = blockIdx.x * kRows;
  const int row = row0 + threadIdx.x / kThreadsPerRow;
  const int col = (threadIdx.x % kThreadsPerRow) * 4;
  const int covered = (p.seqlen_q + kBlockM - 1) / kBlockM * kBlockM;
  const int rows = max(0, min(min(seq.seqlen_q, covered) - row0, kRows));  // real rows of this CTA
  const int num_splits = min(p.num_splits, kMaxSplits);  // (the host caps it; this guards s_lse)
  const int64_t split_stride = int64_t(p.h) * p.total_q;  // accum rows from one split to the next
  const int64_t arow0 = accum_row_offset(p, seq, bidb, bidh, 0) + row0;

  wait_for_prior_grid();
  for (int i = threadIdx.x; i < rows * num_splits; i += kCombineThreads) {
    const int r = i / num_splits, s = i - r * num_splits;
    s_lse[r][s] = p.lseaccum_ptr[arow0 + r + s * split_stride];
  }
  __syncthreads();
  if (row - row0 >= rows) { return; }

  const float *lse_row = s_lse[row - row0];
  const int64_t arow = arow0 + (row - row0);
  float m = -INFINITY;
  for (int s = 0; s < num_splits; ++s) { m = fmaxf(m, lse_row[s]); }
  float lse = INFINITY;
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  if (m != -INFINITY) {
    float sum = 0.f;
    for (int s = 0; s < num_splits; ++s) { sum += expf(lse_row[s] - m); }
    lse = m + logf(sum);
    // Unrolled so that several splits' loads are in flight at once.
#pragma unroll 8
    for (int s = 0; s < num_splits; ++s) {
      const float lse_s = lse_row[s];
      if (lse_s == -INFINITY) { continue; }  // an empty share: weight 0, skip the read
      const float w = expf(lse_s - lse);
      const float4 o = *reinterpret_cast<const float4 *>(p.oaccum_ptr + (arow + s * split_stride) * kHeadDim + col);
      acc[0] += w * o.x;
      acc[1] += w * o.y;
      acc[2] += w * o.z;
      acc[3] += w * o.w;
    }
  }

  // 4 elements = 8 bytes; aligned because the host makes o's pointer and strides 16-byte
  // aligned (vector_aligned / output_buffer) and col is a multiple of 4.
  cutlass::NumericArrayConverter<Element, float, 4> convert;
  cutlass::Array<float, 4> acc_arr;
  for (int i = 0; i < 4; ++i) { acc_arr[i] = acc[i]; }
  Element *o = reinterpret_cast<Element *>(p.o_ptr) + seq.q_offset(p.o_batch_stride, p.o_row_stride, bidb) +
               int64_t(row) * p.o_row_stride + int64_t(bidh) * p.o_head_stride + col;
  *reinterpret_cast<cutlass::Array<Element, 4> *>(o) = convert(acc_arr);
  if (col == 0) { p.softmax_lse_ptr[seq.lse_offset(p, bidb, bidh) + row] = lse; }
}

}  // namespace flash
