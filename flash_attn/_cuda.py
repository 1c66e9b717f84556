"""CUDA route: check the build, pad the head dim to a compiled one, call the flash_attn::
custom ops (flash_attn._ops), slice the output back; and the ops' CUDA kernels, which
call flash_attn_2_cuda. The backward needs an extension with bwd / varlen_bwd."""
import functools

import torch
import torch.nn.functional as F

from . import build_info
from ._normalize import rng_state_shape, s_dmask_shape
from .layers.rotary import apply_rotary_emb


def dense_forward(q, k, v, dropout_p, softmax_scale, window, softcap, alibi_slopes, deterministic=False,
                  return_softmax=False):
    """q (b, sq, hq, d), k/v (b, sk, hk, d) -> out (b, sq, hq, d), lse fp32 (b, hq, sq), S_dmask.

    window: normalized (left, right), -1 = unbounded; softcap 0 = off. Differentiable
    (through flash_attn::fwd's autograd formula); deterministic concerns the backward.
    S_dmask: None, or with return_softmax and dropout_p > 0 the kernel's (b, hq, sq_128, sk_128)
    (flash_attn_func's docstring says what it holds).
    """
    d = q.shape[-1]
    dk = route_head_dim(d, dropout_p, softcap, alibi_slopes is not None)
    return_softmax = bool(return_softmax and dropout_p > 0)
    out, lse, s_dmask, _ = torch.ops.flash_attn.fwd(
        pad_head_dim(q, dk), pad_head_dim(k, dk), pad_head_dim(v, dk), alibi_slopes, softmax_scale, window[0],
        window[1], softcap, deterministic, dropout_p, return_softmax)
    return _unpad_head_dim(out, d), lse, (s_dmask if return_softmax else None)


def varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                   softmax_scale, window, softcap, alibi_slopes, deterministic=False, return_softmax=False):
    """q (total_q, hq, d), k/v (total_k, hk, d), cu_seqlens int32 (b + 1,)
    -> out (total_q, hq, d), lse fp32 (hq, total_q), S_dmask (None, or (b, hq, max_seqlen_q_128,
    max_seqlen_k_128) with sequence i in the top-left corner of S_dmask[i])."""
    d = q.shape[-1]
    dk = route_head_dim(d, dropout_p, softcap, alibi_slopes is not None)
    return_softmax = bool(return_softmax and dropout_p > 0)
    out, lse, s_dmask, _ = torch.ops.flash_attn.varlen_fwd(
        pad_head_dim(q, dk), pad_head_dim(k, dk), pad_head_dim(v, dk), cu_seqlens_q, cu_seqlens_k, None,
        max_seqlen_q, max_seqlen_k, alibi_slopes, softmax_scale, window[0], window[1], softcap, deterministic,
        dropout_p, return_softmax)
    return _unpad_head_dim(out, d), lse, (s_dmask if return_softmax else None)


def varlen_paged_forward(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, block_table, max_seqlen_q, dropout_p,
                         softmax_scale, window, softcap, alibi_slopes, deterministic=False, return_softmax=False):
    """flash_attn_varlen_func with block_table on CUDA: q (total_q, hq, d); k_cache, v_cache
    (num_blocks, page_block_size, hk, d); block_table int32 (b, max_num_blocks_per_seq); sequence
    i has cu_seqlens_k[i + 1] - cu_seqlens_k[i] keys -> out (total_q, hq, d), lse fp32 (hq, total_q),
    S_dmask None.

    The paged-KV kernel reads each key row from its page in place (csrc/flash_attn/paged_kv.h):
    nothing is gathered. No host sync: block indices are clamped on the device (an index outside
    0..num_blocks - 1 reads page 0) and key counts into 0..capacity, so bad values give wrong
    numbers, never an access outside the caches. Forward only, without dropout (the paged kernels
    have neither; CPU tensors have both). deterministic concerns the backward: unused.
    """
    if dropout_p > 0:
        raise NotImplementedError(f"flash_attn: paged KV (block_table) has no dropout on CUDA (got dropout_p="
                                  f"{dropout_p}); gather the pages into k, v yourself to use dropout")
    check_supported(0.0, softcap, alibi_slopes is not None)
    extension()
    d = q.shape[-1]
    dk = paged_kernel_head_dim(d)
    capacity = block_table.shape[1] * k_cache.shape[1]
    k_cache, v_cache = _paged_cache_view(k_cache), _paged_cache_view(v_cache)
    call = functools.partial(_varlen_paged_call, cu_seqlens_q=cu_seqlens_q, cu_seqlens_k=cu_seqlens_k,
                             block_table=block_table.contiguous(), max_seqlen_q=max_seqlen_q, max_seqlen_k=capacity,
                             softmax_scale=softmax_scale, window=window, softcap=softcap, alibi_slopes=alibi_slopes,
                             kernel_d=dk)
    out, lse = _ForwardOnly.apply(q, k_cache, v_cache, call, "flash_attn_varlen_func with block_table on CUDA")
    return out, lse, None


