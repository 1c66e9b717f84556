// gla_cumsum: the chunk-local inclusive cumulative sum of GLA's per-key log-gates,
//   b[t, h, d] = g[s, h, d] + g[s + 1, h, d] + ... + g[t, h, d],  s = the first row of t's chunk,
// which every other GLA kernel reads instead of g (gla_gates.cuh). One CTA per (chunk, head,
// 64 keys), one thread per key: the chunk's rows are loaded first (independent loads), then
// added in row order, so that b is exactly non-increasing down a chunk for gates <= 0 (each
// partial sum adds a non-positive number to the previous one).
#include "chunk_info.cuh"

namespace linear_attn {

__global__ void __launch_bounds__(64) gla_cumsum_kernel(const GlaCumsumParams p) {
  const ChunkCoord cc = locate_chunk(p.seq, blockIdx.x);
  if (!cc.valid) return;
  const int head = blockIdx.y, d = blockIdx.z * 64 + threadIdx.x;
  const int64_t ld = static_cast<int64_t>(p.seq.heads) * p.k_dim;
  const int64_t base = cc.start * ld + static_cast<int64_t>(head) * p.k_dim + d;
  constexpr int kBatch = 16;  // rows loaded ahead of their sums
  float acc = 0.f;
#pragma unroll
  for (int r0 = 0; r0 < kChunk; r0 += kBatch) {
    float x[kBatch];
#pragma unroll
    for (int i = 0; i < kBatch; ++i) x[i] = r0 + i < cc.rows ? p.g[base + (r0 + i) * ld] : 0.f;
#pragma unroll
    for (int i = 0; i < kBatch; ++i) {
      acc += x[i];
      if (r0 + i < cc.rows) p.out[base + (r0 + i) * ld] = acc;
    }
  }
}

cudaError_t run_gla_cumsum(const GlaCumsumParams& p, cudaStream_t stream) {
  if (p.seq.num_slots == 0 || p.seq.heads == 0 || p.k_dim == 0) return cudaSuccess;
  if (p.k_dim % 64 != 0) return cudaErrorInvalidValue;
  gla_cumsum_kernel<<<dim3(p.seq.num_slots, p.seq.heads, p.k_dim / 64), 64, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace linear_attn
