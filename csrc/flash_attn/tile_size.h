// Forward tile shapes per head dim for the mma.sync kernels, in one place.
#pragma once

namespace flash {

struct FwdTile {
  int block_m;   // query rows per CTA
  int block_n;   // key rows per main-loop step
  int n_warps;   // warps per CTA, stacked along M (16 rows per warp per MMA tile)
};

// The S tile (block_m x block_n fp32) and the O accumulator (block_m x d fp32) live in
// registers; a thread owns block_m * (block_n + d) / (32 * n_warps) of them. The choice
// is the fastest spill-free shape measured with benchmarks/tune/run_tune.sh on an H100
// (bf16, 16k tokens, seqlen 2k and 8k, causal and not; 2 CTAs per SM in every case):
// - d = 32: 128 x 128 (a 64-wide step is 10% slower: too little work per barrier).
// - d = 64, 96: 128 x 64; 128 x 128 spills at d = 64 and is 3-9% slower.
// - d = 128: 128 x 32; 128 x 64 needs more than 255 registers (spills) and is 2% slower
//   at 8k; 64-row tiles or 8 warps are 10-15% slower.
// - d = 192: 128 x 64 with 8 warps (16 rows per warp halves the per-thread O).
// - d = 256: 64 x 64 with 4 warps, 1-4% faster than 128 x 64 with 8 warps and spill-free.
constexpr FwdTile fwd_tile(int head_dim) {
  return head_dim <= 32    ? FwdTile{128, 128, 4}
         : head_dim <= 96  ? FwdTile{128, 64, 4}
         : head_dim <= 128 ? FwdTile{128, 32, 4}
         : head_dim <= 192 ? FwdTile{128, 64, 8}
                           : FwdTile{64, 64, 4};
}

}  // namespace flash
