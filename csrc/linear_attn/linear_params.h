// The host/device line of the linear-attention kernels: plain params structs (raw
// pointers, sizes, scales) and the launchers' declarations. No torch, no CUDA types:
// linear_api.cpp includes this and dispatches on the dtype tags below.
//
// Layouts. Token tensors are row-major [tokens, heads, dim] with tokens = B * T (batched:
// sequence b is rows b*seqlen .. b*seqlen + seqlen - 1) or the packed total (varlen: sequence
// n is rows cu_seqlens[n] .. cu_seqlens[n + 1] - 1). Every sequence is cut into chunks of
// kChunk rows from its own first row; chunk c of sequence n has the state slot
// chunk_offsets[n] + c (varlen) or n * ceil(seqlen / kChunk) + c (batched).
//
// The recurrence (DESIGN.md): S_t = exp(g_t) S_{t-1} + k_t^T v_t, o_t = scale * q_t S_t.
// Per chunk, with b_i the chunk-local inclusive cumsum of the log-gates and b_L its last value:
//   chunk_state  (forward):  h_{c+1} = exp(b_L) h_c + sum_j exp(b_L - b_j) k_j^T v_j
//   chunk_state  (reverse):  dH_{c-1} = exp(b_L) dH_c + scale * sum_i exp(b_i) q_i^T do_i
//   chunk_output:            out_r = rowscale_r * (x_r M) + intra_scale * sum_c D[r, c] (x_r . y_c) z_c
// with D the causal decay mask (lower: c <= r, exp(b_r - b_c); upper: c >= r, exp(b_c - b_r)).
//   gate_grad:               dg for scalar gates, chunk by chunk (gate_grad.cu has the formula)
// GLA (one gate per key, gk [tokens, heads, k_dim]) has b per key: gla_cumsum writes it once,
// chunk_state takes it as gk_cum (exp(b_L) becomes diag(exp(b_L))), and gla_output / gla_grad
// (gla_output.cuh, gla_grad.cuh) take the intra-chunk part in 16-row sub-chunks.
// Every exponent is <= 0 for gates <= 0, so nothing overflows however negative the gates are.
#pragma once

#include <atomic>
#include <cstdint>

#include <cuda_runtime_api.h>

