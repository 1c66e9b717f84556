// Times the token-by-token recurrence (recurrent.cuh) in its layouts (W columns per CTA, R rows
// per thread) and run_recurrent's pick on one decoding step and a few short and long sequences,
// checks that they agree, and prints the state's GB/s next to bounds: a device-to-device copy of
// the same bytes and copies with the W = 32 layout's addresses and with contiguous blocks.
// (tune_recurrent_6d1eb18_h100.txt: the column-per-thread kernel recurrent.cuh had before, and
// variants with prefetch, minimum CTAs per SM and cache hints; _0c0878d: W = 32 only.)
//
//   nvcc -O3 -std=c++20 --use_fast_math -arch=sm_90a -Icsrc/linear_attn -Icsrc/common \
//        -I$CUTLASS_INC benchmarks/tune/tune_recurrent.cu -o /tmp/tune_recurrent && /tmp/tune_recurrent
#include <cmath>
#include <cstdio>
#include <cstdlib>

#include "recurrent.cuh"
#include "../../benchmarks/tune/tune_common.cuh"

namespace la = linear_attn;

// x in [-1, 1) -> a log-gate in (-0.1, 0]: long sequences stay finite.
__global__ void to_log_gate(float* x, size_t n) {
  for (size_t i = blockIdx.x * size_t(blockDim.x) + threadIdx.x; i < n; i += size_t(gridDim.x) * blockDim.x) {
    x[i] = -0.05f * (x[i] + 1.f);
  }
}

// TUNE_ITERS=1 (for ncu): one warm-up and one timed launch of each kernel
static const int kIters = std::getenv("TUNE_ITERS") ? std::atoi(std::getenv("TUNE_ITERS")) : 50;
static const int kWarmup = kIters > 1 ? 5 : 1;

struct Case {
  int B, T, H, K, V;
  bool gk;  // per-key gates (fused_recurrent_gla) instead of g (fused_recurrent_simple_gla)
};

// Largest |a - b| over n device floats.
static float max_diff(const float* a, const float* b, size_t n) {
  std::vector<float> x(n), y(n);
  CUDA_OK(cudaMemcpy(x.data(), a, n * 4, cudaMemcpyDeviceToHost));
  CUDA_OK(cudaMemcpy(y.data(), b, n * 4, cudaMemcpyDeviceToHost));
  float m = 0.f;
  for (size_t i = 0; i < n; ++i) m = std::fmax(m, std::fabs(x[i] - y[i]));
  return m;
}

// Bounds: the state's read and write alone (no inputs, no arithmetic), (a) with recurrent.cuh's
// thread -> address map at W = 32, R rows per thread, (b) with each CTA of the same size moving one
// contiguous block of the same bytes (a warp's load: 512 contiguous bytes).
template <int K, int R>
__global__ void __launch_bounds__(la::recurrent_threads<K, 32, R>()) copy_state_mapped(const float* src, float* dst,
                                                                                  int heads, int v_dim) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int n = blockIdx.z * 32 + 4 * (lane % 8), k0 = (warp * 4 + lane / 8) * R;
  const int64_t base = (static_cast<int64_t>(blockIdx.x) * heads + blockIdx.y) * K * v_dim;
  float4 s[R];
#pragma unroll
  for (int r = 0; r < R; ++r) s[r] = __ldcs(reinterpret_cast<const float4*>(src + base + int64_t(k0 + r) * v_dim + n));
#pragma unroll
  for (int r = 0; r < R; ++r) __stcs(reinterpret_cast<float4*>(dst + base + int64_t(k0 + r) * v_dim + n), s[r]);
}

