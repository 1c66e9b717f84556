// chunk_state: the recurrent state at every chunk boundary, one sequential pass over the
// chunks of each (sequence, head, 64-row R tile, BN-column N tile).
//
//   forward (x = k, z = v):   h_0 = init,  h_{c+1} = exp(b_L) h_c + sum_j exp(b_L - b_j) k_j^T v_j
//                             states[slot(c)] = h_c (entering chunk c), final = h_NT
//   reverse (x = q, z = do):  dH_{NT-1} = init (dh_T),
//                             dH_{c-1} = exp(b_L) dH_c + scale * sum_i exp(b_i) q_i^T do_i
//                             states[slot(c)] = dH_c (the gradient of the state leaving chunk c),
//                             final = dh_0; optionally pair_dot = exp(b_L) <dH_c, h_c> per tile
//                             (with the forward states h_c: the gate gradient's inter-chunk term)
// kPerKey (GLA): b is the chunk-local cumulative per-key gate (gla_cumsum) and the scalars above
// become vectors over the state's rows r: h_{c+1} = diag(exp(b_L)) h_c + sum_j (k_j * exp(b_L - b_j))^T v_j
// (reverse: weights scale * exp(b_i) on q_i), so the weights fold into x^T's fragments, not z's,
// and the 64-row R tile's gates come in as a 64 x 64 fp32 tile per chunk (gla_gates.cuh).
// The state tile (64 x BN, fp32) lives in the MMA accumulators: warp w owns its rows
// 16w .. 16w + 15. Per chunk: store it, decay it, and add x^T (w * z) as mma.sync with the
// 64 chunk rows as the reduction (x^T through ldmatrix.trans, the per-row weights w folded
// into z's fragments). x / z tiles and the gates are prefetched kStages - 1 chunks ahead.
//
// Segments (seg_chunks > 0, max_segs > 1): the chain of chunks is what limits
// a long sequence, so each sequence is cut into segments of seg_chunks chunks, a CTA each, and
// run_chunk_state makes two launches (as chunk_fused.cuh does for the forward):
//   pass 1 (p.seg_pass): every segment that a later one needs (forward: all but the last;
//          reverse: all but the first) walks its chunks from a zero state, writing no states:
//          its local result L into seg_state and its log-decay d (the sum of its chunks' b_L;
//          kPerKey: one per state row, the sum of the rows' b_L) into seg_decay;
//   pass 2: each segment starts from the fold S <- exp(d_s) S + L_s, from init, over the segments
//          before it (reverse: after it, from the last one down), which is the state at its
//          boundary, then writes its chunks' states as above; the segment at the sequence's end
//          (reverse: start) writes the final state.
#pragma once

#include "chunk_info.cuh"
#include "gla_gates.cuh"
#include "mma.cuh"

