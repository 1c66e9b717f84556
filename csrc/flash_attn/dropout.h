// Attention dropout: the keep/drop mask, applied to P after the softmax statistics.
//
// The mask is a pure function of (seed, offset, b, h, i, j): batch (sequence) b, query
// head h, query row i and key column j counted from the start of the sequence. Tile shapes,
// thread indices and the layout (the backward's key-rows x query-cols tiles) play no part,
// so every kernel that recomputes the mask gets the same one. Mapping:
//
//   Philox4x32-10 (philox.h), key = (seed low 32 bits, seed high 32 bits),
//   counter = (x, y) = the 64-bit subsequence offset + b * nheads + h   (low word in x),
//             z = i,
//             w = (j / 64) * 4 + (j % 8) / 2
//   -> 16 bytes; byte k is bits [8 (k % 4), 8 (k % 4) + 8) of word k / 4 (x, y, z, w),
//   element (i, j) reads byte k = ((j % 64) / 8) * 2 + j % 2,
//   kept iff byte < keep_threshold = min(255, floor((1 - dropout_p) * 256)).
//
// So the keep rate is keep_threshold / 256 (within 1/256 of 1 - dropout_p, as flash-attn's
// 8-bit threshold), and kept values are scaled by rp_keep = 1 / (1 - dropout_p). One call
// covers the 16 columns {64 g + 8 a + 2 t + e : a < 8, e < 2} of one row: exactly what one
// thread of the SM80 16x8 MMA accumulator holds of a row in a 64-column block (t = lane % 4),
// so the forward calls Philox once per 16 of its elements.
//
// Calls use subsequences [offset, offset + b * h): the host advances the generator's offset
// by (at least) b * h per call, so consecutive calls draw disjoint counters.
// flash_attn/reference_dropout.py computes the same mask in PyTorch (tests compare them).
#pragma once

#include <cute/tensor.hpp>
#include <type_traits>

#include "flash.h"
#include "philox.h"

namespace flash {

using namespace cute;

struct SeedOffset {
  uint64_t seed, offset;
};

// at::cuda::philox::unpack, torch-free: the values, or (graph capture, backward) device loads.
__device__ __forceinline__ SeedOffset unpack_philox(const PhiloxArgs &a) {
  if (a.from_device) { return {uint64_t(*a.seed_ptr), uint64_t(*a.offset_ptr) + a.offset_intragraph}; }
  return {a.seed, a.offset};
}

// The forward's record of its stream for the backward: rng_state = (seed, offset).
__device__ __forceinline__ void write_rng_state(const Flash_fwd_params &p) {
  if (p.rng_state != nullptr && blockIdx.x == 0 && blockIdx.y == 0 && blockIdx.z == 0 && threadIdx.x == 0) {
    const SeedOffset so = unpack_philox(p.philox);
    p.rng_state[0] = int64_t(so.seed);
    p.rng_state[1] = int64_t(so.offset);
  }
}

// The mask of one (sequence b, query head h).
struct DropoutMask {
  uint2 key;             // the seed
  uint64_t subsequence;  // offset + b * nheads + h
  uint32_t threshold;    // keep iff byte < threshold

  __host__ __device__ DropoutMask(uint64_t seed, uint64_t offset, int b, int h, int nheads, uint32_t threshold_)
      : key(make_uint2(uint32_t(seed), uint32_t(seed >> 32))),
        subsequence(offset + uint64_t(b) * uint64_t(nheads) + uint64_t(h)), threshold(threshold_) {}

  __device__ DropoutMask(const Flash_fwd_params &p, int bidb, int bidh)
      : DropoutMask(unpack_philox(p.philox), p, bidb, bidh) {}

  // The 16 bytes of query row i, 64-column group g = j / 64, quad position t = (j % 8) / 2.
  __host__ __device__ __forceinline__ uint4 bytes(int i, int g, int t) const {
    const uint4 counter = make_uint4(uint32_t(subsequence), uint32_t(subsequence >> 32), uint32_t(i),
                                     uint32_t(g) * 4u + uint32_t(t));
    return Philox::generate(counter, key);
  }

  // Byte k (0..15) of r; k is a constant after unrolling in the forward.
  __host__ __device__ __forceinline__ static uint32_t byte(uint4 r, int k) {
    const uint32_t word = k < 4 ? r.x : k < 8 ? r.y : k < 12 ? r.z : r.w;
    return (word >> (8 * (k % 4))) & 0xFFu;
  }

