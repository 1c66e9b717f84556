// The backward's first pass: D = rowsum(dO * O) per (query row, head), fp32, written in
// softmax_lse's layout ([b, h, seqlen_q] or [h, total_q]). One fused read of dO and O in
// 16-byte vectors instead of the cast/multiply/sum passes it would take in torch.
#pragma once

#include <cute/tensor.hpp>

#include "block_info.h"
#include "flash.h"

namespace flash {

constexpr int kDotThreads = 128;

template <int kHeadDim>
constexpr int dot_rows_per_cta() { return kDotThreads / (kHeadDim / 8); }

// Grid: (ceil(seqlen_q / rows per CTA), batch, heads); kHeadDim / 8 threads per row.
template <typename Element, int kHeadDim>
__global__ void __launch_bounds__(kDotThreads) flash_bwd_dot_do_o_kernel(__grid_constant__ const Flash_bwd_params p) {
  static_assert(sizeof(Element) == 2 && kHeadDim % 8 == 0);
  constexpr int kThreadsPerRow = kHeadDim / 8;  // 8 elements (16 bytes) per thread
  static_assert(32 % kThreadsPerRow == 0, "a row's threads must sit in one warp for the shuffles");
  constexpr int kRowsPerCta = dot_rows_per_cta<kHeadDim>();
  const int bidb = blockIdx.y, bidh = blockIdx.z;
  const SeqInfo seq(p, bidb);
  const int row = blockIdx.x * kRowsPerCta + int(threadIdx.x) / kThreadsPerRow;
  const int col = (int(threadIdx.x) % kThreadsPerRow) * 8;
  float acc = 0.f;
  if (row < seq.seqlen_q) {
    const Element *o = reinterpret_cast<const Element *>(p.o_ptr) +
                       seq.q_offset(p.o_batch_stride, p.o_row_stride, bidb) + bidh * p.o_head_stride +
                       row * p.o_row_stride + col;
    const Element *dout = reinterpret_cast<const Element *>(p.do_ptr) +
                          seq.q_offset(p.do_batch_stride, p.do_row_stride, bidb) + bidh * p.do_head_stride +
                          row * p.do_row_stride + col;
    const uint4 ov = *reinterpret_cast<const uint4 *>(o);
    const uint4 dv = *reinterpret_cast<const uint4 *>(dout);
    const Element *oe = reinterpret_cast<const Element *>(&ov);
    const Element *de = reinterpret_cast<const Element *>(&dv);
    CUTE_UNROLL
    for (int i = 0; i < 8; ++i) { acc += float(oe[i]) * float(de[i]); }
  }
  CUTE_UNROLL
  for (int offset = kThreadsPerRow / 2; offset > 0; offset /= 2) { acc += __shfl_xor_sync(0xffffffff, acc, offset); }
  if (row < seq.seqlen_q && threadIdx.x % kThreadsPerRow == 0) {
    p.softmax_d_ptr[seq.lse_offset(p, bidb, bidh) + row] = acc;
  }
}

}  // namespace flash
