// Storing an fp32 accumulator tile to global memory through shared memory.
#pragma once

#include <cute/tensor.hpp>

#include "utils.h"

namespace flash {

using namespace cute;

// acc: (MMA, MMA_M, MMA_N) fp32 accumulator of tiled_mma covering sTile's shape (BM, D).
// Converts it to Element, stages it in sTile (which the caller guarantees no thread
// still reads), and stores rows [0, rows) of gTile (BM, D) in 16-byte vectors.
template <typename Ktraits, typename TiledMma, typename Acc, typename STile, typename GTile>
__forceinline__ __device__ void store_acc_tile(TiledMma const &tiled_mma, Acc const &acc, STile &sTile,
                                               GTile &gTile, int rows) {
  using Element = typename Ktraits::Element;
  const int tidx = threadIdx.x;
  Tensor rAcc = convert_type<Element>(acc);
  auto smem_copy = make_tiled_copy_C(typename Ktraits::SmemCopyAtomO{}, tiled_mma);
  auto smem_thr = smem_copy.get_thread_slice(tidx);
  Tensor tRr = smem_thr.retile_S(rAcc);
  Tensor tRs = smem_thr.partition_D(sTile);
  copy(smem_copy, tRr, tRs);
  __syncthreads();

  typename Ktraits::GmemTiledCopyO gmem_copy;
  auto gmem_thr = gmem_copy.get_thread_slice(tidx);
  Tensor tSs = gmem_thr.partition_S(sTile);  // (CPY, CPY_M, CPY_D)
  Tensor tSg = gmem_thr.partition_D(gTile);
  Tensor tSr = make_tensor<Element>(shape(tSg));
  copy(gmem_copy, tSs, tSr);
  Tensor tSc = gmem_thr.partition_D(make_identity_tensor(make_shape(size<0>(sTile), size<1>(sTile))));
  CUTE_UNROLL
  for (int m = 0; m < size<1>(tSg); ++m) {
    if (get<0>(tSc(0, m, 0)) < rows) { copy(gmem_copy, tSr(_, m, _), tSg(_, m, _)); }
  }
}

}  // namespace flash
