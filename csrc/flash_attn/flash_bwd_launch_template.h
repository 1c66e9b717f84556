// Host launcher of the backward kernels for one (dtype, head dim, variant).
#pragma once

#include <type_traits>

#include <cuda_runtime_api.h>

#include "device_info.h"
#include "flash.h"
#include "flash_bwd_kernel.h"
#include "flash_bwd_kernel_sm90.h"
#include "flash_bwd_preprocess.h"
#include "kernel_traits.h"

namespace flash {

template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, int smem_bytes) {
  if (smem_bytes < 48 * 1024) { return cudaSuccess; }
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
}

// The dK/dV kernel for (Ktraits, Ktraits90) and the shared memory it needs on the current
// device: one kernel when the two traits agree, else flash_bwd_dk_dv_kernel_by_arch with the
// shared memory of the traits its running code was compiled with (the PTX version of the
// function: a build whose sm90 code came from compute_80 PTX runs the sm80 tile there).
template <typename Ktraits, typename Ktraits90, bool Has_alibi, bool Is_softcap, bool Is_dropout, bool Accum_dq>
cudaError_t dk_dv_kernel_for_device(void (**kernel)(const Flash_bwd_params), int *smem_bytes) {
  if constexpr (std::is_same_v<Ktraits, Ktraits90>) {
    *kernel = &flash_bwd_dk_dv_kernel<Ktraits, Has_alibi, Is_softcap, Is_dropout, Accum_dq>;
    *smem_bytes = Ktraits::kSmemBytesDkDv;
    return cudaSuccess;
  } else {
    *kernel = &flash_bwd_dk_dv_kernel_by_arch<Ktraits, Ktraits90, Has_alibi, Is_softcap, Is_dropout, Accum_dq>;
    cudaFuncAttributes attr{};
    const cudaError_t err = cudaFuncGetAttributes(&attr, *kernel);
    if (err != cudaSuccess) { return err; }
    *smem_bytes = attr.ptxVersion >= 90 ? Ktraits90::kSmemBytesDkDv : Ktraits::kSmemBytesDkDv;
    return cudaSuccess;
  }
}

// Whether a wgmma backward kernel (flash_bwd_kernel_sm90.h) runs for this call: the device
// executes the kernel's sm90 code (PTX version 90: setup.py builds sm90 as sm_90a, the only code
// with its body), and, in a build with FLASH_ATTN_SM90_MMA_SYNC_BWD (the mma.sync kernels kept in
// sm90 code), FLASH_ATTN_BWD_SM90 is not "0" (which runs those instead, for A/B timings and for
// testing them on sm90).
// Builds other than setup.py's (benchmarks/tune's harnesses: plain sm_90 code, mma.sync tiles)
// lack FLASH_ATTN_HAS_SM90A and so never take the wgmma kernels (runs_sm90a_code).
template <typename Kernel>
bool sm90_bwd_runs(Kernel kernel) {
  return !wgmma_bwd_switched_off() && runs_sm90a_code(kernel);
}

// The wgmma dK/dV kernel (with atomic dQ when Accum_dq); false if it does not run here.
template <typename Element, int kHeadDim, bool Has_alibi, bool Is_softcap, bool Is_dropout, bool Accum_dq>
bool launch_dk_dv_sm90(Flash_bwd_params &params, cudaStream_t stream, cudaError_t &err) {
  if constexpr (Accum_dq && !bwd_atomic_dq_sm90(kHeadDim)) {
    return false;
  } else {
    using Traits = BwdSm90Traits<kHeadDim, Element>;
    auto kernel = &flash_bwd_dk_dv_kernel_sm90<Traits, Has_alibi, Is_softcap, Is_dropout, Accum_dq>;
    if (!sm90_bwd_runs(kernel)) { return false; }
    last_dk_dv_kernel = 90;
    if ((err = allow_smem(kernel, Traits::kSmemBytes)) != cudaSuccess) { return true; }
    const int num_n_blocks = (params.seqlen_k + Traits::kBlockN - 1) / Traits::kBlockN;
    if (num_n_blocks > 0) {
      kernel<<<dim3(num_n_blocks, params.b, params.h), Traits::kNThreads, Traits::kSmemBytes, stream>>>(params);
    }
    err = cudaGetLastError();
    return true;
  }
}

// The deterministic path's wgmma dQ kernel; false if it does not run here.
template <typename Element, int kHeadDim, bool Has_alibi, bool Is_softcap, bool Is_dropout>
bool launch_dq_sm90(Flash_bwd_params &params, cudaStream_t stream, cudaError_t &err) {
  using Traits = BwdSm90DqTraits<kHeadDim, Element>;
  auto kernel = &flash_bwd_dq_kernel_sm90<Traits, Has_alibi, Is_softcap, Is_dropout>;
  if (!sm90_bwd_runs(kernel)) { return false; }
  if ((err = allow_smem(kernel, Traits::kSmemBytes)) != cudaSuccess) { return true; }
  const int num_m_blocks = (params.seqlen_q + Traits::kBlockM - 1) / Traits::kBlockM;
  kernel<<<dim3(num_m_blocks, params.b, params.h), Traits::kNThreads, Traits::kSmemBytes, stream>>>(params);
  err = cudaGetLastError();
  return true;
}

