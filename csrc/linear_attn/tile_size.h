// Tile choices of the linear-attention kernels, as pure functions of the actual sizes.
#pragma once

#include <cstdint>

namespace linear_attn {

// chunk_state: one CTA per (sequence, head, 64-row R tile, BN-column N tile) walks every chunk
// of its sequence in order, so the pass takes (chunks per sequence) x (one step's latency)
// whatever the GPU's width. With fewer CTAs than two per SM, halving BN doubles the CTAs
// and shortens each step (half the MMAs and z bytes); the x tile is then read by twice as
// many CTAs, mostly from L2 since they walk the same chunks at the same time.
constexpr int chunk_state_tile_n(int64_t num_seqs, int64_t heads, int r_dim, int n_dim, int num_sms) {
  return num_seqs * heads * (r_dim / 64) * (n_dim / 64) >= 2 * static_cast<int64_t>(num_sms) ? 64 : 32;
}

// chunk_output: the N tile. Every CTA recomputes the 64 x 64 scores x y^T over all of R and
// reads the chunk's x and y, so a wider tile divides that work by two; its cost is shared
// memory (R = 128, BN = 128: 80 KB, two CTAs per SM) and registers (a 16 x BN fp32 tile per
// warp), so R = 256 keeps BN = 64 (104 KB, and 128 accumulator registers would spill).
constexpr int chunk_output_tile_n(int r_dim, int n_dim) { return r_dim <= 128 && n_dim % 128 == 0 ? 128 : 64; }

// chunk_fused_fwd: the V tile. The fp32 state K x BV lives in the registers of 128 threads, at most
// 64 per thread next to the output tile and the scores (no spills): BV = 64 up to K = 128, 32 at
// K = 256. Its grid is B * H * (V / BV) CTAs, each walking a whole sequence; where that is below the
// SM count the route cuts the sequences into segments (flash_attn/linear_attn/_kernels.py: fused_plan).
constexpr int chunk_fused_tile_v(int k_dim) { return k_dim <= 128 ? 64 : 32; }

static_assert(chunk_fused_tile_v(64) == 64 && chunk_fused_tile_v(128) == 64 && chunk_fused_tile_v(256) == 32,
              "chunk_fused_fwd tiles");

// chunk_bwd_fused (chunk_bwd_sm90.cuh, K = V): the output columns of a CTA. All of them up to 128:
// the CTA then reads the chunk's tiles and both states once for all three products. At 256 the
// whole states (128 KB each) do not fit next to q, k, v and do, so 64: each CTA reads the slices
// of dH and h its columns need (3 x 32 KB) and recomputes the scores.
constexpr int chunk_bwd_fused_tile_n(int k_dim) { return k_dim <= 128 ? k_dim : 64; }

static_assert(chunk_bwd_fused_tile_n(128) == 128 && chunk_bwd_fused_tile_n(256) == 64, "chunk_bwd_fused tiles");

// gla_fused_fwd: the V tile. Every V tile's CTA recomputes the chunk's scores A, GLA's expensive
// part (exp per key, elementwise diagonal blocks), so at K = 128 with V a multiple of 128 one CTA
// of 256 threads takes 128 columns (gla_fused.cuh: gla_fused_fwd_wide_kernel, A once per 128 V
// columns, the fp32 state 128 x 128 over 8 warps). Else the 128-thread kernel's tile, for the same
// reason as chunk_fused_fwd's (the fp32 state K x BV in at most 64 registers per thread, next to A
// and o): 64 up to K = 128, 32 at K = 256 (gla_fused_narrow_tile_v). Shared memory (the fp32 gate
// tiles) is in gla_fused.cuh. The route runs it only where its B * H * (V / BV) CTAs are at least
// the SMs (it has no segments).
constexpr int gla_fused_narrow_tile_v(int k_dim) { return chunk_fused_tile_v(k_dim); }
constexpr int gla_fused_tile_v(int k_dim, int64_t v_dim) {
  return k_dim == 128 && v_dim % 128 == 0 ? 128 : gla_fused_narrow_tile_v(k_dim);
}

static_assert(gla_fused_tile_v(64, 128) == 64 && gla_fused_tile_v(128, 128) == 128 && gla_fused_tile_v(128, 256) == 128 &&
              gla_fused_tile_v(128, 192) == 64 && gla_fused_tile_v(256, 256) == 32, "gla_fused_fwd tiles");

// gla_output: the N tile. GLA's scores A are recomputed by every N tile of a chunk, and their
// diagonal sub-chunk blocks are elementwise work (exp per key) that no tensor core does, so
// the widest tile that fits: 128 columns (16 x 128 fp32 accumulators per warp next to the 16 x 64
// scores; 65 KB of shared memory) when N allows, else 64. R is walked in 64-column slabs, so it
// does not enter.
constexpr int gla_output_tile_n(int n_dim) { return n_dim % 128 == 0 ? 128 : 64; }

static_assert(gla_output_tile_n(128) == 128 && gla_output_tile_n(256) == 128 && gla_output_tile_n(192) == 64,
              "gla_output tiles");

// masked_attn: the N tile. Every CTA recomputes its 64 x 64 score tiles over all of R, so
// 128 columns per CTA halve that work against 64 when N allows it. The y and z tiles are
// double-buffered next to x: R = 256 with BN = 128 takes 128 KB of shared memory (one CTA per
// SM on sm80, which has 164 KB) and a 16 x 128 fp32 accumulator per warp (64 registers).
constexpr int masked_tile_n(int /*r_dim*/, int n_dim) { return n_dim % 128 == 0 ? 128 : 64; }

static_assert(chunk_output_tile_n(128, 128) == 128 && chunk_output_tile_n(256, 256) == 64 &&
              chunk_output_tile_n(128, 192) == 64, "chunk_output tiles");
static_assert(chunk_state_tile_n(8, 16, 128, 128, 132) == 64, "8 x 16 heads x 4 tiles fill an H100");
static_assert(chunk_state_tile_n(1, 16, 128, 128, 132) == 32, "one long sequence: smaller tiles");
static_assert(masked_tile_n(64, 256) == 128 && masked_tile_n(256, 64) == 64, "masked_attn tiles");

}  // namespace linear_attn
