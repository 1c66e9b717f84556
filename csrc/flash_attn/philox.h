// Philox4x32-10 (Salmon et al., "Parallel random numbers: as easy as 1, 2, 3", SC'11):
// a counter-based generator, 128-bit counter + 64-bit key -> 128 random bits, no state.
// Same function as Random123's philox4x32 with 10 rounds and curand's Philox4_32_10
// (checked against Random123's known-answer vectors by tests/test_dropout_cpu.py through
// the Python twin in flash_attn/reference_dropout.py). Host and device, torch-free.
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>  // uint2, uint4, __host__ / __device__
#include <vector_functions.h>   // make_uint2, make_uint4

namespace flash {

struct Philox {
  static constexpr uint32_t kM0 = 0xD2511F53u, kM1 = 0xCD9E8D57u;  // round multipliers
  static constexpr uint32_t kW0 = 0x9E3779B9u, kW1 = 0xBB67AE85u;  // key schedule (Weyl) increments

  __host__ __device__ __forceinline__ static void mulhilo(uint32_t a, uint32_t b, uint32_t &hi, uint32_t &lo) {
#ifdef __CUDA_ARCH__
    hi = __umulhi(a, b);
    lo = a * b;
#else
    const uint64_t product = uint64_t(a) * uint64_t(b);
    hi = uint32_t(product >> 32);
    lo = uint32_t(product);
#endif
  }

  // One round: two 32x32 -> 64 multiplies, the halves mixed with the other words and the key.
  __host__ __device__ __forceinline__ static uint4 round(uint4 c, uint2 k) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo(kM0, c.x, hi0, lo0);
    mulhilo(kM1, c.z, hi1, lo1);
    return make_uint4(hi1 ^ c.y ^ k.x, lo1, hi0 ^ c.w ^ k.y, lo0);
  }

  // counter (x, y, z, w) and key (x, y) -> four random 32-bit words.
  __host__ __device__ __forceinline__ static uint4 generate(uint4 counter, uint2 key) {
#ifdef __CUDA_ARCH__
    // Hides the key from the optimizer so it recomputes the 9 round keys (2 adds each) in
    // every call instead of keeping 18 of them live across the attention loop, where the
    // forward's registers are all taken (hd128: 160 -> 120 bytes of spill stack, sm90a).
    asm("" : "+r"(key.x), "+r"(key.y));
#pragma unroll
#endif
    for (int r = 0; r < 10; ++r) {
      if (r > 0) {
        key.x += kW0;
        key.y += kW1;
      }
      counter = round(counter, key);
    }
    return counter;
  }
};

}  // namespace flash
