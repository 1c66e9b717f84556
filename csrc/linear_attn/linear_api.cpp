// flash_attn_linear_cuda: the only linear-attention file that includes torch. Python
// (flash_attn/linear_attn/_cuda.py) checks the user's arguments, pads head dims, allocates
// every output and workspace and calls these launchers; the checks here are the last line
// of defence for direct callers (shapes, dtypes, devices, contiguity, alignment).
// Runtime sizes and flags become template parameters here and nowhere else.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include "arg_error.h"
#include "device_info.h"

#include <cuda_runtime_api.h>

#include <algorithm>
#include <initializer_list>
#include <optional>
#include <type_traits>
#include <utility>

#include "linear_params.h"
#include "masked_params.h"
#include "tile_size.h"

namespace {

namespace la = linear_attn;
using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Named = std::pair<const Tensor*, const char*>;

#define CHECK_ARG(cond, ...) ARG_ERROR_CHECK("flash_attn_linear_cuda: ", cond, __VA_ARGS__)

// ---------------------------------------------------------------- dispatch (the one place)
// Each calls f with the runtime value as a type and returns what f returns (the launchers'
// cudaError_t), so that dispatches nest as plain `return` expressions.
template <typename F>
auto dispatch_dtype(at::ScalarType st, F&& f) {
  if (st == at::kHalf) return f(la::Fp16{});
  CHECK_ARG(st == at::kBFloat16, "inputs must be float16 or bfloat16, got ", st);
  return f(la::Bf16{});
}

template <typename F>
auto dispatch_bool(bool b, F&& f) {
  return b ? f(std::true_type{}) : f(std::false_type{});
}

template <typename F>
auto dispatch_head_dim(int64_t d, F&& f) {
  if (d == 64) return f(std::integral_constant<int, 64>{});
  if (d == 128) return f(std::integral_constant<int, 128>{});
  CHECK_ARG(d == 256, "head dim must be 64, 128 or 256 (pad in Python), got ", d);
  return f(std::integral_constant<int, 256>{});
}

// ---------------------------------------------------------------- checks
void check_dense(const Tensor& t, const char* name, const Tensor& like) {
  CHECK_ARG(t.is_cuda() && t.device() == like.device(), name, " must be on ", like.device(), ", got ", t.device());
  CHECK_ARG(t.is_contiguous(), name, " must be contiguous");
  CHECK_ARG(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name, " must be 16-byte aligned");
}

void check_shape(const Tensor& t, const char* name, at::IntArrayRef shape) {
  CHECK_ARG(t.sizes() == shape, name, " must have shape ", shape, ", got ", t.sizes());
}

void check_dtype(const Tensor& t, const char* name, at::ScalarType st) {
  CHECK_ARG(t.scalar_type() == st, name, " must be ", st, ", got ", t.scalar_type());
}

// Each operand on `like`'s device, contiguous, 16-byte aligned, of dtype st (in order).
void check_operands(std::initializer_list<Named> operands, const Tensor& like, at::ScalarType st) {
  for (const auto& [t, name] : operands) {
    check_dense(*t, name, like);
    check_dtype(*t, name, st);
  }
}

void check_opt(const OptTensor& t, const char* name, const Tensor& like, at::ScalarType st, at::IntArrayRef shape) {
  if (!t.has_value()) return;
  check_dense(*t, name, like);
  check_dtype(*t, name, st);
  check_shape(*t, name, shape);
}

// t's data, or null when t is absent (check_opt has checked what is there).
void* data_or_null(const OptTensor& t) { return t.has_value() ? t->data_ptr() : nullptr; }
float* float_data_or_null(const OptTensor& t) { return t.has_value() ? t->data_ptr<float>() : nullptr; }

// The sizes of a chunked launcher's token operands.
struct TokenDims {
  int64_t B, T, H, R, N;
};

// x and y [B, T, H, R], z and w [B, T, H, N]; layout is x's shape as the messages name it
// ("[B, T, H, K]" for q). Shapes only: devices and dtypes are check_operands' job.
TokenDims check_tokens(Named x, const char* layout, Named y, Named z, Named w) {
  const Tensor& t = *x.first;
  CHECK_ARG(t.dim() == 4, x.second, " must be ", layout, ", got ", t.sizes());
  const TokenDims d{t.size(0), t.size(1), t.size(2), t.size(3), z.first->size(3)};
  check_shape(*y.first, y.second, t.sizes());
  check_shape(*z.first, z.second, {d.B, d.T, d.H, d.N});
  check_shape(*w.first, w.second, {d.B, d.T, d.H, d.N});
  return d;
}

// x: a token tensor [B, T, H, D]; cu_seqlens int32 [N + 1] (B == 1) or none.
la::SeqParams seq_params(const Tensor& x, const OptTensor& cu_seqlens, const OptTensor& chunk_offsets,
                         int64_t num_slots, bool need_chunks = true) {
  CHECK_ARG(x.dim() == 4, "token tensors must be [B, T, H, D], got ", x.sizes());
  la::SeqParams s;
  s.tokens = x.size(0) * x.size(1);
  s.heads = static_cast<int>(x.size(2));
  s.num_slots = static_cast<int>(num_slots);
  CHECK_ARG(x.size(1) < (int64_t{1} << 31) && num_slots < (int64_t{1} << 31), "sizes must fit in int32");
  if (cu_seqlens.has_value()) {
    CHECK_ARG(x.size(0) == 1, "B must be 1 with cu_seqlens, got ", x.size(0));
    check_dense(*cu_seqlens, "cu_seqlens", x);
    check_dtype(*cu_seqlens, "cu_seqlens", at::kInt);
    CHECK_ARG(cu_seqlens->dim() == 1 && cu_seqlens->size(0) >= 2, "cu_seqlens must be [N + 1], got ",
              cu_seqlens->sizes());
    CHECK_ARG(chunk_offsets.has_value() || !need_chunks, "chunk_offsets is required with cu_seqlens");
    if (chunk_offsets.has_value()) {
      check_dense(*chunk_offsets, "chunk_offsets", x);
      check_dtype(*chunk_offsets, "chunk_offsets", at::kInt);
      check_shape(*chunk_offsets, "chunk_offsets", cu_seqlens->sizes());
      s.chunk_offsets = chunk_offsets->data_ptr<int>();
    }
    s.cu_seqlens = cu_seqlens->data_ptr<int>();
    s.num_seqs = static_cast<int>(cu_seqlens->size(0) - 1);
  } else {
    s.seqlen = static_cast<int>(x.size(1));
    s.num_seqs = static_cast<int>(x.size(0));
  }
  return s;
}

la::GateParams gate_params(const OptTensor& g, const OptTensor& gamma, const Tensor& x) {
  CHECK_ARG(!(g.has_value() && gamma.has_value()), "pass g or gamma, not both");
  check_opt(g, "g", x, at::kFloat, {x.size(0), x.size(1), x.size(2)});
  check_opt(gamma, "gamma", x, at::kFloat, {x.size(2)});
  la::GateParams p;
  p.g = float_data_or_null(g);
  p.gamma = float_data_or_null(gamma);
  return p;
}

void check_launch(const char* what, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, "flash_attn_linear_cuda: ", what, " failed to launch: ", cudaGetErrorString(err));
}

int num_sms(int device) {
  const int n = flash::cached_device_attribute<cudaDevAttrMultiProcessorCount>(device);
  return n > 0 ? n : 108;  // (an A100's count when the driver cannot say: only a grid-size hint)
}

// ---------------------------------------------------------------- masked linear attention
// masked_params.h has the math and the four uses of masked_attn; flash_attn/linear_attn/_masked.py
// composes them into the forward and backward.