template <int K, int R>
__global__ void __launch_bounds__(la::recurrent_threads<K, 32, R>()) copy_state_blocks(const float4* src, float4* dst) {
  constexpr int kThreads = la::recurrent_threads<K, 32, R>();
  const int64_t block = (static_cast<int64_t>(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
  const int64_t base = block * kThreads * R;
  float4 s[R];
#pragma unroll
  for (int r = 0; r < R; ++r) s[r] = __ldcs(src + base + r * kThreads + threadIdx.x);
#pragma unroll
  for (int r = 0; r < R; ++r) __stcs(dst + base + r * kThreads + threadIdx.x, s[r]);
}

template <int K>
static void run_case(const Case& c) {
  using T = cutlass::bfloat16_t;
  const size_t tok = size_t(c.B) * c.T * c.H, state = size_t(c.B) * c.H * K * c.V;
  T* q = random_alloc<T>(tok * K, 1);
  T* k = random_alloc<T>(tok * K, 2);
  T* v = random_alloc<T>(tok * c.V, 3);
  float* gate = random_alloc<float>(tok * (c.gk ? K : 1), 4);
  to_log_gate<<<1024, 256>>>(gate, tok * (c.gk ? K : 1));
  float* init = random_alloc<float>(state, 5);
  T* out = device_alloc<T>(tok * c.V);
  float* fin_ref = device_alloc<float>(state);
  float* fin = device_alloc<float>(state);

  la::RecurrentParams p;
  p.seq.tokens = int64_t(c.B) * c.T;
  p.seq.seqlen = c.T;
  p.seq.num_seqs = c.B;
  p.seq.heads = c.H;
  (c.gk ? p.gk : p.gate.g) = gate;
  p.q = q, p.k = k, p.v = v, p.out = out, p.init = init;
  p.k_dim = K, p.v_dim = c.V, p.scale = 0.1f;
  CUDA_OK(cudaDeviceGetAttribute(&p.num_sms, cudaDevAttrMultiProcessorCount, 0));

  const double gb = 2.0 * state * 4 / 1e9;
  auto report = [&](const char* name, auto&& launch) {
    CUDA_OK(cudaMemset(p.final_state, 0xff, state * 4));
    CUDA_OK(launch());
    CUDA_OK(cudaDeviceSynchronize());
    const float diff = p.final_state == fin ? max_diff(fin, fin_ref, state) : 0.f;
    const float ms = median_ms(launch, kWarmup, kIters);
    std::printf("  %-24s %8.4f ms %7.0f GB/s   max |final - W 32 R 8| %.2e\n", name, ms, gb / (ms * 1e-3), diff);
  };
  std::printf("B %d T %d H %d K %d V %d %s (state %.0f MB read + written)\n", c.B, c.T, c.H, K, c.V,
              c.gk ? "gk" : "g", gb * 500);
  p.final_state = fin_ref;
  report("W 32 R 8", [&] { return la::launch_recurrent<la::Bf16, K, 32, 8>(p, 0); });
  p.final_state = fin;
  report("W 32 R 4", [&] { return la::launch_recurrent<la::Bf16, K, 32, 4>(p, 0); });
  if (c.V % 128 == 0) report("W 128 R 16", [&] { return la::launch_recurrent<la::Bf16, K, 128, 16>(p, 0); });
  report("run_recurrent's pick", [&] { return la::run_recurrent<la::Bf16, K, false>(p, 0); });
  const dim3 grid(c.B, c.H, c.V / 32);
  auto bound = [&](const char* name, auto&& launch) {
    const float ms = median_ms(launch, kWarmup, kIters);
    std::printf("  %-24s %8.4f ms %7.0f GB/s\n", name, ms, gb / (ms * 1e-3));
  };
  bound("bound: mapped copy R 8", [&] {
    copy_state_mapped<K, 8><<<grid, la::recurrent_threads<K, 32, 8>()>>>(init, fin, c.H, c.V);
    return cudaGetLastError();
  });
  bound("bound: block copy R 8", [&] {
    copy_state_blocks<K, 8><<<grid, la::recurrent_threads<K, 32, 8>()>>>(reinterpret_cast<const float4*>(init),
                                                                     reinterpret_cast<float4*>(fin));
    return cudaGetLastError();
  });
  const float copy = median_ms([&] { return cudaMemcpyAsync(fin, init, state * 4, cudaMemcpyDeviceToDevice); },
                               kWarmup, kIters);
  std::printf("  %-24s %8.4f ms %7.0f GB/s\n", "copy of the state", copy, gb / (copy * 1e-3));
  for (void* x : {(void*)q, (void*)k, (void*)v, (void*)gate, (void*)init, (void*)out, (void*)fin_ref, (void*)fin}) {
    CUDA_OK(cudaFree(x));
  }
}

// Arguments: the indices of the cases to run (default all).
int main(int argc, char** argv) {
  const Case cases[] = {{128, 1, 16, 128, 128, false}, {128, 1, 16, 128, 128, true}, {32, 1, 16, 128, 128, false},
                        {8, 1, 16, 128, 128, false},   {128, 4, 16, 128, 128, false}, {32, 16, 16, 128, 128, false},
                        {4, 64, 16, 128, 128, true},   {1, 512, 16, 128, 128, false}, {128, 1, 16, 64, 64, false},
                        {64, 1, 16, 256, 256, false},  {64, 1, 16, 128, 96, true}};
  const int n = sizeof(cases) / sizeof(cases[0]);
  for (int i = 0; i < n; ++i) {
    bool wanted = argc == 1;
    for (int a = 1; a < argc; ++a) wanted |= std::atoi(argv[a]) == i;
    if (!wanted) continue;
    const Case& c = cases[i];
    if (c.K == 64) run_case<64>(c);
    else if (c.K == 128) run_case<128>(c);
    else run_case<256>(c);
  }
  return 0;
}
