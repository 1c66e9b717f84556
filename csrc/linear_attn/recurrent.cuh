// recurrent: the recurrence token by token (decoding, fused_recurrent_*).
//
//   S_t = diag(exp(gk_t)) S_{t-1} diag(exp(gv_t)) * exp(g_t) + k_t^T v_t,   o_t = scale * q_t S_t
//
// with g_t the scalar gate (g or gamma; none = 0), gk_t / gv_t the GLA per-key / per-value gates
// (each optional). A decoding step is little else than the fp32 state's read and write, so the
// state moves in whole lines. One CTA per (sequence, head, W value columns), W = 32 (a 128-byte
// line of each state row) or 128 (a 512-byte row); L = W / 4 lanes cover a row. Lane l of warp w
// keeps S[k0 .. k0 + R - 1, n0 + 4 c .. n0 + 4 c + 3] in registers, c = l % L,
// k0 = (32 / L * w + l / L) R: a warp's load of its j-th rows reads 32 / L whole lines (four at
// W = 32, one row at W = 128). q_t S_t: each thread sums its R rows, a warp its row groups with
// shuffles, the warps meet in shared memory (double-buffered: one barrier per step). A step's
// inputs are loaded at the step (prefetching them during the step before measured no faster:
// benchmarks/tune/tune_recurrent_6d1eb18_h100.txt).
// run_recurrent<.., kGrad = true> runs the gradients of the GLA form instead (recurrent_grad.cuh).
#pragma once

#include "chunk_info.cuh"
#include "mma.cuh"
#include "recurrent_grad.cuh"

namespace linear_attn {

// A CTA covers W value columns (32: one 128-byte line of each fp32 state row; 128: a 512-byte row)
// and K rows, R rows x 4 columns per thread.
template <int K, int W, int R>
constexpr int recurrent_threads() { return K * W / (4 * R); }

// R 16-bit values in 32-bit words, loaded 8 or 16 bytes at a time.
template <int R>
__device__ __forceinline__ void load_halves(uint32_t (&w)[R / 2], const void* src) {
  if constexpr (R % 8 == 0) {
#pragma unroll
    for (int j = 0; j < R / 8; ++j) {
      const uint4 x = reinterpret_cast<const uint4*>(src)[j];
      w[4 * j] = x.x, w[4 * j + 1] = x.y, w[4 * j + 2] = x.z, w[4 * j + 3] = x.w;
    }
  } else {
    static_assert(R == 4, "R is 4 or a multiple of 8");
    const uint2 x = *reinterpret_cast<const uint2*>(src);
    w[0] = x.x, w[1] = x.y;
  }
}

template <int R>
struct RecurrentRow {
  uint32_t q[R / 2], k[R / 2];  // this thread's R keys
  uint2 v;                      // its 4 value columns
  float g;
  float4 gv;                    // per-value log-gates of its columns (0 without gv)
  float4 gk[R / 4];             // per-key log-gates of its rows (unused without gk)
};

template <typename Tag, int K, int W, int R>
__global__ void __launch_bounds__(recurrent_threads<K, W, R>()) recurrent_kernel(const RecurrentParams p) {
  using E = Elem<Tag>;
  using T = typename E::T;
  constexpr int kLanesPerRow = W / 4;            // 4 columns per lane
  constexpr int kRowGroups = 32 / kLanesPerRow;  // rows one warp load covers
  constexpr int kWarps = recurrent_threads<K, W, R>() / 32;
  using Row = RecurrentRow<R>;
  static_assert(K == 64 || K == 128 || K == 256, "K is 64, 128 or 256");
  static_assert(W == 32 || W == 128, "W is 32 or 128 columns");
  static_assert(kWarps * kRowGroups * R == K && kWarps <= 32, "the warps' row groups cover K");

  // per step and warp: its rows' part of q_t S_t, 4 columns per lane of row group 0; two buffers,
  // so that step i + 1 writes one while warp 0 may still read step i's
  __shared__ float4 partial[2][kWarps][kLanesPerRow];

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int cgroup = lane % kLanesPerRow, rgroup = lane / kLanesPerRow;
  const int seq = blockIdx.x, head = blockIdx.y, H = p.seq.heads;
  const int n = blockIdx.z * W + 4 * cgroup;  // first of this thread's 4 columns
  const int k0 = (warp * kRowGroups + rgroup) * R;
  const SeqRange sr = sequence_range(p.seq, seq);
  const int64_t len = sr.eos - sr.bos;
  const int64_t state_base = (static_cast<int64_t>(seq) * H + head) * K * p.v_dim;
  auto state_at = [&](int r) { return state_base + static_cast<int64_t>(k0 + r) * p.v_dim + n; };

  auto load = [&](int64_t i, Row& row) {
    const int64_t t = p.reverse ? sr.eos - 1 - i : sr.bos + i;
    const int64_t th = t * H + head;
    load_halves<R>(row.q, static_cast<const T*>(p.q) + th * K + k0);
    load_halves<R>(row.k, static_cast<const T*>(p.k) + th * K + k0);
    row.v = *reinterpret_cast<const uint2*>(static_cast<const T*>(p.v) + th * p.v_dim + n);
    row.g = p.gate.g != nullptr ? p.gate.g[th] : (p.gate.gamma != nullptr ? p.gate.gamma[head] : 0.f);
    row.gv = p.gv != nullptr ? *reinterpret_cast<const float4*>(p.gv + th * p.v_dim + n)
                             : make_float4(0.f, 0.f, 0.f, 0.f);
    if (p.gk != nullptr) {
#pragma unroll
      for (int j = 0; j < R / 4; ++j) row.gk[j] = reinterpret_cast<const float4*>(p.gk + th * K + k0)[j];
    }
  };

  Row cur;
  if (len > 0) load(0, cur);  // in flight with the state's loads
  float s[R][4];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const float4 x = p.init == nullptr ? make_float4(0.f, 0.f, 0.f, 0.f)  // read once: evict first
                                       : __ldcs(reinterpret_cast<const float4*>(p.init + state_at(r)));
    s[r][0] = x.x, s[r][1] = x.y, s[r][2] = x.z, s[r][3] = x.w;
  }

