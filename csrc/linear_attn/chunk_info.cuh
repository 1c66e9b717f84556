// Sequence and chunk bookkeeping shared by the chunked kernels, and the chunk-local
// cumulative log-gate b. Every row index is clamped into [0, tokens): a malformed
// cu_seqlens gives wrong numbers, never an access outside the tensors.
#pragma once

#include <cstdint>

#include "linear_params.h"
#include "mma.cuh"

namespace linear_attn {

// Segments of a sequence (chunk_state.cuh, chunk_fused.cuh, gla_fused.cuh): its nchunks chunks
// cut into segments of seg_chunks chunks (the last one shorter; seg_chunks = 0: one segment);
// an empty sequence has one (empty) segment. Segment seg covers chunks [begin, end).
struct SegmentRange {
  int count = 1;  // segments of this sequence
  int begin = 0;
  int end = 0;
};

__device__ __forceinline__ SegmentRange segment_range(int nchunks, int seg_chunks, int seg) {
  SegmentRange r;
  const int per_seg = seg_chunks > 0 ? seg_chunks : max(nchunks, 1);
  r.count = max(1, (nchunks + per_seg - 1) / per_seg);
  r.begin = seg * per_seg;
  r.end = min(nchunks, r.begin + per_seg);
  return r;
}

struct SeqRange {
  int64_t bos = 0;  // first row of the sequence
  int64_t eos = 0;  // one past its last row (eos >= bos)
  int first_slot = 0;  // state slot of its chunk 0
};

__device__ __forceinline__ int64_t clamp64(int64_t x, int64_t lo, int64_t hi) {
  return x < lo ? lo : (x > hi ? hi : x);
}

__device__ __forceinline__ SeqRange sequence_range(const SeqParams& s, int n) {
  SeqRange r;
  if (s.cu_seqlens == nullptr) {
    r.bos = static_cast<int64_t>(n) * s.seqlen;
    r.eos = r.bos + s.seqlen;
    r.first_slot = n * ((s.seqlen + kChunk - 1) / kChunk);
  } else {
    r.bos = clamp64(s.cu_seqlens[n], 0, s.tokens);
    r.eos = clamp64(s.cu_seqlens[n + 1], r.bos, s.tokens);
    r.first_slot = s.chunk_offsets == nullptr ? 0 : s.chunk_offsets[n];
  }
  return r;
}

// What a CTA of the segmented sequential passes (chunk_state.cuh, chunk_fused.cuh, gla_fused.cuh;
// grid x: sequences x max_segs segments) walks: its sequence, its segment of it, the sequence's
// rows and chunk count, and the segment's chunks [segs.begin, segs.end) (without segments,
// seg_chunks = 0: the whole sequence).
struct SegmentWalk {
  int seq = 0;
  int seg = 0;
  SeqRange sr;
  int nchunks = 0;
  SegmentRange segs;
};

__device__ __forceinline__ SegmentWalk segment_walk(const SeqParams& s, int max_segs, int seg_chunks) {
  SegmentWalk w;
  w.seq = blockIdx.x / max_segs;
  w.seg = blockIdx.x % max_segs;
  w.sr = sequence_range(s, w.seq);
  w.nchunks = static_cast<int>((w.sr.eos - w.sr.bos + kChunk - 1) / kChunk);
  w.segs = segment_range(w.nchunks, seg_chunks, w.seg);
  return w;
}

// A CTA of the one-pass forward (chunk_fused.cuh, chunk_fused_sm90.cuh; grid x: sequences x
// max_segs, y: heads): what it walks (its segment of its sequence) and where its rows live (q, k
// of its head; v and out from column n0; its fp32 states).
template <typename T, int K>
struct FusedCta {
  SegmentWalk walk;
  int head = 0, heads = 0, max_segs = 1;
  int nsegs = 1, c_begin = 0, c_end = 0;  // the sequence's segment count; this segment's chunks
  int64_t ldk = 0, ldv = 0;               // row strides of q, k and of v, out
  const T* qg = nullptr;
  const T* kg = nullptr;
  const T* vg = nullptr;
  T* og = nullptr;
  int64_t state_base = 0;                 // this sequence and head in an [N, H, K, V] state

