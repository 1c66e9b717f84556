"""Exact attention as torch.library custom ops, so torch.compile(fullgraph=True) traces
through flash_attn_func / flash_attn_varlen_func without graph breaks.

    flash_attn::fwd(q, k, v, alibi_slopes, softmax_scale, window_left, window_right, softcap,
                    deterministic=False, dropout_p=0.0, return_softmax=False)
        -> (out, lse, s_dmask, rng_state)
    flash_attn::varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k,
                           alibi_slopes, softmax_scale, window_left, window_right, softcap,
                           deterministic=False, dropout_p=0.0, return_softmax=False)
        -> (out, lse, s_dmask, rng_state)
    flash_attn::bwd(dout, q, k, v, out, lse, alibi_slopes, softmax_scale, window_left, window_right,
                    softcap, deterministic, dropout_p=0.0, rng_state=None) -> (dq, dk, dv)
    flash_attn::varlen_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q,
                           max_seqlen_k, alibi_slopes, softmax_scale, window_left, window_right, softcap,
                           deterministic, dropout_p=0.0, rng_state=None) -> (dq, dk, dv)

Arguments are already checked and normalized by the caller (flash_attn._checks,
flash_attn._normalize): causal folded into the window (-1 = unbounded side), the
scale resolved, and on CUDA the head dim padded to a compiled one (and the output
sliced back) outside the op, with differentiable torch ops. Layouts as in
flash-attn: q (b, sq, hq, d), k/v (b, sk, hk, d); varlen (total, h, d) with int32
cu_seqlens (b + 1,); seqused_k int32 (b,) or None. out is contiguous in q's shape
and dtype; lse (b, hq, sq), or (hq, total_q) for varlen, fp32 (fp64 for fp64 inputs
on CPU). dq, dk, dv are contiguous in the shapes of q, k, v.

Dropout: rng_state is int64 (2,) = (seed, offset) of the mask (flash_attn.reference_dropout
has it in PyTorch) when dropout_p > 0, else empty (0,); the forward draws it from torch's
default generator of q's device (a fresh mask per call, reproducible under
torch.manual_seed; CUDA-graph safe on CUDA), the backward takes it back. s_dmask is
(b, hq, sq, sk) rounded up to multiples of 128 (varlen: b sequences, max_seqlen_q/k), q's
dtype, when return_softmax and dropout_p > 0, else empty (0,): P with dropped entries
negated (CUDA: exp(score - running row max) per key block; CPU: normalized probabilities).

Kernels by device type: CPU tensors run the reference (flash_attn._cpu), CUDA
tensors flash_attn_2_cuda (flash_attn._cuda). `deterministic` only concerns the
backward; the forward ops take it so that their autograd formula can pass it on.
The autograd formula saves q, k, v, out, lse and rng_state (nothing quadratic); lse,
s_dmask and rng_state are not differentiable; alibi_slopes gets no gradient (as in flash-attn).
"""
import torch

from . import _cpu, _cuda
from ._normalize import rng_state_shape, s_dmask_shape

_OPTIONS = "Tensor? alibi_slopes, float softmax_scale, SymInt window_left, SymInt window_right, float softcap"
_VARLEN = "Tensor cu_seqlens_q, Tensor cu_seqlens_k, Tensor? seqused_k, SymInt max_seqlen_q, SymInt max_seqlen_k"
_FWD_TAIL = "bool deterministic=False, float dropout_p=0.0, bool return_softmax=False"
_BWD_TAIL = "bool deterministic, float dropout_p=0.0, Tensor? rng_state=None"

fwd = torch.library.custom_op(
    "flash_attn::fwd", _cpu.fwd, mutates_args=(), device_types="cpu",
    schema=f"(Tensor q, Tensor k, Tensor v, {_OPTIONS}, {_FWD_TAIL}) -> (Tensor, Tensor, Tensor, Tensor)")
varlen_fwd = torch.library.custom_op(
    "flash_attn::varlen_fwd", _cpu.varlen_fwd, mutates_args=(), device_types="cpu",
    schema=f"(Tensor q, Tensor k, Tensor v, {_VARLEN}, {_OPTIONS}, {_FWD_TAIL}) -> (Tensor, Tensor, Tensor, Tensor)")
bwd = torch.library.custom_op(
    "flash_attn::bwd", _cpu.bwd, mutates_args=(), device_types="cpu",
    schema=f"(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, {_OPTIONS}, "
           f"{_BWD_TAIL}) -> (Tensor, Tensor, Tensor)")
