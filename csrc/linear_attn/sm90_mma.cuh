// Building blocks of the sm90a (wgmma) linear-attention kernels (chunk_fused_sm90.cuh,
// chunk_bwd_sm90.cuh): issuing a warpgroup MMA over K slices, loading 64-row tiles into the
// swizzled layouts of sm90_tiles.h by cp.async, and a threadIdx.x read the compiler cannot hoist.
#pragma once

#include <type_traits>

#include <cute/tensor.hpp>

#include "mma.cuh"
#include "sm90_tiles.h"

namespace linear_attn {
namespace sm90 {

using namespace cute;

// acc (+)= A B over the K slices [k0, k0 + kSlices) (all of them by default), issued and committed
// (not waited for); Zero_init: the first slice overwrites acc.
template <bool Zero_init, int kSlices = -1, typename TiledMma, typename FragA, typename FragB, typename Acc>
__forceinline__ __device__ void wgmma_issue(TiledMma& mma, FragA const& a, FragB const& b, Acc& acc, int k0 = 0) {
  constexpr bool kAInRegs = std::is_same_v<typename FragA::value_type, typename TiledMma::ValTypeA>;
  if constexpr (kAInRegs) warpgroup_fence_operand(const_cast<FragA&>(a));
  warpgroup_fence_operand(acc);
  warpgroup_arrive();
  if constexpr (Zero_init) mma.accumulate_ = GMMA::ScaleOut::Zero;
  constexpr int kCount = kSlices < 0 ? decltype(size<2>(a))::value : kSlices;
  CUTE_UNROLL
  for (int k = 0; k < kCount; ++k) {
    cute::gemm(mma, a(_, _, k0 + k), b(_, _, k0 + k), acc);
    mma.accumulate_ = GMMA::ScaleOut::One;
  }
  warpgroup_commit_batch();
  warpgroup_fence_operand(acc);
  if constexpr (kAInRegs) warpgroup_fence_operand(const_cast<FragA&>(a));
}

// Rows [0, R) x columns [0, C) of a global matrix (row r at gbase + r * ld) into an R x C tile
// (R: 64, a chunk, by default; or a state's rows); rows >= valid_rows zero-filled (nothing read).
template <int C, int NT, int R = kChunk, typename T>
__device__ __forceinline__ void load_rows_async(T* tile, const T* gbase, int64_t ld, int valid_rows, int t) {
  using W = GroupWalk<C, NT>;
  static_assert(R % kChunk == 0, "whole 64-row blocks");
  const int r0 = t / W::G, c0 = (t % W::G) * 8;
#pragma unroll
  for (int rb = 0; rb < R / kChunk; ++rb) {
#pragma unroll
    for (int b = 0; b < W::kBlocks; ++b) {
      const int c = b * W::kBlockCols + c0, r = rb * kChunk + r0;
      T* s = tile + tile_offset<R, C>(r, c);
      const T* g = gbase + r * ld + c;
#pragma unroll
      for (int i = 0; i < W::kRows; ++i) {
        const bool valid = r + i * W::kRowStep < valid_rows;
        cp_async16(s + i * W::kRowStep * W::kRowStride, valid ? g + i * W::kRowStep * ld : gbase, valid);
      }
    }
  }
}

// The register fragment of P, the A operand of an RS wgmma P z over a 64-row chunk (thr: that MMA's
// thread slice): 64 x 64 elements of TC in the element order of a 64 x 64 fp32 accumulator, so
// that the masked scores round into it element by element (as 32-bit pairs: p_words).
template <typename TC, typename ThrMma>
__device__ __forceinline__ auto p_fragment(ThrMma const& thr) {
  using PLayout = decltype(thr.partition_fragment_A(
      make_tensor(make_smem_ptr(static_cast<TC*>(nullptr)), Layout<Shape<_64, _64>>{})).layout());
  static_assert(decltype(size(PLayout{}))::value == kChunk * kChunk / 128, "one accumulator's elements");
  return make_tensor<TC>(PLayout{});
}

template <typename Frag>
__device__ __forceinline__ uint32_t* p_words(Frag& frag) {
  return reinterpret_cast<uint32_t*>(raw_pointer_cast(frag.data()));
}

// threadIdx.x read where it is used: values derived from it inside the chunk loop (tile offsets,
// accumulator coordinates) are then recomputed per chunk instead of hoisted out of the loop, where
// they would hold dozens of registers next to the accumulators.
__device__ __forceinline__ int tid_here() {
  int t;
  asm volatile("mov.u32 %0, %%tid.x;" : "=r"(t));
  return t;
}

}  // namespace sm90
}  // namespace linear_attn