la::MaskDtype mask_dtype_of(const Tensor& mask) {
  switch (mask.scalar_type()) {
    case at::kFloat: return la::MaskDtype::kFp32;
    case at::kHalf: return la::MaskDtype::kFp16;
    case at::kBFloat16: return la::MaskDtype::kBf16;
    default: CHECK_ARG(false, "mask must be float32, float16 or bfloat16, got ", mask.scalar_type());
  }
  return la::MaskDtype::kFp32;
}

// out = scale * sum_{g, j} (x_i . y_j) M[b, head, i, j] z_j (masked_attn.cuh): x [B, T, Hx, R];
// y [B, T, Hy, R]; z [B, T, Hy, N]; out [B, T, Hx, N]; Hx % Hy == 0 or Hy % Hx == 0. mask: a
// [B, max(Hx, Hy), T, T] view with any strides (expanded or transposed: nothing is copied) in the
// pass's orientation (i = x row, j = y row), indexed by the query head, the side with more heads.
// Hx >= Hy: x head h reads y / z head h / (Hx / Hy); Hx < Hy: it sums over the G = Hy / Hx
// heads h * G .. h * G + G - 1.
void masked_attn(const Tensor& x, const Tensor& y, const Tensor& z, const Tensor& mask, Tensor& out,
                 double scale) {
  check_operands({{&x, "x"}, {&y, "y"}, {&z, "z"}, {&out, "out"}}, x, x.scalar_type());
  CHECK_ARG(x.dim() == 4 && y.dim() == 4 && z.dim() == 4, "x, y and z must be [B, T, heads, dim], got ", x.sizes(),
            ", ", y.sizes(), " and ", z.sizes());
  const int64_t B = x.size(0), T = x.size(1), Hx = x.size(2), R = x.size(3), Hy = y.size(2), N = z.size(3);
  check_shape(y, "y", {B, T, Hy, R});
  check_shape(z, "z", {B, T, Hy, N});
  check_shape(out, "out", {B, T, Hx, N});
  CHECK_ARG(Hx > 0 && Hy > 0 && (Hx % Hy == 0 || Hy % Hx == 0),
            "the head counts of x and y must divide one another, got ", Hx, " and ", Hy);
  CHECK_ARG(N % 64 == 0 && N > 0, "N must be a multiple of 64, got ", N);
  const int64_t Hq = std::max(Hx, Hy);
  CHECK_ARG(mask.is_cuda() && mask.device() == x.device(), "mask must be on ", x.device(), ", got ", mask.device());
  check_shape(mask, "mask", {B, Hq, T, T});
  const int64_t ctas = (T + la::kMaskedTile - 1) / la::kMaskedTile * B * Hx;
  CHECK_ARG(T < (int64_t{1} << 31) && ctas < (int64_t{1} << 31), "B * heads * ceil(T / 64) must fit in int32, got ",
            ctas);
  la::MaskedParams p;
  p.x = x.data_ptr();
  p.y = y.data_ptr();
  p.z = z.data_ptr();
  p.out = out.data_ptr();
  p.mask = mask.data_ptr();
  p.mask_dtype = mask_dtype_of(mask);
  for (int d = 0; d < 4; ++d) p.mask_stride[d] = mask.stride(d);
  p.batch = static_cast<int>(B);
  p.seqlen = static_cast<int>(T);
  p.x_heads = static_cast<int>(Hx);
  p.yz_heads = static_cast<int>(Hy);
  p.x_div = static_cast<int>(Hx >= Hy ? Hx / Hy : 1);
  p.group = static_cast<int>(Hx >= Hy ? 1 : Hy / Hx);
  p.mask_head_from_y = Hy > Hx;
  p.r_dim = static_cast<int>(R);
  p.n_dim = static_cast<int>(N);
  p.scale = static_cast<float>(scale);
  c10::cuda::CUDAGuard guard(x.device());
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  const bool wide = la::masked_tile_n(p.r_dim, p.n_dim) == 128;
  check_launch("masked_attn", dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using Tag = decltype(tag);
    return dispatch_head_dim(R, [&](auto r) {
      constexpr int kR = decltype(r)::value;
      return wide ? la::run_masked_attn<Tag, kR, 128>(p, stream) : la::run_masked_attn<Tag, kR, 64>(p, stream);
    });
  }));
}

// dM = scale * (dout v^T) * (q k^T) per (b, h), summed over the mask's broadcast dimensions
// (mask_grad.cuh): q [B, T, H, K]; k [B, T, HK, K]; v [B, T, HK, V]; dout [B, T, H, V]; dmask fp32
// [Bm, Hm, Tm, Tn], each size 1 (summed over) or B, H, T, T. Written whole (zeros when T == 0).
void masked_mask_grad(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& dout, Tensor& dmask,
                      double scale) {
  check_operands({{&q, "q"}, {&k, "k"}, {&v, "v"}, {&dout, "dout"}}, q, q.scalar_type());
  CHECK_ARG(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k and v must be [B, T, heads, dim], got ", q.sizes(),
            ", ", k.sizes(), " and ", v.sizes());
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), K = q.size(3), HK = k.size(2), V = v.size(3);
  check_shape(k, "k", {B, T, HK, K});
  check_shape(v, "v", {B, T, HK, V});
  check_shape(dout, "dout", {B, T, H, V});
  CHECK_ARG(HK > 0 && H % HK == 0, "k's heads must divide q's, got ", HK, " and ", H);
  CHECK_ARG(K % 64 == 0 && V % 64 == 0 && K > 0 && V > 0, "K and V must be multiples of 64, got ", K, " and ", V);
  check_dense(dmask, "dmask", q);
  check_dtype(dmask, "dmask", at::kFloat);
  const int64_t full[4] = {B, H, T, T};
  CHECK_ARG(dmask.dim() == 4, "dmask must be 4-d [Bm, Hm, Tm, Tn], got ", dmask.sizes());
  for (int d = 0; d < 4; ++d) {
    CHECK_ARG(dmask.size(d) == 1 || dmask.size(d) == full[d], "dmask must be broadcastable to [B, H, T, T] = ",
              at::IntArrayRef(full), " with each size 1 or full, got ", dmask.sizes());
  }
  c10::cuda::CUDAGuard guard(q.device());
  if (B == 0 || T == 0 || H == 0) {
    dmask.zero_();
    return;
  }
  const int64_t tiles = (T + la::kMaskedTile - 1) / la::kMaskedTile;
  const int64_t ctas =
      dmask.size(0) * dmask.size(1) * (dmask.size(2) == 1 ? 1 : tiles) * (dmask.size(3) == 1 ? 1 : tiles);
  CHECK_ARG(T < (int64_t{1} << 31) && ctas < (int64_t{1} << 31), "dmask has too many 64 x 64 tiles for one grid: ",
            ctas);
  la::MaskGradParams p;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.dout = dout.data_ptr();
  p.dmask = dmask.data_ptr<float>();
  p.batch = static_cast<int>(B);
  p.seqlen = static_cast<int>(T);
  p.heads = static_cast<int>(H);
  p.kv_heads = static_cast<int>(HK);
  p.k_dim = static_cast<int>(K);
  p.v_dim = static_cast<int>(V);
  p.mask_batch = static_cast<int>(dmask.size(0));
  p.mask_heads = static_cast<int>(dmask.size(1));
  p.mask_rows = static_cast<int>(dmask.size(2));
  p.mask_cols = static_cast<int>(dmask.size(3));
  p.scale = static_cast<float>(scale);
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  check_launch("masked_mask_grad",
               dispatch_dtype(q.scalar_type(), [&](auto tag) { return la::run_mask_grad<decltype(tag)>(p, stream); }));
}

