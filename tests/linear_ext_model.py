"""A PyTorch model of flash_attn_linear_cuda (csrc/linear_attn/linear_api.cpp): every launcher
with the same arguments, written from the kernels' definitions in linear_params.h and
computed in float64, writing into the outputs it is given.

CPU tests run flash_attn.linear_attn's CUDA route (._kernels) on this model, which checks the
orchestration and its math (operands, scales, masks, slots, gate gradient) against the
reference; GPU tests compare each kernel with it on the same inputs.
"""
import math

import torch

CHUNK = 64


def sequences(B, T, cu_seqlens, chunk_offsets):
    """[(bos, eos, first slot)] per sequence, with the kernels' clamping (chunk_info.cuh)."""
    if cu_seqlens is None:
        nt = math.ceil(T / CHUNK)
        return [(b * T, b * T + T, b * nt) for b in range(B)]
    tokens = B * T
    cu = [int(x) for x in cu_seqlens.tolist()]
    off = [int(x) for x in chunk_offsets.tolist()] if chunk_offsets is not None else [0] * len(cu)
    out = []
    for n in range(len(cu) - 1):
        bos = min(max(cu[n], 0), tokens)
        eos = min(max(cu[n + 1], bos), tokens)
        out.append((bos, eos, off[n]))
    return out


def _chunk_rows(bos, eos):
    return [(c, bos + c * CHUNK, min(bos + (c + 1) * CHUNK, eos)) for c in range(math.ceil((eos - bos) / CHUNK))]


def _cumgate(g, gamma, start, stop, H):
    """The chunk-local cumulative log-gate b [L, H] (float64)."""
    L = stop - start
    if g is not None:
        rows = g.reshape(-1, H)[start:stop].double()
    elif gamma is not None:
        rows = gamma.double().reshape(1, H).expand(L, H)
    else:
        rows = torch.zeros(L, H, dtype=torch.float64)
    return rows.cumsum(0)