def _varlen_paged_call(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, block_table, max_seqlen_q, max_seqlen_k,
                       softmax_scale, window, softcap, alibi_slopes, kernel_d):
    """q (total_q, hq, d), caches (num_blocks, page, hk, kv_d) -> out (total_q, hq, d), lse (hq, total_q)."""
    total_q, hq, d = q.shape
    if q.numel() == 0 or cu_seqlens_q.shape[0] == 1 or max_seqlen_k == 0:  # no query, or no key anywhere
        return _empty_result(q, (hq, total_q))
    out, lse = extension().varlen_fwd(
        pad_head_dim(q, kernel_d), k_cache, v_cache, None, cu_seqlens_q, cu_seqlens_k, None, max_seqlen_q,
        max_seqlen_k, _contiguous(alibi_slopes), softmax_scale, window[0], window[1], softcap,
        block_table=block_table)[:2]
    return _unpad_head_dim(out, d).contiguous(), lse


PAGED_HEAD_DIMS = (64, 128, 256)  # generate_kernels.py's SPLIT_HEAD_DIMS: the paged kernels' head dims


def paged_kernel_head_dim(head_dim):
    """The head dim of the paged-KV kernel that serves head_dim: the smallest compiled one of
    64, 128, 256 that is >= head_dim. The kernel reads the caches' narrower rows itself (their
    missing columns as zeros), so only q is padded to it."""
    if not build_info.has_feature("paged"):
        raise RuntimeError(f"flash_attn: block_table (paged KV) on CUDA needs the paged-KV kernels, which this "
                           f"build left out (variants: {build_info.build_config().get('variants')}); rebuild "
                           f"without FLASH_ATTN_DISABLE_PAGEDKV")
    compiled = sorted(set(build_info.compiled_head_dims()) & set(PAGED_HEAD_DIMS))
    for d in compiled:
        if d >= head_dim:
            return d
    raise RuntimeError(f"flash_attn: head dim {head_dim} has no paged-KV kernel in this build (paged kernels: "
                       f"head dims {compiled} of {list(PAGED_HEAD_DIMS)}); rebuild with FLASH_ATTN_HEADDIMS "
                       f"including one of {[x for x in PAGED_HEAD_DIMS if x >= head_dim]}")


def _paged_cache_view(cache):
    """The cache as the paged kernel reads it: itself when its head dim is a multiple of 8 (16-byte
    rows), else zero-padded to the next multiple of 8, as flash-attn does (a copy of the whole
    pool: slow, only for such head dims)."""
    d = cache.shape[-1]
    return cache if d % 8 == 0 else F.pad(cache, (0, -d % 8))


def _unpad_head_dim(out, d):
    """out's first d columns; out itself when nothing was padded, so that the backward does
    not pay for an extra full-size gradient buffer (narrow's backward allocates one)."""
    return out if out.shape[-1] == d else out.narrow(-1, 0, d)


