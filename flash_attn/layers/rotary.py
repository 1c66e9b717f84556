"""Rotary position embedding (RoPE), flash-attn compatible, in pure PyTorch.

The first rotary_dim = 2 * cos.shape[-1] features of each head are rotated,
the rest pass through. Token t of sequence b sits at position
t + seqlen_offsets[b]; positions >= cos.shape[0] are left unrotated.
Non-interleaved (GPT-NeoX): feature f pairs with f + rotary_dim / 2.
Interleaved (GPT-J): feature 2f pairs with 2f + 1.
The pair (x1, x2) at frequency f becomes
(x1 cos - x2 sin, x1 sin + x2 cos), computed in fp32 (fp64 for fp64 x).
"""
import torch
from torch import nn


def apply_rotary_emb(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0,
                     cu_seqlens=None, max_seqlen=None):
    """x: (batch, seqlen, nheads, headdim), or (total, nheads, headdim) with
    cu_seqlens int (batch + 1,); cos, sin: (seqlen_ro, rotary_dim / 2);
    seqlen_offsets: int or int (batch,). max_seqlen is accepted for
    compatibility (the kernel's grid size) and not needed here.

    Returns x rotated: a new tensor, or x itself written in place if inplace.
    """
    rotary_dim = 2 * cos.shape[-1]
    if sin.shape != cos.shape:
        raise ValueError(f"apply_rotary_emb: sin.shape must be cos.shape = {tuple(cos.shape)}, "
                         f"got {tuple(sin.shape)}")
    if rotary_dim > x.shape[-1]:
        raise ValueError(f"apply_rotary_emb: rotary_dim = 2 * cos.shape[-1] must be <= headdim "
                         f"{x.shape[-1]}, got {rotary_dim}")
    positions = _positions(x, seqlen_offsets, cu_seqlens)
    rotated = _rotate(x[..., :rotary_dim], cos, sin, positions, interleaved)
    if inplace:
        x[..., :rotary_dim].copy_(rotated)
        return x
    return torch.cat([rotated, x[..., rotary_dim:]], dim=-1)


apply_rotary_emb_func = apply_rotary_emb  # the older flash-attn name


def apply_rotary_emb_qkv_(qkv, cos, sin, cos_k=None, sin_k=None, interleaved=False,
                          seqlen_offsets=0, num_heads_q=None):
    """Rotate q and k of a packed qkv in place.

    qkv: (batch, seqlen, 3, nheads, headdim), or (batch, seqlen, num_heads_q +
    2 * nheads_k, headdim) with num_heads_q given (GQA). cos_k / sin_k
    default to cos / sin. Returns qkv.
    """
    if qkv.dim() == 5:
        q, k = qkv[:, :, 0], qkv[:, :, 1]
    else:
        if num_heads_q is None:
            raise ValueError("apply_rotary_emb_qkv_: num_heads_q is required for a 4-D qkv "
                             "(batch, seqlen, num_heads_q + 2 * nheads_k, headdim)")
        nheads_k = (qkv.shape[2] - num_heads_q) // 2
        q, k = qkv[:, :, :num_heads_q], qkv[:, :, num_heads_q:num_heads_q + nheads_k]
    apply_rotary_emb(q, cos, sin, interleaved, True, seqlen_offsets)
    apply_rotary_emb(k, cos if cos_k is None else cos_k, sin if sin_k is None else sin_k,
                     interleaved, True, seqlen_offsets)
    return qkv


def apply_rotary_emb_kv_(kv, cos, sin, interleaved=False, seqlen_offsets=0):
    """Rotate k of a packed kv (batch, seqlen, 2, nheads_k, headdim) in place; returns kv."""
    apply_rotary_emb(kv[:, :, 0], cos, sin, interleaved, True, seqlen_offsets)
    return kv


