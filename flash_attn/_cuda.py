"""CUDA route: check the build, pad the head dim to a compiled one, call
flash_attn_2_cuda, slice the output back. Forward only for now."""
import functools

import torch
import torch.nn.functional as F

from . import build_info


def dense_forward(q, k, v, dropout_p, softmax_scale, window, softcap, alibi_slopes):
    """q (b, sq, hq, d), k/v (b, sk, hk, d) -> out (b, sq, hq, d), lse fp32 (b, hq, sq).

    window: normalized (left, right), -1 = unbounded; softcap 0 = off.
    """
    call = functools.partial(_dense_call, softmax_scale=softmax_scale, window=window,
                             softcap=softcap, alibi_slopes=alibi_slopes)
    return _run(call, q, k, v, dropout_p, softcap, alibi_slopes)


def varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                   softmax_scale, window, softcap, alibi_slopes):
    """q (total_q, hq, d), k/v (total_k, hk, d), cu_seqlens int32 (b + 1,)
    -> out (total_q, hq, d), lse fp32 (hq, total_q)."""
    call = functools.partial(_varlen_call, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                             max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                             softmax_scale=softmax_scale, window=window, softcap=softcap,
                             alibi_slopes=alibi_slopes)
    return _run(call, q, k, v, dropout_p, softcap, alibi_slopes)


def extension():
    """The flash_attn_2_cuda module; RuntimeError when the package has no CUDA kernels."""
    ext = build_info.cuda_extension()
    if ext is None:
        reason = build_info.build_config().get("skip_reason")
        raise RuntimeError(f"flash_attn: CUDA tensors given, but this package was built without CUDA "
                           f"kernels (skip_reason: {reason}); reinstall with nvcc and a CUDA build of "
                           f"torch, or pass CPU tensors to run the reference implementation")
    return ext


def kernel_head_dim(head_dim):
    """The smallest compiled head dim >= head_dim."""
    compiled = sorted(build_info.compiled_head_dims())
    for d in compiled:
        if d >= head_dim:
            return d
    raise RuntimeError(f"flash_attn: head dim {head_dim} has no kernel in this build (compiled head "
                       f"dims: {compiled}); rebuild with a larger FLASH_ATTN_HEADDIMS")


def pad_head_dim(x, head_dim):
    """Zero-pad the last dim of x up to head_dim (x itself when already there)."""
    return x if x.shape[-1] == head_dim else F.pad(x, (0, head_dim - x.shape[-1]))


def check_supported(dropout_p, softcap, alibi_slopes):
    """Features the CUDA route lacks now, or that this build left out."""
    if dropout_p > 0:
        raise NotImplementedError(f"flash_attn: dropout_p > 0 is not supported on CUDA yet (it arrives "
                                  f"with the backward); got dropout_p={dropout_p}")
    for name, used in (("alibi", alibi_slopes is not None), ("softcap", softcap > 0)):
        if used and not build_info.has_feature(name):
            raise RuntimeError(f"flash_attn: {name} was requested but this build has no {name} kernels "
                               f"(variants: {build_info.build_config().get('variants')}); rebuild "
                               f"without FLASH_ATTN_DISABLE_{name.upper()}")


class _ForwardOnly(torch.autograd.Function):
    """Routes q, k, v through a kernel call; the backward does not exist yet."""

    @staticmethod
    def forward(ctx, q, k, v, call):
        out, lse = call(q, k, v)
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        raise NotImplementedError("flash_attn backward is not implemented yet for CUDA tensors; "
                                  "run the forward under torch.no_grad(), or use CPU tensors "
                                  "(reference implementation) for gradients")


def _run(call, q, k, v, dropout_p, softcap, alibi_slopes):
    check_supported(dropout_p, softcap, alibi_slopes)
    return _ForwardOnly.apply(q, k, v, call)


def _empty_result(q, lse_shape):
    """What a call with no keys (or no queries) returns: zeros and lse = +inf."""
    return torch.zeros_like(q), torch.full(lse_shape, float("inf"), dtype=torch.float32, device=q.device)


def _dense_call(q, k, v, softmax_scale, window, softcap, alibi_slopes):
    ext = extension()
    b, sq, hq, d = q.shape
    dk = kernel_head_dim(d)
    if q.numel() == 0 or k.shape[1] == 0:
        return _empty_result(q, (b, hq, sq))
    alibi = None if alibi_slopes is None else alibi_slopes.contiguous()
    out, lse = ext.fwd(pad_head_dim(q, dk), pad_head_dim(k, dk), pad_head_dim(v, dk), None, alibi,
                       softmax_scale, window[0], window[1], softcap)
    return out[..., :d], lse


def _varlen_call(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, softmax_scale,
                 window, softcap, alibi_slopes):
    ext = extension()
    total_q, hq, d = q.shape
    dk = kernel_head_dim(d)
    if q.numel() == 0 or k.shape[0] == 0 or cu_seqlens_q.shape[0] == 1:
        return _empty_result(q, (hq, total_q))
    alibi = None if alibi_slopes is None else alibi_slopes.contiguous()
    out, lse = ext.varlen_fwd(pad_head_dim(q, dk), pad_head_dim(k, dk), pad_head_dim(v, dk), None,
                              cu_seqlens_q, cu_seqlens_k, None, max_seqlen_q, max_seqlen_k, alibi,
                              softmax_scale, window[0], window[1], softcap)
    return out[..., :d], lse