// ---------------------------------------------------------------- launchers

// Segments (chunk_state.cuh, chunk_fused.cuh): seg_chunks > 0 cuts every sequence into segments of
// that many chunks, each its own CTA; seg_state fp32 [N_seq * S, H, R, N] and seg_decay fp32
// [N_seq * S, H] are then the kernels' workspace, S (segments per sequence) their first size / N_seq,
// with S * seg_chunks * 64 >= T so that every sequence's chunks are covered. S = 1 is no segments.
// per_row: seg_decay is [N_seq * S, H, R] (per-key gates: one log-decay per state row).
template <typename Params>
void set_segments(Params& p, int64_t seg_chunks, const OptTensor& seg_state, const OptTensor& seg_decay,
                  const Tensor& like, int64_t N, int64_t H, int64_t R, int64_t C, int64_t T, bool per_row = false) {
  CHECK_ARG(seg_chunks >= 0, "seg_chunks must be >= 0, got ", seg_chunks);
  if (seg_chunks == 0) return;
  CHECK_ARG(seg_state.has_value() && seg_decay.has_value(), "seg_chunks > 0 needs seg_state and seg_decay");
  CHECK_ARG(N > 0 && seg_state->dim() == 4 && seg_state->size(0) % N == 0 && seg_state->size(0) > 0,
            "seg_state must be [N_seq * S, H, R, N] with S >= 1 (N_seq = ", N, "), got ", seg_state->sizes());
  const int64_t S = seg_state->size(0) / N;
  check_opt(seg_state, "seg_state", like, at::kFloat, {N * S, H, R, C});
  if (per_row) {
    check_opt(seg_decay, "seg_decay", like, at::kFloat, {N * S, H, R});
  } else {
    check_opt(seg_decay, "seg_decay", like, at::kFloat, {N * S, H});
  }
  CHECK_ARG(S * seg_chunks * 64 >= T, "seg_state's ", S, " segments of seg_chunks = ", seg_chunks,
            " chunks must cover T = ", T, " tokens");
  CHECK_ARG(N * S < (int64_t{1} << 31), "N_seq * segments must be below 2^31 (grid x), got ", N * S);
  if (S > 1) {
    p.seg_chunks = static_cast<int>(std::min<int64_t>(seg_chunks, T / 64 + 1));
    p.max_segs = static_cast<int>(S);
    p.seg_state = seg_state->data_ptr<float>();
    p.seg_decay = seg_decay->data_ptr<float>();
  }
}

// The state at every chunk boundary (see chunk_state.cuh). x [B, T, H, R], z [B, T, H, N];
// states [S, H, R, N] in x's dtype; init / final_state fp32 [N_seq, H, R, N].
// Reverse only: pair_states [S, H, R, N] (the forward states) and pair_dot fp32
// [S, H, (R / 64) * (N / 32)] get exp(b_L) <dH_c, h_c> per tile (both or neither).
// GLA: gk_cum fp32 [B, T, H, R] (gla_cumsum's per-key cumulative gates) instead of g / gamma.
// seg_chunks, seg_state, seg_decay: segments (set_segments; seg_decay [.., H, R] with gk_cum).
void chunk_state(const Tensor& x, const Tensor& z, const OptTensor& g, const OptTensor& gamma, const OptTensor& init,
                 Tensor& states, const OptTensor& final_state, const OptTensor& cu_seqlens,
                 const OptTensor& chunk_offsets, double scale, bool reverse, const OptTensor& pair_states,
                 const OptTensor& pair_dot, int64_t tile_n, const OptTensor& gk_cum, int64_t seg_chunks,
                 const OptTensor& seg_state, const OptTensor& seg_decay) {
  check_dense(x, "x", x);
  check_dense(z, "z", x);
  check_dense(states, "states", x);
  CHECK_ARG(z.dim() == 4 && z.sizes().slice(0, 3) == x.sizes().slice(0, 3), "z must be [B, T, H, N] like x, got ",
            z.sizes());
  check_dtype(z, "z", x.scalar_type());
  check_dtype(states, "states", x.scalar_type());
  const int64_t H = x.size(2), R = x.size(3), N = z.size(3);
  CHECK_ARG(R % 64 == 0 && N % 64 == 0 && R > 0 && N > 0, "R and N must be multiples of 64, got ", R, " and ", N);
  check_shape(states, "states", {states.size(0), H, R, N});
  c10::cuda::CUDAGuard guard(x.device());
  la::ChunkStateParams p;
  p.seq = seq_params(x, cu_seqlens, chunk_offsets, states.size(0));
  check_opt(init, "init", x, at::kFloat, {p.seq.num_seqs, H, R, N});
  check_opt(final_state, "final_state", x, at::kFloat, {p.seq.num_seqs, H, R, N});
  p.gate = gate_params(g, gamma, x);
  CHECK_ARG(pair_states.has_value() == pair_dot.has_value(), "pair_states and pair_dot go together");
  CHECK_ARG(!pair_dot.has_value() || reverse, "pair_dot is for the reverse pass");
  check_opt(pair_states, "pair_states", x, x.scalar_type(), states.sizes());
  check_opt(pair_dot, "pair_dot", x, at::kFloat, {states.size(0), H, (R / 64) * (N / 32)});
  p.pair_states = data_or_null(pair_states);
  p.pair_dot = float_data_or_null(pair_dot);
  const bool per_key = gk_cum.has_value();
  CHECK_ARG(!per_key || (!g.has_value() && !gamma.has_value() && !pair_dot.has_value()),
            "gk_cum (GLA) goes without g, gamma and pair_dot");
  check_opt(gk_cum, "gk_cum", x, at::kFloat, x.sizes());
  p.gk_cum = float_data_or_null(gk_cum);
  p.x = x.data_ptr();
  p.z = z.data_ptr();
  p.init = float_data_or_null(init);
  p.states = states.data_ptr();
  p.final_state = float_data_or_null(final_state);
  p.r_dim = static_cast<int>(R);
  p.n_dim = static_cast<int>(N);
  p.scale = static_cast<float>(scale);
  const int bn = tile_n > 0 ? static_cast<int>(tile_n)
                            : la::chunk_state_tile_n(p.seq.num_seqs, H, p.r_dim, p.n_dim, num_sms(x.get_device()));
  CHECK_ARG(bn == 32 || bn == 64, "tile_n must be 0 (auto), 32 or 64, got ", tile_n);
  set_segments(p, seg_chunks, seg_state, seg_decay, x, p.seq.num_seqs, H, R, N, x.size(1), per_key);
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  check_launch("chunk_state", dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using Tag = decltype(tag);
    return dispatch_bool(reverse, [&](auto rev) {
      return dispatch_bool(per_key, [&](auto pk) {
        constexpr bool kRev = decltype(rev)::value, kPK = decltype(pk)::value;
        return bn == 64 ? la::run_chunk_state<Tag, 64, kRev, kPK>(p, stream)
                        : la::run_chunk_state<Tag, 32, kRev, kPK>(p, stream);
      });
    });
  }));
}

