"""Exact attention as torch.library custom ops, so torch.compile(fullgraph=True) traces
through flash_attn_func / flash_attn_varlen_func without graph breaks.

    flash_attn::fwd(q, k, v, alibi_slopes, softmax_scale, window_left, window_right, softcap,
                    deterministic=False) -> (out, lse)
    flash_attn::varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k,
                           alibi_slopes, softmax_scale, window_left, window_right, softcap,
                           deterministic=False) -> (out, lse)
    flash_attn::bwd(dout, q, k, v, out, lse, alibi_slopes, softmax_scale, window_left, window_right,
                    softcap, deterministic) -> (dq, dk, dv)
    flash_attn::varlen_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q,
                           max_seqlen_k, alibi_slopes, softmax_scale, window_left, window_right, softcap,
                           deterministic) -> (dq, dk, dv)

Arguments are already checked and normalized by the caller (flash_attn._checks,
flash_attn._normalize): causal folded into the window (-1 = unbounded side), the
scale resolved, and on CUDA the head dim padded to a compiled one (and the output
sliced back) outside the op, with differentiable torch ops. Layouts as in
flash-attn: q (b, sq, hq, d), k/v (b, sk, hk, d); varlen (total, h, d) with int32
cu_seqlens (b + 1,); seqused_k int32 (b,) or None. out is contiguous in q's shape
and dtype; lse (b, hq, sq), or (hq, total_q) for varlen, fp32 (fp64 for fp64 inputs
on CPU). dq, dk, dv are contiguous in the shapes of q, k, v.

Kernels by device type: CPU tensors run the reference (flash_attn._cpu), CUDA
tensors flash_attn_2_cuda (flash_attn._cuda). `deterministic` only concerns the
backward; the forward ops take it so that their autograd formula can pass it on.
The autograd formula saves q, k, v, out and lse (nothing quadratic); lse is not
differentiable; alibi_slopes gets no gradient (as in flash-attn).
"""
import torch

from . import _cpu, _cuda

_OPTIONS = "Tensor? alibi_slopes, float softmax_scale, SymInt window_left, SymInt window_right, float softcap"
_VARLEN = "Tensor cu_seqlens_q, Tensor cu_seqlens_k, Tensor? seqused_k, SymInt max_seqlen_q, SymInt max_seqlen_k"

fwd = torch.library.custom_op(
    "flash_attn::fwd", _cpu.fwd, mutates_args=(), device_types="cpu",
    schema=f"(Tensor q, Tensor k, Tensor v, {_OPTIONS}, bool deterministic=False) -> (Tensor, Tensor)")
varlen_fwd = torch.library.custom_op(
    "flash_attn::varlen_fwd", _cpu.varlen_fwd, mutates_args=(), device_types="cpu",
    schema=f"(Tensor q, Tensor k, Tensor v, {_VARLEN}, {_OPTIONS}, bool deterministic=False) -> (Tensor, Tensor)")
bwd = torch.library.custom_op(
    "flash_attn::bwd", _cpu.bwd, mutates_args=(), device_types="cpu",
    schema=f"(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, {_OPTIONS}, "
           f"bool deterministic) -> (Tensor, Tensor, Tensor)")
varlen_bwd = torch.library.custom_op(
    "flash_attn::varlen_bwd", _cpu.varlen_bwd, mutates_args=(), device_types="cpu",
    schema=f"(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, {_VARLEN}, {_OPTIONS}, "
           f"bool deterministic) -> (Tensor, Tensor, Tensor)")

fwd.register_kernel("cuda", _cuda.fwd)
varlen_fwd.register_kernel("cuda", _cuda.varlen_fwd)
bwd.register_kernel("cuda", _cuda.bwd)
varlen_bwd.register_kernel("cuda", _cuda.varlen_bwd)


# --- fakes: shapes, dtypes and strides of the outputs, nothing computed ---

def _lse_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _new_contiguous(x):
    return x.new_empty(x.shape)


@fwd.register_fake
def _fwd_fake(q, k, v, alibi_slopes, softmax_scale, window_left, window_right, softcap, deterministic=False):
    b, sq, hq, _ = q.shape
    return _new_contiguous(q), q.new_empty((b, hq, sq), dtype=_lse_dtype(q.dtype))


@varlen_fwd.register_fake
def _varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, alibi_slopes,
                     softmax_scale, window_left, window_right, softcap, deterministic=False):
    total_q, hq, _ = q.shape
    return _new_contiguous(q), q.new_empty((hq, total_q), dtype=_lse_dtype(q.dtype))


@bwd.register_fake
def _bwd_fake(dout, q, k, v, out, lse, alibi_slopes, softmax_scale, window_left, window_right, softcap,
              deterministic):
    return _new_contiguous(q), _new_contiguous(k), _new_contiguous(v)


@varlen_bwd.register_fake
def _varlen_bwd_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k,
                     alibi_slopes, softmax_scale, window_left, window_right, softcap, deterministic):
    return _new_contiguous(q), _new_contiguous(k), _new_contiguous(v)


# --- autograd: save what the backward op needs, route the gradient to it ---

def _fwd_setup_context(ctx, inputs, output):
    q, k, v, alibi_slopes, *options = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, alibi_slopes)
    ctx.options = options  # softmax_scale, window_left, window_right, softcap, deterministic


def _fwd_backward(ctx, dout, dlse):
    q, k, v, out, lse, alibi_slopes = ctx.saved_tensors
    dq, dk, dv = bwd(dout, q, k, v, out, lse, alibi_slopes, *ctx.options)
    return dq, dk, dv, None, None, None, None, None, None


def _varlen_fwd_setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, alibi_slopes, *options = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k, alibi_slopes)
    ctx.max_seqlens = (max_seqlen_q, max_seqlen_k)
    ctx.options = options


def _varlen_fwd_backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k, alibi_slopes = ctx.saved_tensors
    dq, dk, dv = varlen_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k, *ctx.max_seqlens,
                            alibi_slopes, *ctx.options)
    return (dq, dk, dv) + (None,) * 11


fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)
varlen_fwd.register_autograd(_varlen_fwd_backward, setup_context=_varlen_fwd_setup_context)