@torch.compiler.assume_constant_result
def route_head_dim(head_dim, dropout_p, softcap, has_alibi):
    """The kernel head dim for head_dim, after checking that this build can run the call.

    (The backward needs no say here: the extension pads head dims without a backward
    kernel itself.) Depends only on the build and the Python arguments, so torch.compile calls it while
    tracing and keeps the result (it reads the build configuration file).
    """
    extension()
    check_supported(dropout_p, softcap, has_alibi)
    return kernel_head_dim(head_dim)


# --- the flash_attn:: ops' CUDA kernels (arguments normalized, head dim a compiled one) ---

def fwd(q, k, v, alibi_slopes, softmax_scale, window_left, window_right, softcap, deterministic=False,
        dropout_p=0.0, return_softmax=False):
    """flash_attn::fwd: q (b, sq, hq, d), k/v (b, sk, hk, d) -> out (b, sq, hq, d), lse (b, hq, sq),
    S_dmask (b, hq, sq_128, sk_128) or empty, rng_state int64 (2,) or empty (_ops has the contract)."""
    ext = extension()
    b, sq, hq, _ = q.shape
    sk = k.shape[1]
    return_softmax = bool(return_softmax and dropout_p > 0)
    if q.numel() == 0 or sk == 0:
        return _empty_result(q, (b, hq, sq)) + _empty_dropout_outputs(q, dropout_p, return_softmax, b, hq, sq, sk)
    out, lse, s_dmask, rng_state = ext.fwd(q, k, v, None, _contiguous(alibi_slopes), softmax_scale, window_left,
                                           window_right, softcap, dropout_p, return_softmax)
    # the fake's layout (a no-op: the extension allocates them contiguous)
    return out.contiguous(), lse, _tensor_or_empty(s_dmask, q), rng_state


def varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, alibi_slopes,
               softmax_scale, window_left, window_right, softcap, deterministic=False, dropout_p=0.0,
               return_softmax=False):
    """flash_attn::varlen_fwd: q (total_q, hq, d), k/v (total_k, hk, d) -> out (total_q, hq, d),
    lse (hq, total_q), S_dmask (b, hq, max_seqlen_q_128, max_seqlen_k_128) or empty, rng_state."""
    ext = extension()
    total_q, hq, _ = q.shape
    b = cu_seqlens_q.shape[0] - 1
    return_softmax = bool(return_softmax and dropout_p > 0)
    if q.numel() == 0 or k.shape[0] == 0 or b == 0:
        return _empty_result(q, (hq, total_q)) + _empty_dropout_outputs(
            q, dropout_p, return_softmax, b, hq, max_seqlen_q, max_seqlen_k)
    out, lse, s_dmask, rng_state = ext.varlen_fwd(
        q, k, v, None, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, _contiguous(alibi_slopes),
        softmax_scale, window_left, window_right, softcap, dropout_p, return_softmax)
    return out.contiguous(), lse, _tensor_or_empty(s_dmask, q), rng_state


def bwd(dout, q, k, v, out, lse, alibi_slopes, softmax_scale, window_left, window_right, softcap,
        deterministic, dropout_p=0.0, rng_state=None):
    """flash_attn::bwd: dq (b, sq, hq, d), dk/dv (b, sk, hk, d) (summed over each kv head's query heads)."""
    ext = backward_extension("bwd")
    if q.numel() == 0 or k.numel() == 0:
        return _zero_grads(q, k, v)
    dq, dk, dv, _ = ext.bwd(_last_dim_contiguous(dout), q, k, v, out, lse, None, None, None,
                            _contiguous(alibi_slopes), softmax_scale, window_left, window_right, softcap,
                            deterministic, dropout_p, rng_state if dropout_p > 0 else None)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()  # the fake's layout


