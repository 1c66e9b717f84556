// chunk_bwd_fused on sm90a: the simple-GLA backward's dv, dk and dq (given the forward's chunk states
// h and their gradients dH) with the chunk's tiles read once, one warpgroup of wgmma per product,
// instead of three chunk_output passes that each read their own tiles and a 32 KB state.
// One CTA = one (chunk, head); per product (out_r is a row of the chunk, b the chunk-local
// cumulative log-gate, L its last row; the same sums as chunk_output.cuh):
//
//   job  x   y   M      z   mask   out_r = rowscale_r (x_r M) + scale sum_c D[r, c] (x_r . y_c) z_c
//   dv   k   q   dH     do  upper  rowscale_r = exp(b_L - b_r), D[r, c] = exp(b_c - b_r) for c >= r
//   dk   v   do  dH^T   q   upper  (the same), and k_r . (its inter part) for the gate gradient
//   dq   do  v   h^T    k   lower  rowscale_r = scale exp(b_r), D[r, c] = exp(b_r - b_c) for c <= r;
//                                  and q_r . (its inter part)
//
// Each warpgroup: S = x y^T (64 x 64 x R, SS) and O = x M (64 x N x R, SS) issued together; P =
// the masked, decayed S rounded in registers to the A layout of O += P z (RS, z read MN-major); O's
// rows scaled between the two. M's tile is the state as stored ([K][V], V contiguous): read
// MN-major for dv (B = dH as (V column, key)) and K-major for dk and dq (B = dH or h as (key,
// V column)). R = K, N = V for dv; R = V, N = K for dk and dq.
//
// kJobs picks the products of one CTA (ChunkBwdJob bits, one warpgroup each, in bit order): all
// three (384 threads; K = V = 128: q, k, v, do, dH, h = 128 KB, one CTA per SM), or dv + dk (256
// threads, 96 KB: two CTAs per SM, so one's loads overlap the other's MMAs) and dq alone (80 KB).
// Output columns in tiles of BN (tile_size.h: chunk_bwd_fused_tile_n; grid z): all of them up to
// K = V = 128; 64 at K = V = 256, where a CTA reads q, k, v, do whole (the scores contract over
// all keys) but only the state slices its columns n need: dH[:, n] (dv), dH[n, :] (dk), h[n, :]
// (dq), 224 KB in all; z is the column block n of its tile.
// The CTA loads its tiles by cp.async (each warpgroup some of them), warp 0 scans the gates,
// and one barrier hands everything to the warpgroups; no barrier after that.
#pragma once

#include <cute/tensor.hpp>
#include <cutlass/arch/barrier.h>
#include <cutlass/numeric_types.h>

#include "chunk_info.cuh"
#include "device_info.h"
#include "sm90_mma.cuh"
#include "sm90_tiles.h"
#include "tile_size.h"

namespace linear_attn {
namespace sm90 {

using namespace cute;

constexpr int popcount3(int bits) { return (bits & 1) + ((bits >> 1) & 1) + ((bits >> 2) & 1); }

template <typename Tag, int K, int V, int kJobs>
struct BwdSm90Traits {
  using TC = typename CuteType<Tag>::type;
  static constexpr int kK = K, kV = V;
  static constexpr int BN = chunk_bwd_fused_tile_n(K);  // output columns per CTA
  static_assert(BN == K || K == V, "N tiles (the jobs' N are K or V) only where K == V");
  static constexpr int kWG = popcount3(kJobs);
  static constexpr int kThreads = 128 * kWG;
  // which tiles the products read (x, y, M and z of the table above)
  static constexpr bool kHasQ = (kJobs & (kJobDv | kJobDk)) != 0;
  static constexpr bool kHasK = (kJobs & (kJobDv | kJobDq)) != 0;
  static constexpr bool kHasV = (kJobs & (kJobDk | kJobDq)) != 0;
  static constexpr bool kDv = (kJobs & kJobDv) != 0, kDk = (kJobs & kJobDk) != 0, kDq = (kJobs & kJobDq) != 0;
  using RowK = StagedTile<TC, kChunk, K, 1>;  // q, k: (chunk row, key)
  using RowV = StagedTile<TC, kChunk, V, 1>;  // v, do: (chunk row, column)
  // the state slices of an N tile n (key, column): dH[:, n] for dv, dH[n, :] for dk, h[n, :] for dq;
  // without N tiles (BN = K = V) both are the whole state, and dv and dk share one dH tile
  using StateCols = StagedTile<TC, K, BN, 1>;
  using StateRows = StagedTile<TC, BN, V, 1>;
  static constexpr bool kSplitDh = BN < K;

