"""Masked linear attention with an arbitrary mask (TransnormerLLM-style)."""
from ..reference_linear import masked_linear_attention_ref
from ._checks import check_mask, check_qkv, check_scale, require_cpu


def masked_linear_attention(q, k, v, mask, scale=None):
    """o = scale * ((q k^T) * M) v, per head.

    Args:
        q: [B, T, H, K]; k: [B, T, HK, K]; v: [B, T, HK, V] with H % HK == 0
            (MQA/GQA: query head h reads kv head h // (H // HK)).
        mask: M broadcastable to [B, H, T, T], float (differentiable) or bool;
            e.g. flash_attn.reference_linear.causal_decay_mask(g) turns this into
            the simple-GLA recurrence.
        scale: default K ** -0.5.
    Returns:
        o [B, T, H, V] in q.dtype. No recurrent state: an arbitrary mask has none.
    """
    dims = check_qkv(q, k, v, allow_fewer_kv_heads=True)
    scale = check_scale(scale, dims.K)
    check_mask(mask, dims, q)
    require_cpu("masked_linear_attention", q.device)
    return masked_linear_attention_ref(q, k, v, mask, scale=scale)
