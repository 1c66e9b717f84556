// The only file that includes torch: argument checks, allocation, params, dispatch.
// Python (flash_attn/flash_attn_interface.py) checks arguments first with friendlier
// messages; these checks are the last line of defence for direct callers.
#include <ATen/cuda/CUDAGeneratorImpl.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "arg_error.h"

#include <algorithm>
#include <cmath>
#include <mutex>
#include <optional>

#include "device_info.h"
#include "flash.h"
#include "static_switch.h"
#include "tile_size.h"

namespace {

using flash::Flash_fwd_params;

#define CHECK_ARG(cond, ...) ARG_ERROR_CHECK("flash_attn: ", cond, __VA_ARGS__)

void check_qkv(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, int rank) {
  const auto dtype = q.scalar_type();
  CHECK_ARG(dtype == at::kHalf || dtype == at::kBFloat16, "q must be float16 or bfloat16, got ", dtype);
  CHECK_ARG(k.scalar_type() == dtype, "k must have q's dtype ", dtype, ", got ", k.scalar_type());
  CHECK_ARG(v.scalar_type() == dtype, "v must have q's dtype ", dtype, ", got ", v.scalar_type());
  for (const auto *t : {&q, &k, &v}) {
    CHECK_ARG(t->is_cuda(), "q, k, v must be CUDA tensors");
    CHECK_ARG(t->device() == q.device(), "q, k, v must be on one device");
    CHECK_ARG(t->dim() == rank, "q, k, v must have ", rank, " dims, got ", t->dim());
    CHECK_ARG(t->stride(-1) == 1, "q, k, v must be contiguous in the last dim (stride(-1) == 1)");
  }
}

// cp.async moves 16-byte vectors: pointers and all strides (in elements) must allow it.
bool is_vector_aligned(const at::Tensor &t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) { return false; }
  for (int i = 0; i < t.dim() - 1; ++i) {
    if (t.size(i) > 1 && t.stride(i) % 8 != 0) { return false; }
  }
  return true;
}

at::Tensor vector_aligned(const at::Tensor &t) {
  return is_vector_aligned(t) ? t : t.clone(at::MemoryFormat::Contiguous);
}

// Strides of a (b, s, h, d) or varlen (total, h, d) tensor: row and head are the two
// dims before the last in both layouts; the batch stride exists only for the first.
void set_strides(const at::Tensor &t, int64_t &batch_stride, int64_t &row_stride, int64_t &head_stride) {
  const int rank = t.dim();
  row_stride = t.stride(rank - 3);
  head_stride = t.stride(rank - 2);
  batch_stride = rank == 4 ? t.stride(0) : 0;
}

void set_common_params(Flash_fwd_params &p, const at::Tensor &q, const at::Tensor &k, const at::Tensor &v,
                       const at::Tensor &out, const at::Tensor &lse, const std::optional<at::Tensor> &alibi_slopes,
                       int batch, float softmax_scale, int window_left, int window_right, float softcap) {
  p = {};
  p.q_ptr = q.data_ptr();
  p.k_ptr = k.data_ptr();
  p.v_ptr = v.data_ptr();
  p.o_ptr = out.data_ptr();
  p.softmax_lse_ptr = lse.data_ptr<float>();
  set_strides(q, p.q_batch_stride, p.q_row_stride, p.q_head_stride);
  set_strides(k, p.k_batch_stride, p.k_row_stride, p.k_head_stride);
  set_strides(v, p.v_batch_stride, p.v_row_stride, p.v_head_stride);
  set_strides(out, p.o_batch_stride, p.o_row_stride, p.o_head_stride);
  p.b = batch;
  p.h = q.size(-2);
  p.h_k = k.size(-2);
  p.h_h_k_ratio = p.h / p.h_k;
  p.d = q.size(-1);
  p.is_bf16 = q.scalar_type() == at::kBFloat16;

  CHECK_ARG(softcap >= 0.f, "softcap must be >= 0, got ", softcap);
  if (softcap > 0.f) {
    p.softcap_prescale = softmax_scale / softcap;
    p.scale_softmax = softcap;
  } else {
    p.softcap_prescale = 0.f;
    p.scale_softmax = softmax_scale;
  }
  p.scale_softmax_log2 = p.scale_softmax * float(M_LOG2E);
  CHECK_ARG(window_left >= -1 && window_right >= -1, "window_size entries must be >= -1, got (", window_left,
            ", ", window_right, ")");
  p.window_size_left = window_left;
  p.window_size_right = window_right;

  if (alibi_slopes.has_value()) {
    const auto &a = *alibi_slopes;
    CHECK_ARG(a.scalar_type() == at::kFloat, "alibi_slopes must be float32, got ", a.scalar_type());
    CHECK_ARG(a.device() == q.device(), "alibi_slopes must be on q's device");
    CHECK_ARG(a.stride(-1) == 1, "alibi_slopes must be contiguous in the last dim");
    const bool per_head = a.dim() == 1 && a.size(0) == p.h;
    const bool per_batch = a.dim() == 2 && a.size(0) == batch && a.size(1) == p.h;
    CHECK_ARG(per_head || per_batch, "alibi_slopes must have shape (nheads,) or (batch, nheads) = (", batch,
              ", ", p.h, "), got ", a.sizes());
    p.alibi_slopes_ptr = a.data_ptr<float>();
    p.alibi_slopes_batch_stride = per_batch ? a.stride(0) : 0;
  }
}

// --- dropout (mask: dropout.h; the backward reads the same fields) ---

// p_keep, rp_keep and the 8-bit keep threshold for dropout_p (p_keep = 1: no dropout).
void set_dropout_params(Flash_fwd_params &p, double p_dropout) {
  CHECK_ARG(p_dropout >= 0.0 && p_dropout < 1.0, "dropout_p must be in [0, 1), got ", p_dropout);
  p.p_keep = float(1.0 - p_dropout);
  p.rp_keep = 1.f / p.p_keep;
  // An element is kept iff its random byte is below the threshold: keep rate threshold / 256.
  p.keep_threshold = uint32_t(std::min(255.0, std::floor((1.0 - p_dropout) * 256.0)));
}

// This call's Philox seed and offset, from gen or the device's default CUDA generator, whose
// offset advances by b * h: the mask uses subsequences [offset, offset + b * h) (dropout.h),
// so the next call's are disjoint (torch rounds the increment up to a multiple of 4). Under
// CUDA-graph capture torch hands out device pointers that each replay refreshes.
void set_philox_from_generator(Flash_fwd_params &p, const std::optional<at::Generator> &gen_, c10::Device device) {
  auto *gen = at::get_generator_or_default<at::CUDAGeneratorImpl>(
      gen_, at::cuda::detail::getDefaultCUDAGenerator(device.index()));
  at::PhiloxCudaState state;
  {
    std::lock_guard<std::mutex> lock(gen->mutex_);  // torch's rule for using a generator
    state = gen->philox_cuda_state(uint64_t(p.b) * uint64_t(p.h));
  }
  p.philox.from_device = state.captured_;
  if (state.captured_) {
    p.philox.seed_ptr = state.seed_.ptr;
    p.philox.offset_ptr = state.offset_.ptr;
    p.philox.offset_intragraph = state.offset_intragraph_;
  } else {
    p.philox.seed = state.seed_.val;
    p.philox.offset = state.offset_.val;
  }
}

