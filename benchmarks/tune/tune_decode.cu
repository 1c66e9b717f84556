// Tile-shape tuning harness for decoding (split-KV forward + combine), torch-free.
// One new token per sequence against a full KV cache, GQA packed the way
// flash_attn_with_kvcache packs it: the g = h / h_k query heads of a kv head are g query
// rows of one sequence, so the kernel sees h_k heads and seqlen_q = g.
// Build one binary per tile (run_tune.sh does this for "dec:HDIM:BM:BN:WARPS:STAGES"):
//   nvcc ... -DHDIM=128 -DBM=64 -DBN=64 -DWARPS=4 -DSTAGES=2 tune_decode.cu
// Output per shape: the split count num_splits_heuristic picks, TB/s of K + V read once
// (median time of 30-50 launches) for the unsplit kernel, the split kernel writing O
// itself with one share ("1d", what num_splits = 0 runs on a full grid), and the split
// kernel plus combine at a sweep of split counts.
// -DPAGE=P (a multiple of 16; run_tune.sh "dec:HDIM:BM:BN:WARPS:STAGES:P") times the paged-KV
// kernels instead: the caches in pages of P rows, each sequence's pages a random
// permutation of the pool (as benchmark_decode.py lays them out).

#include <cuda_bf16.h>

#include <algorithm>
#include <cstring>
#include <random>
#include <vector>

#include "tune_common.cuh"
#include "flash_fwd_launch_template.h"
#include "tile_size.h"

#ifndef HDIM
#define HDIM 128
#endif
#ifndef BM
#define BM 64
#endif
#ifndef BN
#define BN 64
#endif
#ifndef STAGES
#define STAGES 2
#endif
#ifndef WARPS
#define WARPS 4
#endif
#ifndef PAGE
#define PAGE 0
#endif
constexpr bool kPaged = PAGE > 0;
static_assert(PAGE % 16 == 0, "pages hold a multiple of 16 rows");

using Element = cutlass::bfloat16_t;
using Ktraits = flash::FwdKernelTraits<HDIM, Element, flash::FwdTile{BM, BN, WARPS, STAGES}>;

__global__ void fill_cu_seqlens(int *cu, int b, int len) {
  for (int i = threadIdx.x; i <= b; i += blockDim.x) { cu[i] = i * len; }
}

// The row of key j of sequence bi in k / v, in units of h_k * d elements: (b * len) packed
// rows, or with pages (table != null) slot j % page of pool page table[bi][j / page].
__device__ size_t key_row(const int *table, int bi, int j, int len, int page) {
  if (table == nullptr) { return size_t(bi) * len + j; }
  return size_t(table[size_t(bi) * (len / page) + j / page]) * page + j % page;
}

__device__ float block_reduce(float x, bool is_max) {
  __shared__ float buf[32];
  for (int o = 16; o > 0; o >>= 1) {
    const float y = __shfl_xor_sync(0xffffffffu, x, o);
    x = is_max ? fmaxf(x, y) : x + y;
  }
  __syncthreads();
  if (threadIdx.x % 32 == 0) { buf[threadIdx.x / 32] = x; }
  __syncthreads();
  x = buf[0];
  for (int w = 1; w < int(blockDim.x / 32); ++w) { x = is_max ? fmaxf(x, buf[w]) : x + buf[w]; }
  return x;
}

// Plain fp32 attention of one query row per CTA (row = (qrow, kv head), q / out rows
// (b * g, h_k, d)), every key of its sequence: the reference the kernels are checked against
// (a pipeline or paging bug shows as a large error, whatever the timing says).
// scores: [rows, len] fp32 scratch. 256 threads.
__global__ void reference_decode(const Element *q, const Element *k, const Element *v, float *out, float *scores,
                                 const int *table, int g, int h_k, int d, int len, int page, float scale) {
  const int row = blockIdx.x, hk = row % h_k, qrow = row / h_k, bi = qrow / g;
  const Element *qr = q + (size_t(qrow) * h_k + hk) * d;
  float *sc = scores + size_t(row) * len;
  float m = -INFINITY;
  for (int j = threadIdx.x; j < len; j += blockDim.x) {
    const Element *kr = k + (key_row(table, bi, j, len, page) * h_k + hk) * d;
    float acc = 0.f;
    for (int c = 0; c < d; ++c) { acc += float(qr[c]) * float(kr[c]); }
    sc[j] = acc * scale;
    m = fmaxf(m, sc[j]);
  }
  m = block_reduce(m, true);
  float sum = 0.f;
  for (int j = threadIdx.x; j < len; j += blockDim.x) {
    sc[j] = expf(sc[j] - m);
    sum += sc[j];
  }
  sum = block_reduce(sum, false);  // (its barriers also order the score writes before the reads below)
  for (int c = threadIdx.x; c < d; c += blockDim.x) {
    float acc = 0.f;
    for (int j = 0; j < len; ++j) { acc += sc[j] * float(v[(key_row(table, bi, j, len, page) * h_k + hk) * d + c]); }
    out[(size_t(qrow) * h_k + hk) * d + c] = acc / sum;
  }
}

