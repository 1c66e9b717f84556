"""A PyTorch model of flash_attn_linear_cuda (csrc/linear_attn/linear_api.cpp): every launcher
with the same arguments, written from the kernels' definitions in linear_params.h and
computed in float64, writing into the outputs it is given.

CPU tests run flash_attn.linear_attn's CUDA route (._kernels) on this model, which checks the
orchestration and its math (operands, scales, masks, slots, gate gradient) against the
reference; GPU tests compare each kernel with it on the same inputs.

The GLA launchers (gla_cumsum, chunk_state with gk_cum, gla_output, gla_grad, gla_fused_fwd)
follow the kernels' algorithm step by step, not just their definitions: 16-row sub-chunks, the
reference rows of the off-diagonal sub-chunk blocks, elementwise diagonal blocks and the
chunk-local gate gradient. Every exponential goes through _exp0, which asserts that its
argument is <= 0 wherever the result is used, so the route's CPU tests also check that
the algorithm never takes exp of a positive cumulative sum.
"""
import math

import torch

CHUNK = 64
SUB = 16  # GLA sub-chunk rows (gla_output.cuh, gla_grad.cu)


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


def _segments(chunks, seg_chunks, max_segs):
    """A sequence's chunks cut into segments of seg_chunks (0: one segment), as the kernels cut
    them; an empty sequence has one empty segment."""
    per = seg_chunks or max(len(chunks), 1)
    segs = [chunks[i:i + per] for i in range(0, len(chunks), per)] or [[]]
    assert len(segs) <= max_segs
    return segs


def _one_pass_sequence(step, S_in, segs, first, h_out, seg_state, seg_decay, seg_row0, reverse=False):
    """One sequence through a one-pass kernel (chunk_fused.cuh, gla_fused.cuh) as its launches run
    it, walking the chunks in order (reverse: from the last one down): each segment's chunks from
    S_in, the state entering the sequence folded with the segments walked before it. Pass 1 of
    segment s writes its local state L (from zeros) and log-decay d (the sum of its chunks' b_L:
    [H], or [H, K] with per-key gates) at row seg_row0 + s of seg_state / seg_decay; S_in <-
    exp(d) S_in + L. step(S, start, stop, write, slot) runs one chunk (its output when write, S
    into h_out[slot] when slot is given) and returns (S', b_L). Returns the state after the walk."""
    order = list(range(len(segs)))
    if reverse:
        order.reverse()

    def walk(seg):
        return list(reversed(seg)) if reverse else seg
    S = S_in
    for pos, j in enumerate(order):
        if pos > 0:  # pass 1 of the segment walked before this one, then its fold into S_in
            prev = order[pos - 1]
            L, d = torch.zeros_like(S_in), 0
            for _, start, stop in walk(segs[prev]):
                L, bl = step(L, start, stop, False)
                d = d + bl
            row = seg_row0 + prev
            seg_state[row] = L.to(seg_state.dtype)
            seg_decay[row] = d.to(seg_decay.dtype)
            decay = torch.exp(seg_decay[row].double())
            S_in = decay.reshape(decay.shape + (1,) * (S_in.dim() - decay.dim())) * S_in + seg_state[row].double()
        S = S_in
        for c, start, stop in walk(segs[j]):
            S, _ = step(S, start, stop, True, None if h_out is None else first + c)
    return S


def _exp0(x, used=None):
    """exp(x) for exponents that must be <= 0 (wherever `used`, a broadcastable bool mask)."""
    bad = x > 0 if used is None else (x > 0) & used
    assert not bool(bad.any()), f"exp of a positive exponent ({x[bad].max().item():.3g})"
    return torch.exp(x if used is None else x.masked_fill(~used, -math.inf))


def _pad_rows(x, clamp=False):
    """[L, ...] -> [CHUNK, ...]: zero rows past L, or copies of row L - 1 with clamp (the GLA
    kernels load the cumulative gates of rows past a chunk's end that way: they decay nothing)."""
    L = x.shape[0]
    if L == CHUNK:
        return x
    fill = x[L - 1:L].expand(CHUNK - L, *x.shape[1:]) if clamp else x.new_zeros(CHUNK - L, *x.shape[1:])
    return torch.cat([x, fill], 0)


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


