"""Pure-PyTorch references for linear attention: what CPU tensors run in
flash_attn.linear_attn, and what the CUDA kernels are tested against.

Semantics (DESIGN.md, the linear-attention contract). Per sequence and head,
with q_t, k_t rows of length K, v_t a row of length V and the state S a K x V
matrix:

    S_0 = initial_state (zeros when None)
    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t
    o_t = scale * q_t S_t                         (scale defaults to K ** -0.5)

The log-gate g_t (natural log, <= 0 for a decay) is
  - a scalar per head and step (simple GLA, g [B, T, H]),
  - a fixed scalar per head (g_gamma [H]: RetNet, Lightning),
  - zero (g None: plain linear attention),
  - one per key dimension (GLA, g [B, T, H, K]).
Gates must be finite (the chunked form takes differences of cumulative sums;
a gate of -inf would make them NaN). The GLA recurrent form also takes an
optional value gate gv [B, T, H, V]:
S_t = diag(exp(gk_t)) S_{t-1} diag(exp(gv_t)) + k_t^T v_t.

Layouts: q, k [B, T, H, K]; v [B, T, H, V]; initial_state and the final state
[N, H, K, V] with N = B, or N = number of sequences with cu_seqlens (varlen:
B == 1, sequence n is tokens cu_seqlens[n]:cu_seqlens[n + 1], each starting
from initial_state[n]; a state never crosses a sequence boundary).

Two forms of the same function:
  linear_attn_recurrent_ref   token by token, the definition above;
  linear_attn_chunk_ref       chunkwise parallel: the algorithm the CUDA chunk
                              kernels follow (see _chunk_dense for the math).
Both are differentiable through autograd (q, k, v, g, g_gamma, initial_state).

Dtypes: the math runs in fp32 (fp64 when an input is fp64); o is returned in
q.dtype, the final state in the compute dtype (fp32 for fp16/bf16/fp32 inputs).
"""
import math

import torch
import torch.nn.functional as F

DEFAULT_CHUNK_SIZE = 64
DEFAULT_SUB_CHUNK_SIZE = 16
NORMALIZE_EPS = 1e-10


# --------------------------------------------------------------------------- fixed decays

def retention_log_decay(num_heads, device=None):
    """RetNet's fixed per-head log-decay: g_gamma[h] = log(1 - 2^(-5 - h)), h = 0..H-1.

    Returns fp32 [H]. Head 0 decays by 1 - 1/32 per step, the last head the least.
    """
    h = torch.arange(num_heads, dtype=torch.float64, device=device)
    return torch.log1p(-torch.pow(2.0, -5.0 - h)).float()


def lightning_log_decay(num_heads, layer_idx, num_layers, device=None):
    """Lightning Attention's fixed per-head log-decay (TransNormerLLM, arXiv 2307.14995,
    the rate fla's chunk_lightning_attn cites):

        lambda_h   = exp(-(8 h / H) * (1 - layer_idx / num_layers)),  h = 0..H-1
        g_gamma[h] = log(lambda_h) = -(8 h / H) * (1 - layer_idx / num_layers)

    Head 0 never decays; higher heads and lower layers decay faster; layer_idx
    counts from 0. Returns fp32 [H].
    """
    h = torch.arange(num_heads, dtype=torch.float64, device=device)
    return (-(8.0 * h / num_heads) * (1.0 - layer_idx / num_layers)).float()


# --------------------------------------------------------------------------- public references

def linear_attn_recurrent_ref(q, k, v, g=None, g_gamma=None, gv=None, scale=None, initial_state=None,
                              output_final_state=False, reverse=False, cu_seqlens=None):
    """The recurrence, one token at a time (what fused_recurrent_* compute).

    g: None, [B, T, H] (scalar log-gate) or [B, T, H, K] (per-key log-gate);
    g_gamma: [H] fixed log-decay (not together with g); gv: [B, T, H, V] value
    log-gate or None. reverse=True runs each sequence from its last token to its
    first: S_t = diag(exp(g_t)) S_{t+1} diag(exp(gv_t)) + k_t^T v_t,
    o_t = scale * q_t S_t (the forward recurrence on the time-reversed sequence).
    Returns (o [B, T, H, V] in q.dtype, final state [N, H, K, V] or None).
    """
    o, state = _recurrent(q, k, v, g, g_gamma, gv, scale, initial_state, reverse, cu_seqlens)
    return o.to(q.dtype), (state if output_final_state else None)


