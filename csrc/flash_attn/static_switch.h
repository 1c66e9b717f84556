// Runtime flag -> template parameter, in one place. Each case exists only when its
// slice was compiled (FLASH_ATTN_HAS_* macros set by setup.py), so a trimmed build
// raises a clear error instead of failing to load on an undefined symbol.
#pragma once

#include <stdexcept>
#include <string>
#include <type_traits>

#include <cuda_runtime_api.h>
#include <cutlass/numeric_types.h>

namespace flash {

// Tags passed to the generic lambdas below (C++17: `[&](auto tag) { using T = typename decltype(tag)::type; }`).
template <typename T>
struct TypeTag { using type = T; };
template <int N>
using IntTag = std::integral_constant<int, N>;
template <bool B>
using BoolTag = std::bool_constant<B>;

// Calls fn(TypeTag<Element>{}) for the dtype (is_bf16 selects bf16).
template <typename Fn>
cudaError_t dtype_switch(bool is_bf16, Fn &&fn) {
  if (is_bf16) {
#ifdef FLASH_ATTN_HAS_BF16
    return fn(TypeTag<cutlass::bfloat16_t>{});
#else
    throw std::invalid_argument("flash_attn: bf16 kernels were not compiled (FLASH_ATTN_DTYPES)");
#endif
  }
#ifdef FLASH_ATTN_HAS_FP16
  return fn(TypeTag<cutlass::half_t>{});
#else
  throw std::invalid_argument("flash_attn: fp16 kernels were not compiled (FLASH_ATTN_DTYPES)");
#endif
}

// Calls fn(IntTag<kHeadDim>{}) for a compiled head dim.
template <typename Fn>
cudaError_t headdim_switch(int head_dim, Fn &&fn) {
  switch (head_dim) {
#ifdef FLASH_ATTN_HAS_HDIM32
    case 32: return fn(IntTag<32>{});
#endif
#ifdef FLASH_ATTN_HAS_HDIM64
    case 64: return fn(IntTag<64>{});
#endif
#ifdef FLASH_ATTN_HAS_HDIM96
    case 96: return fn(IntTag<96>{});
#endif
#ifdef FLASH_ATTN_HAS_HDIM128
    case 128: return fn(IntTag<128>{});
#endif
#ifdef FLASH_ATTN_HAS_HDIM192
    case 192: return fn(IntTag<192>{});
#endif
#ifdef FLASH_ATTN_HAS_HDIM256
    case 256: return fn(IntTag<256>{});
#endif
    default:
      throw std::invalid_argument("flash_attn: no kernel compiled for head dim " + std::to_string(head_dim) +
                                  " (FLASH_ATTN_HEADDIMS)");
  }
}

// Calls fn(BoolTag<Has_alibi>{}, BoolTag<Is_softcap>{}) for a compiled variant.
template <typename Fn>
cudaError_t variant_switch(bool has_alibi, bool is_softcap, Fn &&fn) {
#ifndef FLASH_ATTN_HAS_ALIBI
  if (has_alibi) { throw std::invalid_argument("flash_attn: ALiBi kernels were not compiled (FLASH_ATTN_DISABLE_ALIBI)"); }
#endif
#ifndef FLASH_ATTN_HAS_SOFTCAP
  if (is_softcap) { throw std::invalid_argument("flash_attn: softcap kernels were not compiled (FLASH_ATTN_DISABLE_SOFTCAP)"); }
#endif
#if defined(FLASH_ATTN_HAS_ALIBI) && defined(FLASH_ATTN_HAS_SOFTCAP)
  if (has_alibi && is_softcap) { return fn(BoolTag<true>{}, BoolTag<true>{}); }
#endif
#ifdef FLASH_ATTN_HAS_ALIBI
  if (has_alibi) { return fn(BoolTag<true>{}, BoolTag<false>{}); }
#endif
#ifdef FLASH_ATTN_HAS_SOFTCAP
  if (is_softcap) { return fn(BoolTag<false>{}, BoolTag<true>{}); }
#endif
  return fn(BoolTag<false>{}, BoolTag<false>{});
}

// Calls fn(BoolTag<Is_dropout>{}). The dropout kernels are one variant (ALiBi optional at
// run time, no softcap), compiled unless FLASH_ATTN_DISABLE_DROPOUT.
template <typename Fn>
cudaError_t dropout_switch(bool is_dropout, Fn &&fn) {
  if (is_dropout) {
#ifdef FLASH_ATTN_HAS_DROPOUT
    return fn(BoolTag<true>{});
#else
    throw std::invalid_argument("flash_attn: dropout kernels were not compiled (FLASH_ATTN_DISABLE_DROPOUT)");
#endif
  }
  return fn(BoolTag<false>{});
}

// Calls fn(BoolTag<Has_alibi>{}, BoolTag<Is_softcap>{}, BoolTag<Is_dropout>{}) for the
// compiled kernel variant that serves a call: with dropout the one dropout variant (ALiBi
// optional at run time, no softcap), else the ALiBi x softcap variant.
template <typename Fn>
cudaError_t kernel_variant_switch(bool has_alibi, bool is_softcap, bool is_dropout, Fn &&fn) {
  return dropout_switch(is_dropout, [&](auto dropout_tag) {
    if constexpr (decltype(dropout_tag)::value) {
      return fn(BoolTag<true>{}, BoolTag<false>{}, BoolTag<true>{});
    } else {
      return variant_switch(has_alibi, is_softcap,
                            [&](auto alibi_tag, auto softcap_tag) { return fn(alibi_tag, softcap_tag, dropout_tag); });
    }
  });
}

// Calls fn(BoolTag<Has_alibi>{}, BoolTag<Is_softcap>{}, BoolTag<Is_dropout>{}, BoolTag<Is_split>{},
// BoolTag<Is_paged>{}) for a forward: with is_paged the paged variant, split or not (ALiBi and
// softcap optional at run time, no dropout); else with is_split the one split-KV variant (the
// same flags); else kernel_variant_switch's variant. Split and paged kernels exist for head
// dims 64, 128, 256 only, which the caller must check. The host asks for a split only when
// FLASH_ATTN_HAS_SPLITKV.
template <typename Fn>
cudaError_t fwd_variant_switch(bool has_alibi, bool is_softcap, bool is_dropout, bool is_split, bool is_paged,
                               Fn &&fn) {
  if (is_dropout && (is_split || is_paged)) {
    throw std::invalid_argument("flash_attn: split-KV and paged-KV kernels have no dropout");
  }
  if (is_paged) {
#ifdef FLASH_ATTN_HAS_PAGEDKV
    if (is_split) {
#ifdef FLASH_ATTN_HAS_SPLITKV
      return fn(BoolTag<true>{}, BoolTag<true>{}, BoolTag<false>{}, BoolTag<true>{}, BoolTag<true>{});
#else
      throw std::invalid_argument("flash_attn: split-KV kernels were not compiled (FLASH_ATTN_DISABLE_SPLITKV)");
#endif
    }
    return fn(BoolTag<true>{}, BoolTag<true>{}, BoolTag<false>{}, BoolTag<false>{}, BoolTag<true>{});
#else
    throw std::invalid_argument("flash_attn: paged-KV kernels were not compiled (FLASH_ATTN_DISABLE_PAGEDKV)");
#endif
  }
  if (is_split) {
#ifdef FLASH_ATTN_HAS_SPLITKV
    return fn(BoolTag<true>{}, BoolTag<true>{}, BoolTag<false>{}, BoolTag<true>{}, BoolTag<false>{});
#else
    throw std::invalid_argument("flash_attn: split-KV kernels were not compiled (FLASH_ATTN_DISABLE_SPLITKV)");
#endif
  }
  return kernel_variant_switch(has_alibi, is_softcap, is_dropout, [&](auto alibi_tag, auto softcap_tag, auto dropout_tag) {
    return fn(alibi_tag, softcap_tag, dropout_tag, BoolTag<false>{}, BoolTag<false>{});
  });
}

}  // namespace flash