class LinearExtModel:
    """Same call signatures as flash_attn_linear_cuda."""

    def chunk_state(self, x, z, g, gamma, init, states, final_state, cu_seqlens, chunk_offsets, scale, reverse,
                    pair_states=None, pair_dot=None, tile_n=0):
        """pair_dot gets exp(b_L) <dH_c, h_c> in its first tile (the kernel spreads it over tiles)."""
        B, T, H, R = x.shape
        N = z.shape[-1]
        xs = x.reshape(B * T, H, R).double().cpu()
        zs = z.reshape(B * T, H, N).double().cpu()
        g, gamma = (None if t is None else t.cpu() for t in (g, gamma))
        for n, (bos, eos, first) in enumerate(sequences(B, T, cu_seqlens, chunk_offsets)):
            S = init[n].double().cpu().clone() if init is not None else torch.zeros(H, R, N, dtype=torch.float64)
            chunks = _chunk_rows(bos, eos)
            for c, start, stop in (reversed(chunks) if reverse else chunks):
                b = _cumgate(g, gamma, start, stop, H)  # [L, H]
                bl = b[-1]
                if first + c < states.shape[0]:
                    states[first + c] = S.to(states.dtype)
                    if pair_dot is not None:
                        h = pair_states[first + c].double().cpu()
                        pair_dot[first + c] = 0
                        pair_dot[first + c, :, 0] = (torch.exp(bl) * (S * h).sum((-2, -1))).to(pair_dot.dtype)
                w = scale * torch.exp(b) if reverse else torch.exp(bl - b)
                S = torch.exp(bl)[:, None, None] * S + torch.einsum("lhr,lh,lhn->hrn", xs[start:stop], w,
                                                                    zs[start:stop])
            if final_state is not None:
                final_state[n] = S.to(final_state.dtype)

    def chunk_output(self, x, y, z, m, out, dot, rowdot, g, gamma, cu_seqlens, chunk_offsets, inter_scale,
                     intra_scale, trans_m, upper):
        B, T, H, R = x.shape
        N = z.shape[-1]
        xs, ys = (t.reshape(B * T, H, R).double().cpu() for t in (x, y))
        zs = z.reshape(B * T, H, N).double().cpu()
        ds = None if dot is None else dot.reshape(B * T, H, N).double().cpu()
        g, gamma = (None if t is None else t.cpu() for t in (g, gamma))
        outs = out.view(B * T, H, N)
        for bos, eos, first in sequences(B, T, cu_seqlens, chunk_offsets):
            for c, start, stop in _chunk_rows(bos, eos):
                slot = first + c
                if slot >= m.shape[0]:
                    continue
                M = m[slot].double().cpu()
                M = M.transpose(-1, -2) if trans_m else M  # [H, R, N]
                X, Y, Z = xs[start:stop], ys[start:stop], zs[start:stop]
                b = _cumgate(g, gamma, start, stop, H)  # [L, H]
                bl = b[-1]
                rs = inter_scale * (torch.exp(bl - b) if upper else torch.exp(b))
                inter = torch.einsum("lhr,hrn->lhn", X, M) * rs[..., None]
                L = stop - start
                i = torch.arange(L)
                keep = (i[None, :] >= i[:, None]) if upper else (i[None, :] <= i[:, None])  # [row, col]
                bt = b.t()  # [H, L]
                expo = (bt[:, None, :] - bt[:, :, None]) if upper else (bt[:, :, None] - bt[:, None, :])
                D = torch.exp(expo.masked_fill(~keep, -math.inf))  # [H, row, col]
                scores = torch.einsum("ihr,jhr->hij", X, Y) * D
                o = inter + intra_scale * torch.einsum("hij,jhn->ihn", scores, Z)
                outs[start:stop] = o.to(out.dtype)
                if rowdot is not None:  # of the inter-chunk part alone
                    rd = rowdot.view(N // 64, B * T, H)
                    prod = (inter * ds[start:stop]).reshape(L, H, N // 64, 64).sum(-1)  # [L, H, tiles]
                    rd[:, start:stop] = prod.permute(2, 0, 1).to(rowdot.dtype)

    def gate_grad(self, q, k, v, dout, g, gamma, rq, rk, pair, dg, cu_seqlens, chunk_offsets, scale):
        """dg_l = pair_c + sum_{j < l} rk_j + sum_{i >= l} (rq_i + rowsum_i(A) - colsum_i(A)) per chunk."""
        B, T, H, K = q.shape
        V = v.shape[-1]
        qs, ks = (t.reshape(B * T, H, K).double().cpu() for t in (q, k))
        vs, dos = (t.reshape(B * T, H, V).double().cpu() for t in (v, dout))
        rqs = rq.double().sum(0).reshape(B * T, H).cpu()
        rks = rk.double().sum(0).reshape(B * T, H).cpu()
        pairs = pair.double().sum(-1).cpu()  # [S, H]
        g, gamma = (None if t is None else t.cpu() for t in (g, gamma))
        dgs = dg.view(B * T, H)
        for bos, eos, first in sequences(B, T, cu_seqlens, chunk_offsets):
            for c, start, stop in _chunk_rows(bos, eos):
                b = _cumgate(g, gamma, start, stop, H).t()  # [H, L]
                L = stop - start
                i = torch.arange(L)
                keep = i[None, :] <= i[:, None]
                D = torch.exp((b[:, :, None] - b[:, None, :]).masked_fill(~keep, -math.inf))
                A = scale * D * torch.einsum("ihk,jhk->hij", qs[start:stop], ks[start:stop]) * \
                    torch.einsum("ihv,jhv->hij", dos[start:stop], vs[start:stop])
                x = rqs[start:stop] - rks[start:stop] + (A.sum(2) - A.sum(1)).t()  # [L, H]
                out = x.flip(0).cumsum(0).flip(0) + rks[start:stop].sum(0) + pairs[first + c]
                dgs[start:stop] = out.to(dg.dtype)

    def recurrent(self, q, k, v, g, gamma, gk, gv, init, out, final_state, cu_seqlens, chunk_offsets, scale,
                  reverse):
        B, T, H, K = q.shape
        V = v.shape[-1]
        qs, ks = (t.reshape(B * T, H, K).double().cpu() for t in (q, k))
        vs = v.reshape(B * T, H, V).double().cpu()
        gs = None if g is None else g.reshape(B * T, H).double().cpu()
        gks = None if gk is None else gk.reshape(B * T, H, K).double().cpu()
        gvs = None if gv is None else gv.reshape(B * T, H, V).double().cpu()
        outs = out.view(B * T, H, V)
        for n, (bos, eos, _) in enumerate(sequences(B, T, cu_seqlens, chunk_offsets)):
            S = init[n].double().cpu().clone() if init is not None else torch.zeros(H, K, V, dtype=torch.float64)
            for t in (range(eos - 1, bos - 1, -1) if reverse else range(bos, eos)):
                expo = torch.zeros(H, K, V, dtype=torch.float64)
                if gs is not None:
                    expo = expo + gs[t][:, None, None]
                elif gamma is not None:
                    expo = expo + gamma.double().cpu()[:, None, None]
                if gks is not None:
                    expo = expo + gks[t][:, :, None]
                if gvs is not None:
                    expo = expo + gvs[t][:, None, :]
                S = S * torch.exp(expo) + ks[t][:, :, None] * vs[t][:, None, :]
                outs[t] = (scale * torch.einsum("hk,hkv->hv", qs[t], S)).to(out.dtype)
            if final_state is not None:
                final_state[n] = S.to(final_state.dtype)
