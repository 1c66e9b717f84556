// Forward tile shapes per head dim for the mma.sync kernels, in one place.
#pragma once

namespace flash {

struct FwdTile {
  int block_m;   // query rows per CTA
  int block_n;   // key rows per main-loop step
  int n_warps;   // warps per CTA, stacked along M (16 rows per warp per MMA tile)
};

// Reasoning:
// - 128 query rows per CTA amortize each K/V tile over many rows; with 4 warps each
//   warp owns 32 rows, giving two independent MMA row-tiles to hide latency.
// - block_n is as large as registers allow: the S tile (block_m x block_n fp32) and
//   the O accumulator (block_m x d fp32) live in registers. d <= 64 fits a 128-wide
//   S tile; d = 96/128 needs block_n = 64 to stay under 255 registers per thread.
// - d >= 192 doubles O; 8 warps split the 128 rows (16 each) to halve per-thread O.
// - Shared memory: Q (block_m x d) + K + V (block_n x d each), single-buffered:
//   d=128 uses 64 KB, d=256 128 KB (fits sm80's 163 KB and sm90's 227 KB).
constexpr FwdTile fwd_tile(int head_dim) {
  return head_dim <= 64    ? FwdTile{128, 128, 4}
         : head_dim <= 128 ? FwdTile{128, 64, 4}
                           : FwdTile{128, 64, 8};
}

}  // namespace flash