  __device__ __forceinline__ FusedCta(const ChunkFusedParams& p, int n0)
      : walk(segment_walk(p.seq, p.max_segs, p.seg_chunks)), head(blockIdx.y), heads(p.seq.heads),
        max_segs(p.max_segs), nsegs(walk.segs.count), c_begin(walk.segs.begin), c_end(walk.segs.end) {
    ldk = static_cast<int64_t>(heads) * K;
    ldv = static_cast<int64_t>(heads) * p.v_dim;
    qg = static_cast<const T*>(p.q) + static_cast<int64_t>(head) * K;
    kg = static_cast<const T*>(p.k) + static_cast<int64_t>(head) * K;
    vg = static_cast<const T*>(p.v) + static_cast<int64_t>(head) * p.v_dim + n0;
    og = static_cast<T*>(p.out) + static_cast<int64_t>(head) * p.v_dim + n0;
    state_base = (static_cast<int64_t>(walk.seq) * heads + head) * K * p.v_dim;
  }
  // nothing to do: a segment past the sequence's last, or pass 1's last segment (never needed)
  __device__ __forceinline__ bool idle(bool state_only) const {
    return walk.seg >= nsegs || (state_only && walk.seg == nsegs - 1);
  }
  // segment s of this sequence in seg_state [N * max_segs, H, K, V] and seg_decay [N * max_segs, H]
  __device__ __forceinline__ int64_t seg_row(int s) const {
    return (static_cast<int64_t>(walk.seq) * max_segs + s) * heads + head;
  }
  // chunk i's state slot and this head, the row of [slots, H, K, V] (h_out) that holds its state
  __device__ __forceinline__ int64_t slot_row(int i) const {
    return static_cast<int64_t>(walk.sr.first_slot + i) * heads + head;
  }
  __device__ __forceinline__ int64_t chunk_start(int i) const { return walk.sr.bos + static_cast<int64_t>(i) * kChunk; }
  __device__ __forceinline__ int chunk_rows(int i) const {
    return static_cast<int>(min(static_cast<int64_t>(kChunk), walk.sr.eos - chunk_start(i)));
  }
};

// The chunk in state slot `slot` (the CTA's blockIdx.x): its sequence, its index in it and
// its rows. valid is false for a slot no chunk occupies (varlen grids are sized by a bound).
struct ChunkCoord {
  bool valid = false;
  int seq = 0;
  int chunk = 0;
  int64_t start = 0;  // first row
  int rows = 0;       // rows in [1, kChunk]
};

__device__ __forceinline__ ChunkCoord locate_chunk(const SeqParams& s, int slot) {
  ChunkCoord c;
  if (slot >= s.num_slots) return c;
  if (s.cu_seqlens == nullptr) {
    const int nt = (s.seqlen + kChunk - 1) / kChunk;
    if (nt == 0) return c;
    c.seq = slot / nt;
    c.chunk = slot % nt;
  } else {
    // the last sequence whose first slot is <= slot (chunk_offsets is non-decreasing)
    int lo = 0, hi = s.num_seqs - 1;
    while (lo < hi) {
      const int mid = (lo + hi + 1) >> 1;
      if (s.chunk_offsets[mid] <= slot) lo = mid; else hi = mid - 1;
    }
    c.seq = lo;
    c.chunk = slot - s.chunk_offsets[lo];
  }
  if (c.seq >= s.num_seqs || c.chunk < 0) return c;
  const SeqRange r = sequence_range(s, c.seq);
  c.start = r.bos + static_cast<int64_t>(c.chunk) * kChunk;
  if (c.start >= r.eos) return c;
  const int64_t left = r.eos - c.start;
  c.rows = left < kChunk ? static_cast<int>(left) : kChunk;
  c.valid = true;
  return c;
}

// Per-step gates of a chunk's rows into raw[kChunk] (zero past rows) by cp.async, issued by
// one warp (each lane copies rows lane and lane + 32, and reads just those back in
// chunk_gate_scan, so its own cp.async.wait_group makes them visible). No-op without g.
__device__ __forceinline__ void chunk_gate_load_async(const GateParams& gate, int64_t start, int rows, int head,
                                                      int heads, float* raw, int lane) {
  if (gate.g == nullptr) return;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int i = lane + 32 * half;
    const bool valid = i < rows;
    cp_async4(raw + i, gate.g + (valid ? (start + i) * heads + head : 0), valid);
  }
}