// The backward's Philox state: the forward's (seed, offset), read by the kernel from rng_state.
void set_philox_from_rng_state(Flash_fwd_params &p, const std::optional<at::Tensor> &rng_state,
                               const at::Tensor &q) {
  CHECK_ARG(rng_state.has_value(), "rng_state (returned by the forward) is required with dropout_p > 0");
  const auto &r = *rng_state;
  CHECK_ARG(r.scalar_type() == at::kLong && r.numel() == 2 && r.is_contiguous() && r.device() == q.device(),
            "rng_state must be a contiguous int64 tensor of 2 elements on q's device, got ", r.scalar_type(), " ",
            r.sizes(), " on ", r.device());
  p.philox.from_device = true;
  p.philox.seed_ptr = r.data_ptr<int64_t>();
  p.philox.offset_ptr = p.philox.seed_ptr + 1;
  p.philox.offset_intragraph = 0;
}

// The backward's dropout fields: dropout_p and, with dropout, the forward's rng_state.
void set_bwd_dropout(Flash_fwd_params &p, double p_dropout, const std::optional<at::Tensor> &rng_state,
                     const at::Tensor &q) {
  set_dropout_params(p, p_dropout);
  if (p_dropout > 0.0) { set_philox_from_rng_state(p, rng_state, q); }
  p.rng_state = nullptr;  // only the forward writes it
}

struct DropoutOutputs {
  at::Tensor s_dmask;    // (b, h, round128(sq), round128(sk)) zeros in q's dtype, or undefined
  at::Tensor rng_state;  // int64 (2,): (seed, offset) written by the kernel; (0,) without dropout
};

int64_t round_up_128(int64_t x) { return (x + 127) / 128 * 128; }

// The forward's dropout arguments, checked before anything runs.
void check_dropout_args(double p_dropout, bool return_softmax, double softcap) {
  CHECK_ARG(p_dropout >= 0.0 && p_dropout < 1.0, "dropout_p must be in [0, 1), got ", p_dropout);
  CHECK_ARG(!return_softmax || p_dropout > 0.0, "return_softmax needs dropout_p > 0 (S_dmask is None without dropout)");
  TORCH_CHECK_NOT_IMPLEMENTED(!(softcap > 0.0 && p_dropout > 0.0),
                              "flash_attn: softcap with dropout is not supported (as in flash-attn)");
}

DropoutOutputs dropout_outputs(const at::Tensor &q, double p_dropout, bool return_softmax, int64_t b, int64_t h,
                               int64_t sq, int64_t sk) {
  DropoutOutputs o;
  o.rng_state = at::empty({p_dropout > 0.0 ? 2 : 0}, q.options().dtype(at::kLong));
  if (return_softmax) { o.s_dmask = at::zeros({b, h, round_up_128(sq), round_up_128(sk)}, q.options()); }
  return o;
}

// Dropout fields of a forward that runs the kernel: philox from the generator, outputs.
void set_fwd_dropout(Flash_fwd_params &p, double p_dropout, const std::optional<at::Generator> &gen,
                     DropoutOutputs &o, const at::Tensor &q) {
  set_dropout_params(p, p_dropout);
  if (p_dropout == 0.0) { return; }
  set_philox_from_generator(p, gen, q.device());
  p.rng_state = o.rng_state.data_ptr<int64_t>();
  if (o.s_dmask.defined()) {
    p.s_dmask_ptr = o.s_dmask.data_ptr();
    p.s_dmask_batch_stride = o.s_dmask.stride(0);
    p.s_dmask_head_stride = o.s_dmask.stride(1);
    p.s_dmask_row_stride = o.s_dmask.stride(2);
    p.s_dmask_rows = o.s_dmask.size(2);
    p.s_dmask_cols = o.s_dmask.size(3);
  }
}

void run_fwd(Flash_fwd_params &p, bool is_dropout, cudaStream_t stream) {
  TORCH_CHECK_NOT_IMPLEMENTED(!(is_dropout && p.softcap_prescale > 0.f),
                              "flash_attn: softcap with dropout is not supported (as in flash-attn)");
  // The switches throw std::invalid_argument (Python ValueError) for a value with no kernel.
  const cudaError_t err = flash::dtype_switch(p.is_bf16, [&](auto dtype_tag) {
    using Element = typename decltype(dtype_tag)::type;
    return flash::headdim_switch(p.d, [&](auto hdim_tag) {
      constexpr int kHeadDim = decltype(hdim_tag)::value;
      const bool has_alibi = p.alibi_slopes_ptr != nullptr, is_softcap = p.softcap_prescale > 0.f;
      const bool is_split = p.num_splits >= 1, is_paged = p.block_table != nullptr;
      return flash::fwd_variant_switch(has_alibi, is_softcap, is_dropout, is_split, is_paged,
                                       [&](auto alibi, auto cap, auto drop, auto split, auto paged) {
        constexpr bool kSplit = decltype(split)::value, kPaged = decltype(paged)::value;
        if constexpr ((kSplit || kPaged) && !(kHeadDim == 64 || kHeadDim == 128 || kHeadDim == 256)) {
          // choose_num_splits never splits at these head dims; check_paged_qkv refuses them
          return cudaErrorNotSupported;
        } else {
          return flash::run_mha_fwd_<Element, kHeadDim, decltype(alibi)::value, decltype(cap)::value,
                                     decltype(drop)::value, kSplit, kPaged>(p, stream);
        }
      });
    });
  });
  TORCH_CHECK(err == cudaSuccess, "flash_attn forward kernel launch failed: ", cudaGetErrorString(err));
}

// --- split-KV (flash_attn_with_kvcache's num_splits; kernels: split_kv.h, flash_fwd_combine.h) ---

// The SM count of a device (cached: device_info.h).
int sm_count(int device_index) {
  const int n = flash::cached_device_attribute<cudaDevAttrMultiProcessorCount>(device_index);
  TORCH_CHECK(n > 0, "flash_attn: could not query the SM count of CUDA device ", arg_error::printable(device_index));
  return n;
}