  static constexpr int kOffQ = 0;
  static constexpr int kOffK = kOffQ + (kHasQ ? RowK::kBytes : 0);
  static constexpr int kOffV = kOffK + (kHasK ? RowK::kBytes : 0);
  static constexpr int kOffDo = kOffV + (kHasV ? RowV::kBytes : 0);
  static constexpr int kOffDhC = kOffDo + RowV::kBytes;  // dH[:, n] (dv), or all of dH
  static constexpr int kOffDhR = kSplitDh ? kOffDhC + (kDv ? StateCols::kBytes : 0) : kOffDhC;  // dH[n, :] (dk)
  static constexpr int kOffH = kOffDhR + (kDk || (!kSplitDh && kDv) ? StateRows::kBytes : 0);  // h[n, :] (dq)
  static constexpr int kOffB = kOffH + (kDq ? StateRows::kBytes : 0);
  static constexpr int kSmemBytes = kOffB + kChunk * 4;
  // CTAs per SM for the launch bound: two where shared memory (228 KB, 1 KB reserved per CTA) and
  // registers (at most 128 per thread for two CTAs of 256 threads) allow it
  static constexpr int kMinBlocks = kWG <= 2 && 2 * (kSmemBytes + 1024) <= 228 * 1024 ? 2 : 1;
};

static_assert(BwdSm90Traits<Bf16, 128, 128, kJobDv | kJobDk | kJobDq>::kSmemBytes == 128 * 1024 + 256,
              "all three at K = V = 128: 128.25 KB");
static_assert(BwdSm90Traits<Bf16, 128, 128, kJobDv | kJobDk>::kMinBlocks == 2, "dv + dk: two CTAs per SM");
static_assert(BwdSm90Traits<Bf16, 128, 128, kJobDq>::kMinBlocks == 2, "dq: two CTAs per SM");
static_assert(BwdSm90Traits<Bf16, 256, 256, kJobDv | kJobDk | kJobDq>::kSmemBytes == 224 * 1024 + 256,
              "all three at K = V = 256, N tiles of 64: 224.25 KB (of the 227 KB a CTA may have)");

// One product (kJob) of the table above: its operand tiles, sizes and MMAs.
template <typename Tr, int kJob>
struct BwdJob {
  using TC = typename Tr::TC;
  static constexpr bool kDv = kJob == kJobDv;
  static constexpr bool kUpper = kJob != kJobDq;
  static constexpr int R = kDv ? Tr::kK : Tr::kV;  // the contraction of x y^T and x M
  static constexpr int N = kDv ? Tr::kV : Tr::kK;  // out's columns
  static constexpr int BN = Tr::BN;                 // of which a CTA computes BN
  static constexpr int kOffX = kDv ? Tr::kOffK : (kJob == kJobDk ? Tr::kOffV : Tr::kOffDo);
  static constexpr int kOffY = kDv ? Tr::kOffQ : (kJob == kJobDk ? Tr::kOffDo : Tr::kOffV);
  static constexpr int kOffM = kDv ? Tr::kOffDhC : (kJob == kJobDk ? Tr::kOffDhR : Tr::kOffH);
  static constexpr int kOffZ = kDv ? Tr::kOffDo : (kJob == kJobDk ? Tr::kOffQ : Tr::kOffK);
  using XY = StagedTile<TC, kChunk, R, 1>;  // x, y: (chunk row, r)
  using Z = StagedTile<TC, kChunk, BN, 1>;  // z's column block n: (chunk row, n)
  // M as wgmma's B operand (n, r): dH[:, n]^T's (column, key) view for dv; the stored (key, column)
  // of dH[n, :] for dk and h[n, :] for dq
  using MLayout = std::conditional_t<kDv, typename Tr::StateCols::LayoutT, typename Tr::StateRows::Layout>;
  static constexpr GMMA::Major kMajorM = kDv ? GMMA::Major::MN : GMMA::Major::K;

