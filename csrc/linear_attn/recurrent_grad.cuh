// recurrent_grad: the gradients of GLA's token-by-token recurrence with per-key gates gk and/or
// per-value gates gv (fused_recurrent_gla's backward when gv is given; no scalar gate):
//
//   S_t = diag(exp(gk_t)) S_{t-1} diag(exp(gv_t)) + k_t^T v_t,   o_t = scale * q_t S_t.
//
// With D_t = dL/dS_t = scale q_t^T do_t + G_{t+1} * D_{t+1} (G_t[a, n] = exp(gk_t[a] + gv_t[n]),
// D past the end = dht):
//   dq_t = scale do_t S_t^T,   dk_t = v_t D_t^T,   dv_t = k_t D_t,   dh0 = G_first * D_first.
//
// Gate gradients. With B_t = gk_1 + ... + gk_t and C_t = gv_1 + ... + gv_t (per key, per value),
//   S_t[a, n] = sum_{s <= t} exp(B_t[a] - B_s[a] + C_t[n] - C_s[n]) k_s[a] v_s[n]
//             + exp(B_t[a] + C_t[n]) h0[a, n],
// so B_t enters the loss as a factor exp(B_t) on q_t (through o_t), exp(-B_t) on k_t and exp(B_T)
// on the final state; C_t likewise on o_t (all of row t's output), on v_t and on the final state.
// Hence dL/dB_t = q_t * dq_t - k_t * dk_t (+ rowsum(dht * h_T) at t = T), and gk_t enters every
// B_s with s >= t, so
//   dgk_t[a] = sum_{s >= t} (q_s[a] dq_s[a] - k_s[a] dk_s[a]) + sum_n dht[a, n] h_T[a, n]
//   dgv_t[n] = sum_{s >= t} (o_s[n] do_s[n] - v_s[n] dv_s[n]) + sum_a dht[a, n] h_T[a, n]
// (dgv is dgk with the state transposed: keys <-> values, q <-> do, k <-> v, dq <-> o).
//
// Cancellation. Each row's own pair k_s^T v_s (in S_s) and scale q_s^T do_s (in D_s) adds the same
// scale (q_s . k_s)(do_s . v_s)-type product to q dq and to k dk (to o do and to v dv), so those
// O(1) terms cancel exactly, and under strong gates the true suffix sums are tiny. The kernel
// therefore never forms them: with S'_s = G_s * S_{s-1} (the state before row s's pair) and
// P_s = G_{s+1} * D_{s+1} (the gradient before row s's q^T do; P_T = dht),
//   q dq - k dk = q * dq'_s - k * dk'_s,   dq'_s = scale do_s S'_s^T,  dk'_s = v_s P_s^T
//   o do - v dv = o'_s do_s - v_s dv'_s,   o'_s = scale q_s S'_s,      dv'_s = k_s P_s
// and the final-state terms become rowsum / colsum(dht * S'_T) with the last row's k dk' / v dv'
// left out (rowsum(dht * h_T) = rowsum(dht * S'_T) + k_T * dk'_T, likewise for the columns).
// Every remaining term is small where the gradient is (fp32 throughout): in a PyTorch fp32
// emulation of this algorithm against the float64 recurrence, ~1e-6 relative (RMS) even with
// value gates of -1000, where the plain form lost ~1%.
//
// One CTA per (sequence, head, 32 value columns), thread (column c, slice s)
// holding rows 32 s .. 32 s + 31 of column c of S (forward sweep) and then of D (reverse sweep):
//   forward sweep: S'_t; o'_t * do_t parked in dgv; dq'_t over this CTA's 32 columns (column_sum)
//     parked in dgk_part[z] (z = blockIdx.z); dq_t = dq'_t + scale k_t (do_t . v_t over the
//     CTA's columns) into dq_part[z]; then S_t = S'_t + k_t^T v_t (not for the last row: S'_T
//     is what the final-state terms take);
//   reverse sweep: P_t; dv_t = dv'_t + scale (q_t . k_t) do_t; dk_t = dk'_t + scale q_t (do_t . v_t)
//     into dk_part[z]; the suffix sums: dgv_t complete (one column is one CTA), dgk_t as this
//     CTA's part in dgk_part[z] (the per-key terms are linear in the CTA's share of the columns);
//     then D_t = P_t + scale q_t^T do_t and P_{t-1} = G_t * D_t.
// The caller sums the parts over z (fixed order: bitwise reproducible). A CTA reads back only
// what its own threads wrote (dgk_part by key = thread, dgv by the slice-0 thread of the column).
#pragma once

