"""CUDA route: check the build, pad the head dim to a compiled one, call
flash_attn_2_cuda, slice the output back. Forward only for now."""
import functools

import torch
import torch.nn.functional as F

from . import build_info
from .layers.rotary import apply_rotary_emb


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


def kvcache_forward(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                    cache_leftpad, softmax_scale, window, softcap, rotary_interleaved, alibi_slopes):
    """flash_attn_with_kvcache on CUDA: rotary and the cache append in PyTorch, then varlen_fwd.

    q (b, sq, hq, d); k_cache, v_cache (b_cache, s_cache, hk, d), written in place
    with k, v (b, s_new, hk, d) when given; cache_seqlens int32 (b,) or None (full
    cache); cache_batch_idx, cache_leftpad int32 (b,) or None; window normalized
    with causal folded in. Returns out (b, sq, hq, d), lse fp32 (b, hq, sq).

    Fast path (no cache_batch_idx, no cache_leftpad, a compiled head dim, caches
    whose first two dims flatten into a view): the kernel reads the caches in
    place, each row a varlen sequence of s_cache keys capped by seqused_k.
    Otherwise the used keys are gathered into a (b, s_cache, hk, d) temporary,
    valid keys first (correct, slower; a kernel-side path replaces it later).
    Without a mask or ALiBi, query heads that share a kv head are packed as rows of one
    sequence (GQA packing), so each kv head is read once per sequence, not once per head.
    Nothing here reads device values to the host (no sync). Values that Python
    did not check (FLASH_ATTN_DEBUG unset) are clamped into the caches' bounds:
    bad ones give wrong numbers, never an access outside the tensors.
    num_splits is not used: varlen_fwd has no split-KV yet.
    """
    check_supported(0.0, softcap, alibi_slopes)
    extension()  # fail before touching the caches
    b, sq, hq, d = q.shape
    b_cache, s_cache, hk, _ = k_cache.shape
    dk = kernel_head_dim(d)
    s_new = 0 if k is None else k.shape[1]
    device = q.device
    # cache_seqlens + s_new <= s_cache and 0 <= leftpad <= cache_seqlens by clamping (no-ops when valid)
    if cache_seqlens is None:
        seqlens = torch.full((b,), s_cache, dtype=torch.int64, device=device)
    else:
        seqlens = cache_seqlens.to(torch.int64).clamp(0, s_cache - s_new)
    rows = None if cache_batch_idx is None else cache_batch_idx.to(torch.int64).clamp(0, max(b_cache - 1, 0))
    starts = None if cache_leftpad is None else torch.minimum(cache_leftpad.to(torch.int64).clamp(min=0), seqlens)

    with torch.no_grad():
        if k is not None:
            _append_kv(k_cache, v_cache, k, v, seqlens, rows, rotary_cos, rotary_sin, rotary_interleaved)
    if rotary_cos is not None:
        q = _rotary_q(q, rotary_cos, rotary_sin, seqlens, rotary_interleaved, per_row=window != (-1, -1))
    if b == 0 or sq == 0 or s_cache == 0:
        return _empty_result(q, (b, hq, sq))

    keys, values = None, None
    if rows is None and starts is None and dk == d:
        keys, values = _flat_rows(k_cache, b), _flat_rows(v_cache, b)
    if keys is None or values is None:  # gather [start, seqlen + s_new) of each row, valid keys first
        starts = torch.zeros(b, dtype=torch.int64, device=device) if starts is None else starts
        rows = torch.arange(b, device=device) if rows is None else rows
        index = (starts[:, None] + torch.arange(s_cache, device=device)).clamp(max=s_cache - 1)  # (b, s_cache)
        keys = pad_head_dim(k_cache[rows[:, None], index], dk).view(b * s_cache, hk, dk)
        values = pad_head_dim(v_cache[rows[:, None], index], dk).view(b * s_cache, hk, dk)
        seqused = seqlens + s_new - starts
    else:
        seqused = seqlens + s_new
    # GQA packing (flash-attn's seqlenq_ngroups_swapped, generalized): without a mask or ALiBi
    # every query row sees the same keys, so the query heads sharing a kv head can be the
    # rows of one sequence, and the kernel reads each kv head once instead of once per group.
    pack_gqa = hq > hk and window == (-1, -1) and alibi_slopes is None
    call = functools.partial(_kvcache_call, cu_seqlens_k=_arange_cu(b, s_cache, device),
                             seqused_k=seqused.to(torch.int32), max_seqlen_k=s_cache,
                             softmax_scale=softmax_scale, window=window, softcap=softcap,
                             alibi_slopes=alibi_slopes, pack_gqa=pack_gqa)
    return _ForwardOnly.apply(q, keys, values, call)


