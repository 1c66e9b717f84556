// Split-KV decoding, the forward kernel's side: which key blocks a split processes and
// where it writes its partial result. flash_fwd_combine.h merges the partials.
#pragma once

#include <cmath>
#include <cute/tensor.hpp>

#include "block_info.h"
#include "flash.h"
#include "tile_size.h"

namespace flash {

using namespace cute;

// Hopper's programmatic dependent launch (PTX griddepcontrol, sm_90+; no-ops elsewhere and
// when the launch did not ask for it). The split kernel lets the combine grid launch once
// all its CTAs run; the combine then waits here until the split kernel has finished and
// its partials are visible. That hides the combine's launch behind the split kernel's
// last CTAs (flash_fwd_launch_template.h's launch_after_prior_grid).
__forceinline__ __device__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__forceinline__ __device__ void wait_for_prior_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Narrows a CTA's visible key blocks [n_min, n_max) to share `split` of the shares this
// sequence uses. The host sizes the grid (num_splits) from the cache capacity, since it
// reads no lengths (so a captured CUDA graph replays with new cache_seqlens); the count and
// the cut come from this sequence's actual visible range (seqused_k / cache_seqlens, the
// window), read here on the device: the first min(num_splits, n / kMinShareBlocks) shares
// (at least one) get the n blocks, differing by at most one block, and the rest are empty
// (lse -inf, weight 0 in the combine). A cache filled to a fraction of its capacity thus
// runs as many working shares as its length calls for, not slivers of one or zero blocks.
__forceinline__ __device__ void split_share(int &n_min, int &n_max, int split, int num_splits) {
  const int64_t n = n_max > n_min ? n_max - n_min : 0;
  const int64_t by_length = n / kMinShareBlocks;
  const int used = int(by_length < num_splits ? (by_length > 1 ? by_length : 1) : num_splits);
  if (split >= used) {
    n_max = n_min;  // an empty share
    return;
  }
  const int lo = n_min + int(n * split / used);
  n_max = n_min + int(n * (split + 1) / used);
  n_min = lo;
}

// Row of (split, head, first row of this sequence) in the [num_splits, h, total_q] accum
// layouts (times d for oaccum). Varlen rows are packed at q_start; batched ones at
// bidb * seqlen_q. Rows stay inside [0, total_q) because SeqInfo clamps cu_seqlens.
__forceinline__ __device__ int64_t accum_row_offset(const Flash_fwd_params &p, const SeqInfo &seq, int bidb,
                                                    int bidh, int split) {
  const int64_t row0 = seq.varlen ? seq.q_start : int64_t(bidb) * p.seqlen_q;
  return (int64_t(split) * p.h + bidh) * int64_t(p.total_q) + row0;
}

// A share with no key block: O partial 0 and lse -inf for rows [0, rows), so the
// combine gives it weight 0. oacc: (rows, d) fp32 rows of length kHeadDim.
template <typename Ktraits>
__forceinline__ __device__ void write_empty_split_tile(float *oacc, float *lse, int rows) {
  constexpr int kHeadDim = Ktraits::kHeadDim;
  static_assert(kHeadDim % 4 == 0);
  for (int i = threadIdx.x; i < rows * (kHeadDim / 4); i += Ktraits::kNThreads) {
    reinterpret_cast<float4 *>(oacc)[i] = make_float4(0.f, 0.f, 0.f, 0.f);
  }
  for (int row = threadIdx.x; row < rows; row += Ktraits::kNThreads) { lse[row] = -INFINITY; }
}

// Stores one thread's normalized fp32 accumulator (rows, cols view) and its rows' lse.
// coord: the same view of the identity tensor, giving (row, col) in the (BM, D) tile.
// finalize() marks a row without keys with lse +inf (flash-attn's convention for the
// final output); a partial needs -inf there, so that it carries no weight.
template <typename TensorO, typename TensorC, int kNRows>
__forceinline__ __device__ void store_split_partial(float *oacc, float *lse, TensorO const &acc_o,
                                                    TensorC const &coord, const float (&row_lse)[kNRows], int rows,
                                                    int d) {
  static_assert(decltype(size<0>(acc_o))::value == kNRows);
  CUTE_UNROLL
  for (int r = 0; r < kNRows; ++r) {
    const int row = get<0>(coord(r, 0));
    if (row >= rows) { continue; }
    CUTE_UNROLL
    for (int c = 0; c < size<1>(acc_o); ++c) { oacc[int64_t(row) * d + get<1>(coord(r, c))] = acc_o(r, c); }
    // The four threads of a quad hold a row together; the first one writes its lse.
    if (threadIdx.x % 4 == 0) { lse[row] = row_lse[r] == INFINITY ? -INFINITY : row_lse[r]; }
  }
}

}  // namespace flash