// Whether and how the split-KV kernel runs a forward whose other fields p already holds (b,
// h, d, seqlen_q, seqlen_k: varlen's max_seqlen_q, max_seqlen_k). Returns 0 for the
// unsplit kernel, n >= 1 for the split kernel with n key-block shares. requested 1 = no
// split; n > 1 = n capped by the keys and the grid; 0 = heuristic (tile_size.h), and then
// also the split kernel with one share when the queries fit its small tile: a decode step
// reads the cache with fewer wasted MMA rows that way (fwd_split_tile). Host values only
// (no device read, so CUDA-graph capture works). Split-KV is a performance hint: where it
// has no kernel (dropout, S_dmask, head dims other than 64/128/256, a build without
// split-KV), the call runs unsplit with the same result.
int choose_num_splits(int64_t requested, const Flash_fwd_params &p, bool is_dropout, bool return_softmax,
                      c10::Device device) {
  CHECK_ARG(requested >= 0, "num_splits must be >= 0 (0 = chosen from the lengths, 1 = no split), got ",
            requested);
#ifndef FLASH_ATTN_HAS_SPLITKV
  return 0;
#endif
  if (requested == 1 || is_dropout || return_softmax || !(p.d == 64 || p.d == 128 || p.d == 256)) { return 0; }
  const flash::FwdTile tile = flash::fwd_split_tile(p.d);
  const int n_blocks = (p.seqlen_k + tile.block_n - 1) / tile.block_n;
  if (requested > 1) { return flash::clamp_num_splits(requested, n_blocks, p.h); }
  const int num_sms = sm_count(device.index());
  // The heuristic counts the prefill tile's CTAs: a grid that would fill the GPU unsplit
  // is not split, and then only a short query block takes the split kernel.
  const flash::FwdTile prefill = flash::fwd_tile(p.d);
  const int64_t m_blocks = (p.seqlen_q + prefill.block_m - 1) / prefill.block_m;
  int splits;
  if (p.block_table != nullptr) {
    const int smem_per_sm =
        flash::cached_device_attribute<cudaDevAttrMaxSharedMemoryPerMultiprocessor>(device.index());
    const int64_t slots = int64_t(num_sms) * flash::fwd_ctas_per_sm(tile, p.d, smem_per_sm > 0 ? smem_per_sm : 0);
    splits = flash::num_splits_heuristic_paged(m_blocks * p.b * p.h, slots, n_blocks, p.h);
  } else {
    splits = flash::num_splits_heuristic(m_blocks * p.b * p.h, num_sms, n_blocks, p.h);
  }
  return splits > 1 || p.seqlen_q <= tile.block_m ? splits : 0;
}

// Output buffer: the caller's `out` when it can be written directly, else a fresh one
// (copied back into `out` after the kernel).
at::Tensor output_buffer(const std::optional<at::Tensor> &out_, const at::Tensor &q) {
  if (!out_.has_value()) { return at::empty_like(q, q.options().memory_format(at::MemoryFormat::Contiguous)); }
  const auto &out = *out_;
  CHECK_ARG(out.scalar_type() == q.scalar_type(), "out must have q's dtype");
  CHECK_ARG(out.device() == q.device(), "out must be on q's device");
  CHECK_ARG(out.sizes() == q.sizes(), "out must have q's shape ", q.sizes(), ", got ", out.sizes());
  CHECK_ARG(out.stride(-1) == 1, "out must be contiguous in the last dim");
  return is_vector_aligned(out) ? out : at::empty_like(q, q.options().memory_format(at::MemoryFormat::Contiguous));
}

void check_heads(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v) {
  const int h = q.size(-2), h_k = k.size(-2), d = q.size(-1);
  CHECK_ARG(h_k > 0 && h % h_k == 0, "nheads (", h, ") must be divisible by nheads_k (", h_k, ")");
  CHECK_ARG(v.size(-2) == h_k, "v must have ", h_k, " heads like k, got ", v.size(-2));
  CHECK_ARG(k.size(-1) == d && v.size(-1) == d, "q, k, v must share the head dim ", d);
  CHECK_ARG(d % 8 == 0 && d <= 256, "head dim must be a multiple of 8 and <= 256 (pad in Python), got ", d);
}

// Split-KV partials of a forward whose other fields p holds (total_q included), for
// choose_num_splits(requested, ...): [num_splits, h, total_q, d] and [num_splits, h, total_q] fp32,
// returned so that they live until the launch (undefined with fewer than two shares). Empty is enough: every
// split CTA writes all rows of its query block, and the combine reads only those. Freed on
// return; the caching allocator orders reuse after the kernels.
std::pair<at::Tensor, at::Tensor> set_split_params(Flash_fwd_params &p, int64_t requested, bool is_dropout,
                                                   bool return_softmax, const at::Tensor &q) {
  p.num_splits = choose_num_splits(requested, p, is_dropout, return_softmax, q.device());
  // The split kernel runs iff num_splits >= 1 (run_fwd); with one share it writes the output
  // itself (no partials, no combine: oaccum_ptr stays null).
  if (p.num_splits <= 1) { return {}; }
  at::Tensor oaccum = at::empty({p.num_splits, p.h, p.total_q, p.d}, q.options().dtype(at::kFloat));
  at::Tensor lseaccum = at::empty({p.num_splits, p.h, p.total_q}, q.options().dtype(at::kFloat));
  p.oaccum_ptr = oaccum.data_ptr<float>();
  p.lseaccum_ptr = lseaccum.data_ptr<float>();
  return {oaccum, lseaccum};
}

// seqused_k: int32 (b) or None: the keys each sequence uses. Only the shape is checked (no
// device read); the kernels clamp each value into the sequence's key range (block_info.h,
// paged_kv.h), so any value is safe.
void check_seqused_k(const std::optional<at::Tensor> &seqused_k, const at::Tensor &q, int b) {
  if (!seqused_k.has_value()) { return; }
  const auto &s = *seqused_k;
  CHECK_ARG(s.scalar_type() == at::kInt, "seqused_k must be int32, got ", s.scalar_type());
  CHECK_ARG(s.device() == q.device(), "seqused_k must be on q's device");
  CHECK_ARG(s.dim() == 1 && s.numel() == b && s.is_contiguous(), "seqused_k must be a contiguous (batch,) = (", b,
            ",) tensor, got ", s.sizes());
}

// --- paged KV (fwd's and varlen_fwd's block_table; the kernel side is paged_kv.h) ---

// q (total_q, h, d) for varlen_fwd or (b, sq, h, d) for fwd (q_rank 3 or 4), d a paged kernel's
// head dim; k_cache, v_cache (num_pages, page_size, h_k, kv_d) with kv_d <= d: the kernel reads
// the caches' rows and zero-fills columns [kv_d, d), so a head dim without a paged kernel needs
// q padded (cheap), not the caches.
void check_paged_qkv(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, int q_rank) {
  const auto dtype = q.scalar_type();
  CHECK_ARG(dtype == at::kHalf || dtype == at::kBFloat16, "q must be float16 or bfloat16, got ", dtype);
  CHECK_ARG(k.scalar_type() == dtype && v.scalar_type() == dtype, "k_cache and v_cache must have q's dtype ", dtype,
            ", got ", k.scalar_type(), " and ", v.scalar_type());
  CHECK_ARG(q.dim() == q_rank, "q must be ",
            q_rank == 3 ? "(total_q, nheads, headdim)" : "(batch, seqlen_q, nheads, headdim)",
            " with block_table, got ", q.dim(), " dims");
  CHECK_ARG(k.dim() == 4 && k.sizes() == v.sizes(),
            "k_cache and v_cache must both be (num_pages, page_size, nheads_k, headdim) with block_table, got ",
            k.sizes(), " and ", v.sizes());
  for (const auto *t : {&q, &k, &v}) {
    CHECK_ARG(t->is_cuda() && t->device() == q.device(), "q, k_cache and v_cache must be CUDA tensors on one device");
    CHECK_ARG(t->stride(-1) == 1, "q, k_cache and v_cache must be contiguous in the last dim (stride(-1) == 1)");
  }
  const int h = q.size(-2), d = q.size(-1), h_k = k.size(2), kv_d = k.size(3);
  CHECK_ARG(h_k > 0 && h % h_k == 0, "nheads (", h, ") must be divisible by nheads_k (", h_k, ")");
  CHECK_ARG(d == 64 || d == 128 || d == 256,
            "paged-KV kernels exist for head dims 64, 128 and 256 (pad q in Python), got ", d);
  CHECK_ARG(kv_d > 0 && kv_d % 8 == 0 && kv_d <= d, "the caches' head dim (k_cache.size(3)) must be a multiple of 8 "
            "and <= q's head dim ", d, ", got ", kv_d);
  CHECK_ARG(k.size(0) > 0, "k_cache must have at least one page (k_cache.size(0) = num_pages), got 0");
  CHECK_ARG(k.size(1) > 0 && k.size(1) % 16 == 0, "page_size (k_cache.size(1)) must be a positive multiple of 16, got ",
            k.size(1));
  CHECK_ARG(k.size(0) < (int64_t(1) << 31), "num_pages must fit in int32, got ", k.size(0));
}

