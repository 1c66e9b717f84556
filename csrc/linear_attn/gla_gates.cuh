// GLA's per-key gates inside the chunked kernels: tiles of the chunk-local cumulative gate b
// (gla_cumsum.cu writes b[t, h, d] = g[chunk start, h, d] + ... + g[t, h, d]).
//
// A gate tile is 64 chunk rows x 64 key columns of b in fp32, row pitch kGatePitch = 68 floats:
// rows 0..7 start 4 banks apart, so the reads below (8 rows x 4 lanes, or 4 rows x float4) hit
// 32 different banks, and every row stays 16-byte aligned for cp.async.
//
// Rows past a chunk's end are loaded as copies of its last row: they decay nothing, b_L is row
// 63 whatever the chunk's length, and every exponent the kernels take stays <= 0 there too
// (b is non-increasing down a chunk for gates <= 0; rows past the end hold zeros in q, k, v, so
// what they contribute is 0, never inf * 0).
#pragma once

#include <cstdint>

#include "linear_params.h"
#include "mma.cuh"

namespace linear_attn {

constexpr int kSub = 16;                            // GLA sub-chunk rows (one warp's rows)
constexpr int kGatePitch = 68;                      // floats per gate-tile row
constexpr int kGateTileFloats = kChunk * kGatePitch;

__device__ __forceinline__ int gate_at(int row, int col) { return row * kGatePitch + col; }

// rows [0, kChunk) x cols [0, 64) of b (row r at gbase + r * ld) into a gate tile; rows at or
// past valid_rows (>= 1) copy row valid_rows - 1. With kRaw, raw gates g (before gla_cumsum)
// instead, and rows at or past valid_rows (>= 0) are zeros, no decay, so that after
// scan_gate_column they hold the last row's b, as the copies would. All NT threads take part
// (cp.async; the caller commits and waits).
template <int NT, bool kRaw = false>
__device__ __forceinline__ void load_gate_tile(float* tile, const float* gbase, int64_t ld, int valid_rows, int tid) {
  constexpr int kChunksPerRow = 64 / 4;  // 16-byte chunks
  constexpr int kChunks = kChunk * kChunksPerRow;
  static_assert(kChunks % NT == 0, "gate tile copies split evenly over the threads");
#pragma unroll
  for (int i = 0; i < kChunks / NT; ++i) {
    const int idx = tid + i * NT;
    const int r = idx / kChunksPerRow;
    const int c = (idx % kChunksPerRow) * 4;
    if constexpr (kRaw) {
      const bool valid = r < valid_rows;
      cp_async16(tile + gate_at(r, c), valid ? gbase + r * ld + c : gbase, valid);
    } else {
      const int src = r < valid_rows ? r : valid_rows - 1;
      cp_async16(tile + gate_at(r, c), gbase + src * ld + c, true);
    }
  }
}

// The inclusive sum down a chunk's rows of one key's gates, b_r = g_0 + ... + g_r: load(r) gives
// g_r (0 past the chunk's end), store(r, b_r) takes the sums. Rows are loaded kBatch ahead of
// their sums and added in row order, so b is non-increasing down the chunk for gates <= 0 (each
// sum adds a non-positive number to the previous one), and gla_cumsum and scan_gate_column, which
// both call this, give the same b bit for bit.
template <typename Load, typename Store>
__device__ __forceinline__ void chunk_gate_cumsum(Load&& load, Store&& store) {
  constexpr int kBatch = 16;  // rows loaded ahead of their sums
  float acc = 0.f;
#pragma unroll
  for (int r0 = 0; r0 < kChunk; r0 += kBatch) {
    float x[kBatch];
#pragma unroll
    for (int i = 0; i < kBatch; ++i) x[i] = load(r0 + i);
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      acc += x[i];
      store(r0 + i, acc);
    }
  }
}

// Column col of a gate tile of raw gates -> b in place (chunk_gate_cumsum), and rows <
// valid_rows of it into b_out (row r at b_out + r * ld) unless null. One thread per column.
__device__ __forceinline__ void scan_gate_column(float* tile, int col, float* b_out, int64_t ld, int valid_rows) {
  chunk_gate_cumsum([&](int r) { return tile[gate_at(r, col)]; },
                    [&](int r, float b) {
                      tile[gate_at(r, col)] = b;
                      if (b_out != nullptr && r < valid_rows) b_out[r * ld] = b;
                    });
}

}  // namespace linear_attn
