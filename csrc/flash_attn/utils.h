// Small device helpers shared by the forward kernel: register-layout views,
// shared->register GEMM loops, predicated tile copies, warp-quad reductions.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/array.h>
#include <cutlass/numeric_conversion.h>

namespace flash {

using namespace cute;

// Accumulator of an SM80 16x8 MMA: ((2 cols, 2 rows), MMA_M, MMA_N) ->
// ((2 rows, MMA_M), (2 cols, MMA_N)), so rows and columns can be looped separately.
template <typename Layout>
__forceinline__ __device__ auto acc_layout_rowcol(Layout acc) {
  static_assert(decltype(rank(acc))::value == 3);
  static_assert(decltype(size<0>(acc))::value == 4);
  auto l = logical_divide(acc, Shape<_2>{});  // ((2, 2), MMA_M, MMA_N)
  return make_layout(make_layout(get<0, 1>(l), get<1>(l)), make_layout(get<0, 0>(l), get<2>(l)));
}

// The same accumulator reused as the A operand of the next 16x8x16 MMA: two
// adjacent n-atoms (8 columns each) form one k-slice of 16.
// ((2, 2), MMA_M, MMA_N) -> ((2, 2, 2), MMA_M, MMA_N / 2)
template <typename Layout>
__forceinline__ __device__ auto acc_layout_as_A(Layout acc) {
  static_assert(decltype(size<0>(acc))::value == 4);
  static_assert(decltype(size<2>(acc))::value % 2 == 0);
  auto l = logical_divide(acc, Shape<Underscore, Underscore, _2>{});  // (4, MMA_M, (2, MMA_N / 2))
  return make_layout(make_layout(get<0>(l), get<2, 0>(l)), get<1>(l), get<2, 1>(l));
}

template <typename To, typename Engine, typename Layout>
__forceinline__ __device__ auto convert_type(Tensor<Engine, Layout> const &t) {
  using From = typename Engine::value_type;
  constexpr int N = decltype(size(t))::value;
  cutlass::NumericArrayConverter<To, From, N> convert;
  auto frag = convert(*reinterpret_cast<const cutlass::Array<From, N> *>(t.data()));
  return make_tensor(make_rmem_ptr<To>(&frag), t.layout());
}

// acc += A B with both operands read from shared memory k-slice by k-slice; the next
// slice's ldmatrix is issued before the current slice's MMAs to overlap them.
template <typename TiledMma, typename Acc, typename FragA, typename FragB, typename SmemA, typename SmemB,
          typename CopyA, typename CopyB>
__forceinline__ __device__ void gemm_smem_smem(TiledMma &mma, Acc &acc, FragA &rA, FragB &rB,
                                               SmemA const &sA, SmemB const &sB,
                                               CopyA const &copy_a, CopyB const &copy_b) {
  // rA: (MMA, MMA_M, MMA_K) registers; sA: (CPY, CPY_M, CPY_K) this thread's smem view.
  auto rA_view = copy_a.get_thread_slice(threadIdx.x).retile_D(rA);
  auto rB_view = copy_b.get_thread_slice(threadIdx.x).retile_D(rB);
  static_assert(decltype(size<2>(rA_view))::value == decltype(size<2>(sA))::value);
  copy(copy_a, sA(_, _, _0{}), rA_view(_, _, _0{}));
  copy(copy_b, sB(_, _, _0{}), rB_view(_, _, _0{}));
  CUTE_UNROLL
  for (int k = 0; k < size<2>(rA); ++k) {
    if (k < size<2>(rA) - 1) {
      copy(copy_a, sA(_, _, k + 1), rA_view(_, _, k + 1));
      copy(copy_b, sB(_, _, k + 1), rB_view(_, _, k + 1));
    }
    cute::gemm(mma, rA(_, _, k), rB(_, _, k), acc);
  }
}

// acc += A B with A already in registers (P after softmax) and B from shared memory.
template <typename TiledMma, typename Acc, typename FragA, typename FragB, typename SmemB, typename CopyB>
__forceinline__ __device__ void gemm_reg_smem(TiledMma &mma, Acc &acc, FragA const &rA, FragB &rB,
                                              SmemB const &sB, CopyB const &copy_b) {
  auto rB_view = copy_b.get_thread_slice(threadIdx.x).retile_D(rB);
  copy(copy_b, sB(_, _, _0{}), rB_view(_, _, _0{}));
  CUTE_UNROLL
  for (int k = 0; k < size<2>(rA); ++k) {
    if (k < size<2>(rA) - 1) { copy(copy_b, sB(_, _, k + 1), rB_view(_, _, k + 1)); }
    cute::gemm(mma, rA(_, _, k), rB(_, _, k), acc);
  }
}

// Copy a (CPY, CPY_ROWS, CPY_K) tile of this thread, rows at or past max_rows are not
// read: they are zero-filled in the destination, so padded keys never inject NaN or
// garbage into P V. `coord` is the identity tensor partitioned the same way.
template <typename TiledCopy, typename Src, typename Dst, typename Coord>
__forceinline__ __device__ void copy_rows_guarded(TiledCopy const &tiled_copy, Src const &src, Dst &&dst,
                                                  Coord const &coord, int max_rows) {
  CUTE_UNROLL
  for (int m = 0; m < size<1>(src); ++m) {
    if (get<0>(coord(0, m, 0)) < max_rows) {
      copy(tiled_copy, src(_, m, _), dst(_, m, _));
    } else {
      clear(dst(_, m, _));
    }
  }
}

// Reductions over the 4 threads of a quad, which hold one accumulator row together.
__forceinline__ __device__ float quad_allreduce_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, 2));
  return fmaxf(x, __shfl_xor_sync(0xffffffff, x, 1));
}
__forceinline__ __device__ float quad_allreduce_sum(float x) {
  x += __shfl_xor_sync(0xffffffff, x, 2);
  return x + __shfl_xor_sync(0xffffffff, x, 1);
}

}  // namespace flash