namespace linear_attn {

// Pipeline depth: stages of (x tile, z tile, raw gates) in flight. The pass is a chain of
// dependent steps, so loads are issued kStages - 1 chunks ahead of their use.
template <int BN>
constexpr int chunk_state_stages() { return BN == 32 ? 4 : 3; }

// per stage: x tile, z tile (16-bit), and the gates: raw scalar gates, or (kPerKey) the
// cumulative per-key gate tile
template <int BN, bool kPerKey>
constexpr int chunk_state_smem_bytes() {
  return chunk_state_stages<BN>() * ((kChunk * 64 + kChunk * BN) * 2 + (kPerKey ? kGateTileFloats : kChunk) * 4);
}

template <typename Tag, int BN, bool kReverse, bool kPerKey>
__global__ void __launch_bounds__(128) chunk_state_kernel(const ChunkStateParams p) {
  using E = Elem<Tag>;
  using T = typename E::T;
  constexpr int BR = 64;
  constexpr int kThreads = 128;
  constexpr int NT8 = BN / 8;  // accumulator n tiles per warp
  constexpr int kStages = chunk_state_stages<BN>();
  static_assert(BN == 32 || BN == 64, "N tiles of 32 or 64 columns");

  extern __shared__ __align__(128) unsigned char smem_raw[];
  T* sx = reinterpret_cast<T*>(smem_raw);        // [kStages] x (chunk row, r) swizzled
  T* sz = sx + kStages * kChunk * BR;            // [kStages] x (chunk row, n) swizzled
  float* graw = reinterpret_cast<float*>(sz + kStages * kChunk * BN);  // [kStages] x [kChunk] raw gates, or
                                                 // (kPerKey) [kStages] x (chunk row, r) gate tiles
  __shared__ float sb[kChunk];                   // chunk-local cumulative log-gate
  __shared__ float red[4];                       // per-warp partials of pair_dot

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int g = lane >> 2, t4 = lane & 3;
  const SegmentWalk walk = segment_walk(p.seq, p.max_segs, p.seg_chunks);
  const int seq = walk.seq, seg = walk.seg;
  const int head = blockIdx.y, H = p.seq.heads;
  const int n_tiles = p.n_dim / BN;
  const int r0 = (blockIdx.z / n_tiles) * BR, n0 = (blockIdx.z % n_tiles) * BN;
  const SeqRange sr = walk.sr;
  // this CTA's chunks [c_begin, c_end): the whole sequence without segments
  const SegmentRange segs = walk.segs;
  const int nsegs = segs.count, c_begin = segs.begin, c_end = segs.end;
  const int last_needed = kReverse ? 0 : nsegs - 1;  // the segment whose local result nobody folds in
  if (seg >= nsegs || (p.seg_pass && seg == last_needed)) return;
  const int count = c_end - c_begin;

  const int64_t ldx = static_cast<int64_t>(H) * p.r_dim, ldz = static_cast<int64_t>(H) * p.n_dim;
  const T* xg = static_cast<const T*>(p.x) + static_cast<int64_t>(head) * p.r_dim + r0;
  const T* zg = static_cast<const T*>(p.z) + static_cast<int64_t>(head) * p.n_dim + n0;
  const float* bg = kPerKey ? p.gk_cum + static_cast<int64_t>(head) * p.r_dim + r0 : nullptr;
  const int64_t state_base = (static_cast<int64_t>(seq) * H + head) * p.r_dim * p.n_dim;
  // segment s of this sequence in seg_state [N * max_segs, H, R, N] and seg_decay [N * max_segs, H]
  // (kPerKey: [N * max_segs, H, R])
  auto seg_row = [&](int s) { return (static_cast<int64_t>(seq) * p.max_segs + s) * H + head; };
  // where the log-decay of this thread's state row 16 warp + g + 8 half is in seg_decay
  auto decay_at = [&](int s, int half) {
    return kPerKey ? seg_row(s) * p.r_dim + r0 + warp * 16 + g + 8 * half : seg_row(s);
  };
  // where acc[nt][2 half ..] lives in an fp32 (R, N) state matrix starting at `base`
  auto acc_at = [&](int nt, int half, int64_t base) {
    return base + static_cast<int64_t>(r0 + warp * 16 + g + 8 * half) * p.n_dim + n0 + nt * 8 + 2 * t4;
  };

  // acc[nt][0..1] = state (r0 + 16 warp + g, n0 + 8 nt + 2 t4 + {0, 1}); [2..3] the row g + 8
  float acc[NT8][4];
#pragma unroll
  for (int nt = 0; nt < NT8; ++nt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int64_t off = acc_at(nt, half, state_base);
      const bool from_init = p.init != nullptr && !p.seg_pass;
      acc[nt][2 * half] = from_init ? p.init[off] : 0.f;
      acc[nt][2 * half + 1] = from_init ? p.init[off + 1] : 0.f;
    }
  }
  if (!p.seg_pass) {
    // the state at this segment's boundary: the other segments' pass-1 results folded in order
    // (forward: segments 0 .. seg - 1; reverse: the last one down to seg + 1)
    const int nfold = kReverse ? nsegs - 1 - seg : seg;
    for (int f = 0; f < nfold; ++f) {
      const int s = kReverse ? nsegs - 1 - f : f;
      const float decay[2] = {__expf(p.seg_decay[decay_at(s, 0)]), __expf(p.seg_decay[decay_at(s, 1)])};
      const int64_t base = seg_row(s) * p.r_dim * p.n_dim;
#pragma unroll
      for (int nt = 0; nt < NT8; ++nt) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const float2 l = *reinterpret_cast<const float2*>(p.seg_state + acc_at(nt, half, base));
          acc[nt][2 * half] = fmaf(decay[half], acc[nt][2 * half], l.x);
          acc[nt][2 * half + 1] = fmaf(decay[half], acc[nt][2 * half + 1], l.y);
        }
      }
    }
  }
  float seg_log_decay[2] = {0.f, 0.f};  // pass 1: the sum of the segment's b_L (of this thread's rows)

  auto chunk_of = [&](int i) { return kReverse ? c_end - 1 - i : c_begin + i; };
  auto chunk_start = [&](int i) { return sr.bos + static_cast<int64_t>(chunk_of(i)) * kChunk; };
  auto chunk_rows = [&](int i) {
    return static_cast<int>(min(static_cast<int64_t>(kChunk), sr.eos - chunk_start(i)));
  };
  auto issue = [&](int i) {
    const int stage = i % kStages;
    const int64_t start = chunk_start(i);
    const int rows = chunk_rows(i);
    load_tile<kChunk, BR, kThreads>(sx + stage * kChunk * BR, xg + start * ldx, ldx, rows, tid);
    load_tile<kChunk, BN, kThreads>(sz + stage * kChunk * BN, zg + start * ldz, ldz, rows, tid);
    if constexpr (kPerKey) {
      load_gate_tile<kThreads>(graw + stage * kGateTileFloats, bg + start * ldx, ldx, rows, tid);
    } else {
      if (warp == 0) chunk_gate_load_async(p.gate, start, rows, head, H, graw + stage * kChunk, lane);
    }
  };