  // Whether element (i, j) is kept: one Philox call per element, for any layout (e.g. the
  // backward's transposed tiles). A kernel that holds several columns of one (i, j / 64,
  // (j % 8) / 2) should call bytes() once and read them with byte(r, ((j % 64) / 8) * 2 + j % 2).
  __host__ __device__ __forceinline__ bool keep(int i, int j) const {
    return byte(bytes(i, j / 64, (j % 8) / 2), ((j % 64) / 8) * 2 + j % 2) < threshold;
  }

  // s: (rows, cols) view of one thread's accumulator of an SM80 16x8 MMA tiled over kNWarps
  // warps along M, for query rows from m0 and key columns from n0 (n0 % 64 == 0), the layout
  // of ScoreMod::apply (row = m0 + warp * 16 + lane / 4 + 8 i + 16 kNWarps mi, col = n0 +
  // 8 nj + 2 (lane % 4) + e). Dropped elements become 0, or -s with kEncodeSign (S_dmask).
  template <int kNWarps, bool kEncodeSign, typename TensorS>
  __device__ __forceinline__ void apply(TensorS &s, int m0, int n0) const {
    static_assert(decltype(size<0, 0>(s))::value == 2 && decltype(size<1, 0>(s))::value == 2);
    constexpr int kNAtoms = decltype(size<1, 1>(s))::value;  // 8-column atoms per row
    static_assert(kNAtoms % 8 == 0, "the dropout mask works on 64-column key blocks");
    const int lane = threadIdx.x % 32;
    const int row_base = m0 + (threadIdx.x / 32) * 16 + lane / 4;
    const int t = lane % 4;
    CUTE_UNROLL
    for (int mi = 0; mi < size<0, 1>(s); ++mi) {
      CUTE_UNROLL
      for (int i = 0; i < 2; ++i) {
        const int r = i + 2 * mi;
        const int row = row_base + mi * 16 * kNWarps + 8 * i;
        CUTE_UNROLL
        for (int g = 0; g < kNAtoms / 8; ++g) {
          const uint4 rnd = bytes(row, n0 / 64 + g, t);
          CUTE_UNROLL
          for (int a = 0; a < 8; ++a) {
            CUTE_UNROLL
            for (int e = 0; e < 2; ++e) {
              const int c = e + 2 * (8 * g + a);
              const bool kept = byte(rnd, 2 * a + e) < threshold;
              if constexpr (kEncodeSign) {
                s(r, c) = kept ? s(r, c) : -s(r, c);
              } else {
                s(r, c) = kept ? s(r, c) : 0.f;
              }
            }
          }
        }
      }
    }
  }

 private:
  __device__ DropoutMask(SeedOffset so, const Flash_fwd_params &p, int bidb, int bidh)
      : DropoutMask(so.seed, so.offset, bidb, bidh, p.h, p.keep_threshold) {}
};

// What kernels without dropout hold instead of a DropoutMask (nothing).
struct NoDropout {
  __device__ NoDropout(const Flash_fwd_params &, int, int) {}
};

template <bool Is_dropout>
using DropoutOrNone = std::conditional_t<Is_dropout, DropoutMask, NoDropout>;

// return_softmax: stores the thread's (rows, cols) tile s (layout of DropoutMask::apply) into
// S_dmask of (bidb, bidh), rows below min(seqlen_q, s_dmask_rows) and columns below
// min(seqlen_k, s_dmask_cols) only (the buffer's padding stays zero).
template <int kNWarps, typename Element, typename TensorS>
__device__ __forceinline__ void write_s_dmask(const Flash_fwd_params &p, const TensorS &s, int bidb, int bidh,
                                              int m0, int n0, int seqlen_q, int seqlen_k) {
  Element *base = reinterpret_cast<Element *>(p.s_dmask_ptr) + bidb * p.s_dmask_batch_stride +
                  bidh * p.s_dmask_head_stride;
  const int rows = min(seqlen_q, p.s_dmask_rows);
  const int cols = min(seqlen_k, p.s_dmask_cols);
  const int lane = threadIdx.x % 32;
  const int row_base = m0 + (threadIdx.x / 32) * 16 + lane / 4;
  const int col_base = n0 + (lane % 4) * 2;
  CUTE_UNROLL
  for (int mi = 0; mi < size<0, 1>(s); ++mi) {
    CUTE_UNROLL
    for (int i = 0; i < 2; ++i) {
      const int row = row_base + mi * 16 * kNWarps + 8 * i;
      if (row >= rows) { continue; }
      CUTE_UNROLL
      for (int nj = 0; nj < size<1, 1>(s); ++nj) {
        CUTE_UNROLL
        for (int e = 0; e < 2; ++e) {
          const int col = col_base + nj * 8 + e;
          if (col < cols) { base[row * p.s_dmask_row_stride + col] = Element(s(i + 2 * mi, e + 2 * nj)); }
        }
      }
    }
  }
}

}  // namespace flash
