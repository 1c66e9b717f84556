"""A PyTorch model of flash_attn_linear_cuda's masked launchers (masked_attn, masked_mask_grad;
csrc/linear_attn/masked_params.h), written from their definitions and computed in float64,
writing into the outputs they are given, with the same argument checks that matter for the
route (shapes, head mapping, the mask view's shape).

CPU tests run flash_attn.linear_attn's masked CUDA route (._masked) on this model; GPU tests
compare each launcher with it on the same inputs.
"""
import torch


class MaskedExtModel:
    """Same call signatures as flash_attn_linear_cuda.masked_attn / masked_mask_grad."""

    def masked_attn(self, x, y, z, mask, out, scale):
        B, T, Hx, R = x.shape
        Hy, N = y.shape[2], z.shape[3]
        assert y.shape == (B, T, Hy, R) and z.shape == (B, T, Hy, N) and out.shape == (B, T, Hx, N)
        assert Hx % Hy == 0 or Hy % Hx == 0
        assert R % 64 == 0 and N % 64 == 0
        assert tuple(mask.shape) == (B, max(Hx, Hy), T, T), mask.shape
        X, Y, Z = (t.double().cpu() for t in (x, y, z))
        M = mask.double().cpu()  # [B, Hq, T, T]: (b, query head, x row, y row)
        if Hx >= Hy:  # x head h reads y / z head h // (Hx // Hy); the mask's head is h
            rep = Hx // Hy
            Y, Z = Y.repeat_interleave(rep, 2), Z.repeat_interleave(rep, 2)
            S = torch.einsum("bihr,bjhr->bhij", X, Y) * M
            o = torch.einsum("bhij,bjhn->bihn", S, Z)
        else:  # x head h sums over y / z heads h * G + g, g < G; the mask's head is h * G + g
            G = Hy // Hx
            Yg, Zg = Y.view(B, T, Hx, G, R), Z.view(B, T, Hx, G, N)
            S = torch.einsum("bihr,bjhgr->bhgij", X, Yg) * M.view(B, Hx, G, T, T)
            o = torch.einsum("bhgij,bjhgn->bihn", S, Zg)
        out.copy_((scale * o).to(out.dtype))

    def masked_mask_grad(self, q, k, v, dout, dmask, scale):
        B, T, H, K = q.shape
        HK, V = k.shape[2], v.shape[3]
        assert k.shape == (B, T, HK, K) and v.shape == (B, T, HK, V) and dout.shape == (B, T, H, V)
        assert H % HK == 0 and dmask.dtype == torch.float32 and dmask.dim() == 4
        full = (B, H, T, T)
        assert all(m in (1, f) for m, f in zip(dmask.shape, full)), dmask.shape
        Q, DO = q.double().cpu(), dout.double().cpu()
        Kr, Vr = (t.double().cpu().repeat_interleave(H // HK, 2) for t in (k, v))
        dm = scale * torch.einsum("bihv,bjhv->bhij", DO, Vr) * torch.einsum("bihk,bjhk->bhij", Q, Kr)
        dims = [d for d in range(4) if dmask.shape[d] == 1 and full[d] != 1]
        if dims:
            dm = dm.sum(dims, keepdim=True)
        dmask.copy_(dm.reshape(dmask.shape).to(dmask.dtype))
