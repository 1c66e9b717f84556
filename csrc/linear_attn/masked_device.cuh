// Device helpers of the masked linear-attention kernels (masked_attn.cuh, mask_grad.cuh):
//   - the thread index as seen inside their pipelined loops;
//   - reading the mask straight into registers, in the C-fragment layout of a warp's 16 x 64
//     score tile (mma.cuh), as fp32 whatever its dtype. The mask is addressed through its
//     strides (0 on broadcast dimensions, swapped for the transposed passes), so a broadcast
//     or transposed mask is never copied.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "masked_params.h"

namespace linear_attn {

// threadIdx.x, read afresh where it is called. Inside a loop that issues a tile copy per step,
// this keeps the compiler from hoisting every per-thread copy offset out of the loop and holding
// them in registers throughout (up to ~90 registers and spills for 64 x 256 tiles, ptxas -v);
// recomputing them per step costs a few integer instructions.
__device__ __forceinline__ int loop_tid() {
  int tid;
  asm volatile("mov.u32 %0, %%tid.x;\n" : "=r"(tid));
  return tid;
}

// The element types as read from memory (16-bit types as raw bits) and their fp32 value.
struct MaskF32 {
  using Raw = float;
  static __device__ __forceinline__ float load(const Raw* p) { return __ldg(p); }
};
struct MaskF16 {
  using Raw = unsigned short;
  static __device__ __forceinline__ float load(const Raw* p) { return __half2float(__ushort_as_half(__ldg(p))); }
};
struct MaskBf16 {
  using Raw = unsigned short;
  // bf16 is the upper half of an fp32
  static __device__ __forceinline__ float load(const Raw* p) {
    return __uint_as_float(static_cast<uint32_t>(__ldg(p)) << 16);
  }
};

// m[nt][e] = M(row0 + g + 8 * (e >> 1), col0 + nt * 8 + 2 * t + (e & 1)) with g = lane / 4,
// t = lane % 4 (the C layout of a 16 x 64 tile), element (r, c) at mask + off + r * sr + c * sc
// (in elements); 0 where r >= rows or c >= cols (nothing is read there).
template <typename Ty>
__device__ __forceinline__ void load_mask_frag_as(float (&m)[8][4], const void* mask, int64_t off, int64_t sr,
                                                  int64_t sc, int row0, int rows, int col0, int cols, int lane) {
  using Raw = typename Ty::Raw;
  const Raw* base = static_cast<const Raw*>(mask) + off;
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = row0 + g + 8 * half;
    const bool row_ok = r < rows;
    // column 2t of n tile 0; each n tile moves 8 columns on
    const Raw* p = base + static_cast<int64_t>(row_ok ? r : 0) * sr + static_cast<int64_t>(col0 + 2 * t) * sc;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
      const int c = col0 + nt * 8 + 2 * t;
      m[nt][2 * half] = row_ok && c < cols ? Ty::load(p) : 0.f;
      m[nt][2 * half + 1] = row_ok && c + 1 < cols ? Ty::load(p + sc) : 0.f;
      p += 8 * sc;
    }
  }
}

// The same for the mask's runtime dtype (one uniform branch per tile).
__device__ __forceinline__ void load_mask_frag(float (&m)[8][4], MaskDtype dtype, const void* mask, int64_t off,
                                               int64_t sr, int64_t sc, int row0, int rows, int col0, int cols,
                                               int lane) {
  switch (dtype) {
    case MaskDtype::kFp16: load_mask_frag_as<MaskF16>(m, mask, off, sr, sc, row0, rows, col0, cols, lane); break;
    case MaskDtype::kBf16: load_mask_frag_as<MaskBf16>(m, mask, off, sr, sc, row0, rows, col0, cols, lane); break;
    default: load_mask_frag_as<MaskF32>(m, mask, off, sr, sc, row0, rows, col0, cols, lane); break;
  }
}

}  // namespace linear_attn
