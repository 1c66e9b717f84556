// Online softmax over key blocks: running row max and row sum per query row.
#pragma once

#include <cmath>
#include <cute/tensor.hpp>

#include "utils.h"

namespace flash {

using namespace cute;

// kNRows: query rows held by one thread (2 per MMA row-tile). Each row's scores are
// spread over the 4 threads of a quad; the max is reduced across the quad at every
// step, the sum only once at the end (each thread keeps a partial sum consistently
// rescaled, which is exact because rescaling is linear).
template <int kNRows>
struct OnlineSoftmax {
  float row_max[kNRows];  // running max of raw scores (-inf until a key is seen)
  float row_sum[kNRows];  // this thread's partial sum of exp2(s * scale_log2 - max * scale_log2)

  __forceinline__ __device__ OnlineSoftmax() {
    CUTE_UNROLL
    for (int r = 0; r < kNRows; ++r) { row_max[r] = -INFINITY; row_sum[r] = 0.f; }
  }

  // scores: (rows, cols) raw scores of one key block, overwritten with unnormalized
  // probabilities; acc_o: (rows, d) output accumulator, rescaled to the new max.
  template <typename TensorS, typename TensorO>
  __forceinline__ __device__ void step(TensorS &scores, TensorO &acc_o, float scale_log2) {
    static_assert(decltype(size<0>(scores))::value == kNRows);
    CUTE_UNROLL
    for (int r = 0; r < kNRows; ++r) {
      float m = row_max[r];
      CUTE_UNROLL
      for (int c = 0; c < size<1>(scores); ++c) { m = fmaxf(m, scores(r, c)); }
      m = quad_allreduce_max(m);
      // A row that has seen only masked keys keeps max -inf: use 0 as the offset so
      // exp2(-inf - 0) = 0 instead of exp2(-inf + inf) = NaN.
      const float m_scaled = m == -INFINITY ? 0.f : m * scale_log2;
      // Rescaling O costs one multiply per output element; once the max has settled it
      // rarely moves, so skip it (exactly: the factor would be 1) unless some row of
      // the warp changed. The vote keeps the branch warp-uniform.
      if (__any_sync(0xffffffff, m != row_max[r])) {
        const float correction = exp2f(row_max[r] * scale_log2 - m_scaled);
        row_sum[r] *= correction;
        CUTE_UNROLL
        for (int c = 0; c < size<1>(acc_o); ++c) { acc_o(r, c) *= correction; }
      }
      row_max[r] = m;
      float sum = 0.f;
      CUTE_UNROLL
      for (int c = 0; c < size<1>(scores); ++c) {
        scores(r, c) = exp2f(scores(r, c) * scale_log2 - m_scaled);
        sum += scores(r, c);
      }
      row_sum[r] += sum;
    }
  }

  // Normalizes acc_o by the row sums and returns, per row, the natural-log
  // sum-exp of the scaled scores (+inf for a row that saw no key, whose output is 0).
  template <typename TensorO>
  __forceinline__ __device__ void finalize(TensorO &acc_o, float scale, float (&lse)[kNRows]) {
    CUTE_UNROLL
    for (int r = 0; r < kNRows; ++r) {
      const float sum = quad_allreduce_sum(row_sum[r]);
      const bool empty = sum == 0.f || sum != sum;
      const float inv = empty ? 1.f : 1.f / sum;
      lse[r] = empty ? INFINITY : row_max[r] * scale + logf(sum);
      CUTE_UNROLL
      for (int c = 0; c < size<1>(acc_o); ++c) { acc_o(r, c) *= inv; }
    }
  }
};

}  // namespace flash