varlen_bwd = torch.library.custom_op(
    "flash_attn::varlen_bwd", _cpu.varlen_bwd, mutates_args=(), device_types="cpu",
    schema=f"(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, {_VARLEN}, {_OPTIONS}, "
           f"{_BWD_TAIL}) -> (Tensor, Tensor, Tensor)")

fwd.register_kernel("cuda", _cuda.fwd)
varlen_fwd.register_kernel("cuda", _cuda.varlen_fwd)
bwd.register_kernel("cuda", _cuda.bwd)
varlen_bwd.register_kernel("cuda", _cuda.varlen_bwd)


# --- fakes: shapes, dtypes and strides of the outputs, nothing computed ---

def _lse_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _new_contiguous(x):
    return x.new_empty(x.shape)


def _dropout_fakes(q, dropout_p, return_softmax, b, hq, sq, sk):
    """(s_dmask, rng_state) placeholders."""
    s_dmask = q.new_empty(s_dmask_shape(b, hq, sq, sk) if return_softmax and dropout_p > 0 else (0,))
    return s_dmask, q.new_empty(rng_state_shape(dropout_p), dtype=torch.int64)


@fwd.register_fake
def _fwd_fake(q, k, v, alibi_slopes, softmax_scale, window_left, window_right, softcap, deterministic=False,
              dropout_p=0.0, return_softmax=False):
    b, sq, hq, _ = q.shape
    return (_new_contiguous(q), q.new_empty((b, hq, sq), dtype=_lse_dtype(q.dtype)),
            *_dropout_fakes(q, dropout_p, return_softmax, b, hq, sq, k.shape[1]))


@varlen_fwd.register_fake
def _varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, alibi_slopes,
                     softmax_scale, window_left, window_right, softcap, deterministic=False, dropout_p=0.0,
                     return_softmax=False):
    total_q, hq, _ = q.shape
    b = cu_seqlens_q.shape[0] - 1
    return (_new_contiguous(q), q.new_empty((hq, total_q), dtype=_lse_dtype(q.dtype)),
            *_dropout_fakes(q, dropout_p, return_softmax, b, hq, max_seqlen_q, max_seqlen_k))


@bwd.register_fake
def _bwd_fake(dout, q, k, v, out, lse, alibi_slopes, softmax_scale, window_left, window_right, softcap,
              deterministic, dropout_p=0.0, rng_state=None):
    return _new_contiguous(q), _new_contiguous(k), _new_contiguous(v)


@varlen_bwd.register_fake
def _varlen_bwd_fake(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k,
                     alibi_slopes, softmax_scale, window_left, window_right, softcap, deterministic, dropout_p=0.0,
                     rng_state=None):
    return _new_contiguous(q), _new_contiguous(k), _new_contiguous(v)


# --- autograd: save what the backward op needs, route the gradient to it ---

def _fwd_setup_context(ctx, inputs, output):
    q, k, v, alibi_slopes, *options, _return_softmax = inputs
    out, lse, s_dmask, rng_state = output
    ctx.mark_non_differentiable(lse, s_dmask, rng_state)
    ctx.save_for_backward(q, k, v, out, lse, alibi_slopes, rng_state)
    ctx.options = options  # softmax_scale, window_left, window_right, softcap, deterministic, dropout_p


def _fwd_backward(ctx, dout, dlse, ds_dmask, drng_state):
    q, k, v, out, lse, alibi_slopes, rng_state = ctx.saved_tensors
    dq, dk, dv = bwd(dout, q, k, v, out, lse, alibi_slopes, *ctx.options, rng_state)
    return (dq, dk, dv) + (None,) * 8


def _varlen_fwd_setup_context(ctx, inputs, output):
    (q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, alibi_slopes, *options,
     _return_softmax) = inputs
    out, lse, s_dmask, rng_state = output
    ctx.mark_non_differentiable(lse, s_dmask, rng_state)
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k, alibi_slopes, rng_state)
    ctx.max_seqlens = (max_seqlen_q, max_seqlen_k)
    ctx.options = options


def _varlen_fwd_backward(ctx, dout, dlse, ds_dmask, drng_state):
    q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k, alibi_slopes, rng_state = ctx.saved_tensors
    dq, dk, dv = varlen_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k, *ctx.max_seqlens,
                            alibi_slopes, *ctx.options, rng_state)
    return (dq, dk, dv) + (None,) * 13


fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup_context)
varlen_fwd.register_autograd(_varlen_fwd_backward, setup_context=_varlen_fwd_setup_context)
