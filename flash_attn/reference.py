"""Pure-PyTorch reference for exact attention: what CPU tensors run, and what
the CUDA kernels are tested against.

Semantics (flash-attn 2.x, see DESIGN.md), for query row i and key column j of
one sequence with seqlen_q = sq and seqlen_k = sk, writing diag = i + sk - sq - j:

    score  = softmax_scale * q_i . k_j
    score  = softcap * tanh(score / softcap)            if softcap > 0
    score -= slope * |diag|                             if alibi_slopes is given
    keep j iff -right <= diag <= left                   (-1 = unbounded side)
    causal  == window (left, 0): aligned to the bottom-right corner.

A query row that keeps no key outputs exactly 0 and has lse = +inf, in the
forward and (without NaN) in the backward. Everything here is differentiable.

Dtypes: with ``upcast`` the math runs in fp32 (fp64 inputs stay fp64); without
it, in q.dtype. ``out`` is returned in q.dtype, ``lse`` in fp32 (fp64 for fp64
inputs).
"""
import torch
import torch.nn.functional as F

from .layers.rotary import apply_rotary_emb


def attention_ref(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1),
                  softcap=0.0, alibi_slopes=None, dropout_p=0.0, dropout_mask=None,
                  upcast=True, key_padding_mask=None, query_padding_mask=None):
    """Exact attention on padded batches.

    q: (b, sq, hq, d); k, v: (b, sk, hk, d) with hq % hk == 0 (query head h
    reads kv head h // (hq // hk)).
    alibi_slopes: fp32 (hq,) or (b, hq).
    dropout_mask: bool (b, hq, sq, sk), True = keep; kept probabilities are
    scaled by 1 / (1 - dropout_p). Without it and dropout_p > 0, a mask is drawn
    from torch's default generator.
    key_padding_mask: bool (b, sk), query_padding_mask: bool (b, sq), True =
    valid. Positions i, j and the lengths sq, sk above then count valid tokens
    only, so a padded batch equals its unpadded (varlen) sequences; padded
    query rows output 0 with lse = +inf.
    Returns out (b, sq, hq, d) in q.dtype and lse (b, hq, sq).
    """
    out, lse, _, _ = attention_ref_with_probs(
        q, k, v, softmax_scale, causal, window_size, softcap, alibi_slopes, dropout_p,
        dropout_mask, upcast, key_padding_mask, query_padding_mask)
    return out, lse


