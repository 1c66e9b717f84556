"""CPU route: the reference implementation.

fwd, varlen_fwd, bwd, varlen_bwd are the CPU kernels of the flash_attn:: custom ops
(flash_attn._ops): the reference forward, and for the backward the reference forward
recomputed and differentiated with autograd (the CPU path does not save memory).
dense_forward, varlen_forward run the reference with dropout, differentiable through
autograd; the API uses them outside the ops when dropout_p > 0.
"""
import contextlib

import torch

from . import reference


def fwd(q, k, v, alibi_slopes, softmax_scale, window_left, window_right, softcap, deterministic=False):
    """flash_attn::fwd on CPU: q (b, sq, hq, d), k/v (b, sk, hk, d) -> out (b, sq, hq, d), lse (b, hq, sq)."""
    out, lse = reference.attention_ref(q, k, v, softmax_scale, False, (window_left, window_right), softcap,
                                       alibi_slopes)
    return out.contiguous(), lse.contiguous()


def varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, alibi_slopes,
               softmax_scale, window_left, window_right, softcap, deterministic=False):
    """flash_attn::varlen_fwd on CPU: q (total_q, hq, d), k/v (total_k, hk, d)
    -> out (total_q, hq, d), lse (hq, total_q)."""
    out, lse = reference.attention_varlen_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                              seqused_k, softmax_scale, False, (window_left, window_right),
                                              softcap, alibi_slopes)
    return out.contiguous(), lse.contiguous()


def bwd(dout, q, k, v, out, lse, alibi_slopes, softmax_scale, window_left, window_right, softcap,
        deterministic):
    """flash_attn::bwd on CPU: (dq, dk, dv) of fwd for the output gradient dout (out, lse unused)."""
    def attention(q, k, v):
        return fwd(q, k, v, alibi_slopes, softmax_scale, window_left, window_right, softcap)[0]
    return _recompute_grads(attention, dout, q, k, v)


def varlen_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k,
               alibi_slopes, softmax_scale, window_left, window_right, softcap, deterministic):
    """flash_attn::varlen_bwd on CPU: (dq, dk, dv) of varlen_fwd for dout (out, lse unused)."""
    def attention(q, k, v):
        return varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k,
                          alibi_slopes, softmax_scale, window_left, window_right, softcap)[0]
    return _recompute_grads(attention, dout, q, k, v)


def _recompute_grads(attention, dout, q, k, v):
    """Gradients of attention(q, k, v) for dout (contiguous): the forward recomputed with autograd."""
    with _autograd_in_kernel():
        q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
        grads = torch.autograd.grad(attention(q, k, v), (q, k, v), dout)
    return tuple(g.contiguous() for g in grads)


# What a custom op's kernel runs under: the dispatcher excludes the autograd keys below the
# op's Autograd kernel, so nothing inside it is recorded even with grad mode on. torch.func.vjp
# works there, but its wrapped tensors break tensor-inspecting dispatch modes (opcheck's
# SchemaCheckMode); lifting the exclusion for the recompute keeps plain tensors.
_AUTOGRAD_KEYS = [getattr(torch._C.DispatchKey, name) for name in
                  ("AutogradFunctionality", "AutogradOther", "AutogradNestedTensor", "ADInplaceOrView")]


@contextlib.contextmanager
def _autograd_in_kernel():
    """Grad mode on and autograd dispatch keys included, restored on exit."""
    excluded = [key for key in _AUTOGRAD_KEYS if torch._C._dispatch_tls_is_dispatch_key_excluded(key)]
    for key in excluded:
        torch._C._dispatch_tls_set_dispatch_key_excluded(key, False)
    try:
        with torch.enable_grad():
            yield
    finally:
        for key in excluded:
            torch._C._dispatch_tls_set_dispatch_key_excluded(key, True)


def dense_forward(q, k, v, dropout_p, softmax_scale, window, softcap, alibi_slopes):
    """q (b, sq, hq, d), k/v (b, sk, hk, d) -> (out (b, sq, hq, d), lse (b, hq, sq), S_dmask).

    window: normalized (left, right) with causal already folded in.
    S_dmask: see s_dmask; (b, hq, sq, sk).
    """
    out, lse, probs, keep = reference.attention_ref_with_probs(
        q, k, v, softmax_scale, False, window, softcap, alibi_slopes, dropout_p)
    return out, lse, s_dmask(probs, keep, q.dtype)


def varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                   softmax_scale, window, softcap, alibi_slopes):
    """q (total_q, hq, d), k/v (total_k, hk, d)
    -> (out (total_q, hq, d), lse (hq, total_q), S_dmask (b, hq, max_seqlen_q, max_seqlen_k))."""
    out, lse, probs, keep = reference.attention_varlen_ref_with_probs(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, None, softmax_scale,
        False, window, softcap, alibi_slopes, dropout_p)
    return out, lse, s_dmask(probs, keep, q.dtype)


def s_dmask(probs, keep, dtype):
    """The S_dmask returned with return_attn_probs=True on CPU.

    None without dropout. With dropout: the softmax probabilities before
    dropout (normalized, not rescaled by 1 / (1 - p)), with every dropped
    entry negated, in q.dtype and detached. Kept entries are >= 0; dropped
    ones have their sign bit set (torch.signbit), which also marks a dropped
    probability of exactly 0 as -0.0.
    """
    if keep is None:
        return None
    return torch.where(keep, probs, -probs).detach().to(dtype)


def kvcache_forward(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                    cache_leftpad, softmax_scale, window, softcap, rotary_interleaved, alibi_slopes,
                    block_table=None):
    """flash_attn_with_kvcache on CPU: reference.kvcache_ref, which writes k, v into the
    caches (paged with block_table) in place. window: normalized, causal folded in.
    Returns out (b, sq, hq, d) and lse (b, hq, sq)."""
    return reference.kvcache_ref(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens,
                                 cache_batch_idx, cache_leftpad, softmax_scale, False, window, softcap,
                                 rotary_interleaved, alibi_slopes, block_table=block_table)