def linear_attn_chunk_ref(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None,
                          output_final_state=False, cu_seqlens=None, chunk_size=DEFAULT_CHUNK_SIZE,
                          sub_chunk_size=DEFAULT_SUB_CHUNK_SIZE):
    """The chunkwise-parallel form (what chunk_* compute); equals linear_attn_recurrent_ref.

    Same arguments as linear_attn_recurrent_ref (no gv, no reverse), plus the
    chunk length and, for per-key gates, the sub-chunk length (a divisor of
    chunk_size) of the intra-chunk scores.
    Returns (o [B, T, H, V] in q.dtype, final state [N, H, K, V] or None).
    """
    o, state = _chunk(q, k, v, g, g_gamma, scale, initial_state, cu_seqlens, chunk_size, sub_chunk_size)
    return o.to(q.dtype), (state if output_final_state else None)


def linear_attn_ref(q, k, v, scale=None, initial_state=None, output_final_state=False, normalize=True,
                    cu_seqlens=None, chunked=True):
    """Plain linear attention (no decay) with chunk_linear_attn's normalize option.

    normalize=False: o_t = scale * q_t S_t; initial_state and the final state
    are tensors [N, H, K, V].
    normalize=True: the output is divided by the query's dot product with the
    running key sum of its sequence,
        z_t = z_0 + k_1 + ... + k_t
        o_t = (scale * q_t S_t) / (scale * q_t . z_t + 1e-10)
    (the scale cancels up to the epsilon); initial_state and the final state
    are tuples (kv_state [N, H, K, V], z_state [N, 1, H, K]), z_0 = 0 when
    initial_state is None.
    chunked picks the chunkwise or the token-by-token form.
    Returns (o [B, T, H, V] in q.dtype, final state or None).
    """
    if normalize and initial_state is not None and not isinstance(initial_state, (tuple, list)):
        raise TypeError("flash_attn: initial_state must be a tuple (kv_state, z_state) when normalize=True")
    kv0, z0 = initial_state if (normalize and initial_state is not None) else (initial_state, None)
    if chunked:
        o, state = _chunk(q, k, v, None, None, scale, kv0, cu_seqlens, DEFAULT_CHUNK_SIZE, DEFAULT_SUB_CHUNK_SIZE)
    else:
        o, state = _recurrent(q, k, v, None, None, None, scale, kv0, False, cu_seqlens)
    if normalize:
        den, z_state = linear_attn_normalizer_ref(q, k, scale, z0, cu_seqlens)
        o = o / (den.unsqueeze(-1) + NORMALIZE_EPS)
        state = (state, z_state)
    return o.to(q.dtype), (state if output_final_state else None)


def linear_attn_normalizer_ref(q, k, scale=None, z_state=None, cu_seqlens=None):
    """The denominator of normalized linear attention: scale * q_t . z_t with
    z_t = z_0 + k_1 + ... + k_t per sequence.

    z_state: [N, 1, H, K] running key sum entering each sequence, or None (zeros).
    Returns (den [B, T, H], final z_state [N, 1, H, K]) in the compute dtype.
    """
    dtype = _compute_dtype(q, k, z_state)
    scale = q.shape[-1] ** -0.5 if scale is None else scale

    def dense(q, k, z0):
        z = k.cumsum(1)  # [B, T, H, K]
        if z0 is not None:
            z = z + z0
        last = z[:, -1:] if z.shape[1] > 0 else (z0 if z0 is not None else k.new_zeros(k.shape[0], 1, *k.shape[2:]))
        return scale * (q * z).sum(-1), last

    q, k = q.to(dtype), k.to(dtype)
    return _per_sequence(dense, (q, k), None if z_state is None else z_state.to(dtype), cu_seqlens)


def masked_linear_attention_ref(q, k, v, mask, scale=None):
    """Masked linear attention (TransnormerLLM-style), per head:

        o = scale * ((q k^T) * M) v

    q [B, T, H, K]; k [B, T, HK, K], v [B, T, HK, V] with H % HK == 0 (query
    head h reads kv head h // (H // HK)); mask M broadcastable to [B, H, T, T]
    (float, differentiable; or bool). scale defaults to K ** -0.5. With M the
    causal decay mask of log-gates g (causal_decay_mask) this equals
    linear_attn_recurrent_ref(q, k, v, g) from a zero state.
    Returns o [B, T, H, V] in q.dtype.
    """
    dtype = _compute_dtype(q, k, v, mask)
    groups = q.shape[2] // k.shape[2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    kq = k.to(dtype).repeat_interleave(groups, dim=2)  # [B, T, H, K]
    vq = v.to(dtype).repeat_interleave(groups, dim=2)  # [B, T, H, V]
    scores = torch.einsum("bihk,bjhk->bhij", q.to(dtype), kq) * mask.to(dtype)  # [B, H, T, T]
    return (scale * torch.einsum("bhij,bjhv->bihv", scores, vq)).to(q.dtype)