// out = rowscale * (x M) + intra_scale * ((x y^T) * D) z per chunk (see chunk_output.cuh).
// x, y [B, T, H, R]; z, out [B, T, H, N]; m [S, H, R, N] ([S, H, N, R] with trans_m);
// dot [B, T, H, N] and rowdot fp32 [N / 64, B, T, H], both or neither.
void chunk_output(const Tensor& x, const Tensor& y, const Tensor& z, const Tensor& m, Tensor& out,
                  const OptTensor& dot, const OptTensor& rowdot, const OptTensor& g, const OptTensor& gamma,
                  const OptTensor& cu_seqlens, const OptTensor& chunk_offsets, double inter_scale,
                  double intra_scale, bool trans_m, bool upper) {
  check_operands({{&x, "x"}, {&y, "y"}, {&z, "z"}, {&m, "m"}, {&out, "out"}}, x, x.scalar_type());
  const auto [B, T, H, R, N] = check_tokens({&x, "x"}, "[B, T, H, R]", {&y, "y"}, {&z, "z"}, {&out, "out"});
  CHECK_ARG(N % 64 == 0 && N > 0, "N must be a multiple of 64, got ", N);
  if (trans_m) {
    check_shape(m, "m", {m.size(0), H, N, R});
  } else {
    check_shape(m, "m", {m.size(0), H, R, N});
  }
  CHECK_ARG(dot.has_value() == rowdot.has_value(), "dot and rowdot go together");
  check_opt(dot, "dot", x, x.scalar_type(), {B, T, H, N});
  check_opt(rowdot, "rowdot", x, at::kFloat, {N / 64, B, T, H});
  c10::cuda::CUDAGuard guard(x.device());
  la::ChunkOutputParams p;
  p.seq = seq_params(x, cu_seqlens, chunk_offsets, m.size(0));
  p.gate = gate_params(g, gamma, x);
  p.x = x.data_ptr();
  p.y = y.data_ptr();
  p.z = z.data_ptr();
  p.m = m.data_ptr();
  p.out = out.data_ptr();
  p.dot = data_or_null(dot);
  p.rowdot = float_data_or_null(rowdot);
  p.r_dim = static_cast<int>(R);
  p.n_dim = static_cast<int>(N);
  p.inter_scale = static_cast<float>(inter_scale);
  p.intra_scale = static_cast<float>(intra_scale);
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  const bool wide = la::chunk_output_tile_n(p.r_dim, p.n_dim) == 128;
  check_launch("chunk_output", dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using Tag = decltype(tag);
    return dispatch_head_dim(R, [&](auto r) {
      constexpr int kR = decltype(r)::value;
      return dispatch_bool(trans_m, [&](auto tm) {
        return dispatch_bool(upper, [&](auto up) {
          constexpr bool kT = decltype(tm)::value, kU = decltype(up)::value;
          if constexpr (kR <= 128) {
            return wide ? la::run_chunk_output<Tag, kR, 128, kT, kU>(p, stream)
                        : la::run_chunk_output<Tag, kR, 64, kT, kU>(p, stream);
          } else {
            return la::run_chunk_output<Tag, kR, 64, kT, kU>(p, stream);
          }
        });
      });
    });
  }));
}

// The one-pass forwards' optional h_out [S, H, K, V] in q's dtype (every chunk's entering state, as
// chunk_state writes it): checked, and its data, or null. With cu_seqlens the caller's chunk_offsets
// place the chunks (as for chunk_state); batched, S must be B * ceil(T / 64).
void* state_out_data(const OptTensor& h_out, const OptTensor& chunk_offsets, const OptTensor& cu_seqlens,
                     const Tensor& q, int64_t B, int64_t T, int64_t H, int64_t K, int64_t V) {
  if (!h_out.has_value()) return nullptr;
  CHECK_ARG(!cu_seqlens.has_value() || chunk_offsets.has_value(), "h_out with cu_seqlens needs chunk_offsets");
  check_operands({{&*h_out, "h_out"}}, q, q.scalar_type());
  check_shape(*h_out, "h_out", {h_out->size(0), H, K, V});
  CHECK_ARG(cu_seqlens.has_value() || h_out->size(0) == B * ((T + 63) / 64), "h_out must have B * ceil(T / 64) = ",
            B * ((T + 63) / 64), " slots, got ", h_out->size(0));
  return h_out->data_ptr();
}

// What the one-pass forwards' parameters share (ChunkFusedParams, GlaFusedParams), checked and set:
// the sequences, h_out (state_out_data), init / final_state fp32 [N_seq, H, K, V], the grid's y and
// z (H, V / bv), the operands, K, V and the scale.
template <typename Params>
void set_one_pass_params(Params& p, const Tensor& q, const Tensor& k, const Tensor& v, Tensor& out,
                         const OptTensor& init, const OptTensor& final_state, const OptTensor& cu_seqlens,
                         const OptTensor& h_out, const OptTensor& chunk_offsets, int bv, double scale) {
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), K = q.size(3), V = v.size(3);
  p.h_out = state_out_data(h_out, chunk_offsets, cu_seqlens, q, B, T, H, K, V);
  p.seq = seq_params(q, cu_seqlens, h_out.has_value() ? chunk_offsets : std::nullopt,
                     h_out.has_value() ? h_out->size(0) : 0, false);
  check_opt(init, "init", q, at::kFloat, {p.seq.num_seqs, H, K, V});
  check_opt(final_state, "final_state", q, at::kFloat, {p.seq.num_seqs, H, K, V});
  CHECK_ARG(H < 65536 && V / bv < 65536, "H and V / ", bv, " must be below 65536 (grid y, z), got ", H, " and ",
            V / bv);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.init = float_data_or_null(init);
  p.final_state = float_data_or_null(final_state);
  p.k_dim = static_cast<int>(K);
  p.v_dim = static_cast<int>(V);
  p.scale = static_cast<float>(scale);
}

// The scalar-gate forward in one pass (chunk_fused.cuh): q, k [B, T, H, K]; v, out [B, T, H, V];
// g [B, T, H] or gamma [H] fp32 (or neither); init / final_state fp32 [N_seq, H, K, V], each optional.
// The same o and final state as chunk_state + chunk_output (x = q, y = k, z = v, lower, both scales
// = scale), with no states in global memory. K in {64, 128, 256}; V a multiple of the V tile.
// seg_chunks, seg_state, seg_decay: segments (set_segments), two launches (chunk_fused.cuh).
// h_out [S, H, K, V] in q's dtype (optional) gets every chunk's entering state as chunk_state would
// (chunk_offsets [N_seq + 1] int32 with cu_seqlens, as chunk_state's).
void chunk_fused_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& g, const OptTensor& gamma,
                     const OptTensor& init, Tensor& out, const OptTensor& final_state, const OptTensor& cu_seqlens,
                     double scale, int64_t seg_chunks, const OptTensor& seg_state, const OptTensor& seg_decay,
                     const OptTensor& h_out, const OptTensor& chunk_offsets) {
  check_operands({{&q, "q"}, {&k, "k"}, {&v, "v"}, {&out, "out"}}, q, q.scalar_type());
  const auto [B, T, H, K, V] = check_tokens({&q, "q"}, "[B, T, H, K]", {&k, "k"}, {&v, "v"}, {&out, "out"});
  const int bv = la::chunk_fused_tile_v(static_cast<int>(K));
  CHECK_ARG(V % bv == 0 && V > 0, "V must be a multiple of ", bv, " (K = ", K, "), got ", V);
  c10::cuda::CUDAGuard guard(q.device());
  la::ChunkFusedParams p;
  set_one_pass_params(p, q, k, v, out, init, final_state, cu_seqlens, h_out, chunk_offsets, bv, scale);
  p.gate = gate_params(g, gamma, q);
  set_segments(p, seg_chunks, seg_state, seg_decay, q, p.seq.num_seqs, H, K, V, T);
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  check_launch("chunk_fused_fwd", dispatch_dtype(q.scalar_type(), [&](auto tag) {
    return dispatch_head_dim(K, [&](auto kd) {
      constexpr int kK = decltype(kd)::value;
      return la::run_chunk_fused_fwd<decltype(tag), kK, la::chunk_fused_tile_v(kK)>(p, stream);
    });
  }));
}

