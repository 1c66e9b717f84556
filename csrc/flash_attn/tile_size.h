// Forward tile shapes per head dim for the mma.sync kernels, in one place.
#pragma once

namespace flash {

struct FwdTile {
  int block_m;   // query rows per CTA
  int block_n;   // key rows per main-loop step
  int n_warps;   // warps per CTA, stacked along M (16 rows per warp per MMA tile)
  int kv_stages = 1;  // K/V shared-memory buffers: 2 lets loads run a whole step ahead
};

// The S tile (block_m x block_n fp32) and the O accumulator (block_m x d fp32) live in
// registers; a thread owns block_m * (block_n + d) / (32 * n_warps) of them. The choice
// is the fastest shape measured with benchmarks/tune/run_tune.sh on an H100 (bf16, 16k
// tokens, seqlen 2k and 8k, causal and not; see benchmarks/tune/NOTES.md):
// - d = 32: 128 x 128, one stage (a 64-wide step is 10% slower; two stages gain nothing).
// - d = 64: 128 x 128, two stages: 6-9% faster than 128 x 64 despite a few spills (the
//   loads of a whole step hide behind the current one, with one barrier per step).
// - d = 96: 128 x 64, one stage (two stages measured 2% slower).
// - d = 128: 128 x 64, two stages: 8-11% faster than the best one-stage shape (128 x 32).
// - d = 192, 256: 64 x 64, one stage; 128-row tiles need 8 warps and were 1-5% slower,
//   and two stages of 64-wide K/V would leave one CTA per SM.
constexpr FwdTile fwd_tile(int head_dim) {
  return head_dim <= 32    ? FwdTile{128, 128, 4, 1}
         : head_dim <= 64  ? FwdTile{128, 128, 4, 2}
         : head_dim <= 96  ? FwdTile{128, 64, 4, 1}
         : head_dim <= 128 ? FwdTile{128, 64, 4, 2}
                           : FwdTile{64, 64, 4, 1};
}

// Backward tiles: block_rows of the stationary operand (keys for dK/dV, queries for
// dQ), block_cols of the streamed one. The dK/dV kernel keeps two (rows x d) fp32
// accumulators and two (rows x cols) score tiles in registers, so the streamed step
// shrinks as d grows. Kernels exist for d = 64, 128 and 256; flash_api.cpp pads the
// others up to the next of them.
struct BwdTile {
  int block_rows;
  int block_cols;
  int n_warps;
  int stream_stages = 1;  // buffers of the streamed tiles: 2 loads the next block during this one
};

// Measured on H100 (benchmarks/tune/NOTES.md, backward section): 128 stationary rows
// with 8 warps halve the streamed reads and the dQ atomics per FLOP; the second stage
// of the streamed tiles overlaps their loads with the step before.
// d = 256 (not yet measured): 64 x 64 with 8 warps keeps the per-thread accumulators of
// d = 128 (2 x 64 x 256 fp32 for dK, dV over 256 threads = 128 each, like 2 x 128 x 128);
// the warps split d 2 ways for dK/dV and 4 ways for dQ (kernel_traits.h). One stage:
// K, V (64 KB) + Q, dO (64 KB per stage) + P^T, dS^T (16 KB) need ~208 KB with two,
// more than sm80's 163 KB.
constexpr BwdTile bwd_tile(int head_dim) {
  return head_dim <= 64    ? BwdTile{128, 128, 8, 2}
         : head_dim <= 128 ? BwdTile{128, 64, 8, 2}
                           : BwdTile{64, 64, 8, 1};
}

// The deterministic dQ kernel stacks its warps along its block_rows queries, 16 rows
// each (one 1-D MMA for S, dP and dQ, so that dS stays in registers). A tile with fewer
// than 16 * n_warps rows (d = 256: 64 rows, 8 warps) runs that kernel with
// block_rows / 16 warps and its key step shrunk in proportion, so that each thread holds
// as many scores as in the dK/dV kernel (d = 256: 64 x 32, 4 warps; with 64 keys the
// dropout variant spilled 1.2 KB on sm90, with 32 about 70 bytes). Every other tile is
// returned unchanged (the same kernel as before).
constexpr BwdTile bwd_dq_tile(BwdTile t) {
  if (t.block_rows % (16 * t.n_warps) == 0) { return t; }
  const int warps = t.block_rows / 16;
  return BwdTile{t.block_rows, t.block_cols * warps / t.n_warps, warps, t.stream_stages};
}

}  // namespace flash