def _gla_chunk_output(X, Y, Z, Bc, M, inter_scale, intra_scale, upper):
    """One chunk of gla_output (all [64, H, .] with rows past the end zero, Bc's clamped; M [H, R, N])
    as gla_output.cuh computes it: 16-row sub-chunks (warp w owns rows 16w..16w+15), the blocks
    off the diagonal through the reference row p of the warp's sub-chunk (its first row, lower;
    its last row, upper), the diagonal blocks elementwise. Returns [64, H, N]."""
    H, N = M.shape[0], M.shape[-1]
    tri = torch.ones(SUB, SUB, dtype=torch.bool)
    keep = (tri.triu() if upper else tri.tril())[:, :, None, None]  # [r, c, 1, 1]
    inter = torch.zeros(CHUNK, H, N, dtype=torch.float64)
    A = torch.zeros(H, CHUNK, CHUNK, dtype=torch.float64)
    for w in range(CHUNK // SUB):
        rows = slice(SUB * w, SUB * w + SUB)
        p = Bc[SUB * w + SUB - 1] if upper else Bc[SUB * w]  # [H, R] the reference row
        if upper:
            xo = X[rows] * _exp0(p - Bc[rows])
            xi = xo * _exp0(Bc[-1] - p)  # exp(b_L - b_r) = exp(p - b_r) exp(b_L - p)
        else:
            xo = X[rows] * _exp0(Bc[rows] - p)
            xi = xo * _exp0(p)           # exp(b_r) = exp(b_r - p) exp(p)
        inter[rows] = torch.einsum("rhd,hdn->rhn", xi, M)
        for J in (range(w + 1, CHUNK // SUB) if upper else range(w)):
            cols = slice(SUB * J, SUB * J + SUB)
            yo = Y[cols] * (_exp0(Bc[cols] - p) if upper else _exp0(p - Bc[cols]))
            A[:, rows, cols] = torch.einsum("rhd,chd->hrc", xo, yo)
        D = Bc[rows]  # [16, H, R]
        expo = (D[None, :] - D[:, None]) if upper else (D[:, None] - D[None, :])  # [r, c, H, R]
        diag = (X[rows][:, None] * Y[rows][None, :] * _exp0(expo, keep)).sum(-1)  # [r, c, H]
        A[:, rows, rows] = diag.permute(2, 0, 1)
    return inter_scale * inter + intra_scale * torch.einsum("hrc,chn->rhn", A, Z)


class LinearExtModel:
    """Same call signatures as flash_attn_linear_cuda."""

    def chunk_state(self, x, z, g, gamma, init, states, final_state, cu_seqlens, chunk_offsets, scale, reverse,
                    pair_states=None, pair_dot=None, tile_n=0, gk_cum=None, seg_chunks=0, seg_state=None,
                    seg_decay=None):
        """pair_dot gets exp(b_L) <dH_c, h_c> in its first tile (the kernel spreads it over tiles).
        gk_cum [B, T, H, R]: GLA's chunk-local cumulative per-key gates (gla_cumsum) instead of g / gamma:
        forward h_{c+1} = diag(exp(b_L)) h_c + sum_j (x_j * exp(b_L - b_j))^T z_j, reverse
        dH_{c-1} = diag(exp(b_L)) dH_c + scale sum_i (x_i * exp(b_i))^T z_i.
        Segments (seg_chunks > 0, seg_state of S > 1 per sequence), as the kernel's two launches:
        pass 1 writes the local result L_s (from zeros) and log-decay d_s (the sum of the chunks'
        b_L; [H, R] with gk_cum) of every segment a later one needs (reverse: an earlier one) into
        seg_state / seg_decay; pass 2 starts each segment from the fold S <- exp(d_s) S + L_s over
        the segments before it (reverse: after it, last first), beginning at init."""
        B, T, H, R = x.shape
        N = z.shape[-1]
        xs = x.reshape(B * T, H, R).double().cpu()
        zs = z.reshape(B * T, H, N).double().cpu()
        g, gamma = (None if t is None else t.cpu() for t in (g, gamma))
        if gk_cum is not None:
            assert g is None and gamma is None and pair_dot is None
            bs = gk_cum.reshape(B * T, H, R).double().cpu()
        seqs = sequences(B, T, cu_seqlens, chunk_offsets)
        S_per = 1 if seg_chunks == 0 else seg_state.shape[0] // len(seqs)
        decay_shape = (len(seqs) * S_per, H) + ((R,) if gk_cum is not None else ())
        assert seg_chunks == 0 or (seg_state.shape == (len(seqs) * S_per, H, R, N)
                                   and seg_decay.shape == decay_shape and S_per * seg_chunks * 64 >= T)

        def walk(S, chunks, first, write):
            """The recurrence over `chunks` (in their order) from S; writes states (and pair_dot)
            when `write`. Returns the state after them and the sum of their b_L."""
            d = torch.zeros((H, R) if gk_cum is not None else (H,), dtype=torch.float64)
            for c, start, stop in (reversed(chunks) if reverse else chunks):
                if gk_cum is not None:
                    if write and first + c < states.shape[0]:
                        states[first + c] = S.to(states.dtype)
                    b = bs[start:stop]  # [L, H, R]
                    bl = b[-1]
                    w = scale * _exp0(b) if reverse else _exp0(bl - b)
                    S = torch.exp(bl)[..., None] * S + torch.einsum("lhr,lhn->hrn", xs[start:stop] * w,
                                                                    zs[start:stop])
                    d = d + bl
                    continue
                b = _cumgate(g, gamma, start, stop, H)  # [L, H]
                bl = b[-1]
                if write and first + c < states.shape[0]:
                    states[first + c] = S.to(states.dtype)
                    if pair_dot is not None:
                        h = pair_states[first + c].double().cpu()
                        pair_dot[first + c] = 0
                        pair_dot[first + c, :, 0] = (torch.exp(bl) * (S * h).sum((-2, -1))).to(pair_dot.dtype)
                w = scale * torch.exp(b) if reverse else torch.exp(bl - b)
                S = torch.exp(bl)[:, None, None] * S + torch.einsum("lhr,lh,lhn->hrn", xs[start:stop], w,
                                                                    zs[start:stop])
                d = d + bl
            return S, d

        for n, (bos, eos, first) in enumerate(seqs):
            S0 = init[n].double().cpu().clone() if init is not None else torch.zeros(H, R, N, dtype=torch.float64)
            chunks = _chunk_rows(bos, eos)
            segs = _segments(chunks, seg_chunks if S_per > 1 else 0, S_per)
            order = list(range(len(segs)))[::-1] if reverse else list(range(len(segs)))
            for s in order[:-1]:  # pass 1: every segment but the one at the far end of the walk
                L, d = walk(torch.zeros(H, R, N, dtype=torch.float64), segs[s], first, False)
                seg_state[n * S_per + s] = L.to(seg_state.dtype)
                seg_decay[n * S_per + s] = d.to(seg_decay.dtype)
            S_in = S0
            for i, s in enumerate(order):  # pass 2
                if i > 0:
                    p = order[i - 1]
                    decay = torch.exp(seg_decay[n * S_per + p].double())  # [H] or (gk_cum) [H, R]
                    S_in = decay.reshape(H, -1, 1) * S_in + seg_state[n * S_per + p].double()
                S, _ = walk(S_in, segs[s], first, True)
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

    def chunk_bwd_fused(self, q, k, v, dout, h, dh, dq, dk, dv, rq, rk, g, gamma, cu_seqlens, chunk_offsets, scale,
                        jobs):
        """The simple-GLA backward's products in one launch (chunk_bwd_sm90.cuh): the chunk_output
        sums the three-pass route computes, for the jobs' bits (1 dv, 2 dk, 4 dq); rq and rk (or
        neither) get the dq and dk row dots. False, nothing written, where the kernel has no
        instantiation (K != V, or not 64 / 128 / 256)."""
        K, V = q.shape[3], v.shape[3]
        if K != V or K not in (64, 128, 256):
            return False
        args = (g, gamma, cu_seqlens, chunk_offsets)
        if jobs & 1:
            self.chunk_output(k, q, dout, dh, dv, None, None, *args, 1.0, scale, False, True)
        if jobs & 2:
            self.chunk_output(v, dout, q, dh, dk, None if rk is None else k, rk, *args, 1.0, scale, True, True)
        if jobs & 4:
            self.chunk_output(dout, v, k, h, dq, None if rq is None else q, rq, *args, scale, scale, True, False)
        return True

    def chunk_fused_tile_v(self, k_dim):
        """The V tile of chunk_fused_fwd (tile_size.h: chunk_fused_tile_v)."""
        return 64 if k_dim <= 128 else 32

    def chunk_fused_fwd(self, q, k, v, g, gamma, init, out, final_state, cu_seqlens, scale, seg_chunks=0,
                        seg_state=None, seg_decay=None, h_out=None, chunk_offsets=None):
        """The one-pass forward (chunk_fused.cuh), chunk by chunk with the running state S:
          o_r = scale exp(b_r) q_r S_c + scale sum_{j <= r} exp(b_r - b_j) (q_r . k_j) v_j
          S_{c+1} = exp(b_L) S_c + sum_j exp(b_L - b_j) k_j^T v_j
        S_c rounded to q's dtype where the kernel takes it as an MMA operand (q S_c), as the
        two-pass forward's stored chunk states are; the running S itself is not rounded.
        With seg_chunks > 0 and seg_state of S > 1 segments per sequence, as the kernel's two
        launches: pass 1 writes each segment's local state L_j (from zeros) and log-decay d_j
        (the sum of its chunks' b_L) into seg_state / seg_decay; pass 2 starts segment j from
        the fold S <- exp(d_s) S + L_s over s < j, beginning at init. h_out: every chunk's
        entering state, rounded to q's dtype, at its slot (chunk_offsets with cu_seqlens), as
        chunk_state stores it."""
        B, T, H, K = q.shape
        V = v.shape[-1]
        assert V % self.chunk_fused_tile_v(K) == 0
        qs, ks = (t.reshape(B * T, H, K).double().cpu() for t in (q, k))
        vs = v.reshape(B * T, H, V).double().cpu()
        g, gamma = (None if t is None else t.cpu() for t in (g, gamma))
        outs = out.view(B * T, H, V)
        N = B if cu_seqlens is None else cu_seqlens.numel() - 1
        S_per = 1 if seg_chunks == 0 else seg_state.shape[0] // N
        assert seg_chunks == 0 or (seg_state.shape == (N * S_per, H, K, V) and seg_decay.shape == (N * S_per, H)
                                   and S_per * seg_chunks * 64 >= T)

        assert h_out is None or (h_out.dtype == q.dtype and h_out.shape[1:] == (H, K, V)
                                 and (cu_seqlens is None or chunk_offsets is not None))

        def step(S, start, stop, write, slot=None):
            """One chunk from the state S entering it: its output rows (when write) and the state
            leaving it, with b_L."""
            if slot is not None:
                h_out[slot] = S.to(h_out.dtype)
            Q, Kc, Vc = qs[start:stop], ks[start:stop], vs[start:stop]
            b = _cumgate(g, gamma, start, stop, H)  # [L, H]
            bl = b[-1]
            if write:
                Sr = S.to(q.dtype).double()
                inter = torch.einsum("lhk,hkv->lhv", Q, Sr) * torch.exp(b)[..., None]
                i = torch.arange(stop - start)
                keep = i[None, :] <= i[:, None]  # [row, col]
                bt = b.t()  # [H, L]
                D = torch.exp((bt[:, :, None] - bt[:, None, :]).masked_fill(~keep, -math.inf))
                scores = torch.einsum("ihk,jhk->hij", Q, Kc) * D
                o = scale * inter + scale * torch.einsum("hij,jhv->ihv", scores, Vc)
                outs[start:stop] = o.to(out.dtype)
            return torch.exp(bl)[:, None, None] * S + torch.einsum("lhk,lh,lhv->hkv", Kc, torch.exp(bl - b), Vc), bl

        for n, (bos, eos, first) in enumerate(sequences(B, T, cu_seqlens, chunk_offsets)):
            chunks = list(_chunk_rows(bos, eos))
            segs = _segments(chunks, seg_chunks if S_per > 1 else 0, S_per)
            # S_in: the state entering segment j (the fold); S: pass 2's running state within it
            S_in = init[n].double().cpu().clone() if init is not None else torch.zeros(H, K, V, dtype=torch.float64)
            S = _one_pass_sequence(step, S_in, segs, first, h_out, seg_state, seg_decay, n * S_per)
            if final_state is not None:
                final_state[n] = S.to(final_state.dtype)

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

    def recurrent_grad(self, q, k, v, gk, gv, init, dout, dfinal, dq_part, dk_part, dgk_part, dv, dgv, dinit,
                       cu_seqlens, chunk_offsets, scale, reverse):
        """The token-by-token GLA gradients as recurrent_grad.cuh splits them, per group z of 32
        value columns, with S'_t = G_t * S_{t-1} (the state before row t's pair k_t^T v_t) and
        P_t = G_{t+1} * D_{t+1} (the gradient before row t's scale q_t^T do_t; dht at the last row):
          dq_z = scale do_t[z] S_t[:, z]^T, dk_z = v_t[z] D_t[:, z]^T (parts), dv = k_t D_t,
          dgk_z = rowsum_z(dht * S'_T) + the suffix sum of q * dq'_z - k * dk'_z,
          dgv   = colsum(dht * S'_T)   + the suffix sum of o' * do - v * dv',
        dq' = scale do S'^T, dk' = v P^T, o' = scale q S', dv' = k P, the last row's k dk' and
        v dv' left out; dinit = G_first * D_first."""
        B, T, H, K = q.shape
        V = v.shape[-1]
        Z = V // 32
        qs, ks = (t.reshape(B * T, H, K).double().cpu() for t in (q, k))
        vs, dos = (t.reshape(B * T, H, V).double().cpu() for t in (v, dout))
        gks = None if gk is None else gk.reshape(B * T, H, K).double().cpu()
        gvs = None if gv is None else gv.reshape(B * T, H, V).double().cpu()
        dqp, dkp = dq_part.view(Z, B * T, H, K), dk_part.view(Z, B * T, H, K)
        dgkp = None if dgk_part is None else dgk_part.view(Z, B * T, H, K)
        dvs = dv.view(B * T, H, V)
        dgvs = None if dgv is None else dgv.view(B * T, H, V)

        def grouped(x):  # [H, K, V] -> [Z, H, K] sums over each group's 32 columns
            return x.reshape(H, K, Z, 32).sum(-1).permute(2, 0, 1)

        def decay(t):
            expo = torch.zeros(H, K, V, dtype=torch.float64)
            if gks is not None:
                expo = expo + gks[t][:, :, None]
            if gvs is not None:
                expo = expo + gvs[t][:, None, :]
            return torch.exp(expo)

        for n, (bos, eos, _) in enumerate(sequences(B, T, cu_seqlens, chunk_offsets)):
            order = list(range(eos - 1, bos - 1, -1) if reverse else range(bos, eos))
            S = init[n].double().cpu().clone() if init is not None else torch.zeros(H, K, V, dtype=torch.float64)
            dqd, od = {}, {}
            for i, t in enumerate(order):
                S = S * decay(t)  # S'_t
                kv = ks[t][:, :, None] * vs[t][:, None, :]
                od[t] = scale * torch.einsum("hk,hkv->hv", qs[t], S) * dos[t]
                dqd[t] = scale * grouped(S * dos[t][:, None, :])
                dqp[:, t] = (scale * grouped((S + kv) * dos[t][:, None, :])).to(dq_part.dtype)
                if i + 1 < len(order):
                    S = S + kv
            D = dfinal[n].double().cpu().clone() if dfinal is not None else torch.zeros(H, K, V, dtype=torch.float64)
            run_k, run_v = grouped(D * S), (D * S).sum(1)  # [Z, H, K], [H, V]: on S'_T
            for i, t in enumerate(reversed(order)):
                dvp = torch.einsum("hk,hkv->hv", ks[t], D)  # D = P_t here
                dkp_ = grouped(D * vs[t][:, None, :])
                keep = 0.0 if i == 0 else 1.0  # the last row of the recurrence: k dk', v dv' left out
                run_k = run_k + qs[t] * dqd[t] - keep * ks[t] * dkp_
                run_v = run_v + od[t] - keep * vs[t] * dvp
                D = D + scale * qs[t][:, :, None] * dos[t][:, None, :]  # D_t
                dkp[:, t] = grouped(D * vs[t][:, None, :]).to(dk_part.dtype)
                dvs[t] = torch.einsum("hk,hkv->hv", ks[t], D).to(dv.dtype)
                if dgkp is not None:
                    dgkp[:, t] = run_k.to(dgk_part.dtype)
                if dgvs is not None:
                    dgvs[t] = run_v.to(dgv.dtype)
                D = D * decay(t)
            if dinit is not None:
                dinit[n] = D.to(dinit.dtype)

    # ----------------------------------------------------------------------- GLA (per-key gates)

    def gla_cumsum(self, g, out, cu_seqlens, chunk_offsets, num_slots):
        """out[t] = g[chunk start] + ... + g[t] inside each chunk (fp32 [B, T, H, K])."""
        B, T, H, K = g.shape
        gs = g.reshape(B * T, H, K).double().cpu()
        outs = out.view(B * T, H, K)
        for bos, eos, _ in sequences(B, T, cu_seqlens, chunk_offsets):
            for _, start, stop in _chunk_rows(bos, eos):
                outs[start:stop] = gs[start:stop].cumsum(0).to(out.dtype)

    def gla_output(self, x, y, z, m, b, out, cu_seqlens, chunk_offsets, inter_scale, intra_scale, upper):
        """out = inter_scale * (x * E) M + intra_scale * A z per chunk, b the cumulative gates:
          lower (o: x = q, y = k, M = h_c, z = v):   E_r = exp(b_r),        A_rc = sum_d x_rd y_cd exp(b_rd - b_cd), c <= r
          upper (dv: x = k, y = q, M = dH_c, z = do): E_r = exp(b_L - b_r), A_rc = sum_d x_rd y_cd exp(b_cd - b_rd), c >= r
        computed as gla_output.cuh does: 16-row sub-chunks (warp w owns rows 16w..16w+15), the
        blocks off the diagonal through the reference row p of the warp's sub-chunk (its first
        row, lower; its last row, upper), the diagonal blocks elementwise."""
        B, T, H, R = x.shape
        N = z.shape[-1]
        xs, ys = (t.reshape(B * T, H, R).double().cpu() for t in (x, y))
        zs = z.reshape(B * T, H, N).double().cpu()
        bs = b.reshape(B * T, H, R).double().cpu()
        outs = out.view(B * T, H, N)
        for bos, eos, first in sequences(B, T, cu_seqlens, chunk_offsets):
            for c, start, stop in _chunk_rows(bos, eos):
                slot = first + c
                if slot >= m.shape[0]:
                    continue
                X, Y, Z = (_pad_rows(t[start:stop]) for t in (xs, ys, zs))
                Bc = _pad_rows(bs[start:stop], clamp=True)  # [64, H, R]
                o = _gla_chunk_output(X, Y, Z, Bc, m[slot].double().cpu(), inter_scale, intra_scale, upper)
                outs[start:stop] = o[:stop - start].to(out.dtype)

    def gla_fused_tile_v(self, k_dim, v_dim):
        """The V tile of gla_fused_fwd (tile_size.h: gla_fused_tile_v): 128 at K = 128 when V allows
        it (the 256-thread kernel, A once per 128 V columns), else 64, or 32 at K = 256."""
        if k_dim == 128 and v_dim % 128 == 0:
            return 128
        return 64 if k_dim <= 128 else 32

    def gla_fused_fwd(self, q, k, v, b, init, out, final_state, cu_seqlens, scale, g=None, b_out=None,
                      seg_chunks=0, seg_state=None, seg_decay=None, h_out=None, chunk_offsets=None, reverse=False):
        """GLA's one-pass forward (gla_fused.cuh), chunk by chunk with the running state S:
          o  = gla_output's lower output with M = S_c rounded to q's dtype (the kernel's MMA operand),
               both scales = scale
          S <- diag(exp(b_L)) S + sum_j (k_j * exp(b_L - b_j))^T v_j   (not rounded)
        which is chunk_state (gk_cum = b) + gla_output without the stored states. The 256-thread
        kernel (K = 128, V a multiple of 128) also takes raw gates g instead of b (summed per
        chunk, b into b_out when given) and segments as chunk_fused_fwd's, with a log-decay per
        key: pass 1 writes each segment's local state L_j and d_j = the sum of its chunks' b_L
        [H, K]; pass 2 starts segment j from the fold S <- diag(exp(d_s)) S + L_s over s < j.
        h_out (the 256-thread kernel): every chunk's entering state, rounded to q's dtype, at its
        slot (chunk_offsets with cu_seqlens), as chunk_state stores it.
        reverse (the 256-thread kernel, b only): the backward's reverse pass, called with q = k,
        k = q, v = do, init = dh_T, out = dv, final_state = dh_0, h_out = dH. Chunks from the last
        one down with the running state D (entering: the gradient of the state leaving the chunk):
          dv = gla_output's upper output with M = D rounded, inter scale 1, intra scale scale
          D <- diag(exp(b_L)) D + scale * sum_r (k_r * exp(b_r))^T v_r   (here k = q, v = do)
        which is chunk_state (reverse, gk_cum = b) + gla_output (upper) without the stored states."""
        B, T, H, K = q.shape
        V = v.shape[-1]
        wide = self.gla_fused_tile_v(K, V) == 128
        assert K in (64, 128, 256) and V % self.gla_fused_tile_v(K, V) == 0
        assert (b is None) != (g is None), "exactly one of b and g"
        assert wide or (g is None and seg_chunks == 0), "raw gates and segments: the 256-thread kernel only"
        assert b_out is None or g is not None
        assert not reverse or (wide and b is not None), "reverse: the 256-thread kernel with b"
        assert h_out is None or (wide and h_out.dtype == q.dtype and h_out.shape[1:] == (H, K, V)
                                 and (cu_seqlens is None or chunk_offsets is not None))
        if g is not None:
            assert g.shape == q.shape and g.dtype == torch.float32
            b = torch.empty_like(g)
            LinearExtModel.gla_cumsum(self, g, b, cu_seqlens, None, 0)  # (not counted as a launch)
            if b_out is not None:
                assert b_out.shape == q.shape and b_out.dtype == torch.float32
                b_out.copy_(b)
        assert b.shape == q.shape
        N = B if cu_seqlens is None else cu_seqlens.numel() - 1
        S_per = 1 if seg_chunks == 0 else seg_state.shape[0] // N
        assert seg_chunks == 0 or (seg_state.shape == (N * S_per, H, K, V) and seg_decay.shape == (N * S_per, H, K)
                                   and S_per * seg_chunks * 64 >= T)
        qs, ks = (t.reshape(B * T, H, K).double().cpu() for t in (q, k))
        vs = v.reshape(B * T, H, V).double().cpu()
        bs = b.reshape(B * T, H, K).double().cpu()
        outs = out.view(B * T, H, V)

        def step(S, start, stop, write, slot=None):
            """One chunk from the state S entering it: its output rows (when write), the state
            leaving it and b_L [H, K]; with slot, S into h_out there."""
            if slot is not None:
                h_out[slot] = S.to(h_out.dtype)
            X, Y, Z = (_pad_rows(t[start:stop]) for t in (qs, ks, vs))
            Bc = _pad_rows(bs[start:stop], clamp=True)  # [64, H, K]
            if write:
                o = _gla_chunk_output(X, Y, Z, Bc, S.to(q.dtype).double(), 1.0 if reverse else scale, scale, reverse)
                outs[start:stop] = o[:stop - start].to(out.dtype)
            bl = Bc[-1]  # [H, K]
            weights = scale * _exp0(Bc) if reverse else _exp0(bl - Bc)
            return _exp0(bl)[..., None] * S + torch.einsum("lhk,lhv->hkv", Y * weights, Z), bl

        for n, (bos, eos, first) in enumerate(sequences(B, T, cu_seqlens, chunk_offsets)):
            segs = _segments(list(_chunk_rows(bos, eos)), seg_chunks if S_per > 1 else 0, S_per)
            S_in = init[n].double().cpu().clone() if init is not None else torch.zeros(H, K, V, dtype=torch.float64)
            S = _one_pass_sequence(step, S_in, segs, first, h_out, seg_state, seg_decay, n * S_per, reverse)
            if final_state is not None:
                final_state[n] = S.to(final_state.dtype)

    def gla_grad(self, q, k, v, dout, b, h, dh, dq, dk, dg, cu_seqlens, chunk_offsets, scale):
        """dq, dk and dg of GLA per chunk (gla_grad.cu), with h_c / dH_c the states entering /
        the state gradients leaving each chunk and dA_ij = scale do_i . v_j (j <= i):
          dq_i = scale exp(b_i) * (do_i h_c^T) + sum_{j <= i} dA_ij k_j * exp(b_i - b_j)
          dk_j = exp(b_L - b_j) * (v_j dH_c^T) + sum_{i >= j} dA_ij q_i * exp(b_i - b_j)
                 (state part ks_j)                (intra part ki_j)
          dg_l = exp(b_L) * rowsum(dH_c * h_c) + sum_{j < l} k_j * ks_j + sum_{i >= l} (q_i * dq_i - k_i * ki_i)
        off-diagonal sub-chunk blocks through the reference row of the warp's own sub-chunk (first
        row for dq, last row for dk), diagonal blocks elementwise."""
        B, T, H, K = q.shape
        V = v.shape[-1]
        qs, ks = (t.reshape(B * T, H, K).double().cpu() for t in (q, k))
        vs, dos = (t.reshape(B * T, H, V).double().cpu() for t in (v, dout))
        bs = b.reshape(B * T, H, K).double().cpu()
        dqs, dks, dgs = dq.view(B * T, H, K), dk.view(B * T, H, K), dg.view(B * T, H, K)
        tri = torch.ones(SUB, SUB, dtype=torch.bool)
        lower = tri.tril()[:, :, None, None]  # [i, j, 1, 1]: j <= i
        NS = CHUNK // SUB
        for bos, eos, first in sequences(B, T, cu_seqlens, chunk_offsets):
            for c, start, stop in _chunk_rows(bos, eos):
                slot, L = first + c, stop - start
                if slot >= h.shape[0]:
                    continue
                Q, Kc, Vc, DO = (_pad_rows(t[start:stop]) for t in (qs, ks, vs, dos))
                Bc = _pad_rows(bs[start:stop], clamp=True)
                Hs, DH = h[slot].double().cpu(), dh[slot].double().cpu()  # [H, K, V]
                i = torch.arange(CHUNK)
                dA = scale * torch.einsum("ihv,jhv->hij", DO, Vc) * (i[None, :] <= i[:, None])
                dqi = torch.einsum("ihv,hdv->ihd", DO, Hs)
                dks_ = torch.einsum("jhv,hdv->jhd", Vc, DH)
                pair = _exp0(Bc[-1]) * (DH * Hs).sum(-1)  # [H, K]
                dQ = torch.zeros(CHUNK, H, K, dtype=torch.float64)
                kst, kin = torch.zeros_like(dQ), torch.zeros_like(dQ)
                for w in range(NS):
                    rows = slice(SUB * w, SUB * w + SUB)
                    D = Bc[rows]
                    # dq rows of sub-chunk w, reference p = its first row
                    p = Bc[SUB * w]
                    tmp = torch.zeros(SUB, H, K, dtype=torch.float64)
                    for J in range(w):
                        cols = slice(SUB * J, SUB * J + SUB)
                        tmp += torch.einsum("hij,jhd->ihd", dA[:, rows, cols], Kc[cols] * _exp0(p - Bc[cols]))
                    eq = _exp0(D - p)
                    dQ[rows] = scale * dqi[rows] * eq * _exp0(p) + tmp * eq
                    expo = D[:, None] - D[None, :]  # [i, j, H, K]: b_i - b_j
                    dAd = dA[:, rows, rows].permute(1, 2, 0)[..., None]  # [i, j, H, 1]
                    dQ[rows] += (dAd * Kc[rows][None, :] * _exp0(expo, lower)).sum(1)
                    # dk rows of sub-chunk w, reference p = its last row
                    p = Bc[SUB * w + SUB - 1]
                    tmp = torch.zeros(SUB, H, K, dtype=torch.float64)
                    for I in range(w + 1, NS):
                        cols = slice(SUB * I, SUB * I + SUB)
                        tmp += torch.einsum("hij,ihd->jhd", dA[:, cols, rows], Q[cols] * _exp0(Bc[cols] - p))
                    ek = _exp0(p - D)
                    kst[rows] = dks_[rows] * ek * _exp0(Bc[-1] - p)
                    kin[rows] = tmp * ek + (dAd * Q[rows][:, None] * _exp0(expo, lower)).sum(0)
                x = (Q * dQ - Kc * kin)[:L]
                y = (Kc * kst)[:L]
                prefix = y.cumsum(0) - y  # sum_{j < l}
                suffix = x.flip(0).cumsum(0).flip(0)  # sum_{i >= l}
                dqs[start:stop] = dQ[:L].to(dq.dtype)
                dks[start:stop] = (kst + kin)[:L].to(dk.dtype)
                dgs[start:stop] = (pair + prefix + suffix).to(dg.dtype)
