// Compile-time layout and copy choices for the mma.sync kernels (forward and backward).
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/numeric_types.h>

#include "tile_size.h"

namespace flash {

using namespace cute;

// What every mma.sync attention kernel shares: the MMA, the swizzled shared-memory
// atom for (rows, d) tiles, and the copy atoms between the memories.
template <int kHeadDim_, typename Element_, int kNWarps_>
struct MmaCopyTraits {
  using Element = Element_;           // cutlass::half_t or cutlass::bfloat16_t
  using ElementAccum = float;
  using index_t = int64_t;

  static constexpr int kHeadDim = kHeadDim_;
  static constexpr int kNWarps = kNWarps_;
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

  using SmemCopyAtom = Copy_Atom<SM75_U32x4_LDSM_N, Element>;            // row-major operand -> registers
  using SmemCopyAtomTransposed = Copy_Atom<SM75_U16x8_LDSM_T, Element>;  // (rows, d) tile read as (d, rows)
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

  // A (rows, d) tile with `stages` buffers, and the same bytes viewed as (d, rows, stages).
  template <int kRows, int kStages = 1>
  using SmemLayoutTile = decltype(tile_to_shape(SmemLayoutAtom{}, Shape<Int<kRows>, Int<kHeadDim>, Int<kStages>>{}));
  template <int kRows, int kStages = 1>
  using SmemLayoutTileT = decltype(composition(
      SmemLayoutTile<kRows, kStages>{},
      make_layout(Shape<Int<kHeadDim>, Int<kRows>, Int<kStages>>{},
                  Stride<Int<kRows>, _1, Int<kRows * kHeadDim>>{})));
};

// kTile_ defaults to the tuned choice of tile_size.h; tuning harnesses pass others.
template <int kHeadDim_, typename Element_, FwdTile kTile_ = fwd_tile(kHeadDim_)>
struct FwdKernelTraits : MmaCopyTraits<kHeadDim_, Element_, kTile_.n_warps> {
  using Base = MmaCopyTraits<kHeadDim_, Element_, kTile_.n_warps>;
  static constexpr FwdTile kTile = kTile_;
  static constexpr int kBlockM = kTile.block_m;
  static constexpr int kBlockN = kTile.block_n;
  static constexpr int kStages = kTile.kv_stages;  // K/V buffers (3: two blocks in flight)
  static_assert(kStages >= 1 && kStages <= 3);

  using SmemLayoutQ = decltype(tile_to_shape(typename Base::SmemLayoutAtom{},
                                             Shape<Int<kBlockM>, Int<kHeadDim_>>{}));
  using SmemLayoutKV = typename Base::template SmemLayoutTile<kBlockN, kStages>;   // (BN, D, stages)
  using SmemLayoutVt = typename Base::template SmemLayoutTileT<kBlockN, kStages>;  // (D, BN, stages)
  using SmemLayoutO = SmemLayoutQ;  // O staging tile reuses Q's shared memory

  static constexpr int kSmemQBytes = int(cosize_v<SmemLayoutQ>) * int(sizeof(Element_));
  static constexpr int kSmemKVBytes = int(cosize_v<SmemLayoutKV>) * int(sizeof(Element_));  // all stages
  static constexpr int kSmemBytes = kSmemQBytes + 2 * kSmemKVBytes;
};

// Backward: a stationary tile of kBlockRows rows (K, V for dK/dV; Q, dO for dQ) and a
// streamed tile of kBlockCols rows (the other pair), both (rows, d), plus per-column
// lse and rowsum(dO * O) of the streamed queries.
template <int kHeadDim_, typename Element_, BwdTile kTile_ = bwd_tile(kHeadDim_)>
struct BwdKernelTraits : MmaCopyTraits<kHeadDim_, Element_, kTile_.n_warps> {
  using Base = MmaCopyTraits<kHeadDim_, Element_, kTile_.n_warps>;
  static constexpr BwdTile kTile = kTile_;
  static constexpr int kBlockRows = kTile_.block_rows;
  static constexpr int kBlockCols = kTile_.block_cols;
  static constexpr int kStages = kTile_.stream_stages;
  // kBlockRows % (16 * n_warps) == 0 binds only the dQ kernel's 1-D MMA (Base::TiledMma):
  // compute_dq_tile asserts it, and the launcher gives it bwd_dq_tile's warps.
  static_assert(kBlockRows % 16 == 0 && kBlockCols % 16 == 0);
  static_assert(kStages == 1 || kStages == 2);

  using SmemLayoutRows = typename Base::template SmemLayoutTile<kBlockRows>;             // (rows, D, 1)
  using SmemLayoutCols = typename Base::template SmemLayoutTile<kBlockCols, kStages>;    // (cols, D, stages)
  using SmemLayoutColsT = typename Base::template SmemLayoutTileT<kBlockCols, kStages>;  // (D, cols, stages)

  static constexpr int kSmemRowsBytes = int(cosize_v<SmemLayoutRows>) * int(sizeof(Element_));
  static constexpr int kSmemColsBytes = int(cosize_v<SmemLayoutCols>) * int(sizeof(Element_));  // all stages
  static constexpr int kSmemStatsBytes = 2 * kStages * kBlockCols * int(sizeof(float));  // lse, D

