// Host launcher of the forward kernel for one (dtype, head dim, variant).
#pragma once

#include <cuda_runtime_api.h>

#include "flash.h"
#include "flash_fwd_kernel.h"
#include "kernel_traits.h"

namespace flash {

// Is_dropout defaults to false for the tuning harness (benchmarks/tune/tune_fwd.cu).
template <typename Ktraits, bool Has_alibi, bool Is_softcap, bool Is_dropout = false>
cudaError_t run_flash_fwd(Flash_fwd_params &params, cudaStream_t stream) {
  constexpr int smem_bytes = Ktraits::kSmemBytes;
  const int num_m_blocks = (params.seqlen_q + Ktraits::kBlockM - 1) / Ktraits::kBlockM;
  if (num_m_blocks == 0 || params.b == 0 || params.h == 0) { return cudaSuccess; }
  auto kernel = &flash_fwd_kernel<Ktraits, Has_alibi, Is_softcap, Is_dropout>;
  if (smem_bytes >= 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
    if (err != cudaSuccess) { return err; }
  }
  const dim3 grid(num_m_blocks, params.b, params.h);
  kernel<<<grid, Ktraits::kNThreads, smem_bytes, stream>>>(params);
  return cudaGetLastError();
}

template <typename Element, int kHeadDim, bool Has_alibi, bool Is_softcap, bool Is_dropout>
cudaError_t run_mha_fwd_(Flash_fwd_params &params, cudaStream_t stream) {
  static_assert(!(Is_dropout && Is_softcap), "softcap with dropout is not supported (as in flash-attn)");
  return run_flash_fwd<FwdKernelTraits<kHeadDim, Element>, Has_alibi, Is_softcap, Is_dropout>(params, stream);
}

}  // namespace flash
