"""CPU route: the reference implementation, differentiable through autograd."""
import torch

from . import reference


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
                    cache_leftpad, softmax_scale, window, softcap, rotary_interleaved, alibi_slopes):
    """flash_attn_with_kvcache on CPU: reference.kvcache_ref, which writes k, v into the
    caches in place. window: normalized, causal folded in.
    Returns out (b, sq, hq, d) and lse (b, hq, sq)."""
    return reference.kvcache_ref(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens,
                                 cache_batch_idx, cache_leftpad, softmax_scale, False, window, softcap,
                                 rotary_interleaved, alibi_slopes)
