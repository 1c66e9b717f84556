// gla_cumsum: the chunk-local inclusive cumulative sum of GLA's per-key log-gates,
//   b[t, h, d] = g[s, h, d] + g[s + 1, h, d] + ... + g[t, h, d],  s = the first row of t's chunk,
// which every other GLA kernel reads instead of g (gla_gates.cuh). One CTA per (chunk, head,
// 64 keys), one thread per key, summing as gla_gates.cuh's chunk_gate_cumsum does (the one-pass
// forward sums raw gates with it too, to the same bits).
#include "chunk_info.cuh"
#include "gla_gates.cuh"

namespace linear_attn {

__global__ void __launch_bounds__(64) gla_cumsum_kernel(const GlaCumsumParams p) {
  const ChunkCoord cc = locate_chunk(p.seq, blockIdx.x);
  if (!cc.valid) return;
  const int head = blockIdx.y, d = blockIdx.z * 64 + threadIdx.x;
  const int64_t ld = static_cast<int64_t>(p.seq.heads) * p.k_dim;
  const int64_t base = cc.start * ld + static_cast<int64_t>(head) * p.k_dim + d;
  chunk_gate_cumsum([&](int r) { return r < cc.rows ? p.g[base + r * ld] : 0.f; },
                    [&](int r, float b) {
                      if (r < cc.rows) p.out[base + r * ld] = b;
                    });
}

cudaError_t run_gla_cumsum(const GlaCumsumParams& p, cudaStream_t stream) {
  if (p.seq.num_slots == 0 || p.seq.heads == 0 || p.k_dim == 0) return cudaSuccess;
  if (p.k_dim % 64 != 0) return cudaErrorInvalidValue;
  gla_cumsum_kernel<<<dim3(p.seq.num_slots, p.seq.heads, p.k_dim / 64), 64, 0, stream>>>(p);
  return cudaGetLastError();
}

}  // namespace linear_attn
