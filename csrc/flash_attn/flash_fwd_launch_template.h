// Host launcher of the forward kernel for one (dtype, head dim, variant).
#pragma once

#include <cstdint>
#include <cuda_runtime_api.h>

#include "device_info.h"
#include "flash.h"
#include "flash_fwd_combine.h"
#include "flash_fwd_kernel.h"
#include "kernel_traits.h"

namespace flash {

// Launches kernel(params) after the stream's previous kernel, as a programmatic dependent
// launch where the device has it: the kernel may then start while the previous one's last
// CTAs still run and must wait for its results itself (wait_for_prior_grid, in
// flash_fwd_combine.h). Elsewhere an ordinary launch.
template <typename Kernel>
cudaError_t launch_after_prior_grid(Kernel kernel, dim3 grid, dim3 block, cudaStream_t stream,
                                    const Flash_fwd_params &params) {
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = 0;
  cfg.stream = stream;
  cfg.attrs = attr;
  cfg.numAttrs = current_device_has_pdl() ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, params);
}

// Is_dropout defaults to false for the tuning harness (benchmarks/tune/tune_fwd.cu).
// Is_split: the split-KV kernel over heads * num_splits grid slices, then the combine.
// Is_paged: K and V read through params.block_table (paged_kv.h).
template <typename Ktraits, bool Has_alibi, bool Is_softcap, bool Is_dropout = false, bool Is_split = false,
          bool Is_paged = false>
cudaError_t run_flash_fwd(Flash_fwd_params &params, cudaStream_t stream) {
  constexpr int smem_bytes = Ktraits::kSmemBytes;
  const int num_m_blocks = (params.seqlen_q + Ktraits::kBlockM - 1) / Ktraits::kBlockM;
  if (num_m_blocks == 0 || params.b == 0 || params.h == 0) { return cudaSuccess; }
  // gridDim.z is at most 65535; the host (flash_api.cpp) caps num_splits to fit.
  if (Is_split && (params.num_splits < 1 || int64_t(params.h) * params.num_splits > 65535)) {
    return cudaErrorInvalidValue;
  }
  // The paged kernel's preconditions (flash_api.cpp checks them; here they guard the kernel).
  // The key counts come from seqused_k, else (varlen) from cu_seqlens_k (paged_seq_info).
  if (Is_paged && (params.block_table == nullptr || (params.seqused_k == nullptr && params.cu_seqlens_k == nullptr) ||
                   params.max_blocks_per_seq < 1 || params.num_pages < 1 ||
                   params.page_size < 16 || params.page_size % 16 != 0 || params.kv_d < 8 ||
                   params.kv_d % 8 != 0 || params.kv_d > Ktraits::kHeadDim)) {
    return cudaErrorInvalidValue;
  }
  auto kernel = &flash_fwd_kernel<Ktraits, Has_alibi, Is_softcap, Is_dropout, Is_split, Is_paged>;
  if (smem_bytes >= 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
    if (err != cudaSuccess) { return err; }
  }
  const dim3 grid(num_m_blocks, params.b, params.h * (Is_split ? params.num_splits : 1));
  kernel<<<grid, Ktraits::kNThreads, smem_bytes, stream>>>(params);
  // One share writes the output itself (params.oaccum_ptr null): no combine.
  if constexpr (Is_split) {
    if (params.oaccum_ptr == nullptr) { return cudaGetLastError(); }
    cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) { return err; }
    using Element = typename Ktraits::Element;
    // The rows the split kernel wrote: num_m_blocks query tiles (the combine skips rows
    // past each sequence's end).
    constexpr int kRows = combine_rows_per_cta<Ktraits::kHeadDim>();
    const dim3 grid_combine((num_m_blocks * Ktraits::kBlockM + kRows - 1) / kRows, params.b, params.h);
    return launch_after_prior_grid(flash_fwd_combine_kernel<Element, Ktraits::kHeadDim, Ktraits::kBlockM>,
                                   grid_combine, dim3(kCombineThreads), stream, params);
  }
  return cudaGetLastError();
}

template <typename Element, int kHeadDim, bool Has_alibi, bool Is_softcap, bool Is_dropout, bool Is_split,
          bool Is_paged>
cudaError_t run_mha_fwd_(Flash_fwd_params &params, cudaStream_t stream) {
  static_assert(!(Is_dropout && Is_softcap), "softcap with dropout is not supported (as in flash-attn)");
  static_assert(!Is_split || (Has_alibi && Is_softcap && !Is_dropout),
                "the split-KV variant is one kernel with ALiBi and softcap optional at run time, no dropout");
  static_assert(!Is_paged || (Has_alibi && Is_softcap && !Is_dropout),
                "the paged-KV variants have ALiBi and softcap optional at run time, no dropout");
  constexpr FwdTile kTile = Is_split ? fwd_split_tile(kHeadDim) : fwd_tile(kHeadDim);
  return run_flash_fwd<FwdKernelTraits<kHeadDim, Element, kTile>, Has_alibi, Is_softcap, Is_dropout, Is_split,
                       Is_paged>(params, stream);
}

}  // namespace flash