def varlen_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k,
               alibi_slopes, softmax_scale, window_left, window_right, softcap, deterministic, dropout_p=0.0,
               rng_state=None):
    """flash_attn::varlen_bwd: dq (total_q, hq, d), dk/dv (total_k, hk, d)."""
    ext = backward_extension("varlen_bwd")
    if seqused_k is not None:
        raise NotImplementedError("flash_attn: the CUDA varlen backward has no seqused_k; differentiate "
                                  "a call without seqused_k, or run it under torch.no_grad()")
    if q.numel() == 0 or k.numel() == 0 or cu_seqlens_q.shape[0] == 1:
        return _zero_grads(q, k, v)
    dq, dk, dv, _ = ext.varlen_bwd(_last_dim_contiguous(dout), q, k, v, out, lse, None, None, None,
                                   cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                   _contiguous(alibi_slopes), softmax_scale, window_left, window_right,
                                   softcap, deterministic, dropout_p, rng_state if dropout_p > 0 else None)
    return dq.contiguous(), dk.contiguous(), dv.contiguous()


def kvcache_forward(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                    cache_leftpad, softmax_scale, window, softcap, rotary_interleaved, alibi_slopes,
                    block_table=None, num_splits=0):
    """flash_attn_with_kvcache on CUDA: rotary and the cache append in PyTorch, then varlen_fwd.

    q (b, sq, hq, d); k_cache, v_cache (b_cache, s_cache, hk, d), written in place
    with k, v (b, s_new, hk, d) when given; cache_seqlens int32 (b,) or None (full
    cache); cache_batch_idx, cache_leftpad int32 (b,) or None; window normalized
    with causal folded in. Returns out (b, sq, hq, d), lse fp32 (b, hq, sq).

    Fast path (no cache_batch_idx, no cache_leftpad, a compiled head dim, caches
    whose first two dims flatten into a view): the kernel reads the caches in
    place, each row a varlen sequence of s_cache keys capped by seqused_k.
    Otherwise the used keys are gathered into a (b, s_cache, hk, d) temporary,
    valid keys first (correct, slower; a kernel-side path replaces it later).
    Without a mask or ALiBi, query heads that share a kv head are packed as rows of one
    sequence (GQA packing), so each kv head is read once per sequence, not once per head.
    Nothing here reads device values to the host (no sync). Values that Python
    did not check (FLASH_ATTN_DEBUG unset) are clamped into the caches' bounds:
    bad ones give wrong numbers, never an access outside the tensors.
    num_splits (split-KV, flash-attn semantics: 0 = chosen by varlen_fwd from the grid size,
    the SM count and the cache capacity, 1 = no split, n = up to n shares of each sequence's
    keys) goes to varlen_fwd as is: the kernel cuts each sequence's actual key range on the
    device, so nothing is read back here.

    block_table (paged KV: caches (num_blocks, page_block_size, hk, d), block_table int32
    (b, max_num_blocks_per_seq), no cache_batch_idx): the new keys are written into their pages
    (index_put on the GPU, block indices clamped into 0..num_blocks - 1), then the paged-KV
    kernel reads every key from its page in place (_kvcache_call with block_table): row i's keys
    are logical positions [cache_leftpad[i], cache_seqlens[i] + s_new) of its pages. The
    kernel clamps the block indices it reads itself (no sync), and reads caches of any head dim
    up to its own (multiples of 8; see paged_kernel_head_dim).
    """
    check_supported(0.0, softcap, alibi_slopes is not None)
    extension()  # fail before touching the caches
    b, sq, hq, d = q.shape
    b_cache, s_cache, hk, _ = k_cache.shape
    table = None
    if block_table is not None:
        s_cache = block_table.shape[1] * k_cache.shape[1]  # capacity of a sequence
        table = block_table.to(torch.int64).clamp(0, max(b_cache - 1, 0))  # for the append only
        dk = paged_kernel_head_dim(d)
    else:
        dk = kernel_head_dim(d)
    s_new = 0 if k is None else k.shape[1]
    device = q.device
    # cache_seqlens + s_new <= s_cache and 0 <= leftpad <= cache_seqlens by clamping (no-ops when valid)
    if cache_seqlens is None:
        seqlens = torch.full((b,), s_cache, dtype=torch.int64, device=device)
    else:
        seqlens = cache_seqlens.to(torch.int64).clamp(0, s_cache - s_new)
    rows = None if cache_batch_idx is None else cache_batch_idx.to(torch.int64).clamp(0, max(b_cache - 1, 0))
    starts = None if cache_leftpad is None else torch.minimum(cache_leftpad.to(torch.int64).clamp(min=0), seqlens)

    with torch.no_grad():
        if k is not None:
            _append_kv(k_cache, v_cache, k, v, seqlens, rows, rotary_cos, rotary_sin, rotary_interleaved, table)
    if rotary_cos is not None:
        q = _rotary_q(q, rotary_cos, rotary_sin, seqlens, rotary_interleaved, per_row=window != (-1, -1))
    if b == 0 or sq == 0 or s_cache == 0:
        return _empty_result(q, (b, hq, sq))
    # GQA packing (flash-attn's seqlenq_ngroups_swapped, generalized): without a mask or ALiBi
    # every query row sees the same keys, so the query heads sharing a kv head can be the
    # rows of one sequence, and the kernel reads each kv head once instead of once per group.
    pack_gqa = hq > hk and window == (-1, -1) and alibi_slopes is None
    if block_table is not None:
        # The paged kernel reads the pages in place: key j of row i is logical position starts[i] + j,
        # and row i has seqlens[i] + s_new - starts[i] keys (cu_seqlens_k is unused when paged).
        starts32 = None if starts is None else starts.to(torch.int32)
        seqused = seqlens + s_new - (0 if starts is None else starts)
        call = functools.partial(_kvcache_call, cu_seqlens_k=_arange_cu(b, 0, device),
                                 seqused_k=seqused.to(torch.int32), max_seqlen_k=s_cache,
                                 softmax_scale=softmax_scale, window=window, softcap=softcap,
                                 alibi_slopes=alibi_slopes, pack_gqa=pack_gqa, num_splits=int(num_splits),
                                 paged=dict(block_table=block_table.contiguous(), leftpad_k=starts32), kernel_d=dk)
        return _ForwardOnly.apply(q, _paged_cache_view(k_cache), _paged_cache_view(v_cache), call)

    keys, values = None, None
    if rows is None and starts is None and dk == d:
        keys, values = _flat_rows(k_cache, b), _flat_rows(v_cache, b)
    if keys is None or values is None:  # gather [start, seqlen + s_new) of each row, valid keys first
        starts = torch.zeros(b, dtype=torch.int64, device=device) if starts is None else starts
        rows = torch.arange(b, device=device) if rows is None else rows
        index = (starts[:, None] + torch.arange(s_cache, device=device)).clamp(max=s_cache - 1)  # (b, s_cache)
        keys = pad_head_dim(k_cache[rows[:, None], index], dk).view(b * s_cache, hk, dk)
        values = pad_head_dim(v_cache[rows[:, None], index], dk).view(b * s_cache, hk, dk)
        seqused = seqlens + s_new - starts
    else:
        seqused = seqlens + s_new
    call = functools.partial(_kvcache_call, cu_seqlens_k=_arange_cu(b, s_cache, device),
                             seqused_k=seqused.to(torch.int32), max_seqlen_k=s_cache,
                             softmax_scale=softmax_scale, window=window, softcap=softcap,
                             alibi_slopes=alibi_slopes, pack_gqa=pack_gqa, num_splits=int(num_splits))
    return _ForwardOnly.apply(q, keys, values, call)