def causal_decay_mask(g):
    """The mask that turns masked linear attention into the simple-GLA recurrence.

    g: [B, T, H] log-gates. Returns M [B, H, T, T] (compute dtype) with
    M[i, j] = exp(g_{j+1} + ... + g_i) for j <= i (1 on the diagonal), 0 above.
    Built from differences of one cumulative sum, so it is meant for tests and
    moderate T (the chunked form rebases per chunk instead).
    """
    dtype = _compute_dtype(g)
    b = g.to(dtype).cumsum(1).transpose(1, 2)  # [B, H, T]
    T = b.shape[-1]
    upper = torch.ones(T, T, dtype=torch.bool, device=g.device).triu(1)
    return torch.exp((b.unsqueeze(-1) - b.unsqueeze(-2)).masked_fill(upper, -math.inf))


# --------------------------------------------------------------------------- shared plumbing

def _compute_dtype(*tensors):
    fp64 = any(isinstance(t, torch.Tensor) and t.dtype == torch.float64 for t in tensors)
    return torch.float64 if fp64 else torch.float32


def _prepare(q, k, v, g, g_gamma, gv, initial_state, scale):
    """Casts to the compute dtype and brings every gate to g [B, T, H, G] (G = 1 or K)."""
    if g is not None and g_gamma is not None:
        raise ValueError("flash_attn: pass g or g_gamma, not both")
    dtype = _compute_dtype(q, k, v, g, g_gamma, gv, initial_state)
    B, T, H, K = q.shape
    if g is not None:
        g = g.to(dtype)
        g = g.unsqueeze(-1) if g.dim() == 3 else g
    elif g_gamma is not None:
        g = g_gamma.to(dtype).view(1, 1, H, 1).expand(B, T, H, 1)
    else:
        g = q.new_zeros(B, T, H, 1, dtype=dtype)
    scale = K ** -0.5 if scale is None else scale
    cast = [None if x is None else x.to(dtype) for x in (q, k, v, gv, initial_state)]
    return cast[0], cast[1], cast[2], g, cast[3], cast[4], scale


def _per_sequence(dense, seq_tensors, h0, cu_seqlens):
    """dense(*seq_tensors, h0) on the whole batch, or per sequence of a packed batch.

    seq_tensors: [B, T, ...] tensors (or None) cut along T; h0: [N, ...] initial
    states (or None). dense returns (per-token output [B, T, ...], final state
    [B, ...]); varlen outputs are concatenated along T, states along N.
    """
    if cu_seqlens is None:
        return dense(*seq_tensors, h0)
    bounds = [int(x) for x in cu_seqlens.tolist()]
    outs, states = [], []
    for n, (bos, eos) in enumerate(zip(bounds[:-1], bounds[1:])):
        pieces = [None if x is None else x[:, bos:eos] for x in seq_tensors]
        o, state = dense(*pieces, None if h0 is None else h0[n:n + 1])
        outs.append(o)
        states.append(state)
    return torch.cat(outs, 1), torch.cat(states, 0)


# --------------------------------------------------------------------------- recurrent form

def _recurrent(q, k, v, g, g_gamma, gv, scale, initial_state, reverse, cu_seqlens):
    q, k, v, g, gv, h0, scale = _prepare(q, k, v, g, g_gamma, gv, initial_state, scale)

    def dense(q, k, v, g, gv, h0):
        if reverse:
            q, k, v, g = (x.flip(1) for x in (q, k, v, g))
            gv = None if gv is None else gv.flip(1)
        o, state = _recurrent_dense(q, k, v, g, gv, scale, h0)
        return (o.flip(1) if reverse else o), state

    return _per_sequence(dense, (q, k, v, g, gv), h0, cu_seqlens)


