// Compile-time layout and copy choices for the forward mma.sync kernel.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include "tile_size.h"

namespace flash {

using namespace cute;

// kTile_ defaults to the tuned choice of tile_size.h; tuning harnesses pass others.
template <int kHeadDim_, typename Element_, FwdTile kTile_ = fwd_tile(kHeadDim_)>
struct FwdKernelTraits {
  using Element = Element_;           // cutlass::half_t or cutlass::bfloat16_t
  using ElementAccum = float;
  using index_t = int64_t;

  static constexpr int kHeadDim = kHeadDim_;
  static constexpr FwdTile kTile = kTile_;
  static constexpr int kBlockM = kTile.block_m;
  static constexpr int kBlockN = kTile.block_n;
  static constexpr int kNWarps = kTile.n_warps;
  static constexpr int kNThreads = kNWarps * 32;
  static_assert(kHeadDim % 32 == 0 && kHeadDim <= 256, "compiled head dims are multiples of 32");

  // Tensor-core op: 16x8x16, fp32 accumulate. Warps tile M; the permutation tile
  // makes N 16 wide so one ldmatrix.x4 feeds two n-atoms of B.
  using MmaAtom = std::conditional_t<std::is_same_v<Element, cutlass::half_t>,
                                     MMA_Atom<SM80_16x8x16_F32F16F16F32_TN>,
                                     MMA_Atom<SM80_16x8x16_F32BF16BF16F32_TN>>;
  using TiledMma = TiledMMA<MmaAtom, Layout<Shape<Int<kNWarps>, _1, _1>>,
                            Tile<Int<16 * kNWarps>, _16, _16>>;

  // Shared memory: rows of 64 (or 32) elements, XOR-swizzled in 16-byte chunks so
  // both the cp.async row writes and the ldmatrix column reads are conflict-free.
  static constexpr int kBlockKSmem = kHeadDim % 64 == 0 ? 64 : 32;
  static constexpr int kSwizzleBits = kBlockKSmem == 32 ? 2 : 3;
  using SmemLayoutAtom = decltype(composition(
      Swizzle<kSwizzleBits, 3, 3>{},
      Layout<Shape<_8, Int<kBlockKSmem>>, Stride<Int<kBlockKSmem>, _1>>{}));
  using SmemLayoutQ = decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kBlockM>, Int<kHeadDim>>{}));
  // K and V: kStages buffers each, (BN, D, stages).
  static constexpr int kStages = kTile.kv_stages;
  static_assert(kStages == 1 || kStages == 2);
  using SmemLayoutKV = decltype(tile_to_shape(SmemLayoutAtom{},
                                              Shape<Int<kBlockN>, Int<kHeadDim>, Int<kStages>>{}));
  // V viewed as (d, n, stage): the same bytes, read with ldmatrix.trans as the B operand of P V.
  using SmemLayoutVt = decltype(composition(
      SmemLayoutKV{},
      make_layout(Shape<Int<kHeadDim>, Int<kBlockN>, Int<kStages>>{},
                  Stride<Int<kBlockN>, _1, Int<kBlockN * kHeadDim>>{})));
  // O staging tile reuses Q's shared memory.
  using SmemLayoutO = SmemLayoutQ;

  static constexpr int kSmemQBytes = int(cosize_v<SmemLayoutQ>) * int(sizeof(Element));
  static constexpr int kSmemKVBytes = int(cosize_v<SmemLayoutKV>) * int(sizeof(Element));  // all stages
  static constexpr int kSmemBytes = kSmemQBytes + 2 * kSmemKVBytes;

  using SmemCopyAtom = Copy_Atom<SM75_U32x4_LDSM_N, Element>;            // Q, K -> registers
  using SmemCopyAtomTransposed = Copy_Atom<SM75_U16x8_LDSM_T, Element>;  // V^T -> registers
  using SmemCopyAtomO = Copy_Atom<AutoVectorizingCopyWithAssumedAlignment<128>, Element>;

  // Global memory: each thread moves 16 bytes (8 elements); a row of kBlockKSmem
  // elements is covered by kGmemThreadsPerRow threads.
  static constexpr int kGmemElemsPerLoad = 16 / int(sizeof(Element));
  static constexpr int kGmemThreadsPerRow = kBlockKSmem / kGmemElemsPerLoad;
  static_assert(kNThreads % kGmemThreadsPerRow == 0);
  using GmemLayoutAtom = Layout<Shape<Int<kNThreads / kGmemThreadsPerRow>, Int<kGmemThreadsPerRow>>,
                                Stride<Int<kGmemThreadsPerRow>, _1>>;
  using GmemTiledCopyQKV = decltype(make_tiled_copy(
      Copy_Atom<SM80_CP_ASYNC_CACHEGLOBAL<cute::uint128_t>, Element>{}, GmemLayoutAtom{},
      Layout<Shape<_1, Int<kGmemElemsPerLoad>>>{}));
  using GmemTiledCopyO = decltype(make_tiled_copy(
      Copy_Atom<AutoVectorizingCopyWithAssumedAlignment<128>, Element>{}, GmemLayoutAtom{},
      Layout<Shape<_1, Int<kGmemElemsPerLoad>>>{}));
};

}  // namespace flash