namespace linear_attn {

constexpr int kChunk = 64;  // rows per chunk: the MMA tiles are built around it

// dtype tags: the binding names the element type without CUDA's half/bfloat16 headers.
struct Fp16 {};
struct Bf16 {};

// Where the chunks of each sequence are (shared by every chunked kernel).
struct SeqParams {
  const int* cu_seqlens = nullptr;     // [num_seqs + 1] row offsets (varlen), or null (batched)
  const int* chunk_offsets = nullptr;  // [num_seqs + 1] first state slot of each sequence (varlen)
  int64_t tokens = 0;                  // rows of every token tensor (B * T, or the packed total)
  int seqlen = 0;                      // T (batched only)
  int num_seqs = 0;                    // B, or len(cu_seqlens) - 1
  int num_slots = 0;                   // state slots allocated: slots >= num_slots are never touched
  int heads = 0;
};

// The log-gates: at most one of g / gamma is set; neither means no decay.
struct GateParams {
  const float* g = nullptr;      // [tokens, heads] per-step log-gates (simple GLA), fp32
  const float* gamma = nullptr;  // [heads] fixed per-head log-decay (RetNet, Lightning), fp32
};

// chunk_state: the states at chunk boundaries, one sequential pass over the chunks of
// each (sequence, head, R tile, N tile).
struct ChunkStateParams {
  SeqParams seq;
  GateParams gate;
  const void* x = nullptr;         // [tokens, heads, r_dim]  k (forward) or q (reverse)
  const void* z = nullptr;         // [tokens, heads, n_dim]  v (forward) or do (reverse)
  const float* init = nullptr;     // [num_seqs, heads, r_dim, n_dim] fp32 h0 / dht, or null (zeros)
  void* states = nullptr;          // [num_slots, heads, r_dim, n_dim] (x's dtype): per chunk, the
                                   // state entering it (forward) or the gradient leaving it (reverse)
  float* final_state = nullptr;    // [num_seqs, heads, r_dim, n_dim] fp32 h_T / dh0, or null
  // reverse only, optional: pair_dot[slot, head, tile] = exp(b_L) <dH_c, h_c> over this CTA's
  // tile (tile = r tile * (n_dim / 32) + n0 / 32; a 64-column CTA writes 0 to tile + 1)
  const void* pair_states = nullptr;  // [num_slots, heads, r_dim, n_dim] forward states h_c
  float* pair_dot = nullptr;          // [num_slots, heads, (r_dim / 64) * (n_dim / 32)] fp32
  // GLA, instead of gate: per-key weights (kPerKey; not with gate or pair_dot)
  const float* gk_cum = nullptr;      // [tokens, heads, r_dim] chunk-local cumulative gates (gla_cumsum)
  int r_dim = 0;                   // multiple of 64
  int n_dim = 0;                   // multiple of 64
  float scale = 1.f;               // reverse: the weight of q_i^T do_i is scale * exp(b_i)
  // Segments (chunk_state.cuh): 0 = one CTA walks a whole sequence; else chunks per segment, with
  // max_segs * seg_chunks >= every sequence's chunk count
  int seg_chunks = 0;
  int max_segs = 1;                // segments per sequence in the grid (1 without segments)
  float* seg_state = nullptr;      // [num_seqs * max_segs, heads, r_dim, n_dim] fp32 workspace (pass 1)
  float* seg_decay = nullptr;      // [num_seqs * max_segs, heads] fp32 workspace: each segment's log-decay
                                   // (GLA, gk_cum: [num_seqs * max_segs, heads, r_dim], one per state row)
  int seg_pass = 0;                // set by run_chunk_state for pass 1; 0 from the caller
};

// chunk_output: one (chunk, head, BN-column N tile) per CTA, every chunk in parallel.
struct ChunkOutputParams {
  SeqParams seq;
  GateParams gate;
  const void* x = nullptr;    // [tokens, heads, r_dim] row operand
  const void* y = nullptr;    // [tokens, heads, r_dim] column operand of the scores
  const void* z = nullptr;    // [tokens, heads, n_dim] value operand
  const void* m = nullptr;    // [num_slots, heads, r_dim, n_dim] chunk states ([.., n_dim, r_dim] when trans_m)
  void* out = nullptr;        // [tokens, heads, n_dim]
  const void* dot = nullptr;  // [tokens, heads, n_dim] or null: rowdot_r = sum_n inter_r,n * dot_r,n
  float* rowdot = nullptr;    // [n_dim / 64, tokens, heads] fp32 partials per N tile, where
                              // inter_r = rowscale_r * (x_r M) is the inter-chunk part of out_r
  int r_dim = 0;              // 64, 128 or 256 (a template parameter)
  int n_dim = 0;              // multiple of BN (64 or 128, tile_size.h)
  float inter_scale = 1.f;    // rowscale_r = inter_scale * (upper ? exp(b_L - b_r) : exp(b_r))
  float intra_scale = 1.f;
};

// chunk_fused_fwd (chunk_fused.cuh): the scalar-gate forward o (and the final state) in one pass,
// one (sequence, head, BV-column V tile) per CTA; chunk_state + chunk_output without the states.
struct ChunkFusedParams {
  SeqParams seq;                  // chunk_offsets: only with h_out and cu_seqlens; num_slots unused
  GateParams gate;
  const void* q = nullptr;        // [tokens, heads, k_dim]
  const void* k = nullptr;        // [tokens, heads, k_dim]
  const void* v = nullptr;        // [tokens, heads, v_dim]
  void* out = nullptr;            // [tokens, heads, v_dim]
  const float* init = nullptr;    // [num_seqs, heads, k_dim, v_dim] fp32 h0, or null (zeros)
  float* final_state = nullptr;   // [num_seqs, heads, k_dim, v_dim] fp32 h_T, or null
  int k_dim = 0;                  // 64, 128 or 256 (a template parameter)
  int v_dim = 0;                  // multiple of BV (tile_size.h: chunk_fused_tile_v)
  float scale = 1.f;              // o = scale * (inter-chunk + intra-chunk parts)
  // Segments (chunk_fused.cuh): 0 = one CTA walks a whole sequence; else chunks per segment, with
  // max_segs * seg_chunks >= every sequence's chunk count
  int seg_chunks = 0;
  int max_segs = 1;               // segments per sequence in the grid (1 without segments)
  float* seg_state = nullptr;     // [num_seqs * max_segs, heads, k_dim, v_dim] fp32 workspace (pass 1)
  float* seg_decay = nullptr;     // [num_seqs * max_segs, heads] fp32 workspace: each segment's log-decay
  void* h_out = nullptr;          // [num_slots, heads, k_dim, v_dim] in q's dtype, gets the state entering
                                  // each chunk as chunk_state writes it (for the backward), or null
};

// chunk_bwd_fused (chunk_bwd_sm90.cuh): the simple-GLA backward's dv, dk, dq in one pass over the
// chunks (every chunk in parallel, one CTA per chunk and head), given the states h and dH.
enum ChunkBwdJob : int { kJobDv = 1, kJobDk = 2, kJobDq = 4 };  // the products of a launch (bits)

struct ChunkBwdParams {
  SeqParams seq;                  // num_slots: the states' slots
  GateParams gate;
  const void* q = nullptr;        // [tokens, heads, k_dim]
  const void* k = nullptr;        // [tokens, heads, k_dim]
  const void* v = nullptr;        // [tokens, heads, v_dim]
  const void* dout = nullptr;     // [tokens, heads, v_dim]
  const void* h = nullptr;        // [num_slots, heads, k_dim, v_dim] the state entering each chunk
  const void* dh = nullptr;       // [num_slots, heads, k_dim, v_dim] the gradient leaving it
  void* dq = nullptr;             // [tokens, heads, k_dim]
  void* dk = nullptr;             // [tokens, heads, k_dim]
  void* dv = nullptr;             // [tokens, heads, v_dim]
  float* rq = nullptr;            // [k_dim / 64, tokens, heads] q . dq_inter partials (as chunk_output's), or null
  float* rk = nullptr;            // [k_dim / 64, tokens, heads] k . dk_inter partials, or null
  int k_dim = 0;                  // 64, 128 or 256 (a template parameter; k_dim == v_dim)
  int v_dim = 0;
  float scale = 1.f;
};

// gate_grad: the scalar log-gates' gradient, every chunk in parallel (gate_grad.cu).
struct GateGradParams {
  SeqParams seq;
  GateParams gate;
  const void* q = nullptr;        // [tokens, heads, k_dim]
  const void* k = nullptr;        // [tokens, heads, k_dim]
  const void* v = nullptr;        // [tokens, heads, v_dim]
  const void* dout = nullptr;     // [tokens, heads, v_dim]
  const float* rq = nullptr;      // [k_dim / 64, tokens, heads] q . dq_inter partials (chunk_output)
  const float* rk = nullptr;      // [k_dim / 64, tokens, heads] k . dk_inter partials (chunk_output)
  const float* pair = nullptr;    // [num_slots, heads, pair_tiles] exp(b_L) <dH_c, h_c> partials
  float* dg = nullptr;            // [tokens, heads] fp32
  int k_dim = 0;                  // multiple of 64
  int v_dim = 0;                  // multiple of 64
  int pair_tiles = 0;
  float scale = 1.f;
};

// gla_cumsum: out = the chunk-local inclusive cumsum of GLA's per-key log-gates, one
// (chunk, head, 64 keys) per CTA.
struct GlaCumsumParams {
  SeqParams seq;
  const float* g = nullptr;  // [tokens, heads, k_dim] fp32 log-gates
  float* out = nullptr;      // [tokens, heads, k_dim] fp32 b
  int k_dim = 0;             // multiple of 64
};

// gla_output (gla_output.cuh): one (chunk, head, BN-column N tile) per CTA, b the cumulative gates:
//   lower: out_r = inter_scale * (x_r * exp(b_r)) M + intra_scale * sum_{c <= r} A_rc z_c,
//          A_rc = sum_d x_rd y_cd exp(b_rd - b_cd)              (forward o: x = q, y = k, M = h_c, z = v)
//   upper: out_r = inter_scale * (x_r * exp(b_L - b_r)) M + intra_scale * sum_{c >= r} A_rc z_c,
//          A_rc = sum_d x_rd y_cd exp(b_cd - b_rd)              (dv: x = k, y = q, M = dH_c, z = do)
struct GlaOutputParams {
  SeqParams seq;
  const void* x = nullptr;   // [tokens, heads, r_dim]
  const void* y = nullptr;   // [tokens, heads, r_dim]
  const void* z = nullptr;   // [tokens, heads, n_dim]
  const void* m = nullptr;   // [num_slots, heads, r_dim, n_dim] chunk states
  const float* b = nullptr;  // [tokens, heads, r_dim] fp32 cumulative gates (gla_cumsum)
  void* out = nullptr;       // [tokens, heads, n_dim]
  int r_dim = 0;             // multiple of 64 (looped over in 64-column slabs)
  int n_dim = 0;             // multiple of BN
  float inter_scale = 1.f;
  float intra_scale = 1.f;
};

// gla_fused_fwd (gla_fused.cuh): GLA's forward o (and the final state) in one pass, one (sequence,
// head, BV-column V tile) per CTA; chunk_state (kPerKey, forward) + gla_output (lower, both scales =
// scale) without the states.
struct GlaFusedParams {
  SeqParams seq;                  // chunk_offsets / num_slots unused
  const void* q = nullptr;        // [tokens, heads, k_dim]
  const void* k = nullptr;        // [tokens, heads, k_dim]
  const void* v = nullptr;        // [tokens, heads, v_dim]
  const float* b = nullptr;       // [tokens, heads, k_dim] fp32 cumulative gates (gla_cumsum), or null:
  const float* g = nullptr;       // [tokens, heads, k_dim] fp32 raw gates instead (the 256-thread kernel
                                  // only), summed per chunk in shared memory
  float* b_out = nullptr;         // with g: [tokens, heads, k_dim] fp32, gets b (for the backward), or null
  void* h_out = nullptr;          // the 256-thread kernel: [num_slots, heads, k_dim, v_dim] in q's dtype, gets
                                  // the state entering each chunk as chunk_state writes it (seq.chunk_offsets
                                  // with cu_seqlens), or null
  void* out = nullptr;            // [tokens, heads, v_dim]
  const float* init = nullptr;    // [num_seqs, heads, k_dim, v_dim] fp32 h0, or null (zeros)
  float* final_state = nullptr;   // [num_seqs, heads, k_dim, v_dim] fp32 h_T, or null
  int k_dim = 0;                  // 64, 128 or 256 (a template parameter)
  int v_dim = 0;                  // multiple of BV (tile_size.h: gla_fused_tile_v)
  float scale = 1.f;              // o = scale * (inter-chunk + intra-chunk parts)
  // Segments (the 256-thread kernel only; see chunk_fused.cuh): 0 = one CTA walks a whole
  // sequence; else chunks per segment, with max_segs * seg_chunks >= every sequence's chunk count
  int seg_chunks = 0;
  int max_segs = 1;               // segments per sequence in the grid (1 without segments)
  float* seg_state = nullptr;     // [num_seqs * max_segs, heads, k_dim, v_dim] fp32 workspace (pass 1)
  float* seg_decay = nullptr;     // [num_seqs * max_segs, heads, k_dim] fp32: each segment's log-decay per key
};

// gla_grad (gla_grad.cuh): dq, dk and the per-key dg of GLA, one (chunk, head, 64 keys) per CTA.
struct GlaGradParams {
  SeqParams seq;
  const void* q = nullptr;     // [tokens, heads, k_dim]
  const void* k = nullptr;     // [tokens, heads, k_dim]
  const void* v = nullptr;     // [tokens, heads, v_dim]
  const void* dout = nullptr;  // [tokens, heads, v_dim]
  const float* b = nullptr;    // [tokens, heads, k_dim] fp32 cumulative gates
  const void* h = nullptr;     // [num_slots, heads, k_dim, v_dim] states entering each chunk
  const void* dh = nullptr;    // [num_slots, heads, k_dim, v_dim] state gradients leaving each chunk
  void* dq = nullptr;          // [tokens, heads, k_dim]
  void* dk = nullptr;          // [tokens, heads, k_dim]
  float* dg = nullptr;         // [tokens, heads, k_dim] fp32
  int k_dim = 0;               // multiple of 64
  int v_dim = 0;               // multiple of 64
  float scale = 1.f;
};

// recurrent: token by token, one (sequence, head, 32 value columns) per CTA; the forward, or
// (kGrad) the gradients of GLA's gk / gv recurrence (recurrent_grad.cuh).
struct RecurrentParams {
  SeqParams seq;
  GateParams gate;
  const float* gk = nullptr;     // [tokens, heads, k_dim] per-key log-gates (GLA), fp32, or null
  const float* gv = nullptr;     // [tokens, heads, v_dim] per-value log-gates (GLA), fp32, or null
  const void* q = nullptr;       // [tokens, heads, k_dim]
  const void* k = nullptr;       // [tokens, heads, k_dim]
  const void* v = nullptr;       // [tokens, heads, v_dim]
  void* out = nullptr;           // [tokens, heads, v_dim]
  const float* init = nullptr;   // [num_seqs, heads, k_dim, v_dim] fp32 or null
  float* final_state = nullptr;  // [num_seqs, heads, k_dim, v_dim] fp32 or null
  int k_dim = 0;                 // 64, 128 or 256 (a template parameter)
  int v_dim = 0;                 // multiple of 32
  float scale = 1.f;
  bool reverse = false;          // run each sequence from its last row to its first
  int num_sms = 0;               // the device's SMs: run_recurrent's layout choice (a grid-size hint)
  // gradients (run_recurrent<.., true>, recurrent_grad.cuh): GLA gates gk / gv only (no gate),
  // fp32 parts per 32-column group z = 0 .. v_dim / 32 - 1 that the caller sums over z
  const void* dout = nullptr;    // [tokens, heads, v_dim]
  const float* dfinal = nullptr; // [num_seqs, heads, k_dim, v_dim] fp32 dL/dh_T, or null (zeros)
  float* dq_part = nullptr;      // [v_dim / 32, tokens, heads, k_dim] fp32
  float* dk_part = nullptr;      // [v_dim / 32, tokens, heads, k_dim] fp32
  float* dgk_part = nullptr;     // [v_dim / 32, tokens, heads, k_dim] fp32, with gk (else null)
  void* dv = nullptr;            // [tokens, heads, v_dim]
  float* dgv = nullptr;          // [tokens, heads, v_dim] fp32, with gv (else null)
  float* dinit = nullptr;        // [num_seqs, heads, k_dim, v_dim] fp32 dL/dh0, or null
};

// Launchers (one explicit instantiation per configuration in the .cu files).
template <typename Dtype, int BN, bool kReverse, bool kPerKey>
cudaError_t run_chunk_state(const ChunkStateParams& p, cudaStream_t stream);

template <typename Dtype, int R, int BN, bool kTransM, bool kUpper>
cudaError_t run_chunk_output(const ChunkOutputParams& p, cudaStream_t stream);

template <typename Dtype, int K, int BV>
cudaError_t run_chunk_fused_fwd(const ChunkFusedParams& p, cudaStream_t stream);

// Which kernel the last chunk_fused_fwd launch ran: 90 the wgmma one (chunk_fused_sm90.cuh), 80 the
// mma.sync one, 0 none yet (the binding last_chunk_fused_kernel; tests check the route with it).
inline std::atomic<int> last_chunk_fused_kernel{0};

// kJobs: ChunkBwdJob bits; *ran: false where the device does not execute the kernel's sm90a code
// (nothing launched)
template <typename Dtype, int K, int V, int kJobs>
cudaError_t run_chunk_bwd_sm90(const ChunkBwdParams& p, cudaStream_t stream, bool* ran);

template <typename Dtype>
cudaError_t run_gate_grad(const GateGradParams& p, cudaStream_t stream);

// kGrad: the gradients (recurrent_grad.cuh) instead of the forward
template <typename Dtype, int K, bool kGrad>
cudaError_t run_recurrent(const RecurrentParams& p, cudaStream_t stream);

cudaError_t run_gla_cumsum(const GlaCumsumParams& p, cudaStream_t stream);

template <typename Dtype, int BN, bool kUpper>
cudaError_t run_gla_output(const GlaOutputParams& p, cudaStream_t stream);

template <typename Dtype, int K, int BV>
cudaError_t run_gla_fused_fwd(const GlaFusedParams& p, cudaStream_t stream);

template <typename Dtype>
cudaError_t run_gla_fused_reverse(const GlaFusedParams& p, cudaStream_t stream);

template <typename Dtype>
cudaError_t run_gla_grad(const GlaGradParams& p, cudaStream_t stream);

}  // namespace linear_attn