// The V tile of chunk_fused_fwd for a K (tile_size.h), for the route's grid-size test.
int64_t chunk_fused_tile_v(int64_t k_dim) { return la::chunk_fused_tile_v(static_cast<int>(k_dim)); }

// dg [B, T, H] fp32 for scalar gates, per chunk (gate_grad.cu): q, k [B, T, H, K], v, dout
// [B, T, H, V]; rq, rk fp32 [K / 64, B, T, H] (chunk_output's inter-part row dots); pair fp32
// [S, H, tiles] (chunk_state's reverse pair_dot).
void gate_grad(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& dout, const OptTensor& g,
               const OptTensor& gamma, const Tensor& rq, const Tensor& rk, const Tensor& pair, Tensor& dg,
               const OptTensor& cu_seqlens, const OptTensor& chunk_offsets, double scale) {
  check_operands({{&q, "q"}, {&k, "k"}, {&v, "v"}, {&dout, "dout"}}, q, q.scalar_type());
  const auto [B, T, H, K, V] = check_tokens({&q, "q"}, "[B, T, H, K]", {&k, "k"}, {&v, "v"}, {&dout, "dout"});
  CHECK_ARG(K % 64 == 0 && V % 64 == 0 && K > 0 && V > 0, "K and V must be multiples of 64, got ", K, ", ", V);
  check_operands({{&rq, "rq"}, {&rk, "rk"}, {&pair, "pair"}, {&dg, "dg"}}, q, at::kFloat);
  check_shape(rq, "rq", {K / 64, B, T, H});
  check_shape(rk, "rk", {K / 64, B, T, H});
  check_shape(dg, "dg", {B, T, H});
  CHECK_ARG(pair.dim() == 3 && pair.size(1) == H, "pair must be [S, H, tiles], got ", pair.sizes());
  c10::cuda::CUDAGuard guard(q.device());
  la::GateGradParams p;
  p.seq = seq_params(q, cu_seqlens, chunk_offsets, pair.size(0));
  p.gate = gate_params(g, gamma, q);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.dout = dout.data_ptr();
  p.rq = rq.data_ptr<float>();
  p.rk = rk.data_ptr<float>();
  p.pair = pair.data_ptr<float>();
  p.dg = dg.data_ptr<float>();
  p.k_dim = static_cast<int>(K);
  p.v_dim = static_cast<int>(V);
  p.pair_tiles = static_cast<int>(pair.size(2));
  p.scale = static_cast<float>(scale);
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  check_launch("gate_grad",
               dispatch_dtype(q.scalar_type(), [&](auto tag) { return la::run_gate_grad<decltype(tag)>(p, stream); }));
}

// dv, dk, dq of the simple-GLA backward in one sm90a pass (chunk_bwd_sm90.cuh) from the states h and
// dH [S, H, K, V]: q, k, dq, dk [B, T, H, K]; v, dout, dv [B, T, H, V]; rq, rk fp32 [K / 64, B, T, H]
// (the gate gradient's row dots, as chunk_output writes them) or neither. jobs: the products (1 dv,
// 2 dk, 4 dq; sets 7, 3 and 4 are built). Returns false, with nothing launched, where the build or
// the device lacks the sm90a kernel or K, V are not 64, 128 or 256 (K == V): the caller then runs
// the chunk_output passes.
bool chunk_bwd_fused(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& dout, const Tensor& h,
                     const Tensor& dh, Tensor& dq, Tensor& dk, Tensor& dv, const OptTensor& rq, const OptTensor& rk,
                     const OptTensor& g, const OptTensor& gamma, const OptTensor& cu_seqlens,
                     const OptTensor& chunk_offsets, double scale, int64_t jobs) {
  check_operands({{&q, "q"}, {&k, "k"}, {&v, "v"}, {&dout, "dout"}, {&h, "h"}, {&dh, "dh"}, {&dq, "dq"},
                  {&dk, "dk"}, {&dv, "dv"}}, q, q.scalar_type());
  const auto [B, T, H, K, V] = check_tokens({&q, "q"}, "[B, T, H, K]", {&k, "k"}, {&v, "v"}, {&dout, "dout"});
  check_shape(dq, "dq", q.sizes());
  check_shape(dk, "dk", q.sizes());
  check_shape(dv, "dv", v.sizes());
  check_shape(h, "h", {h.size(0), H, K, V});
  check_shape(dh, "dh", {h.size(0), H, K, V});
  CHECK_ARG(jobs == 7 || jobs == 3 || jobs == 4, "jobs must be 7 (dv, dk, dq), 3 (dv, dk) or 4 (dq), got ", jobs);
  CHECK_ARG(rq.has_value() == rk.has_value(), "rq and rk go together");
  check_opt(rq, "rq", q, at::kFloat, {K / 64, B, T, H});
  check_opt(rk, "rk", q, at::kFloat, {K / 64, B, T, H});
  CHECK_ARG(H < 65536, "H must be below 65536 (grid y), got ", H);
  if (K != V || (K != 64 && K != 128 && K != 256)) return false;
  c10::cuda::CUDAGuard guard(q.device());
  la::ChunkBwdParams p;
  p.seq = seq_params(q, cu_seqlens, chunk_offsets, h.size(0));
  p.gate = gate_params(g, gamma, q);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.dout = dout.data_ptr();
  p.h = h.data_ptr();
  p.dh = dh.data_ptr();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.rq = float_data_or_null(rq);
  p.rk = float_data_or_null(rk);
  p.k_dim = static_cast<int>(K);
  p.v_dim = static_cast<int>(V);
  p.scale = static_cast<float>(scale);
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  bool ran = false;
  check_launch("chunk_bwd_fused", dispatch_dtype(q.scalar_type(), [&](auto tag) {
    using Tag = decltype(tag);
    auto run = [&](auto d) {
      constexpr int kD = decltype(d)::value;
      if (jobs == 7) return la::run_chunk_bwd_sm90<Tag, kD, kD, 7>(p, stream, &ran);
      if (jobs == 3) return la::run_chunk_bwd_sm90<Tag, kD, kD, 3>(p, stream, &ran);
      return la::run_chunk_bwd_sm90<Tag, kD, kD, 4>(p, stream, &ran);
    };
    if (K == 64) return run(std::integral_constant<int, 64>{});
    return K == 128 ? run(std::integral_constant<int, 128>{}) : run(std::integral_constant<int, 256>{});
  }));
  return ran;
}

// What recurrent and recurrent_grad share: the sequences, the per-key / per-value gates gk
// [B, T, H, K] and gv [B, T, H, V] fp32, q, k, v, the initial state fp32 [N_seq, H, K, V], the
// sizes, scale and direction (the caller has checked q, k, v and holds the device guard).
la::RecurrentParams recurrent_params(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& gk,
                                     const OptTensor& gv, const OptTensor& init, const OptTensor& cu_seqlens,
                                     const OptTensor& chunk_offsets, double scale, bool reverse) {
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), K = q.size(3), V = v.size(3);
  la::RecurrentParams p;
  p.seq = seq_params(q, cu_seqlens, chunk_offsets, 0, false);
  check_opt(gk, "gk", q, at::kFloat, {B, T, H, K});
  check_opt(gv, "gv", q, at::kFloat, {B, T, H, V});
  check_opt(init, "init", q, at::kFloat, {p.seq.num_seqs, H, K, V});
  p.gk = float_data_or_null(gk);
  p.gv = float_data_or_null(gv);
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.init = float_data_or_null(init);
  p.k_dim = static_cast<int>(K);
  p.v_dim = static_cast<int>(V);
  p.scale = static_cast<float>(scale);
  p.reverse = reverse;
  p.num_sms = num_sms(q.get_device());
  return p;
}