def _append_kv(k_cache, v_cache, k, v, seqlens, rows, rotary_cos, rotary_sin, rotary_interleaved):
    """Writes k, v (b, s_new, hk, d) into cache rows ``rows`` (None = 0..b-1) at positions
    seqlens[i] + arange(s_new), rotating k at those positions first when rotary is on."""
    b, s_new = k.shape[:2]
    if b == 0 or s_new == 0:
        return
    if rotary_cos is not None:
        k = apply_rotary_emb(k, rotary_cos, rotary_sin, rotary_interleaved, seqlen_offsets=seqlens)
    positions = seqlens[:, None] + torch.arange(s_new, device=k.device)  # (b, s_new)
    rows = torch.arange(b, device=k.device) if rows is None else rows
    k_cache[rows[:, None], positions] = k
    v_cache[rows[:, None], positions] = v


def _rotary_q(q, rotary_cos, rotary_sin, seqlens, rotary_interleaved, per_row):
    """q rotated at positions seqlens + arange(sq) (per_row: causal or local), else every
    row at position seqlens, as flash-attn does."""
    if per_row:
        return apply_rotary_emb(q, rotary_cos, rotary_sin, rotary_interleaved, seqlen_offsets=seqlens)
    b, sq, hq, d = q.shape
    flat = q.reshape(b, 1, sq * hq, d)
    return apply_rotary_emb(flat, rotary_cos, rotary_sin, rotary_interleaved,
                            seqlen_offsets=seqlens).reshape(b, sq, hq, d)


def _flat_rows(cache, b):
    """cache[:b] (b, s, hk, d) as (b * s, hk, d) without a copy, or None when its strides forbid it."""
    try:
        return cache[:b].view(b * cache.shape[1], *cache.shape[2:])
    except RuntimeError:
        return None


def _arange_cu(b, seqlen, device):
    """cu_seqlens int32 (b + 1,) of b sequences of ``seqlen`` rows each."""
    return (torch.arange(b + 1, dtype=torch.int64, device=device) * seqlen).to(torch.int32)


def _kvcache_call(q, k, v, cu_seqlens_k, seqused_k, max_seqlen_k, softmax_scale, window, softcap,
                  alibi_slopes, pack_gqa):
    """q (b, sq, hq, d); k, v (b * max_seqlen_k, hk, dk) rows of b sequences, dk the kernel
    head dim -> out (b, sq, hq, d), lse (b, hq, sq).

    pack_gqa: the g = hq / hk query heads of each kv head become g * sq query rows of
    that kv head (only valid without mask and ALiBi: rows then differ by nothing but q).
    """
    ext = extension()
    b, sq, hq, d = q.shape
    hk, dk = k.shape[1], k.shape[-1]
    g = hq // hk if pack_gqa else 1
    heads = hq // g
    alibi = None if alibi_slopes is None else alibi_slopes.contiguous()
    # head h = kv_head * g + j  ->  row (s, j) of kv head kv_head
    q_rows = pad_head_dim(q, dk).reshape(b, sq, heads, g, dk).transpose(2, 3).reshape(b * sq * g, heads, dk)
    out, lse = ext.varlen_fwd(q_rows, k, v, None, _arange_cu(b, sq * g, q.device), cu_seqlens_k, seqused_k,
                              sq * g, max_seqlen_k, alibi, softmax_scale, window[0], window[1], softcap)
    out = out.view(b, sq, g, heads, dk).transpose(2, 3).reshape(b, sq, hq, dk)[..., :d]
    lse = lse.view(heads, b, sq, g).permute(1, 0, 3, 2).reshape(b, hq, sq).contiguous()
    return (out if dk == d else out.contiguous()), lse


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