// err[0] = max |o - ref|, err[1] = max |ref| (non-negative floats order as their bits).
__global__ void max_errors(const Element *o, const float *ref, size_t n, unsigned *err) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    atomicMax(err, __float_as_uint(fabsf(float(o[i]) - ref[i])));
    atomicMax(err + 1, __float_as_uint(fabsf(ref[i])));
  }
}

int main() {
  // ../shared/ANCHORS.md decode shapes: 32 query heads, 8 kv heads, one new token.
  const int shapes[][2] = {{1, 131072}, {8, 32768}, {32, 8192}, {128, 2048}};
  const int h = 32, h_k = 8, g = h / h_k, d = HDIM;
  int num_sms = 0;
  CUDA_OK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, 0));
  for (auto [b, len] : shapes) {
    const size_t n_kv = size_t(b) * len * h_k * d, n_q = size_t(b) * g * h_k * d;
    Element *q = random_alloc<Element>(n_q, 1), *o = device_alloc<Element>(n_q);
    Element *k = random_alloc<Element>(n_kv, 2), *v = random_alloc<Element>(n_kv, 3);
    float *lse = device_alloc<float>(size_t(b) * g * h_k);
    float *oacc = device_alloc<float>(size_t(flash::kMaxSplits) * n_q);
    float *lseacc = device_alloc<float>(size_t(flash::kMaxSplits) * b * g * h_k);
    int *cu_q = device_alloc<int>(b + 1), *cu_k = device_alloc<int>(b + 1);
    fill_cu_seqlens<<<1, 256>>>(cu_q, b, g);
    fill_cu_seqlens<<<1, 256>>>(cu_k, b, len);
    // Paged: k and v are pools of b * len / PAGE pages (PAGE, h_k, d); sequence i's logical
    // page j is pool page table[i][j], a random permutation (the data is random anyway).
    const int pages_per_seq = kPaged ? len / PAGE : 0;
    int *table = nullptr;
    if constexpr (kPaged) {
      std::vector<int> perm(size_t(b) * pages_per_seq);
      for (size_t i = 0; i < perm.size(); ++i) { perm[i] = int(i); }
      std::mt19937 rng(PAGE);
      std::shuffle(perm.begin(), perm.end(), rng);
      table = device_alloc<int>(perm.size());
      CUDA_OK(cudaMemcpy(table, perm.data(), perm.size() * sizeof(int), cudaMemcpyHostToDevice));
    }

    flash::Flash_fwd_params p = {};
    p.q_ptr = q; p.k_ptr = k; p.v_ptr = v; p.o_ptr = o; p.softmax_lse_ptr = lse;
    // varlen rows: q (b * g, h_k, d), k/v (b * len, h_k, d)
    p.q_row_stride = p.o_row_stride = int64_t(h_k) * d;
    p.k_row_stride = p.v_row_stride = int64_t(h_k) * d;
    p.q_head_stride = p.k_head_stride = p.v_head_stride = p.o_head_stride = d;
    p.b = b; p.seqlen_q = g; p.seqlen_k = len; p.total_q = b * g; p.total_k = b * len;
    p.h = p.h_k = h_k; p.h_h_k_ratio = 1; p.d = d;
    p.cu_seqlens_q = cu_q; p.cu_seqlens_k = cu_k;
    p.scale_softmax = 1.f / std::sqrt(float(d));
    p.scale_softmax_log2 = p.scale_softmax * 1.4426950408889634f;
    p.window_size_left = p.window_size_right = -1;
    p.is_bf16 = true;
    p.p_keep = p.rp_keep = 1.f;
    p.oaccum_ptr = oacc; p.lseaccum_ptr = lseacc;
    if constexpr (kPaged) {  // (paged_seq_info takes each sequence's key count from cu_seqlens_k)
      p.block_table = table;
      p.block_table_batch_stride = pages_per_seq;
      p.max_blocks_per_seq = pages_per_seq;
      p.page_size = PAGE;
      p.num_pages = b * pages_per_seq;
      p.kv_d = d;
      p.k_batch_stride = p.v_batch_stride = int64_t(PAGE) * h_k * d;
      p.total_k = 0;
    }

    // The reference output, and a check of o after each timed variant: relative error
    // max |o - ref| / max |ref| (bf16 output: ~0.4%); above 2% the line says MISMATCH.
    float *ref = device_alloc<float>(n_q), *scores = device_alloc<float>(size_t(b) * g * h_k * len);
    unsigned *err = device_alloc<unsigned>(2);
    reference_decode<<<b * g * h_k, 256>>>(q, k, v, ref, scores, table, g, h_k, d, len, PAGE, p.scale_softmax);
    CUDA_OK(cudaGetLastError());
    float worst = 0.f;
    auto rel_error = [&] {
      CUDA_OK(cudaMemset(err, 0, 2 * sizeof(unsigned)));
      max_errors<<<256, 256>>>(o, ref, n_q, err);
      unsigned host[2];
      CUDA_OK(cudaMemcpy(host, err, sizeof(host), cudaMemcpyDeviceToHost));
      float e, r;
      std::memcpy(&e, &host[0], 4);
      std::memcpy(&r, &host[1], 4);
      const float rel = e / (r > 0.f ? r : 1.f);
      worst = std::max(worst, rel);
      return rel;
    };
    auto flag = [](float rel) { return rel > 0.02f ? " MISMATCH" : ""; };

    const int m_blocks = (g + BM - 1) / BM, n_blocks = (len + BN - 1) / BN;
    const int heuristic = flash::num_splits_heuristic((long long)m_blocks * b * h_k, num_sms, n_blocks, h_k);
    const double bytes = 2.0 * n_kv * sizeof(Element);
    p.num_splits = 1;
    const float plain_ms = median_ms(
        [&] { return flash::run_flash_fwd<Ktraits, false, false, false, false, kPaged>(p, 0); }, 10, 50);
    const float plain_err = rel_error();
    p.oaccum_ptr = nullptr;  // one share, no partials: the split kernel writes O itself
    const float direct_ms = median_ms(
        [&] { return flash::run_flash_fwd<Ktraits, true, true, false, true, kPaged>(p, 0); }, 10, 50);
    const float direct_err = rel_error();
    p.oaccum_ptr = oacc;
    std::printf("hdim %d tile %dx%dx%dw%ds page %d  b %3d len %6d  heuristic %3d | unsplit %.2f TB/s%s | 1d %.2f%s |"
                " split:", HDIM, BM, BN, WARPS, STAGES, PAGE, b, len, heuristic, bytes / plain_ms / 1e9,
                flag(plain_err), bytes / direct_ms / 1e9, flag(direct_err));
    // The split kernel (+ combine) at a sweep of split counts: TB/s of each.
    const int sweep[] = {1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 33, 48, 64, 96, 128};
    for (int s : sweep) {
      if (s > n_blocks || s * h_k > 65535) { continue; }
      p.num_splits = s;
      const float ms =
          median_ms([&] { return flash::run_flash_fwd<Ktraits, true, true, false, true, kPaged>(p, 0); }, 5, 30);
      std::printf(" %d:%.2f%s", s, bytes / ms / 1e9, flag(rel_error()));
    }
    std::printf(" | max rel err %.4f\n", worst);
    cudaFree(q); cudaFree(k); cudaFree(v); cudaFree(o); cudaFree(lse); cudaFree(oacc); cudaFree(lseacc);
    cudaFree(cu_q); cudaFree(cu_k); cudaFree(table); cudaFree(ref); cudaFree(scores); cudaFree(err);
  }
  return 0;
}