// Token by token: q, k [B, T, H, K]; v, out [B, T, H, V]; g [B, T, H] or gamma [H] fp32;
// gk [B, T, H, K], gv [B, T, H, V] fp32; init / final_state fp32 [N_seq, H, K, V].
void recurrent(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& g, const OptTensor& gamma,
               const OptTensor& gk, const OptTensor& gv, const OptTensor& init, Tensor& out,
               const OptTensor& final_state, const OptTensor& cu_seqlens, const OptTensor& chunk_offsets,
               double scale, bool reverse) {
  check_operands({{&q, "q"}, {&k, "k"}, {&v, "v"}, {&out, "out"}}, q, q.scalar_type());
  const auto [B, T, H, K, V] = check_tokens({&q, "q"}, "[B, T, H, K]", {&k, "k"}, {&v, "v"}, {&out, "out"});
  CHECK_ARG(V % 32 == 0 && V > 0, "V must be a multiple of 32, got ", V);
  c10::cuda::CUDAGuard guard(q.device());
  la::RecurrentParams p = recurrent_params(q, k, v, gk, gv, init, cu_seqlens, chunk_offsets, scale, reverse);
  p.gate = gate_params(g, gamma, q);
  check_opt(final_state, "final_state", q, at::kFloat, {p.seq.num_seqs, H, K, V});
  p.out = out.data_ptr();
  p.final_state = float_data_or_null(final_state);
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  check_launch("recurrent", dispatch_dtype(q.scalar_type(), [&](auto tag) {
    return dispatch_head_dim(K, [&](auto kd) {
      return la::run_recurrent<decltype(tag), decltype(kd)::value, false>(p, stream);
    });
  }));
}

// The gradients of the token-by-token GLA recurrence with gk [B, T, H, K] and/or gv [B, T, H, V]
// fp32 gates (recurrent_grad.cuh): q, k [B, T, H, K]; v, dout, dv [B, T, H, V]; init, dfinal,
// dinit fp32 [N_seq, H, K, V] (each optional); dq_part, dk_part and (with gk) dgk_part fp32
// [V / 32, B, T, H, K], parts the caller sums over dim 0; dgv fp32 [B, T, H, V] (with gv).
void recurrent_grad(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& gk, const OptTensor& gv,
                    const OptTensor& init, const Tensor& dout, const OptTensor& dfinal, Tensor& dq_part,
                    Tensor& dk_part, const OptTensor& dgk_part, Tensor& dv, const OptTensor& dgv,
                    const OptTensor& dinit, const OptTensor& cu_seqlens, const OptTensor& chunk_offsets, double scale,
                    bool reverse) {
  check_operands({{&q, "q"}, {&k, "k"}, {&v, "v"}, {&dout, "dout"}, {&dv, "dv"}}, q, q.scalar_type());
  const auto [B, T, H, K, V] = check_tokens({&q, "q"}, "[B, T, H, K]", {&k, "k"}, {&v, "v"}, {&dout, "dout"});
  CHECK_ARG(V % 32 == 0 && V > 0, "V must be a multiple of 32, got ", V);
  check_shape(dv, "dv", v.sizes());
  CHECK_ARG(gk.has_value() == dgk_part.has_value(), "dgk_part is given exactly when gk is");
  CHECK_ARG(gv.has_value() == dgv.has_value(), "dgv is given exactly when gv is");
  c10::cuda::CUDAGuard guard(q.device());
  la::RecurrentParams p = recurrent_params(q, k, v, gk, gv, init, cu_seqlens, chunk_offsets, scale, reverse);
  const int64_t N = p.seq.num_seqs;
  check_opt(dfinal, "dfinal", q, at::kFloat, {N, H, K, V});
  check_opt(dinit, "dinit", q, at::kFloat, {N, H, K, V});
  check_opt(dq_part, "dq_part", q, at::kFloat, {V / 32, B, T, H, K});
  check_opt(dk_part, "dk_part", q, at::kFloat, {V / 32, B, T, H, K});
  check_opt(dgk_part, "dgk_part", q, at::kFloat, {V / 32, B, T, H, K});
  check_opt(dgv, "dgv", q, at::kFloat, {B, T, H, V});
  p.dout = dout.data_ptr();
  p.dfinal = float_data_or_null(dfinal);
  p.dq_part = dq_part.data_ptr<float>();
  p.dk_part = dk_part.data_ptr<float>();
  p.dgk_part = float_data_or_null(dgk_part);
  p.dv = dv.data_ptr();
  p.dgv = float_data_or_null(dgv);
  p.dinit = float_data_or_null(dinit);
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  check_launch("recurrent_grad", dispatch_dtype(q.scalar_type(), [&](auto tag) {
    return dispatch_head_dim(K, [&](auto kd) {
      return la::run_recurrent<decltype(tag), decltype(kd)::value, true>(p, stream);
    });
  }));
}

// ---------------------------------------------------------------- GLA (per-key gates)

// b = the chunk-local cumulative sum of g, both fp32 [B, T, H, K] (K a multiple of 64).
void gla_cumsum(const Tensor& g, Tensor& out, const OptTensor& cu_seqlens, const OptTensor& chunk_offsets,
                int64_t num_slots) {
  check_operands({{&g, "g"}, {&out, "out"}}, g, at::kFloat);
  CHECK_ARG(g.dim() == 4, "g must be [B, T, H, K], got ", g.sizes());
  check_shape(out, "out", g.sizes());
  const int64_t K = g.size(3);
  CHECK_ARG(K % 64 == 0 && K > 0, "K must be a multiple of 64, got ", K);
  c10::cuda::CUDAGuard guard(g.device());
  la::GlaCumsumParams p;
  p.seq = seq_params(g, cu_seqlens, chunk_offsets, num_slots);
  p.g = g.data_ptr<float>();
  p.out = out.data_ptr<float>();
  p.k_dim = static_cast<int>(K);
  check_launch("gla_cumsum", la::run_gla_cumsum(p, c10::cuda::getCurrentCUDAStream().stream()));
}

// GLA's per-chunk output (gla_output.cuh): x, y [B, T, H, R]; z, out [B, T, H, N]; m [S, H, R, N];
// b fp32 [B, T, H, R] (gla_cumsum). Lower: the forward o; upper: dv.
void gla_output(const Tensor& x, const Tensor& y, const Tensor& z, const Tensor& m, const Tensor& b, Tensor& out,
                const OptTensor& cu_seqlens, const OptTensor& chunk_offsets, double inter_scale, double intra_scale,
                bool upper) {
  check_operands({{&x, "x"}, {&y, "y"}, {&z, "z"}, {&m, "m"}, {&out, "out"}}, x, x.scalar_type());
  const auto [B, T, H, R, N] = check_tokens({&x, "x"}, "[B, T, H, R]", {&y, "y"}, {&z, "z"}, {&out, "out"});
  CHECK_ARG(R % 64 == 0 && R > 0 && N % 64 == 0 && N > 0, "R and N must be multiples of 64, got ", R, " and ", N);
  check_shape(m, "m", {m.size(0), H, R, N});
  check_operands({{&b, "b"}}, x, at::kFloat);
  check_shape(b, "b", x.sizes());
  c10::cuda::CUDAGuard guard(x.device());
  la::GlaOutputParams p;
  p.seq = seq_params(x, cu_seqlens, chunk_offsets, m.size(0));
  p.x = x.data_ptr();
  p.y = y.data_ptr();
  p.z = z.data_ptr();
  p.m = m.data_ptr();
  p.b = b.data_ptr<float>();
  p.out = out.data_ptr();
  p.r_dim = static_cast<int>(R);
  p.n_dim = static_cast<int>(N);
  p.inter_scale = static_cast<float>(inter_scale);
  p.intra_scale = static_cast<float>(intra_scale);
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  const bool wide = la::gla_output_tile_n(p.n_dim) == 128;
  check_launch("gla_output", dispatch_dtype(x.scalar_type(), [&](auto tag) {
    using Tag = decltype(tag);
    return dispatch_bool(upper, [&](auto up) {
      constexpr bool kU = decltype(up)::value;
      return wide ? la::run_gla_output<Tag, 128, kU>(p, stream) : la::run_gla_output<Tag, 64, kU>(p, stream);
    });
  }));
}