// block_table: int32 (b, max_blocks_per_seq); leftpad_k: int32 (b) or None. Only shapes are
// checked (no device read); the kernel clamps every value it reads.
void check_paged_tables(const at::Tensor &q, const at::Tensor &k, const at::Tensor &block_table,
                        const std::optional<at::Tensor> &leftpad_k, int b) {
  const auto &t = block_table;
  CHECK_ARG(t.scalar_type() == at::kInt, "block_table must be int32, got ", t.scalar_type());
  CHECK_ARG(t.device() == q.device(), "block_table must be on q's device");
  CHECK_ARG(t.dim() == 2 && t.size(0) == b, "block_table must be (batch, max_blocks_per_seq) with batch = ", b,
            ", got ", t.sizes());
  CHECK_ARG(t.stride(1) == 1 || t.size(1) <= 1, "block_table must be contiguous in the last dim");
  CHECK_ARG(t.size(1) * k.size(1) < (int64_t(1) << 31),
            "max_blocks_per_seq * page_size (a sequence's capacity) must fit in int32, got ", t.size(1), " * ",
            k.size(1));
  if (leftpad_k.has_value()) {
    const auto &l = *leftpad_k;
    CHECK_ARG(l.scalar_type() == at::kInt && l.device() == q.device() && l.dim() == 1 && l.numel() == b &&
                  l.is_contiguous(),
              "leftpad_k must be a contiguous int32 (batch,) tensor on q's device, got ", l.scalar_type(), " ",
              l.sizes());
  }
}

// The paged fields of p (arguments checked by check_paged_qkv and check_paged_tables).
void set_paged_params(Flash_fwd_params &p, const at::Tensor &k, const at::Tensor &block_table,
                      const std::optional<at::Tensor> &leftpad_k) {
  p.block_table = block_table.data_ptr<int>();
  p.block_table_batch_stride = block_table.stride(0);
  p.max_blocks_per_seq = block_table.size(1);
  p.page_size = k.size(1);
  p.num_pages = k.size(0);
  p.kv_d = k.size(3);
  p.leftpad_k = leftpad_k.has_value() ? leftpad_k->data_ptr<int>() : nullptr;
  p.total_k = 0;  // no packed key rows: paged_seq_info takes the key counts
}

// The argument checks shared by fwd and varlen_fwd with block_table (q_rank 4 or 3), or without
// it (then leftpad_k must be None).
void check_qkv_or_paged(const at::Tensor &q, const at::Tensor &k, const at::Tensor &v, int q_rank, bool paged,
                        double p_dropout, const std::optional<at::Tensor> &leftpad_k) {
  if (paged) {
    check_paged_qkv(q, k, v, q_rank);
    // (the value goes through arg_error::printable: no double may reach an ostream, see arg_error.h)
    TORCH_CHECK_NOT_IMPLEMENTED(p_dropout == 0.0, "flash_attn: paged KV (block_table) has no dropout on CUDA, got "
                                "dropout_p = ", arg_error::printable(p_dropout));
  } else {
    CHECK_ARG(!leftpad_k.has_value(), "leftpad_k needs block_table");
    check_qkv(q, k, v, q_rank);
    check_heads(q, k, v);
  }
}

// q: (b, sq, h, d); k, v: (b, sk, h_k, d). Returns {out (b, sq, h, d), lse fp32 (b, h, sq),
// S_dmask (b, h, round128(sq), round128(sk)) or None, rng_state int64 (2,) or (0,) without dropout}.
// q and out_ may be any strided views whose strides are multiples of 8 (others are copied): a
// decode step passes GQA-packed views, (b, g, h_k, d) of a (b, 1, h_k * g, d) tensor, and the
// lse (b, h_k, g) is then the (b, h_k * g, 1) one in memory.
// The decode (KV cache) arguments, all optional:
// seqused_k: int32 (b): sequence i attends to its first seqused_k[i] keys (the kernel clamps the
// value into 0..sk), so a cache (b, capacity, h_k, d) is read in place with no length tensor to build.
// num_splits: split-KV (choose_num_splits): 1 = off (the default), 0 = heuristic, n > 1 = up to n shares.
// block_table: paged KV (check_paged_qkv, set_paged_params): k, v are then the caches (num_pages,
// page_size, h_k, kv_d), sk above is a sequence's capacity max_blocks_per_seq * page_size, and
// sequence i has seqused_k[i] keys (required) from logical position leftpad_k[i] (default 0) of its
// pages. No dropout with block_table.
std::vector<at::Tensor> fwd(at::Tensor q, at::Tensor k, at::Tensor v, std::optional<at::Tensor> out_,
                            std::optional<at::Tensor> alibi_slopes, double softmax_scale, int64_t window_left,
                            int64_t window_right, double softcap, double p_dropout, bool return_softmax,
                            std::optional<at::Generator> gen, std::optional<at::Tensor> seqused_k,
                            int64_t num_splits, std::optional<at::Tensor> block_table,
                            std::optional<at::Tensor> leftpad_k) {
  const bool paged = block_table.has_value();
  check_qkv_or_paged(q, k, v, 4, paged, p_dropout, leftpad_k);
  check_dropout_args(p_dropout, return_softmax, softcap);
  const int b = q.size(0), sq = q.size(1);
  if (paged) {
    CHECK_ARG(seqused_k.has_value(), "seqused_k (the keys of each sequence) is required with block_table in fwd");
    check_paged_tables(q, k, *block_table, leftpad_k, b);
  } else {
    CHECK_ARG(k.size(0) == b && v.size(0) == b, "k and v must have batch size ", b);
    CHECK_ARG(v.size(1) == k.size(1), "v must have k's seqlen ", k.size(1), ", got ", v.size(1));
  }
  check_seqused_k(seqused_k, q, b);
  CHECK_ARG(num_splits >= 0, "num_splits must be >= 0 (0 = chosen from the lengths, 1 = no split), got ",
            num_splits);
  // Keys per sequence: k's seqlen, or a sequence's capacity in pages (fits in int32: check_paged_tables).
  const int64_t sk = paged ? block_table->size(1) * k.size(1) : k.size(1);
  CHECK_ARG(int64_t(b) * sq < (int64_t(1) << 31) && (paged || int64_t(b) * sk < (int64_t(1) << 31)),
            "batch * seqlen_q and batch * seqlen_k must fit in int32, got ", b, " * ", sq, " and ", b, " * ", sk);

  c10::cuda::CUDAGuard guard{q.device()};
  q = vector_aligned(q);
  k = vector_aligned(k);  // paged: a copy of the caches only when their strides forbid 16-byte loads
  v = vector_aligned(v);
  at::Tensor out = output_buffer(out_, q);
  at::Tensor lse = at::empty({b, q.size(2), sq}, q.options().dtype(at::kFloat));
  DropoutOutputs drop = dropout_outputs(q, p_dropout, return_softmax, b, q.size(2), sq, sk);
  if (b == 0 || sq == 0) {
    drop.rng_state.zero_();
    return {out, lse, drop.s_dmask, drop.rng_state};
  }
  if (sk == 0) {  // no key at all: flash-attn semantics are zero output, +inf lse
    out.zero_();
    lse.fill_(INFINITY);
    drop.rng_state.zero_();
  } else {
    Flash_fwd_params p;
    set_common_params(p, q, k, v, out, lse, alibi_slopes, b, float(softmax_scale), int(window_left),
                      int(window_right), float(softcap));
    p.seqlen_q = sq;
    p.seqlen_k = int(sk);
    p.total_q = b * sq;
    p.total_k = int(b * sk);  // (paged: set_paged_params sets 0)
    p.seqused_k = seqused_k.has_value() ? seqused_k->data_ptr<int>() : nullptr;
    if (paged) { set_paged_params(p, k, *block_table, leftpad_k); }
    set_fwd_dropout(p, p_dropout, gen, drop, q);
    const auto accum = set_split_params(p, num_splits, p_dropout > 0.0, return_softmax, q);
    run_fwd(p, p_dropout > 0.0, c10::cuda::getCurrentCUDAStream().stream());
  }
  if (out_.has_value() && !out.is_same(*out_)) { out_->copy_(out); out = *out_; }
  return {out, lse, drop.s_dmask, drop.rng_state};
}

