// Host launcher of the backward kernels for one (dtype, head dim, variant).
#pragma once

#include <cuda_runtime_api.h>

#include "flash.h"
#include "flash_bwd_kernel.h"
#include "kernel_traits.h"

namespace flash {

template <typename Ktraits, bool Has_alibi, bool Is_softcap>
cudaError_t run_flash_bwd(Flash_bwd_params &params, cudaStream_t stream) {
  constexpr int smem_bytes = Ktraits::kSmemBytes;
  if (params.b == 0 || params.h == 0) { return cudaSuccess; }
  auto dk_dv_kernel = &flash_bwd_dk_dv_kernel<Ktraits, Has_alibi, Is_softcap>;
  auto dq_kernel = &flash_bwd_dq_kernel<Ktraits, Has_alibi, Is_softcap>;
  if (smem_bytes >= 48 * 1024) {
    for (auto kernel : {dk_dv_kernel, dq_kernel}) {
      cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
      if (err != cudaSuccess) { return err; }
    }
  }
  const int num_n_blocks = (params.seqlen_k + Ktraits::kBlockRows - 1) / Ktraits::kBlockRows;
  const int num_m_blocks = (params.seqlen_q + Ktraits::kBlockRows - 1) / Ktraits::kBlockRows;
  if (num_n_blocks > 0) {
    dk_dv_kernel<<<dim3(num_n_blocks, params.b, params.h), Ktraits::kNThreads, smem_bytes, stream>>>(params);
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) { return err; }
  }
  if (num_m_blocks > 0) {
    dq_kernel<<<dim3(num_m_blocks, params.b, params.h), Ktraits::kNThreads, smem_bytes, stream>>>(params);
  }
  return cudaGetLastError();
}

template <typename Element, int kHeadDim, bool Has_alibi, bool Is_softcap>
cudaError_t run_mha_bwd_(Flash_bwd_params &params, cudaStream_t stream) {
  return run_flash_bwd<BwdKernelTraits<kHeadDim, Element>, Has_alibi, Is_softcap>(params, stream);
}

}  // namespace flash