  using MmaS = decltype(make_tiled_mma(
      GMMA::ss_op_selector<TC, TC, float, Shape<_64, _64, Int<R>>, GMMA::Major::K, GMMA::Major::K>()));
  using MmaI = decltype(make_tiled_mma(
      GMMA::ss_op_selector<TC, TC, float, Shape<_64, Int<BN>, Int<R>>, GMMA::Major::K, kMajorM>()));
  using MmaP = decltype(make_tiled_mma(
      GMMA::rs_op_selector<TC, TC, float, Shape<_64, Int<BN>, _64>, GMMA::Major::K, GMMA::Major::MN>()));
};

// One warpgroup's product kJob for the chunk cc of head `head`, its tiles and b in shared memory.
template <typename Tag, typename Tr, int kJob>
__device__ __forceinline__ void chunk_bwd_job(const ChunkBwdParams& p, unsigned char* smem_raw, const ChunkCoord& cc,
                                              int head) {
  using J = BwdJob<Tr, kJob>;
  using E = Elem<Tag>;
  using T = typename E::T;
  using TC = typename Tr::TC;
  constexpr int N = J::N, BN = J::BN;
  const int nt = BN < N ? blockIdx.z : 0;  // this CTA's N tile: output columns [n0, n0 + BN)
  const int n0 = nt * BN;
  const float* sb = reinterpret_cast<const float*>(smem_raw + Tr::kOffB);
  auto tile = [&](int offset, auto layout) {
    return make_tensor(make_smem_ptr(reinterpret_cast<TC*>(smem_raw + offset)), layout)(_, _, 0);
  };
  Tensor sX = tile(J::kOffX, typename J::XY::Layout{});   // (chunk row, r)
  Tensor sY = tile(J::kOffY, typename J::XY::Layout{});   // (chunk row, r)
  Tensor sM = tile(J::kOffM, typename J::MLayout{});      // (n, r)
  // (n, chunk row): column block nt of z's tile (its 64 x BN blocks lie one after the other)
  Tensor sZt = tile(J::kOffZ + nt * kChunk * BN * 2, typename J::Z::LayoutT{});

  const int wtid = threadIdx.x & 127;
  typename J::MmaS mma_s;
  typename J::MmaI mma_i;
  typename J::MmaP mma_p;
  auto thr_s = mma_s.get_thread_slice(wtid);
  auto thr_i = mma_i.get_thread_slice(wtid);
  auto thr_p = mma_p.get_thread_slice(wtid);
  Tensor acc_s = partition_fragment_C(mma_s, Shape<_64, _64>{});
  Tensor acc_o = partition_fragment_C(mma_i, Shape<_64, Int<BN>>{});
  wgmma_issue<true>(mma_s, thr_s.partition_fragment_A(sX), thr_s.partition_fragment_B(sY), acc_s);
  wgmma_issue<true>(mma_i, thr_i.partition_fragment_A(sX), thr_i.partition_fragment_B(sM), acc_o);

  // P = scale * D * S in the A-register layout of O += P z (the accumulator's element order)
  Tensor tPa = p_fragment<TC>(thr_p);
  uint32_t* pa = p_words(tPa);
  warpgroup_wait<1>();  // S (O may still run)
  warpgroup_fence_operand(acc_s);
  for_acc_pairs<1, 64>(wtid, [&](int j, int r, int c) {
    const float br = sb[r];
    float p0 = 0.f, p1 = 0.f;
    if constexpr (J::kUpper) {
      if (c >= r) p0 = acc_s(j) * p.scale * __expf(sb[c] - br);
      if (c + 1 >= r) p1 = acc_s(j + 1) * p.scale * __expf(sb[c + 1] - br);
    } else {
      if (c <= r) p0 = acc_s(j) * p.scale * __expf(br - sb[c]);
      if (c + 1 <= r) p1 = acc_s(j + 1) * p.scale * __expf(br - sb[c + 1]);
    }
    pa[j / 2] = E::pack(p0, p1);
  });

  warpgroup_wait<0>();  // x M
  warpgroup_fence_operand(acc_o);
  const int r0 = 16 * (wtid >> 5) + ((wtid & 31) >> 2);  // this thread's rows: r0 and r0 + 8
  {
    const float bl = sb[kChunk - 1], inter = J::kDv || kJob == kJobDk ? 1.f : p.scale;
    float rs[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float br = sb[r0 + 8 * h];
      rs[h] = inter * __expf(J::kUpper ? bl - br : br);
    }
    for_acc_pairs<1, BN>(wtid, [&](int j, int r, int) {
      acc_o(j) *= rs[r != r0];
      acc_o(j + 1) *= rs[r != r0];
    });
  }
  const int H = p.seq.heads;
  const int64_t ld = static_cast<int64_t>(H) * N;  // row stride of out (and of the dot operand)
  if constexpr (!J::kDv) {
    // the gate gradient's row dots of the inter part: k . dk_inter (dk) and q . dq_inter (dq), one
    // fp32 partial per 64 columns; the dot operand is the z tile of the other job (k for dk, q for
    // dq), in shared memory where this CTA loaded it, else read from global memory
    float* rowdot = kJob == kJobDk ? p.rk : p.rq;
    if (rowdot != nullptr) {
      constexpr bool kDotInSmem = kJob == kJobDk ? Tr::kHasK : Tr::kHasQ;
      const T* dot_smem = reinterpret_cast<const T*>(smem_raw + (kJob == kJobDk ? Tr::kOffK : Tr::kOffQ));
      const T* dot_g = static_cast<const T*>(kJob == kJobDk ? p.k : p.q) + cc.start * ld +
                       static_cast<int64_t>(head) * N;
      float dots[2][BN / 64] = {};
      for_acc_pairs<1, BN>(wtid, [&](int j, int r, int c) {
        if (r < cc.rows) {
          const uint32_t u = kDotInSmem
                                 ? *reinterpret_cast<const uint32_t*>(dot_smem + tile_offset<kChunk, N>(r, n0 + c))
                                 : *reinterpret_cast<const uint32_t*>(dot_g + r * ld + n0 + c);
          const float2 d = E::unpack(u);
          dots[r != r0][c / 64] += acc_o(j) * d.x + acc_o(j + 1) * d.y;
        }
      });
#pragma unroll
      for (int h = 0; h < 2; ++h) {
#pragma unroll
        for (int n = 0; n < BN / 64; ++n) {
          float dot = dots[h][n];
          dot += __shfl_xor_sync(0xffffffffu, dot, 1);
          dot += __shfl_xor_sync(0xffffffffu, dot, 2);
          const int r = r0 + 8 * h;
          if (r < cc.rows && (wtid & 3) == 0) {
            rowdot[(static_cast<int64_t>(n0 / 64 + n) * p.seq.tokens + cc.start + r) * H + head] = dot;
          }
        }
      }
    }
  }

  wgmma_issue<false>(mma_p, tPa, thr_p.partition_fragment_B(sZt), acc_o);
  warpgroup_wait<0>();
  warpgroup_fence_operand(acc_o);
  T* og = static_cast<T*>(J::kDv ? p.dv : (kJob == kJobDk ? p.dk : p.dq)) + cc.start * ld +
          static_cast<int64_t>(head) * N + n0;
  for_acc_pairs<1, BN>(wtid, [&](int j, int r, int c) {
    if (r < cc.rows) *reinterpret_cast<uint32_t*>(og + r * ld + c) = E::pack(acc_o(j), acc_o(j + 1));
  });
}

template <typename Tag, int K, int V, int kJobs>
__device__ __forceinline__ void chunk_bwd_sm90_body(const ChunkBwdParams& p) {
  using Tr = BwdSm90Traits<Tag, K, V, kJobs>;
  using T = typename Elem<Tag>::T;
  static_assert(K == 64 || K == 128 || K == 256, "K is 64, 128 or 256");
  static_assert(V == 64 || V == 128 || V == 256, "V is 64, 128 or 256");
  extern __shared__ __align__(1024) unsigned char smem_raw[];

  const ChunkCoord cc = locate_chunk(p.seq, blockIdx.x);
  if (!cc.valid) return;
  const int head = blockIdx.y, H = p.seq.heads;
  const int wg = threadIdx.x >> 7, wtid = threadIdx.x & 127;
  {
    // the tiles, the n-th present one by warpgroup n % kWG
    const int64_t ldk = static_cast<int64_t>(H) * K, ldv = static_cast<int64_t>(H) * V;
    const int64_t rk = cc.start * ldk + static_cast<int64_t>(head) * K;
    const int64_t rv = cc.start * ldv + static_cast<int64_t>(head) * V;
    const int64_t st = (static_cast<int64_t>(blockIdx.x) * H + head) * K * V;
    auto at = [&](int off) { return reinterpret_cast<T*>(smem_raw + off); };
    int n = 0;
    auto mine = [&] { return n++ % Tr::kWG == wg; };
    if (Tr::kHasQ && mine()) load_rows_async<K, 128>(at(Tr::kOffQ), static_cast<const T*>(p.q) + rk, ldk, cc.rows, wtid);
    if (Tr::kHasK && mine()) load_rows_async<K, 128>(at(Tr::kOffK), static_cast<const T*>(p.k) + rk, ldk, cc.rows, wtid);
    if (Tr::kHasV && mine()) load_rows_async<V, 128>(at(Tr::kOffV), static_cast<const T*>(p.v) + rv, ldv, cc.rows, wtid);
    if (mine()) load_rows_async<V, 128>(at(Tr::kOffDo), static_cast<const T*>(p.dout) + rv, ldv, cc.rows, wtid);
    // the state slices of N tile n0 / BN (the whole states without N tiles: n0 = 0, BN = K = V)
    const int n0 = Tr::kSplitDh ? blockIdx.z * Tr::BN : 0;
    const T* dh = static_cast<const T*>(p.dh) + st;
    if (Tr::kSplitDh && Tr::kDv && mine()) load_rows_async<Tr::BN, 128, K>(at(Tr::kOffDhC), dh + n0, V, K, wtid);
    if ((Tr::kDk || (!Tr::kSplitDh && Tr::kDv)) && mine()) {
      load_rows_async<V, 128, Tr::BN>(at(Tr::kOffDhR), dh + static_cast<int64_t>(n0) * V, V, Tr::BN, wtid);
    }
    if (Tr::kDq && mine()) {
      load_rows_async<V, 128, Tr::BN>(at(Tr::kOffH), static_cast<const T*>(p.h) + st + static_cast<int64_t>(n0) * V, V,
                                      Tr::BN, wtid);
    }
    cp_async_commit();
  }
  if (threadIdx.x < 32) {
    chunk_gate_cumsum(p.gate, cc.start, cc.rows, head, H, reinterpret_cast<float*>(smem_raw + Tr::kOffB),
                      threadIdx.x);
  }
  cp_async_wait<0>();
  cutlass::arch::fence_view_async_shared();  // the cp.async (generic proxy) tiles, for the wgmmas
  __syncthreads();

  constexpr int kDvWG = 0;
  constexpr int kDkWG = popcount3(kJobs & kJobDv);
  constexpr int kDqWG = popcount3(kJobs & (kJobDv | kJobDk));
  if constexpr ((kJobs & kJobDv) != 0) {
    if (wg == kDvWG) chunk_bwd_job<Tag, Tr, kJobDv>(p, smem_raw, cc, head);
  }
  if constexpr ((kJobs & kJobDk) != 0) {
    if (wg == kDkWG) chunk_bwd_job<Tag, Tr, kJobDk>(p, smem_raw, cc, head);
  }
  if constexpr ((kJobs & kJobDq) != 0) {
    if (wg == kDqWG) chunk_bwd_job<Tag, Tr, kJobDq>(p, smem_raw, cc, head);
  }
}

// The body exists only in sm90a code; run_chunk_bwd_sm90 launches it only where the device executes
// that code.
template <typename Tag, int K, int V, int kJobs>
__global__ void __launch_bounds__(BwdSm90Traits<Tag, K, V, kJobs>::kThreads,
                                  BwdSm90Traits<Tag, K, V, kJobs>::kMinBlocks)
    chunk_bwd_sm90_kernel(const __grid_constant__ ChunkBwdParams p) {
#if defined(__CUDA_ARCH__) && defined(CUTE_ARCH_MMA_SM90A_ENABLED)
  chunk_bwd_sm90_body<Tag, K, V, kJobs>(p);
#elif defined(__CUDA_ARCH__)
  __trap();
#endif
}

}  // namespace sm90

template <typename Tag, int K, int V, int kJobs>
cudaError_t run_chunk_bwd_sm90(const ChunkBwdParams& p, cudaStream_t stream, bool* ran) {
  auto kernel = sm90::chunk_bwd_sm90_kernel<Tag, K, V, kJobs>;
  *ran = false;
  if (p.k_dim != K || p.v_dim != V) return cudaErrorInvalidValue;
  if (!flash::runs_sm90a_code(kernel)) return cudaSuccess;
  *ran = true;
  if (p.seq.num_slots == 0 || p.seq.heads == 0) return cudaSuccess;
  using Tr = sm90::BwdSm90Traits<Tag, K, V, kJobs>;
  if (Tr::kSmemBytes > 48 * 1024) {
    const cudaError_t err =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, Tr::kSmemBytes);
    if (err != cudaSuccess) return err;
  }
  kernel<<<dim3(p.seq.num_slots, p.seq.heads, K / Tr::BN), Tr::kThreads, Tr::kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace linear_attn