// q: (total_q, h, d); k, v: (total_k, h_k, d); cu_seqlens_*: int32 (b + 1);
// seqused_k: int32 (b) or None. Returns {out (total_q, h, d), lse fp32 (h, total_q), S_dmask
// (b, h, round128(max_seqlen_q), round128(max_seqlen_k)) or None, rng_state} (see fwd);
// sequence i of S_dmask sits in the top-left corner of S_dmask[i]. num_splits: split-KV
// (choose_num_splits): 1 = off (the default), 0 = heuristic, n > 1 = up to n shares.
// block_table: paged KV (see check_paged_qkv, set_paged_params): k, v are then the caches
// (num_pages, page_size, h_k, kv_d); sequence i has seqused_k[i] keys when seqused_k is
// given, else cu_seqlens_k[i + 1] - cu_seqlens_k[i], starting at logical position
// leftpad_k[i] (default 0) of its pages. No dropout.
std::vector<at::Tensor> varlen_fwd(at::Tensor q, at::Tensor k, at::Tensor v, std::optional<at::Tensor> out_,
                                   at::Tensor cu_seqlens_q, at::Tensor cu_seqlens_k,
                                   std::optional<at::Tensor> seqused_k, int64_t max_seqlen_q, int64_t max_seqlen_k,
                                   std::optional<at::Tensor> alibi_slopes, double softmax_scale,
                                   int64_t window_left, int64_t window_right, double softcap, double p_dropout,
                                   bool return_softmax, std::optional<at::Generator> gen, int64_t num_splits,
                                   std::optional<at::Tensor> block_table, std::optional<at::Tensor> leftpad_k) {
  const bool paged = block_table.has_value();
  check_qkv_or_paged(q, k, v, 3, paged, p_dropout, leftpad_k);
  check_dropout_args(p_dropout, return_softmax, softcap);
  CHECK_ARG(v.size(0) == k.size(0), "v must have k's total length ", k.size(0), ", got ", v.size(0));
  for (const auto *c : {&cu_seqlens_q, &cu_seqlens_k}) {
    CHECK_ARG(c->scalar_type() == at::kInt, "cu_seqlens must be int32, got ", c->scalar_type());
    CHECK_ARG(c->device() == q.device(), "cu_seqlens must be on q's device");
    CHECK_ARG(c->dim() == 1 && c->is_contiguous(), "cu_seqlens must be contiguous 1-D tensors");
  }
  const int b = cu_seqlens_q.numel() - 1;
  CHECK_ARG(b >= 0 && cu_seqlens_k.numel() == b + 1, "cu_seqlens_q and cu_seqlens_k must both have batch + 1 = ",
            b + 1, " entries, got ", cu_seqlens_k.numel());
  check_seqused_k(seqused_k, q, b);
  if (paged) { check_paged_tables(q, k, *block_table, leftpad_k, b); }
  CHECK_ARG(max_seqlen_q >= 0 && max_seqlen_k >= 0, "max_seqlen_q/k must be >= 0");
  CHECK_ARG(num_splits >= 0, "num_splits must be >= 0 (0 = chosen from the lengths, 1 = no split), got ",
            num_splits);
  CHECK_ARG(q.size(0) < (int64_t(1) << 31) && k.size(0) < (int64_t(1) << 31), "total length must fit in int32");

  c10::cuda::CUDAGuard guard{q.device()};
  q = vector_aligned(q);
  k = vector_aligned(k);  // paged: a copy of the caches only when their strides forbid 16-byte loads
  v = vector_aligned(v);
  at::Tensor out = output_buffer(out_, q);
  const int total_q = q.size(0);
  at::Tensor lse = at::empty({q.size(1), total_q}, q.options().dtype(at::kFloat));
  DropoutOutputs drop = dropout_outputs(q, p_dropout, return_softmax, b, q.size(1), max_seqlen_q, max_seqlen_k);
  // Paged: k.size(0) is num_pages (>= 1); a block table without columns holds no key.
  const bool no_keys = max_seqlen_k == 0 || k.size(0) == 0 || (paged && block_table->size(1) == 0);
  const bool launch = b > 0 && total_q > 0 && !no_keys && max_seqlen_q > 0;
  if (!launch) { drop.rng_state.zero_(); }  // no kernel writes it
  if (b == 0 || total_q == 0) { return {out, lse, drop.s_dmask, drop.rng_state}; }
  if (no_keys) {  // no sequence has a key
    out.zero_();
    lse.fill_(INFINITY);
  } else if (max_seqlen_q > 0) {
    // Rows past cu_seqlens_q[b] or past a sequence's max_seqlen_q are not written
    // (as in flash-attn); every row inside a sequence is.
    Flash_fwd_params p;
    set_common_params(p, q, k, v, out, lse, alibi_slopes, b, float(softmax_scale), int(window_left),
                      int(window_right), float(softcap));
    p.seqlen_q = int(max_seqlen_q);
    p.seqlen_k = int(max_seqlen_k);
    p.total_q = total_q;
    p.total_k = k.size(0);
    p.cu_seqlens_q = cu_seqlens_q.data_ptr<int>();
    p.cu_seqlens_k = cu_seqlens_k.data_ptr<int>();
    p.seqused_k = seqused_k.has_value() ? seqused_k->data_ptr<int>() : nullptr;
    if (paged) { set_paged_params(p, k, *block_table, leftpad_k); }
    set_fwd_dropout(p, p_dropout, gen, drop, q);
    const auto accum = set_split_params(p, num_splits, p_dropout > 0.0, return_softmax, q);
    run_fwd(p, p_dropout > 0.0, c10::cuda::getCurrentCUDAStream().stream());
  }
  if (out_.has_value() && !out.is_same(*out_)) { out_->copy_(out); out = *out_; }
  return {out, lse, drop.s_dmask, drop.rng_state};
}