  for (int64_t i = 0; i < len; ++i) {
    if (i > 0) load(i, cur);
    const float2 v01 = E::unpack(cur.v.x), v23 = E::unpack(cur.v.y);
    const float v[4] = {v01.x, v01.y, v23.x, v23.y};
    const float gv[4] = {cur.gv.x, cur.gv.y, cur.gv.z, cur.gv.w};
    float dcol[4];  // exp(g_t + gv_t) of each column
#pragma unroll
    for (int c = 0; c < 4; ++c) dcol[c] = __expf(cur.g + gv[c]);
    const float* gk = reinterpret_cast<const float*>(cur.gk);
    float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int e = 0; e < R / 2; ++e) {
      const float2 qf = E::unpack(cur.q[e]), kf = E::unpack(cur.k[e]);
      const float qr[2] = {qf.x, qf.y}, kr[2] = {kf.x, kf.y};
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int r = 2 * e + h;
        const float drow = p.gk != nullptr ? __expf(gk[r]) : 1.f;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
          s[r][c] = s[r][c] * (drow * dcol[c]) + kr[h] * v[c];
          acc[c] += qr[h] * s[r][c];
        }
      }
    }
    // the warp's row groups (lanes kLanesPerRow apart; none at W = 128)
#pragma unroll
    for (int c = 0; c < 4; ++c) {
#pragma unroll
      for (int off = kLanesPerRow; off < 32; off <<= 1) acc[c] += __shfl_xor_sync(0xffffffffu, acc[c], off);
    }
    const int buf = static_cast<int>(i & 1);
    if (rgroup == 0) partial[buf][warp][cgroup] = make_float4(acc[0], acc[1], acc[2], acc[3]);
    __syncthreads();
    if (warp == 0 && rgroup == 0) {
      float4 o = partial[buf][0][cgroup];
#pragma unroll
      for (int w = 1; w < kWarps; ++w) {
        const float4 x = partial[buf][w][cgroup];
        o.x += x.x, o.y += x.y, o.z += x.z, o.w += x.w;
      }
      const int64_t t = p.reverse ? sr.eos - 1 - i : sr.bos + i;
      uint2 packed;
      packed.x = E::pack(p.scale * o.x, p.scale * o.y);
      packed.y = E::pack(p.scale * o.z, p.scale * o.w);
      *reinterpret_cast<uint2*>(static_cast<T*>(p.out) + (t * H + head) * p.v_dim + n) = packed;
    }
  }

  if (p.final_state != nullptr) {
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float4* dst = reinterpret_cast<float4*>(p.final_state + state_at(r));
      __stcs(dst, make_float4(s[r][0], s[r][1], s[r][2], s[r][3]));  // streamed out, not re-read
    }
  }
}

template <typename Tag, int K, int W, int R>
cudaError_t launch_recurrent(const RecurrentParams& p, cudaStream_t stream) {
  const dim3 grid(p.seq.num_seqs, p.seq.heads, p.v_dim / W);
  recurrent_kernel<Tag, K, W, R><<<grid, recurrent_threads<K, W, R>(), 0, stream>>>(p);
  return cudaGetLastError();
}

// The layout (benchmarks/tune/tune_recurrent_*_h100.txt, H100):
// - decoding (at most one token per sequence on average), V a multiple of 128 and at least 2 CTAs
//   per SM: whole 512-byte rows, 16 rows per thread (B 128 x H 16, K = V = 128: 0.103 against
//   0.111 ms; K = V = 256: 0.197 against 0.218; smaller grids lose: B 8, 0.0101 against 0.0092);
// - else 32 columns, 8 rows per thread (32 state values, 80 registers at K = 128) where the grid has
//   at least 4 CTAs per SM; 4 rows (twice the threads, shorter per-step work) below that, i.e. a
//   few long sequences (B 1 x T 512: 0.26 against 0.31 ms).
template <typename Tag, int K, bool kGrad>
cudaError_t run_recurrent(const RecurrentParams& p, cudaStream_t stream) {
  if constexpr (kGrad) {
    return run_recurrent_grad<Tag, K>(p, stream);
  } else {
    if (p.seq.num_seqs == 0 || p.seq.heads == 0 || p.v_dim == 0) return cudaSuccess;
    const int64_t sms = p.num_sms;
    const int64_t heads = static_cast<int64_t>(p.seq.num_seqs) * p.seq.heads;
    if (p.v_dim % 128 == 0 && p.seq.tokens <= p.seq.num_seqs && heads * (p.v_dim / 128) >= 2 * sms) {
      return launch_recurrent<Tag, K, 128, 16>(p, stream);
    }
    return heads * (p.v_dim / 32) < 4 * sms ? launch_recurrent<Tag, K, 32, 4>(p, stream)
                                            : launch_recurrent<Tag, K, 32, 8>(p, stream);
  }
}

}  // namespace linear_attn