#include "chunk_info.cuh"
#include "mma.cuh"

namespace linear_attn {

template <typename Tag, int K>
struct RecurrentGradRow {
  using T = typename Elem<Tag>::T;
  uint4 q[4], k[4];  // this thread's 32-key slice
  T v, dout;         // this thread's column
  T qt, kt;          // key threadIdx.x
  float gv;
  float od, dqd;     // reverse sweep: o'_t do_t of the column (slice 0), dq'_t of key threadIdx.x (gk)
  float4 gk[8];
};

// The sums over the CTA's 32 columns of x (this thread's column, keys k0 .. k0 + 31) for key
// `key` (= threadIdx.x), and of e (one value per column, given by its slice-0 thread). red: 32 x K
// floats, ext: 32. Element r of thread (col, slice) sits at red[col * K + k0 + ((r + lane) & 31)]:
// the 32 lanes of a warp write 32 banks, and a warp of readers (one slice, one key per lane)
// reads 32 banks; ext is read by broadcast. Every thread of the CTA must call it.
template <int K>
__device__ __forceinline__ float2 column_sum(float* red, float* ext, const float (&x)[32], float e, int col,
                                             int slice, int key) {
  constexpr int TPC = K / 32;
  const int lane = key & 31;
  __syncthreads();  // the previous call's readers are done
  float* dst = red + col * K + slice * 32;
#pragma unroll
  for (int r = 0; r < 32; ++r) dst[(r + lane) & 31] = x[r];
  if (slice == 0) ext[col] = e;
  __syncthreads();
  const int ks = key >> 5;  // the reader's slice; its row in the slice is lane
  float sum = 0.f, sum_e = 0.f;
#pragma unroll 8
  for (int c = 0; c < 32; ++c) {
    sum += red[c * K + ks * 32 + ((lane + ((c * TPC + ks) & 31)) & 31)];
    sum_e += ext[c];
  }
  return make_float2(sum, sum_e);
}

// the sum over a column's TPC slices (adjacent lanes), in every one of them
template <int TPC>
__device__ __forceinline__ float slice_sum(float x) {
#pragma unroll
  for (int off = TPC / 2; off > 0; off >>= 1) x += __shfl_xor_sync(0xffffffffu, x, off);
  return x;
}

template <typename Tag, int K>
__global__ void __launch_bounds__(K) recurrent_grad_kernel(const RecurrentParams p) {
  using E = Elem<Tag>;
  using T = typename E::T;
  using Row = RecurrentGradRow<Tag, K>;
  constexpr int TPC = K / 32;
  static_assert(K == 64 || K == 128 || K == 256, "K is 64, 128 or 256");
  __shared__ float red[32 * K];
  __shared__ float ext[32];

  const int tid = threadIdx.x;
  const int col = tid / TPC, slice = tid % TPC;
  const int seq = blockIdx.x, head = blockIdx.y, H = p.seq.heads;
  const int n = blockIdx.z * 32 + col;
  const SeqRange sr = sequence_range(p.seq, seq);
  const int64_t len = sr.eos - sr.bos;
  const int k0 = slice * 32;
  const bool has_gk = p.gk != nullptr, has_gv = p.gv != nullptr;
  const int64_t part = static_cast<int64_t>(blockIdx.z) * p.seq.tokens * H * K;  // this CTA's dq/dk/dgk part
  const int64_t state_base = (static_cast<int64_t>(seq) * H + head) * K * p.v_dim;
  auto row_of = [&](int64_t i) { return p.reverse ? sr.eos - 1 - i : sr.bos + i; };

  // rev: also what the forward sweep parked (o' do, dq')
  auto load = [&](int64_t i, Row& row, bool rev) {
    const int64_t th = row_of(i) * H + head;
    const T* qg = static_cast<const T*>(p.q) + th * K;
    const T* kg = static_cast<const T*>(p.k) + th * K;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      row.q[j] = reinterpret_cast<const uint4*>(qg + k0)[j];
      row.k[j] = reinterpret_cast<const uint4*>(kg + k0)[j];
    }
    row.qt = qg[tid];
    row.kt = kg[tid];
    row.v = static_cast<const T*>(p.v)[th * p.v_dim + n];
    row.dout = static_cast<const T*>(p.dout)[th * p.v_dim + n];
    row.gv = has_gv ? p.gv[th * p.v_dim + n] : 0.f;
    if (has_gk) {
      const float4* gkg = reinterpret_cast<const float4*>(p.gk + th * K + k0);
#pragma unroll
      for (int j = 0; j < 8; ++j) row.gk[j] = gkg[j];
    }
    if (rev) {
      row.dqd = has_gk ? p.dgk_part[part + th * K + tid] : 0.f;
      row.od = has_gv && slice == 0 ? p.dgv[th * p.v_dim + n] : 0.f;
    }
  };
  // G_t for this thread's 32 keys: exp(gk_t[k0 + r] + gv_t[n])
  auto decay = [&](const Row& row, float (&d)[32]) {
    const float dv = __expf(row.gv);
    const float* gkr = reinterpret_cast<const float*>(row.gk);
#pragma unroll
    for (int r = 0; r < 32; ++r) d[r] = has_gk ? dv * __expf(gkr[r]) : dv;
  };

