"""Masked linear attention with an arbitrary mask (TransnormerLLM-style)."""
from ..reference_linear import masked_linear_attention_ref
from . import _kernels, _masked
from ._checks import check_mask, check_qkv, check_scale


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

    CUDA tensors in fp16/bf16 with K, V <= 256 run the blockwise kernels of
    csrc/linear_attn (._masked; the mask may be fp32, fp16, bf16 or bool, is read through
    its strides and never copied, and gets its gradient in its own shape); CPU tensors,
    fp32 CUDA tensors and larger head dims run the PyTorch reference, which forms
    the [B, H, T, T] product.
    """
    dims = check_qkv(q, k, v, allow_fewer_kv_heads=True)
    scale = check_scale(scale, dims.K)
    check_mask(mask, dims, q)
    if _kernels.runs_on_kernels(q, v) and q.numel() > 0 and v.numel() > 0:
        return _masked.masked_attention(q, k, v, mask, scale)
    return masked_linear_attention_ref(q, k, v, mask, scale=scale)