def attention_ref_with_probs(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, dropout_p=0.0, dropout_mask=None,
                             upcast=True, key_padding_mask=None, query_padding_mask=None):
    """attention_ref that also returns what it sampled.

    Returns (out, lse, probs, keep): probs (b, hq, sq, sk) are the softmax
    probabilities before dropout (compute dtype), keep the bool dropout mask
    (b, hq, sq, sk) used, or None when dropout is off.
    """
    b, sq, hq, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    compute_dtype = _compute_dtype(q.dtype, upcast)
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    qc, kc, vc = (t.to(compute_dtype) for t in (q, k, v))
    kc = kc.repeat_interleave(hq // hk, dim=2)
    vc = vc.repeat_interleave(hq // hk, dim=2)

    scores = torch.einsum("bqhd,bkhd->bhqk", qc, kc) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    diag = _diagonal_offsets(b, sq, sk, key_padding_mask, query_padding_mask, q.device)
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(compute_dtype).reshape(-1, hq, 1, 1)
        scores = scores - slopes * diag.abs().unsqueeze(1).to(compute_dtype)
    left, right = window_size[0], 0 if causal else window_size[1]
    visible = _visible(diag, left, right, key_padding_mask, query_padding_mask).unsqueeze(1)
    probs, lse = _masked_softmax(scores, visible)

    keep = None
    if dropout_mask is not None:
        keep = dropout_mask
    elif dropout_p > 0:
        keep = torch.rand(probs.shape, device=q.device) >= dropout_p
    dropped = probs if keep is None else probs * keep / (1.0 - dropout_p)
    out = torch.einsum("bhqk,bkhd->bqhd", dropped, vc).to(q.dtype)
    return out, lse, probs, keep


def attention_varlen_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None,
                         max_seqlen_k=None, seqused_k=None, softmax_scale=None, causal=False,
                         window_size=(-1, -1), softcap=0.0, alibi_slopes=None, dropout_p=0.0,
                         dropout_mask=None, upcast=True):
    """Exact attention on packed variable-length sequences, one sequence at a time.

    q: (total_q, hq, d); k, v: (total_k, hk, d); cu_seqlens_q/k: int (b + 1,)
    offsets of each sequence; seqused_k: int (b,) or None, the number of keys
    of each sequence actually read (a prefix). alibi_slopes (b, hq) uses row
    b for sequence b. dropout_mask: bool (b, hq, max_seqlen_q, max_seqlen_k),
    sequence b in its top-left corner. Rows of q past cu_seqlens_q[-1] output
    0 with lse = +inf. Other options as in attention_ref.
    Returns out (total_q, hq, d) in q.dtype and lse (hq, total_q).
    """
    out, lse, _, _ = attention_varlen_ref_with_probs(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k,
        softmax_scale, causal, window_size, softcap, alibi_slopes, dropout_p, dropout_mask, upcast)
    return out, lse


def attention_varlen_ref_with_probs(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None,
                                    max_seqlen_k=None, seqused_k=None, softmax_scale=None,
                                    causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, dropout_p=0.0, dropout_mask=None,
                                    upcast=True):
    """attention_varlen_ref that also returns what it sampled.

    Returns (out, lse, probs, keep): probs (b, hq, mq, mk) and keep (same
    shape, or None without dropout) hold sequence b in their top-left corner,
    zero / False elsewhere; mq = max(max_seqlen_q, longest query sequence),
    mk likewise.
    """
    starts_q, ends_q = _bounds(cu_seqlens_q)
    starts_k, ends_k = _bounds(cu_seqlens_k)
    if seqused_k is not None:
        ends_k = [s + n for s, n in zip(starts_k, seqused_k.tolist())]
    lens_q = [e - s for s, e in zip(starts_q, ends_q)]
    lens_k = [e - s for s, e in zip(starts_k, ends_k)]
    mq = max([max_seqlen_q or 0] + lens_q)
    mk = max([max_seqlen_k or 0] + lens_k)

    outs, lses, probs, keeps = [], [], [], []
    for i, (sq, sk) in enumerate(zip(lens_q, lens_k)):
        slopes = alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[i]
        mask = None if dropout_mask is None else dropout_mask[i:i + 1, :, :sq, :sk]
        o, l, p, keep = attention_ref_with_probs(
            q[starts_q[i]:ends_q[i]].unsqueeze(0), k[starts_k[i]:ends_k[i]].unsqueeze(0),
            v[starts_k[i]:ends_k[i]].unsqueeze(0), softmax_scale, causal, window_size, softcap, slopes,
            dropout_p, mask, upcast)
        outs.append(o[0])
        lses.append(l[0])
        probs.append(F.pad(p[0], (0, mk - sk, 0, mq - sq)))
        if keep is not None:
            keeps.append(F.pad(keep[0], (0, mk - sk, 0, mq - sq)))

    tail = q.shape[0] - (ends_q[-1] if ends_q else 0)
    hq, dv = q.shape[1], v.shape[-1]
    outs.append(q.new_zeros(tail, hq, dv))
    lses.append(torch.full((hq, tail), float("inf"), dtype=_lse_dtype(q.dtype), device=q.device))
    probs = torch.stack(probs) if probs else q.new_zeros(0, hq, mq, mk, dtype=_compute_dtype(q.dtype, upcast))
    keeps = torch.stack(keeps) if keeps else None
    return torch.cat(outs), torch.cat(lses, dim=1), probs, keeps


def _compute_dtype(dtype, upcast):
    if not upcast:
        return dtype
    return torch.float64 if dtype == torch.float64 else torch.float32


def _lse_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bounds(cu_seqlens):
    """cu_seqlens (b + 1,) -> python lists of starts and ends, b each."""
    cu = cu_seqlens.tolist()
    return cu[:-1], cu[1:]


def _token_positions(mask, batch, seqlen, device):
    """Position of each token among the valid tokens of its row, and the row lengths.

    mask: bool (batch, seqlen) or None (all valid).
    Returns positions (batch, seqlen) and lengths (batch,), int64.
    """
    if mask is None:
        pos = torch.arange(seqlen, device=device).expand(batch, seqlen)
        return pos, torch.full((batch,), seqlen, device=device)
    mask = mask.to(torch.int64)
    return mask.cumsum(-1) - 1, mask.sum(-1)


def _diagonal_offsets(batch, sq, sk, key_padding_mask, query_padding_mask, device):
    """diag[b, i, j] = i + sk - sq - j in valid-token coordinates; int64 (b, sq, sk)."""
    pos_q, len_q = _token_positions(query_padding_mask, batch, sq, device)
    pos_k, len_k = _token_positions(key_padding_mask, batch, sk, device)
    return pos_q[:, :, None] + (len_k - len_q)[:, None, None] - pos_k[:, None, :]


def _visible(diag, left, right, key_padding_mask, query_padding_mask):
    """Which (query, key) pairs attend: bool (b, sq, sk)."""
    visible = torch.ones_like(diag, dtype=torch.bool)
    if left >= 0:
        visible &= diag <= left
    if right >= 0:
        visible &= diag >= -right
    if key_padding_mask is not None:
        visible &= key_padding_mask[:, None, :].bool()
    if query_padding_mask is not None:
        visible &= query_padding_mask[:, :, None].bool()
    return visible


def _masked_softmax(scores, visible):
    """Softmax over the last dim restricted to ``visible``; empty rows give zeros.

    scores: (b, h, sq, sk); visible: bool broadcastable to it.
    Returns probs (like scores) and lse (b, h, sq) with +inf on empty rows.
    The row max is detached: softmax and lse do not depend on it, and this
    keeps -inf out of the backward.
    """
    masked = scores.masked_fill(~visible, float("-inf"))
    if masked.shape[-1] == 0:
        row_max = masked.new_full(masked.shape[:-1], float("-inf"))
    else:
        row_max = masked.detach().amax(dim=-1)
    nonempty = torch.isfinite(row_max)
    shift = torch.where(nonempty, row_max, torch.zeros_like(row_max))
    unnormalized = torch.exp(masked - shift.unsqueeze(-1))
    total = unnormalized.sum(dim=-1)
    safe_total = torch.where(nonempty, total, torch.ones_like(total))
    probs = unnormalized / safe_total.unsqueeze(-1)
    lse = torch.where(nonempty, shift + torch.log(safe_total), torch.full_like(total, float("inf")))
    return probs, lse.to(_lse_dtype(scores.dtype))


def paged_slots(block_table_row, positions, page_block_size):
    """Where logical positions of one sequence live in a paged cache.

    block_table_row: int (max_num_blocks_per_seq,), logical block -> physical block;
    positions: int64 (n,) logical key positions. Returns (blocks, offsets), int64 (n,):
    position p is slot offsets of page blocks, i.e. cache[blocks, offsets].
    """
    blocks = block_table_row.to(torch.int64)[positions // page_block_size]
    return blocks, positions % page_block_size


def gather_paged(cache, block_table_row, length):
    """The first ``length`` keys (or values) of one sequence of a paged cache.

    cache: (num_blocks, page_block_size, hk, d) -> (length, hk, d), a copy in logical order.
    """
    positions = torch.arange(length, device=cache.device)
    blocks, offsets = paged_slots(block_table_row, positions, cache.shape[1])
    return cache[blocks, offsets]


def attention_varlen_paged_ref(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, block_table,
                               max_seqlen_q=None, max_seqlen_k=None, softmax_scale=None,
                               causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                               dropout_p=0.0, dropout_mask=None, upcast=True):
    """attention_varlen_ref on paged keys and values (flash_attn_varlen_func with block_table).

    k_cache, v_cache: (num_blocks, page_block_size, hk, d); block_table: int (b, max_num_blocks_per_seq);
    sequence i has len_i = cu_seqlens_k[i + 1] - cu_seqlens_k[i] keys, its logical positions
    0..len_i - 1 in its pages. The keys are gathered per sequence (gather_paged) into a packed
    (sum len_i, hk, d) tensor, then attention_varlen_ref runs on it.
    """
    keys, values, cu_packed = gather_paged_varlen(k_cache, v_cache, cu_seqlens_k, block_table)
    return attention_varlen_ref(q, keys, values, cu_seqlens_q, cu_packed, max_seqlen_q, max_seqlen_k, None,
                                softmax_scale, causal, window_size, softcap, alibi_slopes, dropout_p,
                                dropout_mask, upcast)


def gather_paged_varlen(k_cache, v_cache, cu_seqlens_k, block_table):
    """Each sequence's keys and values gathered from its pages and packed:
    (keys (total, hk, d), values (total, hk, d), cu_seqlens of the packed keys, int32 (b + 1,))."""
    starts, ends = _bounds(cu_seqlens_k)
    lens = [max(e - s, 0) for s, e in zip(starts, ends)]
    keys = [gather_paged(k_cache, block_table[i], n) for i, n in enumerate(lens)]
    values = [gather_paged(v_cache, block_table[i], n) for i, n in enumerate(lens)]
    hk, d = k_cache.shape[2:]
    empty = k_cache.new_zeros(0, hk, d)
    cu = torch.tensor([0] + lens, dtype=torch.int64).cumsum(0).to(torch.int32).to(cu_seqlens_k.device)
    return torch.cat(keys + [empty]), torch.cat(values + [v_cache.new_zeros(0, hk, d)]), cu


def kvcache_ref(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, softmax_scale=None,
                causal=False, window_size=(-1, -1), softcap=0.0, rotary_interleaved=True,
                alibi_slopes=None, upcast=True, block_table=None):
    """flash_attn_with_kvcache, one batch row at a time (flash-attn 2.8 semantics).

    q: (b, sq, hq, d); k_cache, v_cache: (b_cache, s_cache, hk, d); k, v:
    (b, s_new, hk, d) or None; cache_seqlens: int, int (b,) tensor, or None
    (= s_cache); cache_batch_idx: int (b,) cache row of each batch row (default
    i); cache_leftpad: int (b,) first valid cache position (default 0);
    rotary_cos / rotary_sin: (seqlen_ro, rotary_dim / 2).

    For batch row i, with row = cache_batch_idx[i], n = cache_seqlens[i] and
    start = cache_leftpad[i]:
    1. with rotary, the new k is rotated at positions n, n + 1, ...; q likewise
       when causal or the window is local, else every q row at position n
       (positions are cache indices: the left padding is not subtracted);
    2. k, v are written into k_cache[row, n:n + s_new], v_cache likewise, in place;
    3. q attends to the keys k_cache[row, start:n + s_new], with the mask and
       ALiBi aligned to that key length as in attention_ref (alibi_slopes
       (b, hq) uses row i of the slopes).
    block_table: int (b, max_num_blocks_per_seq) or None. With it the caches are paged,
    (num_blocks, page_block_size, hk, d), and cache row i is the sequence whose logical
    position p sits in slot p % page_block_size of page block_table[i, p // page_block_size]
    (paged_slots); its capacity s_cache is max_num_blocks_per_seq * page_block_size. Steps 2
    and 3 then write into and read from those slots (cache_batch_idx must be None).
    Returns out (b, sq, hq, d) in q.dtype and lse (b, hq, sq).
    """
    b, sq, hq, d = q.shape
    s_cache = k_cache.shape[1] if block_table is None else block_table.shape[1] * k_cache.shape[1]
    if block_table is not None and cache_batch_idx is not None:
        raise ValueError("kvcache_ref: cache_batch_idx cannot be combined with block_table")
    s_new = 0 if k is None else k.shape[1]
    rotate_q_rows = causal or tuple(window_size) != (-1, -1)
    outs, lses = [], []
    for i in range(b):
        row = i if cache_batch_idx is None else int(cache_batch_idx[i])
        n = s_cache if cache_seqlens is None else int(
            cache_seqlens[i] if isinstance(cache_seqlens, torch.Tensor) else cache_seqlens)
        start = 0 if cache_leftpad is None else int(cache_leftpad[i])
        qi = q[i:i + 1]
        if k is not None:
            ki, vi = k[i:i + 1], v[i:i + 1]
            if rotary_cos is not None:
                ki = apply_rotary_emb(ki, rotary_cos, rotary_sin, rotary_interleaved, seqlen_offsets=n)
            if block_table is None:
                k_cache[row, n:n + s_new] = ki[0]
                v_cache[row, n:n + s_new] = vi[0]
            else:
                slots = paged_slots(block_table[i], torch.arange(n, n + s_new, device=q.device), k_cache.shape[1])
                k_cache[slots] = ki[0]
                v_cache[slots] = vi[0]
        if rotary_cos is not None:
            if rotate_q_rows:
                qi = apply_rotary_emb(qi, rotary_cos, rotary_sin, rotary_interleaved, seqlen_offsets=n)
            else:  # every query row at position n: one "token" holding sq * hq heads
                qi = apply_rotary_emb(qi.reshape(1, 1, sq * hq, d), rotary_cos, rotary_sin,
                                      rotary_interleaved, seqlen_offsets=n).reshape(1, sq, hq, d)
        if block_table is None:
            keys = k_cache[row:row + 1, start:n + s_new]
            values = v_cache[row:row + 1, start:n + s_new]
        else:
            keys = gather_paged(k_cache, block_table[i], n + s_new)[None, start:]
            values = gather_paged(v_cache, block_table[i], n + s_new)[None, start:]
        slopes = alibi_slopes if alibi_slopes is None or alibi_slopes.dim() == 1 else alibi_slopes[i]
        o, lse = attention_ref(qi, keys, values, softmax_scale, causal, window_size, softcap, slopes,
                               upcast=upcast)
        outs.append(o)
        lses.append(lse)
    if not outs:
        return q.new_zeros(q.shape), torch.zeros(0, hq, sq, dtype=_lse_dtype(q.dtype), device=q.device)
    return torch.cat(outs), torch.cat(lses)
