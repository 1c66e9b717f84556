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

// The split-KV kernel's tile (Is_split; also the unsplit decode step, see flash_api.cpp's
// choose_num_splits). It serves few query rows per (sequence, kv head): one token times
// the query heads of a GQA group. The forward tiles above would compute 128 rows of
// which 4 are real, and at decode lengths those wasted MMAs, not the K/V reads, set the
// pace. 16 rows (one warp) leave the kernel bound by its reads. Measured with
// tune_decode.cu on an H100 (bf16, 32 query / 8 kv heads, ANCHORS shapes; TB/s of K + V):
// - d = 128: 16 x 64, two stages: 2.74 at 1 x 128k (33 splits), 3.01 at 8 x 32k (4),
//   3.00 at 32 x 8k and 2.89 at 128 x 2k (1 split); the 128 x 64 tile gave 2.19, 2.29,
//   2.27, 2.22 with the same splits. 32 x 64 with two warps was within 1-3%.
// - d = 64: 16 x 128, two stages: 2.34, 2.75, 2.76, 2.60 (16 x 64: 2.36, 2.71, 2.69, 2.57;
//   32 x 128 with two warps: 2.37, 2.76, 2.76, 2.49).
// - d = 256: 16 x 32, two stages: 2.93, 3.09, 3.06, 3.00 (16 x 64 one stage: 2.91, 3.07,
//   3.06, 2.92; 16 x 64 two stages fit one CTA per SM: 2.78 at 1 x 128k).
constexpr FwdTile fwd_split_tile(int head_dim) {
  return head_dim <= 64    ? FwdTile{16, 128, 1, 2}
         : head_dim <= 128 ? FwdTile{16, 64, 1, 2}
                           : FwdTile{16, 32, 1, 2};
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

// The dK/dV tile on sm90 (228 KB of shared memory per SM): at d = 256 the streamed Q and dO
// get two stages (~208 KB, more than sm80's 163 KB). tune_bwd.cu on the H100 (bf16, 16k
// tokens, TFLOP/s nc 2k / nc 8k / c 2k / c 8k): one stage 169 / 177 / 157 / 178, two stages
// 188 / 199 / 172 / 200 (benchmarks/tune/tune_bwd_36849f3_h100.txt). Every other head dim
// keeps bwd_tile. The dQ kernel of the deterministic pair keeps bwd_dq_tile(bwd_tile(d)).
constexpr BwdTile bwd_tile_sm90(int head_dim) {
  return head_dim > 128 ? BwdTile{64, 64, 8, 2} : bwd_tile(head_dim);
}

// Whether the default (deterministic=False) backward of a head dim adds dQ with atomics inside
// the dK/dV kernel; else it runs the deterministic pair too. d = 256: the pair was faster at
// short sequences and within 3% at long ones on the H100 (bf16, 16k tokens, TFLOP/s, pair vs
// atomic: non-causal 204 vs 188 at 2k, 214 vs 211 at 16k; causal 175 vs 160 at 2k, 207 vs 213
// at 16k; benchmarks/results/attn_bwd_nvidia-h100-80gb-hbm3_1cb462f.json) and needs no fp32
// dQ buffer, so the atomic kernel is not even instantiated there.
constexpr bool bwd_atomic_dq(int head_dim) { return head_dim != 256; }

// The same choice where the wgmma kernels run (sm90a, flash_bwd_kernel_sm90.h): only d = 64 keeps
// the atomic kernel. At d = 128 the pair (wgmma dK/dV without dQ, then the wgmma dQ kernel) was
// 5-28% faster than the atomic wgmma kernel on the H100 (bf16, 16k tokens: non-causal 338 vs 303
// TFLOP/s at 2k, 378 vs 360 at 16k; causal 270 vs 240 at 2k), and at d = 64 0-5% slower from 4k
// (benchmarks/results/bwd_sm90_ab/). So there the atomic wgmma kernel is not even instantiated.
constexpr bool bwd_atomic_dq_sm90(int head_dim) { return head_dim == 64; }

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

// Split-KV (flash_attn_with_kvcache's num_splits): how many shares of the key blocks each
// (query block, sequence, head) is cut into. The kernel cuts each sequence's actual key
// range on the device; the host sees only capacities, so n_blocks below comes from
// max_seqlen_k (an upper bound: shorter sequences get shorter shares).
constexpr int kMaxSplits = 128;
// Key blocks a split-KV share keeps at the least (when the sequence has that many): the host
// heuristics cap the split count with it, and the kernel (split_share) leaves the shares of
// a shorter sequence past n_blocks / kMinShareBlocks empty instead of cutting its keys finer.
constexpr int kMinShareBlocks = 2;  // as flash-attn; also bounds the combine's loop per row

// The largest split count the grid and the keys allow: at most one key block per share,
// kMaxSplits, and heads * splits <= 65535 (the split kernel's gridDim.z).
constexpr int clamp_num_splits(long long splits, int n_blocks, int heads) {
  const long long grid_cap = heads > 0 ? 65535 / heads : 1;
  long long s = splits < n_blocks ? splits : n_blocks;
  s = s < kMaxSplits ? s : kMaxSplits;
  s = s < grid_cap ? s : grid_cap;
  return s < 1 ? 1 : int(s);
}

// num_splits = 0. ctas: CTAs of the unsplit grid (query blocks x batch x heads);
// n_blocks: key blocks of the longest sequence; num_sms: the device's SM count.
// - At 80% of a wave or more the grid already keeps the GPU busy: splitting would only
//   add the partial writes and the combine pass. No split.
// - Otherwise as many shares as keep the grid at or under two CTAs per SM:
//   floor(2 * SMs / ctas). Rounding up instead loads some SMs with a third CTA while
//   others hold two, and the slowest SM sets the time (tune_decode.cu on the H100, hd 128,
//   batch 8 x 32k: 4 splits 3.01 TB/s, 5 splits 2.81).
// - Each share keeps at least two key blocks, so its fixed costs (prologue, the fp32
//   partial, the combine's read) stay small next to its main loop.
// Example: batch 1, 8 kv heads (GQA packed), 128k keys, d = 128 on 132 SMs: 8 CTAs
// unsplit, 33 splits of 62 key blocks (64 wide) each, 264 CTAs.
constexpr int num_splits_heuristic(long long ctas, int num_sms, int n_blocks, int heads) {
  if (ctas <= 0 || num_sms <= 0 || ctas * 5 >= (long long)num_sms * 4) { return 1; }
  const long long want = 2LL * num_sms / ctas;
  const int blocks_cap = n_blocks / kMinShareBlocks > 1 ? n_blocks / kMinShareBlocks : 1;
  return clamp_num_splits(want < blocks_cap ? want : blocks_cap, n_blocks, heads);
}
// The cases above, checked at compile time: the examples; a full grid; short caches; the
// grid limit; an explicit request capped by the keys.
static_assert(num_splits_heuristic(8, 132, 2048, 8) == 33 && num_splits_heuristic(64, 132, 512, 8) == 4);
static_assert(num_splits_heuristic(132, 132, 2048, 8) == 1);
static_assert(num_splits_heuristic(8, 132, 16, 8) == 8 && num_splits_heuristic(8, 132, 1, 8) == 1);
static_assert(clamp_num_splits(1000, 4096, 1024) == 63 && clamp_num_splits(16, 5, 8) == 5);

// Shared memory of one forward CTA at head dim d (fp16/bf16): the Q tile and kv_stages
// K and V tiles (kernel_traits.h kSmemBytes). Host code sizes the grid with it.
constexpr int fwd_smem_bytes(FwdTile t, int head_dim) {
  return (t.block_m + 2 * t.kv_stages * t.block_n) * head_dim * 2;
}

// CTAs of `t` resident on one SM with `smem_per_sm` bytes of shared memory (the driver
// reserves 1 KB per CTA). The one-warp split tile is bounded by shared memory, not by
// registers or warps (255 registers x 32 threads: 8 CTAs' worth of the register file).
constexpr int fwd_ctas_per_sm(FwdTile t, int head_dim, int smem_per_sm) {
  const int n = smem_per_sm / (fwd_smem_bytes(t, head_dim) + 1024);
  return n < 1 ? 1 : (n > 32 ? 32 : n);
}

// num_splits = 0 for a paged cache (block_table). ctas as above; slots: CTAs the whole
// GPU holds at once (SMs x fwd_ctas_per_sm). A paged CTA issues about twice the
// instructions of a contiguous one per key (page lookups, per-segment addresses), and one
// warp per scheduler cannot keep enough reads in flight (ncu, 32 x 8k, pages of 16: 58%
// of DRAM peak against 92% contiguous). So the grid is split until every slot is busy:
// the fewest shares whose grid fills its last wave to at least 90% (at most two key blocks
// per share, as above; when no count reaches 90%, the best-filled one). Grids of two full
// waves or more are not split.
// Measured (tune_decode.cu, H100, d 128, 396 slots; TB/s, pages of 16): 32 x 8k: 1 share
// 2.14, 2 (1.3 waves) 2.20, 3 (1.94 waves) 2.80; 8 x 32k: 4 shares 2.16, 6 2.87; 1 x 128k:
// 33 shares 2.30, 48 2.61, 64 (1.3 waves) 1.98. Contiguous caches do not gain from this
// (32 x 8k: 1 share 3.02, 3 shares 2.92), so they keep num_splits_heuristic.
constexpr int num_splits_heuristic_paged(long long ctas, long long slots, int n_blocks, int heads) {
  if (ctas <= 0 || slots <= 0 || ctas >= 2 * slots) { return 1; }
  const int blocks_cap = n_blocks / kMinShareBlocks > 1 ? n_blocks / kMinShareBlocks : 1;
  const int max_s = clamp_num_splits(blocks_cap, n_blocks, heads);
  int best = 1;
  long long best_fill_num = 0, best_fill_den = 1;  // fill of the last wave as a fraction
  for (int s = 1; s <= max_s; ++s) {
    const long long grid = ctas * s;
    const long long waves = (grid + slots - 1) / slots;
    if (grid * 10 >= 9 * slots * waves) { return s; }
    if (grid * best_fill_den > best_fill_num * (slots * waves)) {
      best = s;
      best_fill_num = grid;
      best_fill_den = slots * waves;
    }
  }
  return best;
}
static_assert(fwd_ctas_per_sm(fwd_split_tile(128), 128, 233472) == 3);
static_assert(num_splits_heuristic_paged(256, 396, 128, 8) == 3 && num_splits_heuristic_paged(64, 396, 512, 8) == 6);
static_assert(num_splits_heuristic_paged(8, 396, 2048, 8) == 45 && num_splits_heuristic_paged(1024, 396, 32, 8) == 1);
static_assert(num_splits_heuristic_paged(8, 396, 16, 8) == 8 && num_splits_heuristic_paged(8, 396, 1, 8) == 1);

}  // namespace flash