// chunk_gate_cumsum from the values chunk_gate_load_async brought in (same lane).
__device__ __forceinline__ void chunk_gate_scan(const GateParams& gate, const float* raw, int rows, int head,
                                                float* b_smem, int lane) {
  if (gate.g == nullptr) {
    const float gm = gate.gamma == nullptr ? 0.f : gate.gamma[head];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int i = lane + 32 * half;
      b_smem[i] = gm * static_cast<float>(min(i + 1, rows));
    }
    return;
  }
  float lo = raw[lane], hi = raw[lane + 32];
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const float a = __shfl_up_sync(0xffffffffu, lo, d);
    const float b = __shfl_up_sync(0xffffffffu, hi, d);
    if (lane >= d) {
      lo += a;
      hi += b;
    }
  }
  hi += __shfl_sync(0xffffffffu, lo, 31);
  b_smem[lane] = lo;
  b_smem[lane + 32] = hi;
}

// b[i] = g[start] + ... + g[start + i] for i < rows, and b[i] = b[rows - 1] past the end
// (rows past the end decay nothing), written to b_smem[kChunk] by one warp (lane = the
// calling lane). Scalar gates (g, gamma) only.
__device__ __forceinline__ void chunk_gate_cumsum(const GateParams& gate, int64_t start, int rows, int head,
                                                  int heads, float* b_smem, int lane) {
  if (gate.g == nullptr) {
    const float gm = gate.gamma == nullptr ? 0.f : gate.gamma[head];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int i = lane + 32 * half;
      b_smem[i] = gm * static_cast<float>(min(i + 1, rows));
    }
    return;
  }
  float lo = lane < rows ? gate.g[(start + lane) * heads + head] : 0.f;
  float hi = lane + 32 < rows ? gate.g[(start + lane + 32) * heads + head] : 0.f;
#pragma unroll
  for (int d = 1; d < 32; d <<= 1) {
    const float a = __shfl_up_sync(0xffffffffu, lo, d);
    const float b = __shfl_up_sync(0xffffffffu, hi, d);
    if (lane >= d) {
      lo += a;
      hi += b;
    }
  }
  hi += __shfl_sync(0xffffffffu, lo, 31);
  b_smem[lane] = lo;
  b_smem[lane + 32] = hi;
}

// The intra-chunk scores of a warp's 16 rows as A fragments of (S * D) z: s holds the
// 16 x 64 scores x_w y^T (m16n8 accumulators, 8 column tiles), br the chunk-local
// cumulative log-gates of this thread's two rows, sb the chunk's. D[r, c] = exp(b_r - b_c)
// for c <= r (lower) or exp(b_c - b_r) for c >= r (upper), 0 elsewhere; times `scale`.
// pa[blk]: the A fragment of the 16-column block blk. (chunk_output and chunk_fused.)
template <typename E, bool kUpper>
__device__ __forceinline__ void decayed_score_frags(uint32_t (&pa)[4][4], const float (&s)[8][4],
                                                    const float (&br)[2], const float* sb, float scale,
                                                    int warp, int lane) {
  const int g = lane >> 2, t4 = lane & 3;
#pragma unroll
  for (int blk = 0; blk < 4; ++blk) {
    float pv[2][4];
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      const int nt = 2 * blk + j;
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int r = warp * 16 + g + 8 * (e >> 1);
        const int c = nt * 8 + 2 * t4 + (e & 1);
        const float bc = sb[c];
        const bool keep = kUpper ? c >= r : c <= r;
        const float expo = kUpper ? bc - br[e >> 1] : br[e >> 1] - bc;
        pv[j][e] = keep ? s[nt][e] * scale * __expf(expo) : 0.f;
      }
    }
    pa[blk][0] = E::pack(pv[0][0], pv[0][1]);
    pa[blk][1] = E::pack(pv[0][2], pv[0][3]);
    pa[blk][2] = E::pack(pv[1][0], pv[1][1]);
    pa[blk][3] = E::pack(pv[1][2], pv[1][3]);
  }
}

}  // namespace linear_attn