  // ------------------------------------------------ forward sweep: S'_t, o'_t do_t, dq'_t, dq_t
  float s[32];
#pragma unroll
  for (int r = 0; r < 32; ++r) {
    s[r] = p.init == nullptr ? 0.f : p.init[state_base + static_cast<int64_t>(k0 + r) * p.v_dim + n];
  }
  {
    Row cur, nxt;
    if (len > 0) load(0, cur, false);
    for (int64_t i = 0; i < len; ++i) {
      if (i + 1 < len) load(i + 1, nxt, false);
      const int64_t th = row_of(i) * H + head;
      float d[32], x[32];
      decay(cur, d);
      const float dout = E::to_float(cur.dout);
      float acc = 0.f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t* qw = reinterpret_cast<const uint32_t*>(&cur.q[j]);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float2 qf = E::unpack(qw[e]);
          const int r = j * 8 + e * 2;
          s[r] *= d[r];
          s[r + 1] *= d[r + 1];
          acc += qf.x * s[r] + qf.y * s[r + 1];
          x[r] = s[r] * dout;
          x[r + 1] = s[r + 1] * dout;
        }
      }
      acc = slice_sum<TPC>(acc);
      const float v = E::to_float(cur.v);
      if (has_gv && slice == 0) p.dgv[th * p.v_dim + n] = p.scale * acc * dout;  // o'_t do_t, parked
      const float2 cs = column_sum<K>(red, ext, x, dout * v, col, slice, tid);
      const float dqd = p.scale * cs.x;
      p.dq_part[part + th * K + tid] = dqd + p.scale * E::to_float(cur.kt) * cs.y;
      if (has_gk) p.dgk_part[part + th * K + tid] = dqd;  // dq'_t, parked
      if (i + 1 < len) {  // S_t = S'_t + k_t^T v_t; after the last row s stays S'_T
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          const uint32_t* kw = reinterpret_cast<const uint32_t*>(&cur.k[j]);
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const float2 kf = E::unpack(kw[e]);
            const int r = j * 8 + e * 2;
            s[r] += kf.x * v;
            s[r + 1] += kf.y * v;
          }
        }
      }
      cur = nxt;
    }
  }

  // ------------------------------------------------ turn: D = dht, the final-state terms on S'_T
  float dS[32];
  float run_k = 0.f, run_v = 0.f;  // the suffix sums of dgk (key tid, this CTA's part) and dgv (column n)
  {
    float x[32];
    float pv = 0.f;
#pragma unroll
    for (int r = 0; r < 32; ++r) {
      dS[r] = p.dfinal == nullptr ? 0.f : p.dfinal[state_base + static_cast<int64_t>(k0 + r) * p.v_dim + n];
      x[r] = dS[r] * s[r];
      pv += x[r];
    }
    if (p.dfinal != nullptr) {
      if (has_gk) run_k = column_sum<K>(red, ext, x, 0.f, col, slice, tid).x;
      run_v = slice_sum<TPC>(pv);
    }
  }

  // ------------------------------------------------ reverse sweep: P_t, dv_t, dk_t, dgk, dgv; D_t
  {
    Row cur, nxt;
    if (len > 0) load(len - 1, cur, true);
    for (int64_t i = len - 1; i >= 0; --i) {
      if (i > 0) load(i - 1, nxt, true);
      const int64_t th = row_of(i) * H + head;
      const bool last = i == len - 1;  // the last row of the recurrence: its k dk', v dv' are left out
      const float v = E::to_float(cur.v), dout = E::to_float(cur.dout), sdo = p.scale * dout;
      float x[32];
      float acc = 0.f, qk = 0.f;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const uint32_t* qw = reinterpret_cast<const uint32_t*>(&cur.q[j]);
        const uint32_t* kw = reinterpret_cast<const uint32_t*>(&cur.k[j]);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float2 qf = E::unpack(qw[e]);
          const float2 kf = E::unpack(kw[e]);
          const int r = j * 8 + e * 2;
          acc += kf.x * dS[r] + kf.y * dS[r + 1];  // k_t P_t
          qk += qf.x * kf.x + qf.y * kf.y;
          x[r] = dS[r] * v;
          x[r + 1] = dS[r + 1] * v;
          dS[r] += qf.x * sdo;  // D_t = P_t + scale q_t^T do_t
          dS[r + 1] += qf.y * sdo;
        }
      }
      const float dvp = slice_sum<TPC>(acc);
      qk = slice_sum<TPC>(qk);
      const float2 cs = column_sum<K>(red, ext, x, dout * v, col, slice, tid);
      const float qt = E::to_float(cur.qt);
      p.dk_part[part + th * K + tid] = cs.x + p.scale * qt * cs.y;
      if (has_gk) {
        run_k += qt * cur.dqd - (last ? 0.f : E::to_float(cur.kt) * cs.x);
        p.dgk_part[part + th * K + tid] = run_k;
      }
      if (slice == 0) {
        static_cast<T*>(p.dv)[th * p.v_dim + n] = E::from_float(dvp + qk * sdo);
        if (has_gv) {
          run_v += cur.od - (last ? 0.f : v * dvp);
          p.dgv[th * p.v_dim + n] = run_v;
        }
      }
      float d[32];  // P_{t-1} = G_t * D_t
      decay(cur, d);