#ifdef FLASH_ATTN_HAS_BWD
void run_bwd(flash::Flash_bwd_params &p, bool is_dropout, cudaStream_t stream) {
  CHECK_ARG(p.d == 64 || p.d == 128 || p.d == 256, "backward kernels exist for head dims 64, 128 and 256, got ",
            p.d);
  TORCH_CHECK_NOT_IMPLEMENTED(!(is_dropout && p.softcap_prescale > 0.f),
                              "flash_attn: softcap with dropout is not supported (as in flash-attn)");
  // The switches throw std::invalid_argument (Python ValueError) for a value with no kernel.
  const cudaError_t err = flash::dtype_switch(p.is_bf16, [&](auto dtype_tag) {
    using Element = typename decltype(dtype_tag)::type;
    return flash::headdim_switch(p.d, [&](auto hdim_tag) {
      constexpr int kHeadDim = decltype(hdim_tag)::value;
      if constexpr (kHeadDim == 64 || kHeadDim == 128 || kHeadDim == 256) {
        const bool has_alibi = p.alibi_slopes_ptr != nullptr, is_softcap = p.softcap_prescale > 0.f;
        return flash::kernel_variant_switch(has_alibi, is_softcap, is_dropout, [&](auto alibi, auto cap, auto drop) {
          return flash::run_mha_bwd_<Element, kHeadDim, decltype(alibi)::value, decltype(cap)::value,
                                     decltype(drop)::value>(p, stream);
        });
      } else {
        return cudaErrorNotSupported;
      }
    });
  });
  TORCH_CHECK(err == cudaSuccess, "flash_attn backward kernel launch failed: ", cudaGetErrorString(err));
}

// Fills the gradient fields of p. dk_exp/dv_exp hold one gradient per query head
// (reduced over GQA groups by the caller); softmax_d = rowsum(dO * O) in lse's layout.
// dq_accum: the fp32 accumulator of the atomic (non-deterministic) path, or undefined.
void set_bwd_params(flash::Flash_bwd_params &p, const at::Tensor &dout, const at::Tensor &dq,
                    const at::Tensor &dk_exp, const at::Tensor &dv_exp, const at::Tensor &softmax_d,
                    const at::Tensor &dq_accum, float softmax_scale) {
  if (dq_accum.defined()) {
    p.dq_accum_ptr = dq_accum.data_ptr<float>();
    set_strides(dq_accum, p.dq_accum_batch_stride, p.dq_accum_row_stride, p.dq_accum_head_stride);
    TORCH_CHECK(p.dq_accum_row_stride == dq_accum.size(-1), "dq_accum must be head-major (rows d floats apart)");
  }
  p.do_ptr = dout.data_ptr();
  p.dq_ptr = dq.data_ptr();
  p.dk_ptr = dk_exp.data_ptr();
  p.dv_ptr = dv_exp.data_ptr();
  set_strides(dout, p.do_batch_stride, p.do_row_stride, p.do_head_stride);
  set_strides(dq, p.dq_batch_stride, p.dq_row_stride, p.dq_head_stride);
  set_strides(dk_exp, p.dk_batch_stride, p.dk_row_stride, p.dk_head_stride);
  set_strides(dv_exp, p.dv_batch_stride, p.dv_row_stride, p.dv_head_stride);
  p.softmax_d_ptr = softmax_d.data_ptr<float>();
  p.scale_qk = softmax_scale;
}

void check_bwd_inputs(const at::Tensor &dout, const at::Tensor &q, const at::Tensor &out, const at::Tensor &lse,
                      at::IntArrayRef lse_shape) {
  CHECK_ARG(dout.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(),
            "dout and out must have q's dtype ", q.scalar_type());
  CHECK_ARG(dout.sizes() == q.sizes() && out.sizes() == q.sizes(), "dout and out must have q's shape ", q.sizes());
  CHECK_ARG(dout.device() == q.device() && out.device() == q.device() && lse.device() == q.device(),
            "dout, out and softmax_lse must be on q's device");
  CHECK_ARG(dout.stride(-1) == 1 && out.stride(-1) == 1, "dout and out must be contiguous in the last dim");
  CHECK_ARG(lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.sizes() == lse_shape,
            "softmax_lse must be a contiguous float32 tensor of shape ", lse_shape, ", got ", lse.sizes());
}

// Gradient buffers: the caller's when given (dk/dv only when there is one kv head per
// query head), else fresh ones; per-query-head dk/dv when GQA needs a reduction.
at::Tensor grad_buffer(const std::optional<at::Tensor> &given, const at::Tensor &like, const char *name) {
  if (given.has_value()) {
    CHECK_ARG(given->sizes() == like.sizes() && given->scalar_type() == like.scalar_type() &&
                  given->device() == like.device() && is_vector_aligned(*given),
              name, " must match ", like.sizes(), " in shape, dtype and device, 16-byte aligned");
    return *given;
  }
  return at::empty_like(like, like.options().memory_format(at::MemoryFormat::Contiguous));
}

// Backward kernels exist for head dims 64, 128 and 256 (generate_kernels.py says why
// not 192); the others run zero-padded to the next of them (padding q, k, v, out and
// dout with zeros changes neither the scores nor rowsum(dO * O), and the padded
// gradient columns are dropped).
int bwd_kernel_head_dim(int d) {
  CHECK_ARG(d <= 256, "the backward supports head dims <= 256, got ", d);
  return d <= 64 ? 64 : d <= 128 ? 128 : 256;
}

at::Tensor pad_last_dim(const at::Tensor &t, int to) { return at::constant_pad_nd(t, {0, to - t.size(-1)}); }

// The first d columns of a padded gradient, written into the caller's buffer if given.
at::Tensor unpad_grad(const at::Tensor &g, int d, const std::optional<at::Tensor> &given, const char *name) {
  at::Tensor sliced = g.narrow(-1, 0, d);
  if (!given.has_value()) { return sliced; }
  CHECK_ARG(given->sizes() == sliced.sizes() && given->scalar_type() == sliced.scalar_type() &&
                given->device() == sliced.device(),
            name, " must have shape ", sliced.sizes(), " and the inputs' dtype and device");
  given->copy_(sliced);
  return *given;
}