  // The dK/dV kernel's products, each with its own warp layout so that no warp reads a
  // whole streamed operand from shared memory (FlashAttention-2's layouts):
  //   S^T = K Q^T, dP^T = V dO^T   (rows x cols): warps 4 along rows x 2 along cols
  //   dV += P^T dO, dK += dS^T Q    (rows x d):    warps 4 along rows x 2 along d
  //   dQ  = dS K                    (cols x d):    warps kDqWarpsM along cols x the rest along d
  // P^T and dS^T go through shared memory between them. Each warp step is 16 wide in N so
  // one ldmatrix.x4 feeds two n-atoms.
  static constexpr int kNWarps = kTile_.n_warps;
  static_assert(kNWarps == 4 || kNWarps == 8);
  static constexpr int kWarpsRows = kNWarps / 2 < kBlockRows / 16 ? kNWarps / 2 : kBlockRows / 16;
  static constexpr int kWarpsOther = kNWarps / kWarpsRows;
  // dQ's warp grid: each warp reads (cols / M) x rows of dS^T and (d / N) x rows of K from
  // shared memory, so M minimises cols / M + d / N (ties: 2). d = 64 (128 x 128 tile): 4 x 2,
  // 8K elements per warp instead of 10K with 2 x 4, 3-5% faster on the H100
  // (benchmarks/tune/tune_dq_grid_415954903cfa_h100.txt); d = 128 and 256 keep 2 x 4.
  // benchmarks/tune/run_tune.sh times other grids with -DFLASH_ATTN_TUNE_DQ_WARPS_M (never set
  // by setup.py).
  static constexpr int dq_warps_m() {
    int best = 0, best_reads = 0;
    for (int m : {2, 1, 4}) {
      if (m > kNWarps || kBlockCols % (16 * m) != 0 || kHeadDim_ % (16 * (kNWarps / m)) != 0) { continue; }
      const int reads = kBlockCols / m + kHeadDim_ / (kNWarps / m);
      if (best == 0 || reads < best_reads) {
        best = m;
        best_reads = reads;
      }
    }
    return best;
  }
#ifdef FLASH_ATTN_TUNE_DQ_WARPS_M
  static constexpr int kDqWarpsM = FLASH_ATTN_TUNE_DQ_WARPS_M;
#else
  static constexpr int kDqWarpsM = dq_warps_m();
#endif
  static constexpr int kDqWarpsN = kNWarps / kDqWarpsM;
  static_assert(kBlockRows % (16 * kWarpsRows) == 0 && kBlockCols % (16 * kWarpsOther) == 0);
  static_assert(kHeadDim_ % (16 * kWarpsOther) == 0 && kHeadDim_ % (16 * kDqWarpsN) == 0);
  using MmaAtom = typename Base::MmaAtom;
  using TiledMmaSdP = TiledMMA<MmaAtom, Layout<Shape<Int<kWarpsRows>, Int<kWarpsOther>, _1>>,
                               Tile<Int<16 * kWarpsRows>, Int<16 * kWarpsOther>, _16>>;
  using TiledMmaDkv = TiledMmaSdP;  // same warp grid, N = d instead of cols
  using TiledMmaDq = TiledMMA<MmaAtom, Layout<Shape<Int<kDqWarpsM>, Int<kDqWarpsN>, _1>>,
                              Tile<Int<16 * kDqWarpsM>, Int<16 * kDqWarpsN>, _16>>;

  // P^T and dS^T (rows = keys, cols = queries), cols contiguous, swizzled like the (rows, d)
  // tiles: read as the A operand (rows, cols) of dV / dK, and dS^T transposed by
  // ldmatrix.trans as the A operand (cols, rows) of dQ.
  static constexpr int kPAtomCols = kBlockCols >= 64 ? 64 : 32;
  static_assert(kBlockCols % kPAtomCols == 0);
  using SmemLayoutP = decltype(tile_to_shape(
      composition(Swizzle<kPAtomCols == 64 ? 3 : 2, 3, 3>{},
                  Layout<Shape<_8, Int<kPAtomCols>>, Stride<Int<kPAtomCols>, _1>>{}),
      Shape<Int<kBlockRows>, Int<kBlockCols>>{}));  // (rows, cols)
  using SmemLayoutPT = decltype(composition(
      SmemLayoutP{}, make_layout(Shape<Int<kBlockCols>, Int<kBlockRows>>{},
                                 Stride<Int<kBlockRows>, _1>{})));  // (cols, rows)
  // The stationary K tile read as (d, rows): the B operand of dQ = dS K.
  using SmemLayoutRowsT = typename Base::template SmemLayoutTileT<kBlockRows>;  // (D, rows, 1)
  static constexpr int kSmemPBytes = int(cosize_v<SmemLayoutP>) * int(sizeof(Element_));
  // Accumulator fragments to shared memory: each thread holds pairs of adjacent columns.
  using SmemCopyAtomP = Copy_Atom<AutoVectorizingCopyWithAssumedAlignment<32>, Element_>;

  // dK/dV kernel: [K, V (rows)] [Q, dO (cols, stages)] [lse, D (stages)] [P^T] [dS^T];
  // dQ kernel (deterministic path): the first three, sized by its own traits
  // (bwd_dq_tile: the same rows and stages; at d = 256 fewer warps and key columns).
  static constexpr int kSmemPOffset = (2 * kSmemRowsBytes + 2 * kSmemColsBytes + kSmemStatsBytes + 127) / 128 * 128;
  static constexpr int kSmemBytes = 2 * kSmemRowsBytes + 2 * kSmemColsBytes + kSmemStatsBytes;
  static constexpr int kSmemBytesDkDv = kSmemPOffset + 2 * kSmemPBytes;
};

}  // namespace flash