#pragma unroll
      for (int r = 0; r < 32; ++r) dS[r] *= d[r];
      cur = nxt;
    }
  }

  if (p.dinit != nullptr) {
#pragma unroll
    for (int r = 0; r < 32; ++r) p.dinit[state_base + static_cast<int64_t>(k0 + r) * p.v_dim + n] = dS[r];
  }
}

template <typename Tag, int K>
cudaError_t run_recurrent_grad(const RecurrentParams& p, cudaStream_t stream) {
  if (p.gate.g != nullptr || p.gate.gamma != nullptr) return cudaErrorInvalidValue;  // GLA gates only
  if (p.dout == nullptr || p.dv == nullptr || p.dq_part == nullptr || p.dk_part == nullptr) {
    return cudaErrorInvalidValue;
  }
  if ((p.gk != nullptr) != (p.dgk_part != nullptr) || (p.gv != nullptr) != (p.dgv != nullptr)) {
    return cudaErrorInvalidValue;
  }
  if (p.seq.num_seqs == 0 || p.seq.heads == 0 || p.v_dim == 0) return cudaSuccess;
  if (p.v_dim % 32 != 0) return cudaErrorInvalidValue;
  const dim3 grid(p.seq.num_seqs, p.seq.heads, p.v_dim / 32);
  recurrent_grad_kernel<Tag, K><<<grid, K, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace linear_attn