def _append_kv(k_cache, v_cache, k, v, seqlens, rows, rotary_cos, rotary_sin, rotary_interleaved, table=None):
    """Writes k, v (b, s_new, hk, d) into cache rows ``rows`` (None = 0..b-1) at positions
    seqlens[i] + arange(s_new), rotating k at those positions first when rotary is on.
    table: int64 (b, max_num_blocks_per_seq), already clamped, for paged caches: position p of
    row i is slot p % page_block_size of page table[i, p // page_block_size]."""
    b, s_new = k.shape[:2]
    if b == 0 or s_new == 0:
        return
    if rotary_cos is not None:
        k = apply_rotary_emb(k, rotary_cos, rotary_sin, rotary_interleaved, seqlen_offsets=seqlens)
    positions = seqlens[:, None] + torch.arange(s_new, device=k.device)  # (b, s_new)
    if table is not None:
        page = k_cache.shape[1]
        blocks = table.gather(1, (positions // page).clamp(max=max(table.shape[1] - 1, 0)))
        k_cache[blocks, positions % page] = k
        v_cache[blocks, positions % page] = v
        return
    rows = torch.arange(b, device=k.device) if rows is None else rows
    k_cache[rows[:, None], positions] = k
    v_cache[rows[:, None], positions] = v


def _rotary_q(q, rotary_cos, rotary_sin, seqlens, rotary_interleaved, per_row):
    """q rotated at positions seqlens + arange(sq) (per_row: causal or local), else every
    row at position seqlens, as flash-attn does."""
    if per_row:
        return apply_rotary_emb(q, rotary_cos, rotary_sin, rotary_interleaved, seqlen_offsets=seqlens)
    b, sq, hq, d = q.shape
    flat = q.reshape(b, 1, sq * hq, d)
    return apply_rotary_emb(flat, rotary_cos, rotary_sin, rotary_interleaved,
                            seqlen_offsets=seqlens).reshape(b, sq, hq, d)


def _flat_rows(cache, b):
    """cache[:b] (b, s, hk, d) as (b * s, hk, d) without a copy, or None when its strides forbid it."""
    try:
        return cache[:b].view(b * cache.shape[1], *cache.shape[2:])
    except RuntimeError:
        return None


def _arange_cu(b, seqlen, device):
    """cu_seqlens int32 (b + 1,) of b sequences of ``seqlen`` rows each."""
    return (torch.arange(b + 1, dtype=torch.int64, device=device) * seqlen).to(torch.int32)


def _kvcache_call(q, k, v, cu_seqlens_k, seqused_k, max_seqlen_k, softmax_scale, window, softcap,
                  alibi_slopes, pack_gqa, num_splits=0, paged=None, kernel_d=None):
    """q (b, sq, hq, d); k, v (b * max_seqlen_k, hk, dk) rows of b sequences, dk the kernel
    head dim -> out (b, sq, hq, d), lse (b, hq, sq).

    pack_gqa: the g = hq / hk query heads of each kv head become g * sq query rows of
    that kv head (only valid without mask and ALiBi: rows then differ by nothing but q).
    paged: dict(block_table=..., leftpad_k=...) for the paged kernel; k, v are then the caches
    (num_blocks, page_block_size, hk, kv_d) and kernel_d the kernel head dim (>= kv_d).
    """
    ext = extension()
    b, sq, hq, d = q.shape
    hk = k.shape[-2]
    dk = k.shape[-1] if kernel_d is None else kernel_d
    g = hq // hk if pack_gqa else 1
    heads = hq // g
    alibi = None if alibi_slopes is None else alibi_slopes.contiguous()
    # head h = kv_head * g + j  ->  row (s, j) of kv head kv_head
    q_rows = pad_head_dim(q, dk).reshape(b, sq, heads, g, dk).transpose(2, 3).reshape(b * sq * g, heads, dk)
    out, lse = ext.varlen_fwd(q_rows, k, v, None, _arange_cu(b, sq * g, q.device), cu_seqlens_k, seqused_k,
                              sq * g, max_seqlen_k, alibi, softmax_scale, window[0], window[1], softcap,
                              num_splits=num_splits, **(paged or {}))[:2]
    out = out.view(b, sq, g, heads, dk).transpose(2, 3).reshape(b, sq, hq, dk)[..., :d]
    lse = lse.view(heads, b, sq, g).permute(1, 0, 3, 2).reshape(b, hq, sq).contiguous()
    return (out if dk == d else out.contiguous()), lse


def extension():
    """The flash_attn_2_cuda module; RuntimeError when the package has no CUDA kernels."""
    ext = build_info.cuda_extension()
    if ext is None:
        reason = build_info.build_config().get("skip_reason")
        raise RuntimeError(f"flash_attn: CUDA tensors given, but this package was built without CUDA "
                           f"kernels (skip_reason: {reason}); reinstall with nvcc and a CUDA build of "
                           f"torch, or pass CPU tensors to run the reference implementation")
    return ext


def backward_extension(name):
    """The extension, which must have the backward entry point ``name`` (bwd or varlen_bwd)."""
    ext = extension()
    if not hasattr(ext, name):
        raise NotImplementedError(f"flash_attn backward is not implemented for CUDA tensors in this build "
                                  f"(flash_attn_2_cuda has no {name}); run the forward under "
                                  f"torch.no_grad(), or use CPU tensors (reference implementation) for gradients")
    return ext


def kernel_head_dim(head_dim):
    """The smallest compiled head dim >= head_dim."""
    compiled = sorted(build_info.compiled_head_dims())
    for d in compiled:
        if d >= head_dim:
            return d
    raise RuntimeError(f"flash_attn: head dim {head_dim} has no kernel in this build (compiled head "
                       f"dims: {compiled}); rebuild with a larger FLASH_ATTN_HEADDIMS")


def pad_head_dim(x, head_dim):
    """Zero-pad the last dim of x up to head_dim (x itself when already there)."""
    return x if x.shape[-1] == head_dim else F.pad(x, (0, head_dim - x.shape[-1]))


def check_supported(dropout_p, softcap, has_alibi):
    """Features the CUDA route lacks, or that this build left out."""
    if dropout_p > 0 and softcap > 0:
        raise NotImplementedError(f"flash_attn: softcap with dropout is not supported on CUDA (as in flash-attn); "
                                  f"got softcap={softcap}, dropout_p={dropout_p}")
    # With dropout, ALiBi runs inside the dropout kernels (no separate ALiBi variant needed).
    for name, used in (("alibi", has_alibi and not dropout_p > 0), ("softcap", softcap > 0),
                       ("dropout", dropout_p > 0)):
        if used and not build_info.has_feature(name):
            raise RuntimeError(f"flash_attn: {name} was requested but this build has no {name} kernels "
                               f"(variants: {build_info.build_config().get('variants')}); rebuild "
                               f"without FLASH_ATTN_DISABLE_{name.upper()}")


class _ForwardOnly(torch.autograd.Function):
    """Routes q, k, v through a kernel call that has no backward (flash_attn_with_kvcache, paged
    flash_attn_varlen_func); what: the call's name for the backward's error."""

    @staticmethod
    def forward(ctx, q, k, v, call, what="flash_attn_with_kvcache"):
        out, lse = call(q, k, v)
        ctx.mark_non_differentiable(lse)
        ctx.what = what
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        raise NotImplementedError(f"{ctx.what} has no backward (forward only, as in flash-attn); "
                                  "run it under torch.no_grad(), or use flash_attn_func for gradients")


def _empty_result(q, lse_shape):
    """What a call with no keys (or no queries) returns: zeros and lse = +inf, contiguous."""
    return q.new_zeros(q.shape), torch.full(lse_shape, float("inf"), dtype=torch.float32, device=q.device)


def _empty_dropout_outputs(q, dropout_p, return_softmax, b, hq, sq, sk):
    """(S_dmask, rng_state) of a call that runs no kernel: zeros in the fake's shapes."""
    s_dmask = q.new_zeros(s_dmask_shape(b, hq, sq, sk) if return_softmax else (0,))
    return s_dmask, torch.zeros(rng_state_shape(dropout_p), dtype=torch.int64, device=q.device)


def _tensor_or_empty(x, q):
    """x, or an empty tensor like q when the extension returned None (S_dmask not requested)."""
    return q.new_empty((0,)) if x is None else x


def _zero_grads(q, k, v):
    """The gradients of a call with no keys or no queries: zeros, contiguous."""
    return q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)


def _contiguous(x):
    return None if x is None else x.contiguous()


def _last_dim_contiguous(x):
    return x if x.stride(-1) == 1 else x.contiguous()