#pragma unroll
  for (int i = 0; i < kStages - 1; ++i) {
    if (i < count) issue(i);
    cp_async_commit();
  }
  for (int i = 0; i < count; ++i) {
    const int stage = i % kStages;
    if (i + kStages - 1 < count) issue(i + kStages - 1);
    cp_async_commit();
    const int c = chunk_of(i);
    const int rows = chunk_rows(i);
    cp_async_wait<kStages - 1>();  // chunk i's group has landed (this thread's copies)
    if constexpr (!kPerKey) {
      if (warp == 0) chunk_gate_scan(p.gate, graw + stage * kChunk, rows, head, sb, lane);
    }
    __syncthreads();  // this stage's tiles (every thread's copies) and sb are visible
    const T* xs = sx + stage * kChunk * BR;
    const T* zs = sz + stage * kChunk * BN;

    // The state at this chunk boundary.
    const int slot = sr.first_slot + c;
    if (!p.seg_pass && slot < p.seq.num_slots) {
      T* st = static_cast<T*>(p.states) + (static_cast<int64_t>(slot) * H + head) * p.r_dim * p.n_dim;
#pragma unroll
      for (int nt = 0; nt < NT8; ++nt) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int64_t off = static_cast<int64_t>(r0 + warp * 16 + g + 8 * half) * p.n_dim + n0 + nt * 8 + 2 * t4;
          *reinterpret_cast<uint32_t*>(st + off) = E::pack(acc[nt][2 * half], acc[nt][2 * half + 1]);
        }
      }
    }

    const float* gt = graw + stage * kGateTileFloats;  // kPerKey: (chunk row, r), rows past the end = the last
    const bool pair = !kPerKey && kReverse && p.pair_dot != nullptr && !p.seg_pass && slot < p.seq.num_slots;
    if (pair) {
      // <dH_c, h_c> over this thread's elements (dH_c in fp32 registers, h_c as stored)
      const T* hp = static_cast<const T*>(p.pair_states) + (static_cast<int64_t>(slot) * H + head) * p.r_dim * p.n_dim;
      float part = 0.f;
#pragma unroll
      for (int nt = 0; nt < NT8; ++nt) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int64_t off = static_cast<int64_t>(r0 + warp * 16 + g + 8 * half) * p.n_dim + n0 + nt * 8 + 2 * t4;
          const float2 hv = E::unpack(*reinterpret_cast<const uint32_t*>(hp + off));
          part += acc[nt][2 * half] * hv.x + acc[nt][2 * half + 1] * hv.y;
        }
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) part += __shfl_xor_sync(0xffffffffu, part, o);
      if (lane == 0) red[warp] = part;
    }
    // b_L: the scalar's, or per key for this thread's state rows 16 warp + g + {0, 8}
    const float bl = kPerKey ? 0.f : sb[kChunk - 1];
    float blr[2] = {bl, bl};
    if constexpr (kPerKey) {
#pragma unroll
      for (int half = 0; half < 2; ++half) blr[half] = gt[gate_at(kChunk - 1, warp * 16 + g + 8 * half)];
    }
    const float decay = __expf(bl);
    seg_log_decay[0] += blr[0];
    seg_log_decay[1] += blr[1];
#pragma unroll
    for (int nt = 0; nt < NT8; ++nt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[nt][e] *= kPerKey ? __expf(blr[e >> 1]) : decay;
    }
