// Tensor-core building blocks for the chunked kernels (sm80+): cp.async copies into a
// swizzled shared-memory tile, ldmatrix loads of MMA fragments, and mma.sync m16n8k16 with
// fp32 accumulation. Fragment layouts (PTX ISA, m16n8k16, 16-bit inputs), with
// g = lane / 4 and t = lane % 4:
//   A (16 x 16): a[0] = (g, 2t..2t+1)  a[1] = (g+8, 2t..)  a[2] = (g, 2t+8..)  a[3] = (g+8, 2t+8..)
//   B (16 x 8):  b[0] = (k 2t..2t+1, n g)  b[1] = (k 2t+8..2t+9, n g)
//   C (16 x 8):  c[0..1] = (g, 2t..2t+1)  c[2..3] = (g+8, 2t..2t+1)
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "linear_params.h"

namespace linear_attn {

template <typename Tag> struct Elem;

template <> struct Elem<Bf16> {
  using T = __nv_bfloat16;
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // lo in the low half: the lower column
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ float2 unpack(uint32_t u) {
    return __bfloat1622float2(*reinterpret_cast<__nv_bfloat162*>(&u));
  }
  static __device__ __forceinline__ float to_float(T x) { return __bfloat162float(x); }
  static __device__ __forceinline__ T from_float(float x) { return __float2bfloat16_rn(x); }
  // d += a * b
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <> struct Elem<Fp16> {
  using T = __half;
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  static __device__ __forceinline__ float2 unpack(uint32_t u) {
    return __half22float2(*reinterpret_cast<__half2*>(&u));
  }
  static __device__ __forceinline__ float to_float(T x) { return __half2float(x); }
  static __device__ __forceinline__ T from_float(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

// ---------------------------------------------------------------- swizzled shared tiles
// A tile of ROWS x COLS 16-bit elements, row-major, its 16-byte chunks XOR-swizzled by row
// so that the 8 row addresses of one ldmatrix phase hit 8 different bank groups.
template <int COLS>
__device__ __forceinline__ int swz(int row, int col) {
  static_assert(COLS == 32 || COLS % 64 == 0, "swizzled tiles are 32 or a multiple of 64 columns wide");
  const int chunk = col >> 3;
  const int phys = COLS >= 64 ? (chunk ^ (row & 7)) : (chunk ^ ((row >> 1) & 3));
  return row * COLS + (phys << 3) + (col & 7);
}

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16 bytes global -> shared; zero-filled (nothing read) when !valid.
__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem),
               "r"(valid ? 16 : 0));
}
// 4 bytes global -> shared (cached at all levels); zero-filled when !valid.
__device__ __forceinline__ void cp_async4(void* smem, const void* gmem, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(smem_u32(smem)), "l"(gmem),
               "r"(valid ? 4 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N)); }

// Copies rows [0, ROWS) x cols [0, COLS) of a global matrix (row r at gbase + r * ld) into a
// swizzled tile; row r is zero-filled when r >= valid_rows. All NT threads take part.
template <int ROWS, int COLS, int NT, typename T>
__device__ __forceinline__ void load_tile(T* tile, const T* gbase, int64_t ld, int valid_rows, int tid) {
  constexpr int kChunksPerRow = COLS / 8;
  constexpr int kChunks = ROWS * kChunksPerRow;
  static_assert(kChunks % NT == 0, "tile copies split evenly over the threads");
#pragma unroll
  for (int i = 0; i < kChunks / NT; ++i) {
    const int idx = tid + i * NT;
    const int r = idx / kChunksPerRow;
    const int c = (idx % kChunksPerRow) * 8;
    const bool valid = r < valid_rows;
    cp_async16(tile + swz<COLS>(r, c), valid ? gbase + r * ld + c : gbase, valid);
  }
}

// ---------------------------------------------------------------- ldmatrix
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
}

// The A fragment (16 x 16) at (m0, k0) of a tile stored as A itself, [m][k].
template <int COLS, typename T>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const T* tile, int m0, int k0, int lane) {
  const int row = m0 + (lane & 7) + ((lane >> 3) & 1) * 8;
  const int col = k0 + (lane >> 4) * 8;
  ldsm_x4(a, tile + swz<COLS>(row, col));
}

// The A fragment (16 x 16) at (m0, k0) of a tile stored transposed, [k][m].
template <int COLS, typename T>
__device__ __forceinline__ void load_a_t(uint32_t (&a)[4], const T* tile, int m0, int k0, int lane) {
  const int row = k0 + (lane & 7) + (lane >> 4) * 8;
  const int col = m0 + ((lane >> 3) & 1) * 8;
  ldsm_x4_t(a, tile + swz<COLS>(row, col));
}

// Two B fragments (k 16 x n 16: n tiles n0 and n0 + 8) of a tile stored as [n][k]:
// b[0], b[1] for n tile n0 and b[2], b[3] for n0 + 8.
template <int COLS, typename T>
__device__ __forceinline__ void load_b_nk(uint32_t (&b)[4], const T* tile, int k0, int n0, int lane) {
  const int row = n0 + (lane & 7) + (lane >> 4) * 8;
  const int col = k0 + ((lane >> 3) & 1) * 8;
  ldsm_x4(b, tile + swz<COLS>(row, col));
}

// The same two B fragments from a tile stored as [k][n].
template <int COLS, typename T>
__device__ __forceinline__ void load_b_kn(uint32_t (&b)[4], const T* tile, int k0, int n0, int lane) {
  const int row = k0 + (lane & 7) + ((lane >> 3) & 1) * 8;
  const int col = n0 + (lane >> 4) * 8;
  ldsm_x4_t(b, tile + swz<COLS>(row, col));
}

// ---------------------------------------------------------------- one warp's 16-row products
// c[nt] is the C fragment of n tile nt: 16 rows x columns 8 nt .. 8 nt + 7.

template <int NT>
__device__ __forceinline__ void zero_frags(float (&c)[NT][4]) {
#pragma unroll
  for (int i = 0; i < NT; ++i) {
#pragma unroll
    for (int e = 0; e < 4; ++e) c[i][e] = 0.f;
  }
}

// How a B operand's tile is stored: [k][n] (M, z) or [n][k] (y of the scores x y^T).
enum class BLayout { kKN, kNK };

// c += a * B over all 8 NT columns of c, B = k rows k0 .. k0 + 15 of a COLS-wide tile.
template <typename E, int COLS, BLayout kLayout, int NT, typename T>
__device__ __forceinline__ void mma_b(float (&c)[NT][4], const uint32_t (&a)[4], const T* tile, int k0, int lane) {
  static_assert(NT % 2 == 0, "whole 16-column B fragments");
#pragma unroll
  for (int np = 0; np < NT / 2; ++np) {
    uint32_t b[4];
    if constexpr (kLayout == BLayout::kKN) {
      load_b_kn<COLS>(b, tile, k0, np * 16, lane);
    } else {
      load_b_nk<COLS>(b, tile, k0, np * 16, lane);
    }
    E::mma(c[2 * np], a, b[0], b[1]);
    E::mma(c[2 * np + 1], a, b[2], b[3]);
  }
}

}  // namespace linear_attn