// GLA's forward in one pass (gla_fused.cuh): q, k [B, T, H, K]; v, out [B, T, H, V]; b fp32
// [B, T, H, K] (gla_cumsum); init / final_state fp32 [N_seq, H, K, V], each optional. The same o and
// final state as chunk_state (gk_cum = b) + gla_output (lower, both scales = scale), with no states
// in global memory. K in {64, 128, 256}; V a multiple of the V tile (gla_fused_tile_v: 128 at K = 128
// when V allows it, the 256-thread kernel; else 64, or 32 at K = 256).
// The 256-thread kernel only: g fp32 [B, T, H, K] (raw gates) instead of b, summed per chunk in the
// kernel, with b_out fp32 [B, T, H, K] (optional) getting b; seg_chunks, seg_state [N_seq * S, H, K,
// V], seg_decay [N_seq * S, H, K]: segments (set_segments), two launches (gla_fused.cuh); h_out [S, H,
// K, V] in q's dtype (optional) gets every chunk's entering state as chunk_state would (chunk_offsets
// [N_seq + 1] int32 with cu_seqlens, as chunk_state's).
// reverse: the backward's reverse pass in the 256-thread kernel (run_gla_fused_reverse), with q = k,
// k = q, v = do, b = the forward's b, init = dh_T, out = dv, final_state = dh_0, h_out = dH (the state
// gradients leaving each chunk, as chunk_state's reverse pass writes them); b only, segments allowed.
void gla_fused_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const OptTensor& b, const OptTensor& init,
                   Tensor& out, const OptTensor& final_state, const OptTensor& cu_seqlens, double scale,
                   const OptTensor& g, const OptTensor& b_out, int64_t seg_chunks, const OptTensor& seg_state,
                   const OptTensor& seg_decay, const OptTensor& h_out, const OptTensor& chunk_offsets, bool reverse) {
  check_operands({{&q, "q"}, {&k, "k"}, {&v, "v"}, {&out, "out"}}, q, q.scalar_type());
  const auto [B, T, H, K, V] = check_tokens({&q, "q"}, "[B, T, H, K]", {&k, "k"}, {&v, "v"}, {&out, "out"});
  CHECK_ARG(K == 64 || K == 128 || K == 256, "K must be 64, 128 or 256 (pad in Python), got ", K);
  CHECK_ARG(!reverse || (K == 128 && V % 128 == 0 && b.has_value() && !g.has_value()),
            "reverse needs the 256-thread kernel (K = 128, V a multiple of 128) and b (not g), got K = ", K,
            ", V = ", V);
  const int bv = la::gla_fused_tile_v(static_cast<int>(K), V);
  CHECK_ARG(V % bv == 0 && V > 0, "V must be a multiple of ", bv, " (K = ", K, "), got ", V);
  CHECK_ARG(b.has_value() != g.has_value(), "give exactly one of b (cumulative gates) and g (raw gates)");
  const bool wide = bv == 128;
  CHECK_ARG(wide || (!g.has_value() && seg_chunks == 0),
            "raw gates g and segments need the 256-thread kernel (K = 128, V a multiple of 128), got K = ", K,
            ", V = ", V);
  CHECK_ARG(!b_out.has_value() || g.has_value(), "b_out needs raw gates g");
  CHECK_ARG(wide || !h_out.has_value(), "h_out needs the 256-thread kernel (K = 128, V a multiple of 128)");
  const Tensor& gates = b.has_value() ? *b : *g;
  check_operands({{&gates, b.has_value() ? "b" : "g"}}, q, at::kFloat);
  check_shape(gates, b.has_value() ? "b" : "g", q.sizes());
  check_opt(b_out, "b_out", q, at::kFloat, q.sizes());
  c10::cuda::CUDAGuard guard(q.device());
  la::GlaFusedParams p;
  set_one_pass_params(p, q, k, v, out, init, final_state, cu_seqlens, h_out, chunk_offsets, bv, scale);
  p.b = b.has_value() ? b->data_ptr<float>() : nullptr;
  p.g = g.has_value() ? g->data_ptr<float>() : nullptr;
  p.b_out = float_data_or_null(b_out);
  set_segments(p, seg_chunks, seg_state, seg_decay, q, p.seq.num_seqs, H, K, V, T, /*per_row=*/true);
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  check_launch("gla_fused_fwd", dispatch_dtype(q.scalar_type(), [&](auto tag) {
    return dispatch_head_dim(K, [&](auto kd) {
      constexpr int kK = decltype(kd)::value;
      if constexpr (kK == 128) {
        if (reverse) return la::run_gla_fused_reverse<decltype(tag)>(p, stream);
        if (wide) return la::run_gla_fused_fwd<decltype(tag), 128, 128>(p, stream);
      }
      return la::run_gla_fused_fwd<decltype(tag), kK, la::gla_fused_narrow_tile_v(kK)>(p, stream);
    });
  }));
}

// The V tile of gla_fused_fwd for a K and V (tile_size.h), for the route's grid-size test.
int64_t gla_fused_tile_v(int64_t k_dim, int64_t v_dim) { return la::gla_fused_tile_v(static_cast<int>(k_dim), v_dim); }