#pragma unroll
    for (int kk = 0; kk < kChunk / 16; ++kk) {
      uint32_t a[4];
      load_a_t<BR>(a, xs, warp * 16, kk * 16, lane);
      if constexpr (kPerKey) {
        // a[i] holds x^T (state row 16 warp + g + 8 (i & 1), chunk rows 16 kk + 2 t4 + 8 (i >> 1) + {0, 1})
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int r = warp * 16 + g + 8 * (i & 1), j = kk * 16 + 2 * t4 + 8 * (i >> 1);
          const float2 f = E::unpack(a[i]);
          const float b0 = gt[gate_at(j, r)], b1 = gt[gate_at(j + 1, r)];
          const float w0 = kReverse ? p.scale * __expf(b0) : __expf(blr[i & 1] - b0);
          const float w1 = kReverse ? p.scale * __expf(b1) : __expf(blr[i & 1] - b1);
          a[i] = E::pack(f.x * w0, f.y * w1);
        }
      }
      // scalar gates: weights of the chunk rows this thread's B fragments hold, 16 kk + 2 t4 + {0, 1, 8, 9}
      float w[4] = {1.f, 1.f, 1.f, 1.f};
      if constexpr (!kPerKey) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float bj = sb[kk * 16 + 2 * t4 + (e & 1) + 8 * (e >> 1)];
          w[e] = kReverse ? p.scale * __expf(bj) : __expf(bl - bj);
        }
      }
#pragma unroll
      for (int np = 0; np < NT8 / 2; ++np) {
        uint32_t b[4];
        load_b_kn<BN>(b, zs, kk * 16, np * 16, lane);
        if constexpr (!kPerKey) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float2 f = E::unpack(b[e]);
            const int wi = (e & 1) * 2;  // b[0], b[2]: rows 2t4, 2t4+1; b[1], b[3]: rows + 8
            b[e] = E::pack(f.x * w[wi], f.y * w[wi + 1]);
          }
        }
        E::mma(acc[2 * np], a, b[0], b[1]);
        E::mma(acc[2 * np + 1], a, b[2], b[3]);
      }
    }
    __syncthreads();  // everyone is done with this stage (and red) before it is refilled
    if (pair && tid == 0) {
      const int tiles = (p.r_dim / 64) * (p.n_dim / 32);
      float* pd = p.pair_dot + (static_cast<int64_t>(slot) * H + head) * tiles + (r0 / 64) * (p.n_dim / 32) + n0 / 32;
      pd[0] = decay * (red[0] + red[1] + red[2] + red[3]);
      if (BN == 64) pd[1] = 0.f;
    }
  }
  cp_async_wait<0>();

  // pass 1: the segment's local result; else the final state, from the segment at the end
  // (reverse: the start) of the sequence
  const bool at_end = seg == (kReverse ? 0 : nsegs - 1);
  float* out = p.seg_pass ? p.seg_state : (at_end ? p.final_state : nullptr);
  const int64_t out_base = p.seg_pass ? seg_row(seg) * p.r_dim * p.n_dim : state_base;
  if (out != nullptr) {
#pragma unroll
    for (int nt = 0; nt < NT8; ++nt) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        *reinterpret_cast<float2*>(out + acc_at(nt, half, out_base)) =
            make_float2(acc[nt][2 * half], acc[nt][2 * half + 1]);
      }
    }
  }
  if (p.seg_pass) {  // the same in every N tile (and, scalar gates, every row): one writer per value
    if constexpr (kPerKey) {
      if (blockIdx.z % n_tiles == 0 && t4 == 0) {
        p.seg_decay[decay_at(seg, 0)] = seg_log_decay[0];
        p.seg_decay[decay_at(seg, 1)] = seg_log_decay[1];
      }
    } else {
      if (blockIdx.z == 0 && tid == 0) p.seg_decay[decay_at(seg, 0)] = seg_log_decay[0];
    }
  }
}

template <typename Tag, int BN, bool kReverse, bool kPerKey>
cudaError_t run_chunk_state(const ChunkStateParams& p, cudaStream_t stream) {
  if (p.seq.num_seqs == 0 || p.seq.heads == 0) return cudaSuccess;
  if ((p.gk_cum != nullptr) != kPerKey || p.max_segs < 1 || p.seg_pass) return cudaErrorInvalidValue;
  if (p.max_segs > 1 && (p.seg_chunks < 1 || p.seg_state == nullptr || p.seg_decay == nullptr)) {
    return cudaErrorInvalidValue;
  }
  constexpr int smem = chunk_state_smem_bytes<BN, kPerKey>();
  auto kernel = chunk_state_kernel<Tag, BN, kReverse, kPerKey>;
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(p.seq.num_seqs * p.max_segs, p.seq.heads, (p.r_dim / 64) * (p.n_dim / BN));
  if (p.max_segs > 1) {  // pass 1: the segments' local results
    ChunkStateParams local = p;
    local.seg_pass = 1;
    kernel<<<grid, 128, smem, stream>>>(local);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, 128, smem, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace linear_attn
