// Score modifiers of the forward kernel in one functor: softcap (a logits
// transform), ALiBi (a position bias) and the causal / sliding-window mask.
#pragma once

#include <cmath>
#include <cute/tensor.hpp>

#include "flash.h"

namespace flash {

using namespace cute;

// Hardware tanh (sm75+): max relative error about 2^-11, the size of one fp16
// rounding step of the scores, and several times cheaper than tanhf.
__forceinline__ __device__ float fast_tanh(float x) {
  float y;
  asm("tanh.approx.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Alibi_optional (with Has_alibi): ALiBi is a run-time choice, alibi_slopes_ptr == nullptr
// meaning none (the dropout and split-KV kernels, one instantiation with and without ALiBi).
// Softcap_optional (with Is_softcap): softcap is a run-time choice, softcap_prescale == 0
// meaning none (the split-KV kernels). Without them the code is exactly that of the plain
// Has_alibi / Is_softcap kernels.
template <bool Has_alibi, bool Is_softcap, bool Alibi_optional = false, bool Softcap_optional = false>
struct ScoreMod {
  int seqlen_q, seqlen_k;
  int window_left, window_right;  // -1 = unbounded
  float alibi_slope;              // already divided by the softmax scale (raw-score units)
  float softcap_prescale;

  __device__ ScoreMod(const Flash_fwd_params &p, int seqlen_q_, int seqlen_k_, int bidb, int bidh)
      : seqlen_q(seqlen_q_), seqlen_k(seqlen_k_),
        window_left(p.window_size_left), window_right(p.window_size_right),
        alibi_slope(0.f), softcap_prescale(p.softcap_prescale) {
    if constexpr (Has_alibi && Alibi_optional) {
      if (p.alibi_slopes_ptr != nullptr) {
        alibi_slope = p.alibi_slopes_ptr[bidb * p.alibi_slopes_batch_stride + bidh] / p.scale_softmax;
      }
    } else if constexpr (Has_alibi) {
      alibi_slope = p.alibi_slopes_ptr[bidb * p.alibi_slopes_batch_stride + bidh] / p.scale_softmax;
    }
  }

  // Logits transform, applied to every raw score q.k: tanh(q.k * scale / softcap).
  // (The softmax then multiplies by softcap through scale_softmax.)
  template <typename TensorS>
  __forceinline__ __device__ void transform(TensorS &s) const {
    if constexpr (Is_softcap) {
      if constexpr (Softcap_optional) {
        if (softcap_prescale == 0.f) { return; }  // softcap off: scale_softmax is the plain scale
      }
      CUTE_UNROLL
      for (int i = 0; i < size(s); ++i) { s(i) = fast_tanh(s(i) * softcap_prescale); }
    }
  }

  // Whether the key block [n0, n0 + block_n) needs masking for query rows
  // [m0, m1): any key past seqlen_k, or any (row, key) pair outside the window.
  __forceinline__ __device__ bool block_needs_mask(int m0, int m1, int n0, int block_n) const {
    const int n1 = n0 + block_n;
    const int shift = seqlen_k - seqlen_q;  // key aligned with query row i: i + shift
    return n1 > seqlen_k ||
           (window_right >= 0 && n1 - 1 > m0 + shift + window_right) ||
           (window_left >= 0 && n0 < m1 - 1 + shift - window_left);
  }

  // scores: (rows, cols) view of one thread's (MMA, MMA_M, MMA_N) accumulator of an
  // SM80 16x8 MMA tiled over kNWarps warps along M. Adds the ALiBi bias and, when
  // `mask` is set, sets scores outside the window or past seqlen_k to -inf.
  // Coordinates come from the fragment layout directly (row = m-tile * 16 * kNWarps +
  // warp * 16 + lane / 4 + 8 * i, col = n-atom * 8 + 2 * (lane % 4) + j): cheaper in
  // registers than an identity tensor, whose per-element coordinates get hoisted.
  template <int kNWarps, typename TensorS>
  __forceinline__ __device__ void apply(TensorS &s, int m0, int n0, bool mask) const {
    if (!Has_alibi && !mask) { return; }
    // Optional ALiBi that is off (or a zero slope, which adds nothing): only the mask is left.
    if (Alibi_optional && alibi_slope == 0.f && !mask) { return; }
    static_assert(decltype(size<0, 0>(s))::value == 2 && decltype(size<1, 0>(s))::value == 2);
    const int lane = threadIdx.x % 32;
    const int row_base = m0 + (threadIdx.x / 32) * 16 + lane / 4;
    const int col_base = n0 + (lane % 4) * 2;
    const int shift = seqlen_k - seqlen_q;
    CUTE_UNROLL
    for (int mi = 0; mi < size<0, 1>(s); ++mi) {
      CUTE_UNROLL
      for (int i = 0; i < 2; ++i) {
        const int r = i + 2 * mi;  // row index in the (rows, cols) view
        const int diag = row_base + mi * 16 * kNWarps + 8 * i + shift;
        // Visible keys of this row: [lo, hi).
        const int lo = window_left >= 0 ? diag - window_left : 0;
        const int hi = window_right >= 0 ? min(seqlen_k, diag + window_right + 1) : seqlen_k;
        CUTE_UNROLL
        for (int nj = 0; nj < size<1, 1>(s); ++nj) {
          CUTE_UNROLL
          for (int j = 0; j < 2; ++j) {
            const int c = j + 2 * nj;
            const int col = col_base + nj * 8 + j;
            if constexpr (Has_alibi) { s(r, c) -= alibi_slope * float(abs(diag - col)); }
            if (mask && (col < lo || col >= hi)) { s(r, c) = -INFINITY; }
          }
        }
      }
    }
  }
};

}  // namespace flash
