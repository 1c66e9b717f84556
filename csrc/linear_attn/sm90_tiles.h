// The shared-memory tiles and accumulator layouts of the sm90a (wgmma) linear-attention kernels,
// written out so that the kernels can index them cheaply: the GMMA swizzle atoms and staged tiles
// as CuTe layouts (for the wgmma descriptors), the element offset of (r, c) in those tiles, how the
// threads walk a tile's 16-byte groups, and the (row, column) of a warpgroup's accumulator
// elements. Parses as host code too: tests/cpp/gmma_tiles_host.cpp checks the written-out forms
// against CuTe's layouts on the CPU.
#pragma once

#include <type_traits>

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include "linear_params.h"

namespace linear_attn {
namespace sm90 {

using namespace cute;

template <typename Tag> struct CuteType;
template <> struct CuteType<Bf16> { using type = cutlass::bfloat16_t; };
template <> struct CuteType<Fp16> { using type = cutlass::half_t; };

// The swizzle atom of a tile whose rows are COLS 16-bit elements (GMMA's K-major canonical atoms:
// 8 rows of 64 elements, 128-byte swizzle; or of 32 elements, 64-byte swizzle).
template <typename TC, int COLS>
using RowAtom = std::conditional_t<COLS % 64 == 0, GMMA::Layout_K_SW128_Atom<TC>, GMMA::Layout_K_SW64_Atom<TC>>;

// (R, C, S) stages of an R x C tile (C contiguous, swizzled) and its transposed view (C, R, S):
// the same bytes read with the other mode first (how wgmma takes an MN-major operand).
template <typename TC, int R, int C, int S>
struct StagedTile {
  using Layout = decltype(tile_to_shape(RowAtom<TC, C>{}, Shape<Int<R>, Int<C>, Int<S>>{}));
  using LayoutT = decltype(composition(Layout{}, make_layout(Shape<Int<C>, Int<R>, Int<S>>{},
                                                             Stride<Int<R>, _1, Int<R * C>>{})));
  static constexpr int kBytes = R * C * S * 2;
  static_assert(kBytes % 1024 == 0, "tiles start at multiples of 1024 bytes");
};

// Element offset of (r, c) in an R x C tile of RowAtom<C> tiles (tile_to_shape: the atoms' column
// blocks of 64 (or 32) elements one after the other, rows within each), the swizzle included:
// 16-byte group c / 8 of row r sits at group (c / 8) ^ (r % 8) (128-byte rows) or
// ((c / 8) % 4) ^ ((r / 2) % 4) (64-byte rows). Written out so that the compiler sees what is
// affine in r and c.
template <int R, int C>
__host__ __device__ __forceinline__ int tile_offset(int r, int c) {
  if constexpr (C % 64 == 0) {
    return (c >> 6) * (R * 64) + r * 64 + ((((c >> 3) & 7) ^ (r & 7)) << 3) + (c & 7);
  } else {
    static_assert(C == 32, "tiles of 32 or a multiple of 64 columns");
    return r * 32 + ((((c >> 3) & 3) ^ ((r >> 1) & 3)) << 3) + (c & 7);
  }
}

// How NT threads walk the 16-byte groups of a 64 x C tile: in column blocks of up to 128 columns,
// thread t takes group t % G of rows t / G, t / G + kRowStep, ... A row step that is a multiple of 8
// leaves the swizzle unchanged, so every group of a thread is its first one's offset plus a constant.
template <int C, int NT>
struct GroupWalk {
  static constexpr int kBlockCols = C > 128 ? 128 : C;
  static constexpr int kBlocks = C / kBlockCols;
  static constexpr int G = kBlockCols / 8;          // groups per row of a block
  static constexpr int kRowStep = NT / G;           // 8, 16, 32 or 64
  static constexpr int kRows = kChunk / kRowStep;   // rows per thread and block
  static constexpr int kRowStride = C % 64 == 0 ? 64 : 32;  // elements between rows of one atom column
  static_assert(kRowStep % 8 == 0, "the swizzle repeats every 8 rows");
};

// f(i, row, col) for each pair (i, i + 1) of a wgmma accumulator over an (64 M) x N product of one
// warpgroup (thread t of the warpgroup, 0 .. 127): element i = e + 2 h + 4 n + 4 (N / 8) m holds
// (64 m + 16 warp + lane / 4 + 8 h, 8 n + 2 (lane % 4) + e) (CuTe's SM90 64 x N accumulator
// layout).
template <int M, int N, typename F>
__host__ __device__ __forceinline__ void for_acc_pairs(int t, F&& f) {
  const int row = 16 * (t >> 5) + ((t & 31) >> 2), col = 2 * (t & 3);
#pragma unroll
  for (int m = 0; m < M; ++m) {
#pragma unroll
    for (int n = 0; n < N / 8; ++n) {
#pragma unroll
      for (int h = 0; h < 2; ++h) f(2 * h + 4 * n + 4 * (N / 8) * m, 64 * m + row + 8 * h, 8 * n + col);
    }
  }
}

}  // namespace sm90
}  // namespace linear_attn