class RotaryEmbedding(nn.Module):
    """RoPE with cached cos/sin tables; optional XPos scaling (scale_base).

    dim: rotary_dim; base: frequency base; interleaved: GPT-J pairing;
    scale_base: XPos decay (q scaled by s ** ((t - L // 2) / scale_base),
    k by its inverse, so q.k depends on relative position only);
    pos_idx_in_fp32: build positions and frequencies in fp32 even when the
    module was cast to a lower precision.
    """

    def __init__(self, dim, base=10000.0, interleaved=False, scale_base=None, pos_idx_in_fp32=True,
                 device=None):
        super().__init__()
        self.dim = dim
        self.base = float(base)
        self.interleaved = interleaved
        self.scale_base = scale_base
        self.pos_idx_in_fp32 = pos_idx_in_fp32
        self.register_buffer("inv_freq", self._inv_freq(device), persistent=False)
        scale = None
        if scale_base is not None:
            scale = (torch.arange(0, dim, 2, device=device, dtype=torch.float32) + 0.4 * dim) / (1.4 * dim)
        self.register_buffer("scale", scale, persistent=False)
        self._cache = None  # (seqlen, device, dtype, cos, sin, cos_k, sin_k)

    def forward(self, qkv, kv=None, seqlen_offset=0, max_seqlen=None, num_heads_q=None):
        """qkv: (batch, seqlen, 3, nheads, headdim), or 4-D with num_heads_q (see
        apply_rotary_emb_qkv_); or, with kv (batch, seqlen, 2, nheads_k, headdim)
        given, q (batch, seqlen, nheads, headdim).
        seqlen_offset: int or int (batch,) position of each sequence's first
        token (decoding with a KV cache); with a tensor offset pass max_seqlen
        to size the tables.
        Returns qkv, or (q, kv), rotated in place.
        """
        seqlen = qkv.shape[1]
        if max_seqlen is not None:
            needed = max_seqlen
        elif isinstance(seqlen_offset, int):
            needed = seqlen + seqlen_offset
        else:
            needed = seqlen
        cos, sin, cos_k, sin_k = self._tables(needed, qkv.device, qkv.dtype)
        if kv is None:
            return apply_rotary_emb_qkv_(qkv, cos, sin, cos_k, sin_k, self.interleaved, seqlen_offset,
                                         num_heads_q)
        apply_rotary_emb(qkv, cos, sin, self.interleaved, True, seqlen_offset)
        apply_rotary_emb_kv_(kv, cos_k, sin_k, self.interleaved, seqlen_offset)
        return qkv, kv

    def _inv_freq(self, device):
        exponents = torch.arange(0, self.dim, 2, device=device, dtype=torch.float32) / self.dim
        return 1.0 / self.base ** exponents

    def _tables(self, seqlen, device, dtype):
        """cos, sin, cos_k, sin_k: (>= seqlen, dim / 2) in dtype, cached."""
        c = self._cache
        if c is None or c[0] < seqlen or c[1] != device or c[2] != dtype:
            self._cache = (seqlen, device, dtype, *self._compute_tables(seqlen, device, dtype))
        return self._cache[3:]

    def _compute_tables(self, seqlen, device, dtype):
        if self.pos_idx_in_fp32:
            t = torch.arange(seqlen, device=device, dtype=torch.float32)
            inv_freq = self.inv_freq if self.inv_freq.dtype == torch.float32 else self._inv_freq(device)
        else:
            t = torch.arange(seqlen, device=device, dtype=self.inv_freq.dtype)
            inv_freq = self.inv_freq
        freqs = torch.outer(t, inv_freq.to(device))
        cos, sin = torch.cos(freqs), torch.sin(freqs)
        if self.scale is None:
            return cos.to(dtype), sin.to(dtype), cos.to(dtype), sin.to(dtype)
        power = (torch.arange(seqlen, device=device, dtype=torch.float32) - seqlen // 2) / self.scale_base
        scale = self.scale.to(device=device, dtype=torch.float32) ** power[:, None]
        return ((cos * scale).to(dtype), (sin * scale).to(dtype),
                (cos / scale).to(dtype), (sin / scale).to(dtype))


def _positions(x, seqlen_offsets, cu_seqlens):
    """Position of every token: int64 (batch, seqlen) or, with cu_seqlens, (total,)."""
    device = x.device
    if cu_seqlens is None:
        t = torch.arange(x.shape[1], device=device)
        offsets = torch.as_tensor(seqlen_offsets, device=device).reshape(-1, 1)
        return t[None, :] + offsets
    tokens = torch.arange(x.shape[0], device=device)
    cu = cu_seqlens.to(device=device, dtype=torch.int64)
    seq = torch.bucketize(tokens, cu[1:], right=True).clamp(max=cu.shape[0] - 2)
    offsets = torch.as_tensor(seqlen_offsets, device=device).reshape(-1)
    offsets = offsets[seq] if offsets.numel() > 1 else offsets
    return tokens - cu[seq] + offsets


def _rotate(x, cos, sin, positions, interleaved):
    """x (..., nheads, rotary_dim) at positions (...) -> rotated, in x.dtype."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    seqlen_ro = cos.shape[0]
    in_range = (positions < seqlen_ro).unsqueeze(-1)
    idx = positions.clamp(max=seqlen_ro - 1)
    c = torch.where(in_range, cos.to(compute)[idx], 1.0).unsqueeze(-2)  # (..., 1, rotary_dim / 2)
    s = torch.where(in_range, sin.to(compute)[idx], 0.0).unsqueeze(-2)
    xc = x.to(compute)
    if interleaved:
        x1, x2 = xc[..., 0::2], xc[..., 1::2]
    else:
        x1, x2 = xc.chunk(2, dim=-1)
    o1, o2 = x1 * c - x2 * s, x1 * s + x2 * c
    out = torch.stack([o1, o2], dim=-1).flatten(-2) if interleaved else torch.cat([o1, o2], dim=-1)
    return out.to(x.dtype)
