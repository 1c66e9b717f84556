// recurrent: the recurrence token by token (decoding, fused_recurrent_*).
//
//   S_t = diag(exp(gk_t)) S_{t-1} diag(exp(gv_t)) * exp(g_t) + k_t^T v_t,   o_t = scale * q_t S_t
// with g_t the scalar gate (g or gamma; none = 0), gk_t / gv_t the GLA per-key / per-value
// gates (each optional). One CTA per (sequence, head, 32 value columns), K threads: thread
// (column c, slice s) keeps the fp32 state S[32 s .. 32 s + 31, c] in registers; q_t S_t is
// reduced over the K / 32 slices of a column with warp shuffles. The next row's inputs are
// loaded while the current one is computed. run_recurrent<.., kGrad = true> runs the gradients
// of the GLA form instead (recurrent_grad.cuh).
#pragma once

#include "chunk_info.cuh"
#include "mma.cuh"
#include "recurrent_grad.cuh"

namespace linear_attn {

template <typename Tag, int K>
struct RecurrentRow {
  using T = typename Elem<Tag>::T;
  uint4 q[4], k[4];  // 32 elements each: this thread's key slice
  T v;
  float g, gv;
  float4 gk[8];
};

template <typename Tag, int K>
__global__ void __launch_bounds__(K) recurrent_kernel(const RecurrentParams p) {
  using E = Elem<Tag>;
  using T = typename E::T;
  using Row = RecurrentRow<Tag, K>;
  constexpr int TPC = K / 32;  // threads per value column
  static_assert(K == 64 || K == 128 || K == 256, "K is 64, 128 or 256");

  const int tid = threadIdx.x;
  const int col = tid / TPC, slice = tid % TPC;
  const int seq = blockIdx.x, head = blockIdx.y, H = p.seq.heads;
  const int n = blockIdx.z * 32 + col;
  const SeqRange sr = sequence_range(p.seq, seq);
  const int64_t len = sr.eos - sr.bos;
  const int k0 = slice * 32;

  float s[32];
  const int64_t state_base = (static_cast<int64_t>(seq) * H + head) * K * p.v_dim;
#pragma unroll
  for (int r = 0; r < 32; ++r) {
    s[r] = p.init == nullptr ? 0.f : p.init[state_base + static_cast<int64_t>(k0 + r) * p.v_dim + n];
  }

  auto load = [&](int64_t i, Row& row) {
    const int64_t t = p.reverse ? sr.eos - 1 - i : sr.bos + i;
    const int64_t th = t * H + head;
    const uint4* qg = reinterpret_cast<const uint4*>(static_cast<const T*>(p.q) + th * K + k0);
    const uint4* kg = reinterpret_cast<const uint4*>(static_cast<const T*>(p.k) + th * K + k0);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      row.q[j] = qg[j];
      row.k[j] = kg[j];
    }
    row.v = static_cast<const T*>(p.v)[th * p.v_dim + n];
    row.g = p.gate.g != nullptr ? p.gate.g[th] : (p.gate.gamma != nullptr ? p.gate.gamma[head] : 0.f);
    row.gv = p.gv != nullptr ? p.gv[th * p.v_dim + n] : 0.f;
    if (p.gk != nullptr) {
      const float4* gkg = reinterpret_cast<const float4*>(p.gk + th * K + k0);
#pragma unroll
      for (int j = 0; j < 8; ++j) row.gk[j] = gkg[j];
    }
  };

  Row cur, nxt;
  if (len > 0) load(0, cur);
  for (int64_t i = 0; i < len; ++i) {
    if (i + 1 < len) load(i + 1, nxt);
    const int64_t t = p.reverse ? sr.eos - 1 - i : sr.bos + i;
    const float decay = __expf(cur.g + cur.gv);
    const float v = E::to_float(cur.v);
    float acc = 0.f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const uint32_t* qw = reinterpret_cast<const uint32_t*>(&cur.q[j]);
      const uint32_t* kw = reinterpret_cast<const uint32_t*>(&cur.k[j]);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 qf = E::unpack(qw[e]);
        const float2 kf = E::unpack(kw[e]);
        const int r = j * 8 + e * 2;
        float d0 = decay, d1 = decay;
        if (p.gk != nullptr) {
          const float* gkr = reinterpret_cast<const float*>(cur.gk);
          d0 *= __expf(gkr[r]);
          d1 *= __expf(gkr[r + 1]);
        }
        s[r] = s[r] * d0 + kf.x * v;
        s[r + 1] = s[r + 1] * d1 + kf.y * v;
        acc += qf.x * s[r] + qf.y * s[r + 1];
      }
    }
#pragma unroll
    for (int off = TPC / 2; off > 0; off >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (slice == 0) static_cast<T*>(p.out)[(t * H + head) * p.v_dim + n] = E::from_float(p.scale * acc);
    cur = nxt;
  }

  if (p.final_state != nullptr) {
#pragma unroll
    for (int r = 0; r < 32; ++r) p.final_state[state_base + static_cast<int64_t>(k0 + r) * p.v_dim + n] = s[r];
  }
}

template <typename Tag, int K, bool kGrad>
cudaError_t run_recurrent(const RecurrentParams& p, cudaStream_t stream) {
  if constexpr (kGrad) {
    return run_recurrent_grad<Tag, K>(p, stream);
  } else {
    if (p.seq.num_seqs == 0 || p.seq.heads == 0 || p.v_dim == 0) return cudaSuccess;
    const dim3 grid(p.seq.num_seqs, p.seq.heads, p.v_dim / 32);
    recurrent_kernel<Tag, K><<<grid, K, 0, stream>>>(p);
    return cudaGetLastError();
  }
}

}  // namespace linear_attn