// Whether the backward's wgmma kernels (flash_bwd_kernel_sm90.h) run for q's device: an sm90
// device, a build with sm90a code, and FLASH_ATTN_BWD_SM90 not "0" where the build kept the
// mma.sync kernels in sm90 code. The launcher (flash_bwd_launch_template.h, sm90_bwd_runs)
// decides the same from the kernels themselves.
bool wgmma_bwd_runs(const at::Tensor &q) {
#ifdef FLASH_ATTN_HAS_SM90A
  if (flash::wgmma_bwd_switched_off()) { return false; }
  const int device = q.get_device();
  return flash::cached_device_attribute<cudaDevAttrComputeCapabilityMajor>(device) == 9 &&
         flash::cached_device_attribute<cudaDevAttrComputeCapabilityMinor>(device) == 0;
#else
  (void)q;
  return false;
#endif
}

struct BwdBuffers {
  at::Tensor dq, dk, dv;
  // One gradient per query head, k's shape with h heads; dk/dv themselves without GQA.
  at::Tensor dk_exp, dv_exp;
  // Non-deterministic path: zeroed fp32 dQ accumulator, a head-major buffer viewed in q's
  // shape (undefined otherwise).
  at::Tensor dq_accum;
};

// Aligns the inputs for cp.async (in place) and allocates the gradient buffers of one
// backward call, batched or varlen.
BwdBuffers prepare_bwd(at::Tensor &q, at::Tensor &k, at::Tensor &v, at::Tensor &dout, at::Tensor &out,
                       const std::optional<at::Tensor> &dq_, const std::optional<at::Tensor> &dk_,
                       const std::optional<at::Tensor> &dv_, bool deterministic) {
  for (at::Tensor *t : {&q, &k, &v, &dout, &out}) { *t = vector_aligned(*t); }
  BwdBuffers g{grad_buffer(dq_, q, "dq"), grad_buffer(dk_, k, "dk"), grad_buffer(dv_, v, "dv"), {}, {}, {}};
  // Some head dims take the deterministic pair by default too (tile_size.h bwd_atomic_dq,
  // bwd_atomic_dq_sm90 where the wgmma kernels run).
  const int d = int(q.size(-1));
  if (!deterministic && (wgmma_bwd_runs(q) ? flash::bwd_atomic_dq_sm90(d) : flash::bwd_atomic_dq(d))) {
    // Head-major, (b, h, sq, d) or (h, total_q, d), seen through a view in q's shape: the
    // kernel's atomics then step kHeadDim floats per row (compile-time addresses).
    const auto f32 = q.options().dtype(at::kFloat);
    g.dq_accum = q.dim() == 4 ? at::zeros({q.size(0), q.size(2), q.size(1), q.size(3)}, f32).permute({0, 2, 1, 3})
                              : at::zeros({q.size(1), q.size(0), q.size(2)}, f32).permute({1, 0, 2});
  }
  if (k.size(-2) == q.size(-2)) {
    g.dk_exp = g.dk;
    g.dv_exp = g.dv;
  } else {
    std::vector<int64_t> shape = k.sizes().vec();
    shape[shape.size() - 2] = q.size(-2);
    g.dk_exp = at::empty(shape, k.options());
    g.dv_exp = at::empty(shape, v.options());
  }
  return g;
}

// dout, q, out: (b, sq, h, d); k, v: (b, sk, h_k, d); softmax_lse fp32 (b, h, sq).
// Returns {dq, dk, dv, softmax_d}; softmax_d fp32 (b, h, sq).
std::vector<at::Tensor> bwd(at::Tensor dout, at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor out,
                            at::Tensor softmax_lse, std::optional<at::Tensor> dq_, std::optional<at::Tensor> dk_,
                            std::optional<at::Tensor> dv_, std::optional<at::Tensor> alibi_slopes,
                            double softmax_scale, int64_t window_left, int64_t window_right, double softcap,
                            bool deterministic, double p_dropout, std::optional<at::Tensor> rng_state) {
  check_qkv(q, k, v, 4);
  check_heads(q, k, v);
  const int b = q.size(0), sq = q.size(1), h = q.size(2), sk = k.size(1), h_k = k.size(2), d = q.size(3);
  check_bwd_inputs(dout, q, out, softmax_lse, {b, h, sq});
  if (const int kd = bwd_kernel_head_dim(d); kd != d) {
    auto g = bwd(pad_last_dim(dout, kd), pad_last_dim(q, kd), pad_last_dim(k, kd), pad_last_dim(v, kd),
                 pad_last_dim(out, kd), softmax_lse, std::nullopt, std::nullopt, std::nullopt, alibi_slopes,
                 softmax_scale, window_left, window_right, softcap, deterministic, p_dropout, rng_state);
    return {unpad_grad(g[0], d, dq_, "dq"), unpad_grad(g[1], d, dk_, "dk"), unpad_grad(g[2], d, dv_, "dv"), g[3]};
  }
  c10::cuda::CUDAGuard guard{q.device()};
  auto [dq, dk, dv, dk_exp, dv_exp, dq_accum] = prepare_bwd(q, k, v, dout, out, dq_, dk_, dv_, deterministic);
  const bool gqa = h != h_k;
  // D = rowsum(dO * O) in fp32, laid out like the lse: (b, h, sq); the kernels fill it.
  at::Tensor softmax_d = at::zeros({b, h, sq}, q.options().dtype(at::kFloat));
  if (b > 0 && sq > 0 && sk > 0) {
    flash::Flash_bwd_params p{};
    set_common_params(p, q, k, v, out, softmax_lse, alibi_slopes, b, float(softmax_scale), int(window_left),
                      int(window_right), float(softcap));
    p.seqlen_q = sq;
    p.seqlen_k = sk;
    p.total_q = b * sq;
    p.total_k = b * sk;
    set_bwd_params(p, dout, dq, dk_exp, dv_exp, softmax_d, dq_accum, float(softmax_scale));
    set_bwd_dropout(p, p_dropout, rng_state, q);
    run_bwd(p, p_dropout > 0.0, c10::cuda::getCurrentCUDAStream().stream());
    // the kernel adds unscaled dS K (mul_out cannot cast fp32 to dq's dtype: scale, then copy)
    if (dq_accum.defined()) { dq.copy_(dq_accum.mul_(softmax_scale)); }
  } else {
    dq.zero_();
    dk_exp.zero_();
    dv_exp.zero_();
  }
  if (gqa) {
    at::sum_out(dk, dk_exp.view({b, sk, h_k, h / h_k, d}), {3});
    at::sum_out(dv, dv_exp.view({b, sk, h_k, h / h_k, d}), {3});
  }
  return {dq, dk, dv, softmax_d};
}