def _recurrent_dense(q, k, v, g, gv, scale, h0):
    """q, k [B, T, H, K]; v [B, T, H, V]; g [B, T, H, G]; gv [B, T, H, V] or None;
    h0 [B, H, K, V] or None. Returns o [B, T, H, V], S_T [B, H, K, V]."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    S = q.new_zeros(B, H, K, V) if h0 is None else h0
    outs = []
    for t in range(T):
        S = S * torch.exp(g[:, t]).unsqueeze(-1)  # [B, H, G, 1]: row kk of S scaled by exp(g_t[kk])
        if gv is not None:
            S = S * torch.exp(gv[:, t]).unsqueeze(-2)  # [B, H, 1, V]: column scaling
        S = S + k[:, t].unsqueeze(-1) * v[:, t].unsqueeze(-2)  # + k_t^T v_t
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t], S))
    o = torch.stack(outs, 1) if outs else q.new_zeros(B, 0, H, V)
    return o, S


# --------------------------------------------------------------------------- chunked form

def _chunk(q, k, v, g, g_gamma, scale, initial_state, cu_seqlens, chunk_size, sub_chunk_size):
    if chunk_size < 1 or sub_chunk_size < 1 or chunk_size % sub_chunk_size != 0:
        raise ValueError(f"flash_attn: chunk_size must be a positive multiple of sub_chunk_size, got "
                         f"{chunk_size} and {sub_chunk_size}")
    q, k, v, g, _, h0, scale = _prepare(q, k, v, g, g_gamma, None, initial_state, scale)

    def dense(q, k, v, g, h0):
        return _chunk_dense(q, k, v, g, scale, h0, chunk_size, sub_chunk_size)

    return _per_sequence(dense, (q, k, v, g), h0, cu_seqlens)


def _to_chunks(x, C):
    """[B, T, H, D] -> [B, H, NC, C, D], T zero-padded to NC * C rows."""
    B, T, H, D = x.shape
    NC = -(-T // C)
    x = F.pad(x, (0, 0, 0, 0, 0, NC * C - T))
    return x.reshape(B, NC, C, H, D).permute(0, 3, 1, 2, 4)


def _chunk_dense(q, k, v, g, scale, h0, C, c):
    """One packed-free batch in chunks of C rows.

    q, k [B, T, H, K]; v [B, T, H, V]; g [B, T, H, G] log-gates with G = 1
    (scalar per head) or G = K (per key); h0 [B, H, K, V] or None.
    Returns o [B, T, H, V] and the final state [B, H, K, V].

    Zero padding to whole chunks is exact: a padded row has k = v = 0 (adds
    nothing to the state) and g = 0 (decays nothing); its output is cut off.
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    state = q.new_zeros(B, H, K, V) if h0 is None else h0  # [B, H, K, V]
    if T == 0:
        return q.new_zeros(B, 0, H, V), state
    NC = -(-T // C)
    qc, kc, vc, gc = (_to_chunks(x, C) for x in (q, k, v, g))  # [B, H, NC, C, K | K | V | G]

    # 1. Chunk-local cumulative log-decay: b[i] = g[0] + ... + g[i] inside each chunk,
    #    <= 0 and non-increasing for gates <= 0. Every exponent below is b[i] (row i
    #    back to the chunk start), b_last - b[j] (row j forward to the chunk end) or
    #    b[i] - b[j] with j at or before i: all <= 0. No exp of a positive cumulative
    #    sum, so nothing overflows however negative the gates are; what underflows to
    #    0 is a weight below the dtype's range anyway.
    b = gc.cumsum(3)          # [B, H, NC, C, G]
    b_last = b[..., -1, :]    # [B, H, NC, G]     log-decay across the whole chunk

    # 2. State pass, sequential over chunks (the kernel walks the chunks of one
    #    (sequence, head); everything else is parallel over chunks):
    #      hs[n]      = state entering chunk n
    #      hs[n + 1]  = diag(exp(b_last[n])) hs[n] + sum_j (k_j * exp(b_last[n] - b_j))^T v_j
    k_to_end = kc * torch.exp(b_last.unsqueeze(-2) - b)                 # [B, H, NC, C, K]
    local = torch.einsum("bhnck,bhncv->bhnkv", k_to_end, vc)             # [B, H, NC, K, V]
    chunk_decay = torch.exp(b_last).unsqueeze(-1)                        # [B, H, NC, G, 1]
    entering = []
    for n in range(NC):
        entering.append(state)
        state = chunk_decay[:, :, n] * state + local[:, :, n]            # [B, H, K, V]
    hs = torch.stack(entering, 2)                                        # [B, H, NC, K, V]

    # 3. Output, parallel over chunks; for row i of chunk n:
    #      o_i = scale * (q_i * exp(b_i)) hs[n]          the entering state, decayed to row i
    #          + scale * sum_{j <= i} A[i, j] v_j         the chunk's own rows
    #      A[i, j] = sum_kk q_i[kk] k_j[kk] exp(b_i[kk] - b_j[kk])
    o_inter = torch.einsum("bhnck,bhnkv->bhncv", qc * torch.exp(b), hs)  # [B, H, NC, C, V]
    A = _intra_scores(qc, kc, b, c)                                      # [B, H, NC, C, C]
    o = scale * (o_inter + A @ vc)                                       # [B, H, NC, C, V]
    return o.permute(0, 2, 3, 1, 4).reshape(B, NC * C, H, V)[:, :T], state


def _intra_scores(q, k, b, c):
    """A[i, j] = sum_kk q_i[kk] k_j[kk] exp(b_i[kk] - b_j[kk]) for j <= i, else 0.

    q, k [..., C, K]; b [..., C, G] chunk-local cumulative log-gates; c the
    sub-chunk length for per-key gates. Returns A [..., C, C].
    """
    C, K = q.shape[-2:]
    G = b.shape[-1]
    if G == 1:
        # Scalar gate: the decay leaves the dot product as one C x C factor,
        #   A = (q k^T) * D,  D[i, j] = exp(b_i - b_j) for j <= i, 0 above
        # (the exponent is masked to -inf before the exp, never evaluated positive).
        above = torch.ones(C, C, dtype=torch.bool, device=q.device).triu(1)
        D = torch.exp((b - b.transpose(-1, -2)).masked_fill(above, -math.inf))  # [..., C, C]
        return (q @ k.transpose(-1, -2)) * D

    # Per-key gate: exp(b_i[kk] - b_j[kk]) depends on kk, so it stays inside the dot
    # product. The chunk is cut into NS sub-chunks of c rows; I indexes query
    # sub-chunks, J key sub-chunks, i and j rows inside them.
    lead = q.shape[:-2]
    NS = C // c
    qs, ks, bs = (x.reshape(*lead, NS, c, K) for x in (q, k, b))  # [..., NS, c, K]

    # Blocks below the diagonal (I > J): rebase both sides on r_J = b at the last
    # row of sub-chunk J. Every key row of J is at or before r_J's row and every
    # query row of I after it, so
    #   exp(b_i - b_j) = exp(b_i - r_J) * exp(r_J - b_j),   both factors <= 1,
    # and the block is one matmul of rebased queries and keys (an MMA in the kernel).
    r = bs[..., -1, :]                                                   # [..., NS(J), K]
    k_reb = ks * torch.exp(r.unsqueeze(-2) - bs)                         # [..., NS(J), c, K]
    below = torch.ones(NS, NS, dtype=torch.bool, device=q.device).tril(-1)  # I > J
    q_exp = bs.unsqueeze(-3) - r.unsqueeze(-3).unsqueeze(-2)             # [..., NS(I), NS(J), c, K]
    q_reb = qs.unsqueeze(-3) * torch.exp(q_exp.masked_fill(~below[:, :, None, None], -math.inf))
    A_off = torch.einsum("...IJik,...Jjk->...IJij", q_reb, k_reb)        # [..., NS, NS, c, c], 0 for I <= J

    # Diagonal blocks (I == J): rows of one sub-chunk have no common rebasing point
    # that keeps both factors <= 1, so the decay is applied per (i, j, kk) pair:
    # a c x c x K tensor per sub-chunk (a small per-row loop in the kernel).
    tri_above = torch.ones(c, c, dtype=torch.bool, device=q.device).triu(1)[:, :, None]
    d_exp = (bs.unsqueeze(-2) - bs.unsqueeze(-3)).masked_fill(tri_above, -math.inf)  # [..., NS, c, c, K]
    A_diag = torch.einsum("...Iik,...Ijk,...Iijk->...Iij", qs, ks, torch.exp(d_exp))  # [..., NS, c, c]

    eye = torch.eye(NS, dtype=q.dtype, device=q.device)[:, :, None, None]  # [NS, NS, 1, 1]
    A = A_off + eye * A_diag.unsqueeze(-3)                               # [..., NS(I), NS(J), c, c]
    return A.transpose(-3, -2).reshape(*lead, C, C)                      # [..., I, i, J, j] -> [..., C, C]
