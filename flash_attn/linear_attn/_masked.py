"""The CUDA route of masked_linear_attention: flash_attn_linear_cuda's masked_attn and
masked_mask_grad (csrc/linear_attn/masked_params.h) with autograd.

    o = scale * ((q k^T) * M) v        per query head h (kv head h // (H // HK)), M broadcast to [B, H, T, T]

Arguments arrive checked (._checks). Here: head dims are zero-padded to 64, 128 or 256 (as in
._kernels), a bool mask becomes q's dtype (0 / 1 are exact), and the mask is handed to the
kernels as a [B, H, T, T] view of itself (expand: stride 0 on broadcast dimensions;
transpose: swapped strides), never copied. Every pass is blockwise: no T x T tensor is
allocated beyond the mask and its gradient.

Forward:   masked_attn (q, k, v, M)       -> o
Backward:  masked_attn (do, v, k, M)      -> dq
           masked_attn (v, do, q, M^T)    -> dk   (summed over the H // HK query heads of a kv head)
           masked_attn (k, q, do, M^T)    -> dv   (likewise)
           masked_mask_grad (q, k, v, do) -> dM = scale * (do v^T) * (q k^T) in fp32, in the
                                             mask's own shape (summed over its broadcast
                                             dimensions inside the kernel), then M's dtype
"""
import torch

from . import _kernels


def _as_4d(mask):
    """mask as a 4-d view [Bm, Hm, Tm, Tn] (leading size-1 dimensions added)."""
    return mask[(None,) * (4 - mask.dim())]


class MaskedLinearFunction(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, mask, scale):
        ext = _kernels.extension()
        B, T, H, K = q.shape
        V = v.shape[-1]
        kd, vd = _kernels.kernel_head_dim(K), _kernels.kernel_head_dim(V)
        qp, kp, vp = _kernels._pad_last(q, kd), _kernels._pad_last(k, kd), _kernels._pad_last(v, vd)
        o = q.new_empty(B, T, H, vd)
        ext.masked_attn(qp, kp, vp, _as_4d(mask).expand(B, H, T, T), o, scale)
        ctx.save_for_backward(qp, kp, vp, mask)
        ctx.scale, ctx.dims = scale, (K, V, vd)
        return o[..., :V] if vd != V else o

    @staticmethod
    def backward(ctx, do):
        qp, kp, vp, mask = ctx.saved_tensors
        K, V, vd = ctx.dims
        ext, scale = _kernels.extension(), ctx.scale
        B, T, H, _ = qp.shape
        dop = _kernels._pad_last(do.to(qp.dtype), vd)
        m = _as_4d(mask).expand(B, H, T, T)
        mt = m.transpose(2, 3)
        dq = dk = dv = dmask = None
        if ctx.needs_input_grad[0]:
            dq = torch.empty_like(qp)
            ext.masked_attn(dop, vp, kp, m, dq, scale)
            dq = dq[..., :K]
        if ctx.needs_input_grad[1]:
            dk = torch.empty_like(kp)
            ext.masked_attn(vp, dop, qp, mt, dk, scale)
            dk = dk[..., :K]
        if ctx.needs_input_grad[2]:
            dv = torch.empty_like(vp)
            ext.masked_attn(kp, qp, dop, mt, dv, scale)
            dv = dv[..., :V]
        if ctx.needs_input_grad[3]:
            dm = torch.empty(_as_4d(mask).shape, dtype=torch.float32, device=mask.device)
            ext.masked_mask_grad(qp, kp, vp, dop, dm, scale)
            dmask = dm.view(mask.shape).to(mask.dtype)
        return dq, dk, dv, dmask, None


def masked_attention(q, k, v, mask, scale):
    """masked_linear_attention on the kernels: checked fp16/bf16 CUDA inputs, K and V <= 256."""
    _kernels.require_extension("masked_linear_attention")
    if mask.dtype == torch.bool:
        mask = mask.to(q.dtype)
    return MaskedLinearFunction.apply(q, k, v, mask, scale)