// Varlen: dout, q, out (total_q, h, d); k, v (total_k, h_k, d); softmax_lse (h, total_q).
std::vector<at::Tensor> varlen_bwd(at::Tensor dout, at::Tensor q, at::Tensor k, at::Tensor v, at::Tensor out,
                                   at::Tensor softmax_lse, std::optional<at::Tensor> dq_,
                                   std::optional<at::Tensor> dk_, std::optional<at::Tensor> dv_,
                                   at::Tensor cu_seqlens_q, at::Tensor cu_seqlens_k, int64_t max_seqlen_q,
                                   int64_t max_seqlen_k, std::optional<at::Tensor> alibi_slopes,
                                   double softmax_scale, int64_t window_left, int64_t window_right, double softcap,
                                   bool deterministic, double p_dropout, std::optional<at::Tensor> rng_state) {
  check_qkv(q, k, v, 3);
  check_heads(q, k, v);
  const int total_q = q.size(0), h = q.size(1), total_k = k.size(0), h_k = k.size(1), d = q.size(2);
  check_bwd_inputs(dout, q, out, softmax_lse, {h, total_q});
  if (const int kd = bwd_kernel_head_dim(d); kd != d) {
    auto g = varlen_bwd(pad_last_dim(dout, kd), pad_last_dim(q, kd), pad_last_dim(k, kd), pad_last_dim(v, kd),
                        pad_last_dim(out, kd), softmax_lse, std::nullopt, std::nullopt, std::nullopt, cu_seqlens_q,
                        cu_seqlens_k, max_seqlen_q, max_seqlen_k, alibi_slopes, softmax_scale, window_left,
                        window_right, softcap, deterministic, p_dropout, rng_state);
    return {unpad_grad(g[0], d, dq_, "dq"), unpad_grad(g[1], d, dk_, "dk"), unpad_grad(g[2], d, dv_, "dv"), g[3]};
  }
  for (const auto *c : {&cu_seqlens_q, &cu_seqlens_k}) {
    CHECK_ARG(c->scalar_type() == at::kInt && c->device() == q.device() && c->dim() == 1 && c->is_contiguous(),
              "cu_seqlens must be contiguous 1-D int32 tensors on q's device");
  }
  const int b = cu_seqlens_q.numel() - 1;
  CHECK_ARG(b >= 0 && cu_seqlens_k.numel() == b + 1, "cu_seqlens_q and cu_seqlens_k must have batch + 1 entries");
  c10::cuda::CUDAGuard guard{q.device()};
  auto [dq, dk, dv, dk_exp, dv_exp, dq_accum] = prepare_bwd(q, k, v, dout, out, dq_, dk_, dv_, deterministic);
  const bool gqa = h != h_k;
  // D in the lse's layout (h, total_q); rows outside every sequence stay 0.
  at::Tensor softmax_d = at::zeros({h, total_q}, q.options().dtype(at::kFloat));
  // Rows outside every sequence get no gradient from the kernels: start from zero.
  dq.zero_();
  dk_exp.zero_();
  dv_exp.zero_();
  if (b > 0 && total_q > 0 && total_k > 0 && max_seqlen_q > 0 && max_seqlen_k > 0) {
    flash::Flash_bwd_params p{};
    set_common_params(p, q, k, v, out, softmax_lse, alibi_slopes, b, float(softmax_scale), int(window_left),
                      int(window_right), float(softcap));
    p.seqlen_q = int(max_seqlen_q);
    p.seqlen_k = int(max_seqlen_k);
    p.total_q = total_q;
    p.total_k = total_k;
    p.cu_seqlens_q = cu_seqlens_q.data_ptr<int>();
    p.cu_seqlens_k = cu_seqlens_k.data_ptr<int>();
    set_bwd_params(p, dout, dq, dk_exp, dv_exp, softmax_d, dq_accum, float(softmax_scale));
    set_bwd_dropout(p, p_dropout, rng_state, q);
    run_bwd(p, p_dropout > 0.0, c10::cuda::getCurrentCUDAStream().stream());
    // the kernel adds unscaled dS K (mul_out cannot cast fp32 to dq's dtype: scale, then copy)
    if (dq_accum.defined()) { dq.copy_(dq_accum.mul_(softmax_scale)); }
  }
  if (gqa) {
    at::sum_out(dk, dk_exp.view({total_k, h_k, h / h_k, d}), {2});
    at::sum_out(dv, dv_exp.view({total_k, h_k, h / h_k, d}), {2});
  }
  return {dq, dk, dv, softmax_d};
}
#endif  // FLASH_ATTN_HAS_BWD

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "flash_attn CUDA kernels (FA2-class forward, sm80+)";
  m.def("fwd", &fwd, "Exact attention forward, batched (b, s, h, d); a KV cache in place with seqused_k",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("out"), py::arg("alibi_slopes"), py::arg("softmax_scale"), py::arg("window_size_left"),
        py::arg("window_size_right"), py::arg("softcap"), py::arg("p_dropout") = 0.0,
        py::arg("return_softmax") = false, py::arg("gen") = py::none(), py::arg("seqused_k") = py::none(),
        py::arg("num_splits") = 1, py::arg("block_table") = py::none(), py::arg("leftpad_k") = py::none());
  m.def("varlen_fwd", &varlen_fwd, "Exact attention forward, varlen (total, h, d)", py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("out"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("seqused_k"),
        py::arg("max_seqlen_q"), py::arg("max_seqlen_k"), py::arg("alibi_slopes"), py::arg("softmax_scale"),
        py::arg("window_size_left"), py::arg("window_size_right"), py::arg("softcap"), py::arg("p_dropout") = 0.0,
        py::arg("return_softmax") = false, py::arg("gen") = py::none(), py::arg("num_splits") = 1,
        py::arg("block_table") = py::none(), py::arg("leftpad_k") = py::none());
#ifdef FLASH_ATTN_HAS_BWD
  m.def("bwd", &bwd, "Exact attention backward, batched", py::arg("dout"), py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("out"), py::arg("softmax_lse"), py::arg("dq"), py::arg("dk"), py::arg("dv"),
        py::arg("alibi_slopes"), py::arg("softmax_scale"), py::arg("window_size_left"),
        py::arg("window_size_right"), py::arg("softcap"), py::arg("deterministic"), py::arg("p_dropout") = 0.0,
        py::arg("rng_state") = py::none());
  m.def("varlen_bwd", &varlen_bwd, "Exact attention backward, varlen", py::arg("dout"), py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("out"), py::arg("softmax_lse"), py::arg("dq"), py::arg("dk"),
        py::arg("dv"), py::arg("cu_seqlens_q"), py::arg("cu_seqlens_k"), py::arg("max_seqlen_q"),
        py::arg("max_seqlen_k"), py::arg("alibi_slopes"), py::arg("softmax_scale"), py::arg("window_size_left"),
        py::arg("window_size_right"), py::arg("softcap"), py::arg("deterministic"), py::arg("p_dropout") = 0.0,
        py::arg("rng_state") = py::none());
  m.def(
      "last_bwd_kernel", [] { return flash::last_dk_dv_kernel.load(); },
      "The dK/dV kernel of the last backward: 90 wgmma (sm90a), 80 mma.sync, 0 none yet");
#endif
}