// dq, dk [B, T, H, K] and dg fp32 [B, T, H, K] of GLA (gla_grad.cuh): q, k [B, T, H, K]; v, dout
// [B, T, H, V]; b fp32 [B, T, H, K]; h, dh [S, H, K, V] (chunk_state forward / reverse).
void gla_grad(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& dout, const Tensor& b,
              const Tensor& h, const Tensor& dh, Tensor& dq, Tensor& dk, Tensor& dg, const OptTensor& cu_seqlens,
              const OptTensor& chunk_offsets, double scale) {
  check_operands({{&q, "q"}, {&k, "k"}, {&v, "v"}, {&dout, "dout"}, {&h, "h"}, {&dh, "dh"}, {&dq, "dq"},
                  {&dk, "dk"}}, q, q.scalar_type());
  const auto [B, T, H, K, V] = check_tokens({&q, "q"}, "[B, T, H, K]", {&k, "k"}, {&v, "v"}, {&dout, "dout"});
  CHECK_ARG(K % 64 == 0 && V % 64 == 0 && K > 0 && V > 0, "K and V must be multiples of 64, got ", K, ", ", V);
  check_shape(dq, "dq", q.sizes());
  check_shape(dk, "dk", q.sizes());
  check_shape(h, "h", {h.size(0), H, K, V});
  check_shape(dh, "dh", h.sizes());
  check_operands({{&b, "b"}, {&dg, "dg"}}, q, at::kFloat);
  check_shape(b, "b", q.sizes());
  check_shape(dg, "dg", q.sizes());
  c10::cuda::CUDAGuard guard(q.device());
  la::GlaGradParams p;
  p.seq = seq_params(q, cu_seqlens, chunk_offsets, h.size(0));
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.dout = dout.data_ptr();
  p.b = b.data_ptr<float>();
  p.h = h.data_ptr();
  p.dh = dh.data_ptr();
  p.dq = dq.data_ptr();
  p.dk = dk.data_ptr();
  p.dg = dg.data_ptr<float>();
  p.k_dim = static_cast<int>(K);
  p.v_dim = static_cast<int>(V);
  p.scale = static_cast<float>(scale);
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  check_launch("gla_grad",
               dispatch_dtype(q.scalar_type(), [&](auto tag) { return la::run_gla_grad<decltype(tag)>(p, stream); }));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "Chunked linear-attention kernels (flash_attn.linear_attn's CUDA route)";
  m.def("masked_attn", &masked_attn,
        "Masked linear attention pass: out = scale * sum (x y^T * M) z (forward, dq, dk, dv)", py::arg("x"),
        py::arg("y"), py::arg("z"), py::arg("mask"), py::arg("out"), py::arg("scale"));
  m.def("masked_mask_grad", &masked_mask_grad,
        "Masked linear attention: the mask's gradient, summed over its broadcast dimensions", py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("dout"), py::arg("dmask"), py::arg("scale"));
  m.def("chunk_state", &chunk_state, "States at chunk boundaries (forward h, or reverse dH)", py::arg("x"),
        py::arg("z"), py::arg("g"), py::arg("gamma"), py::arg("init"), py::arg("states"), py::arg("final_state"),
        py::arg("cu_seqlens"), py::arg("chunk_offsets"), py::arg("scale"), py::arg("reverse"),
        py::arg("pair_states") = py::none(), py::arg("pair_dot") = py::none(), py::arg("tile_n") = 0,
        py::arg("gk_cum") = py::none(), py::arg("seg_chunks") = 0, py::arg("seg_state") = py::none(),
        py::arg("seg_decay") = py::none());
  m.def("chunk_bwd_fused", &chunk_bwd_fused,
        "The simple-GLA backward's dv, dk, dq in one sm90a pass; false (nothing run) where it has no kernel",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("dout"), py::arg("h"), py::arg("dh"), py::arg("dq"),
        py::arg("dk"), py::arg("dv"), py::arg("rq"), py::arg("rk"), py::arg("g"), py::arg("gamma"),
        py::arg("cu_seqlens"), py::arg("chunk_offsets"), py::arg("scale"), py::arg("jobs"));
  m.def("chunk_output", &chunk_output, "Per-chunk output: inter-chunk state product plus masked intra-chunk part",
        py::arg("x"), py::arg("y"), py::arg("z"), py::arg("m"), py::arg("out"), py::arg("dot"), py::arg("rowdot"),
        py::arg("g"), py::arg("gamma"), py::arg("cu_seqlens"), py::arg("chunk_offsets"), py::arg("inter_scale"),
        py::arg("intra_scale"), py::arg("trans_m"), py::arg("upper"));
  m.def("chunk_fused_fwd", &chunk_fused_fwd,
        "Scalar-gate chunked forward in one pass (o and the final state; no chunk states in memory)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("g"), py::arg("gamma"), py::arg("init"), py::arg("out"),
        py::arg("final_state"), py::arg("cu_seqlens"), py::arg("scale"), py::arg("seg_chunks") = 0,
        py::arg("seg_state") = py::none(), py::arg("seg_decay") = py::none(), py::arg("h_out") = py::none(),
        py::arg("chunk_offsets") = py::none());
  m.def("chunk_fused_tile_v", &chunk_fused_tile_v, "The V tile (BV) chunk_fused_fwd uses for a K",
        py::arg("k_dim"));
  m.def(
      "last_chunk_fused_kernel", [] { return la::last_chunk_fused_kernel.load(); },
      "Which kernel the last chunk_fused_fwd launch ran: 90 wgmma (sm90a), 80 mma.sync, 0 none yet");
  m.def("gate_grad", &gate_grad, "Scalar log-gate gradient, chunk by chunk", py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("dout"), py::arg("g"), py::arg("gamma"), py::arg("rq"), py::arg("rk"), py::arg("pair"),
        py::arg("dg"), py::arg("cu_seqlens"), py::arg("chunk_offsets"), py::arg("scale"));
  m.def("recurrent", &recurrent, "Token-by-token recurrence (fused_recurrent_*)", py::arg("q"), py::arg("k"),
        py::arg("v"), py::arg("g"), py::arg("gamma"), py::arg("gk"), py::arg("gv"), py::arg("init"), py::arg("out"),
        py::arg("final_state"), py::arg("cu_seqlens"), py::arg("chunk_offsets"), py::arg("scale"),
        py::arg("reverse"));
  m.def("recurrent_grad", &recurrent_grad,
        "Gradients of the token-by-token GLA recurrence with gk and/or gv (fused_recurrent_gla's backward with gv)",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("gk"), py::arg("gv"), py::arg("init"), py::arg("dout"),
        py::arg("dfinal"), py::arg("dq_part"), py::arg("dk_part"), py::arg("dgk_part"), py::arg("dv"), py::arg("dgv"),
        py::arg("dinit"), py::arg("cu_seqlens"), py::arg("chunk_offsets"), py::arg("scale"), py::arg("reverse"));
  m.def("gla_cumsum", &gla_cumsum, "GLA: chunk-local cumulative sum of the per-key log-gates",
        py::arg("g"), py::arg("out"), py::arg("cu_seqlens"), py::arg("chunk_offsets"), py::arg("num_slots"));
  m.def("gla_output", &gla_output,
        "GLA per-chunk output: inter-chunk state product plus per-key-decayed intra-chunk part (o, or dv)",
        py::arg("x"), py::arg("y"), py::arg("z"), py::arg("m"), py::arg("b"), py::arg("out"), py::arg("cu_seqlens"),
        py::arg("chunk_offsets"), py::arg("inter_scale"), py::arg("intra_scale"), py::arg("upper"));
  m.def("gla_fused_fwd", &gla_fused_fwd,
        "GLA chunked forward in one pass (o, the final state, optionally the chunk states); reverse: the "
        "backward's dv + dH pass",
        py::arg("q"),
        py::arg("k"), py::arg("v"), py::arg("b"), py::arg("init"), py::arg("out"), py::arg("final_state"),
        py::arg("cu_seqlens"), py::arg("scale"), py::arg("g") = py::none(), py::arg("b_out") = py::none(),
        py::arg("seg_chunks") = 0, py::arg("seg_state") = py::none(), py::arg("seg_decay") = py::none(),
        py::arg("h_out") = py::none(), py::arg("chunk_offsets") = py::none(), py::arg("reverse") = false);
  m.def("gla_fused_tile_v", &gla_fused_tile_v, "The V tile (BV) gla_fused_fwd uses for a K and V", py::arg("k_dim"),
        py::arg("v_dim"));
  m.def("gla_grad", &gla_grad, "GLA backward: dq, dk and the per-key gate gradient, chunk by chunk",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("dout"), py::arg("b"), py::arg("h"), py::arg("dh"),
        py::arg("dq"), py::arg("dk"), py::arg("dg"), py::arg("cu_seqlens"), py::arg("chunk_offsets"),
        py::arg("scale"));
}