// D = rowsum(dO * O) first; then either the dK/dV kernel with atomic dQ accumulation
// (params.dq_accum_ptr set, head dims with bwd_atomic_dq: the host converts the accumulator
// to dq afterwards) or the deterministic pair, dK/dV then dQ. Each is the wgmma kernel where it
// runs (sm90_bwd_runs), else the mma.sync one: Ktraits90 is then the dK/dV tile where the code
// runs as sm90 (bwd_tile_sm90); the mma.sync dQ kernel and grids follow Ktraits.
template <typename Ktraits, bool Has_alibi, bool Is_softcap, bool Is_dropout = false, typename Ktraits90 = Ktraits>
cudaError_t run_flash_bwd(Flash_bwd_params &params, cudaStream_t stream) {
  if (params.b == 0 || params.h == 0 || params.seqlen_q == 0) { return cudaSuccess; }
  last_dk_dv_kernel = 80;  // until launch_dk_dv_sm90 takes over
  using Element = typename Ktraits::Element;
  constexpr int kHeadDim = Ktraits::kHeadDim;
  // A head dim without the atomic kernel (tile_size.h bwd_atomic_dq) always runs the pair.
  if (!bwd_atomic_dq(kHeadDim) && params.dq_accum_ptr != nullptr) { return cudaErrorInvalidValue; }
  constexpr int kDotRows = dot_rows_per_cta<kHeadDim>();
  flash_bwd_dot_do_o_kernel<Element, kHeadDim>
      <<<dim3((params.seqlen_q + kDotRows - 1) / kDotRows, params.b, params.h), kDotThreads, 0, stream>>>(params);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) { return err; }

  const int num_n_blocks = (params.seqlen_k + Ktraits::kBlockRows - 1) / Ktraits::kBlockRows;
  const int num_m_blocks = (params.seqlen_q + Ktraits::kBlockRows - 1) / Ktraits::kBlockRows;
  void (*dk_dv_kernel)(const Flash_bwd_params) = nullptr;
  int smem_bytes_dk_dv = 0;
  if constexpr (bwd_atomic_dq(kHeadDim)) {
    if (params.dq_accum_ptr != nullptr) {
      if (launch_dk_dv_sm90<Element, kHeadDim, Has_alibi, Is_softcap, Is_dropout, true>(params, stream, err)) {
        return err;
      }
      err = dk_dv_kernel_for_device<Ktraits, Ktraits90, Has_alibi, Is_softcap, Is_dropout, true>(&dk_dv_kernel,
                                                                                                  &smem_bytes_dk_dv);
      if (err != cudaSuccess || (err = allow_smem(dk_dv_kernel, smem_bytes_dk_dv)) != cudaSuccess) { return err; }
      if (num_n_blocks > 0) {
        dk_dv_kernel<<<dim3(num_n_blocks, params.b, params.h), Ktraits::kNThreads, smem_bytes_dk_dv, stream>>>(params);
      }
      return cudaGetLastError();
    }
  }
  // The pair: dK/dV without dQ, then dQ; each the wgmma kernel where it runs, else mma.sync.
  if (!launch_dk_dv_sm90<Element, kHeadDim, Has_alibi, Is_softcap, Is_dropout, false>(params, stream, err)) {
    err = dk_dv_kernel_for_device<Ktraits, Ktraits90, Has_alibi, Is_softcap, Is_dropout, false>(&dk_dv_kernel,
                                                                                                 &smem_bytes_dk_dv);
    if (err == cudaSuccess) { err = allow_smem(dk_dv_kernel, smem_bytes_dk_dv); }
    if (err == cudaSuccess && num_n_blocks > 0) {
      dk_dv_kernel<<<dim3(num_n_blocks, params.b, params.h), Ktraits::kNThreads, smem_bytes_dk_dv, stream>>>(params);
      err = cudaGetLastError();
    }
  }
  if (err != cudaSuccess) { return err; }
  if (launch_dq_sm90<Element, kHeadDim, Has_alibi, Is_softcap, Is_dropout>(params, stream, err)) { return err; }
  // The dQ kernel's traits: Ktraits itself unless its tile has fewer than 16 query rows
  // per warp (d = 256), which runs the dQ kernel with fewer warps and a shorter key step
  // (bwd_dq_tile in tile_size.h).
  using DqTraits = BwdKernelTraits<kHeadDim, Element, bwd_dq_tile(Ktraits::kTile)>;
  static_assert(DqTraits::kBlockRows == Ktraits::kBlockRows);
  auto dq_kernel = &flash_bwd_dq_kernel<DqTraits, Has_alibi, Is_softcap, Is_dropout>;
  constexpr int smem_bytes = DqTraits::kSmemBytes;
  if ((err = allow_smem(dq_kernel, smem_bytes)) != cudaSuccess) { return err; }
  if (num_m_blocks > 0) {
    dq_kernel<<<dim3(num_m_blocks, params.b, params.h), DqTraits::kNThreads, smem_bytes, stream>>>(params);
  }
  return cudaGetLastError();
}

template <typename Element, int kHeadDim, bool Has_alibi, bool Is_softcap, bool Is_dropout>
cudaError_t run_mha_bwd_(Flash_bwd_params &params, cudaStream_t stream) {
  return run_flash_bwd<BwdKernelTraits<kHeadDim, Element>, Has_alibi, Is_softcap, Is_dropout,
                       BwdKernelTraits<kHeadDim, Element, bwd_tile_sm90(kHeadDim)>>(params, stream);
}

}  // namespace flash
