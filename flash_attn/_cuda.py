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
    """flash_attn_with_kvcache on CUDA: rotary and the cache append in PyTorch, then one call of
    the extension's batched forward (flash_api.cpp fwd with seqused_k: no cu_seqlens).

    q (b, sq, hq, d); k_cache, v_cache (b_cache, s_cache, hk, d), written in place
    with k, v (b, s_new, hk, d) when given; cache_seqlens int32 (b,) or None (full
    cache); cache_batch_idx, cache_leftpad int32 (b,) or None; window normalized
    with causal folded in. Returns out (b, sq, hq, d), lse fp32 (b, hq, sq).

    Fast path (no cache_batch_idx, no cache_leftpad, a compiled head dim): the kernel reads
    caches[:b] in place, row i's first seqused_k[i] = cache_seqlens[i] + s_new keys.
    Otherwise the used keys are gathered into a (b, s_cache, hk, d) temporary, valid keys
    first (correct, slower).
    Without a mask or ALiBi, query heads that share a kv head are packed as rows of one
    sequence (GQA packing), so each kv head is read once per sequence, not once per head;
    for sq == 1 (decoding) q and out are strided views, not copies (_kvcache_call).
    Nothing here reads device values to the host (no sync). Values that Python did not check
    (FLASH_ATTN_DEBUG unset) cannot move an access outside the tensors: the kernel clamps
    seqused_k into each row's key range itself (so without new keys, rotary or cache_leftpad
    the int32 cache_seqlens goes to it as it is, and the decode step runs no torch op besides
    the kernels), and where cache_seqlens places writes (the append) or rotations it is clamped
    here into 0..s_cache - s_new first. Bad values give wrong numbers, never an access outside.
    num_splits (split-KV: 0 = chosen by the extension, the grid from the grid size, the SM
    count and the cache capacity, 1 = no split, n = up to n shares of each sequence's keys)
    goes to the extension as is: the kernel takes each sequence's share count and cut from its
    actual key range on the device (split_kv.h split_share), so nothing is read back here.

    block_table (paged KV: caches (num_blocks, page_block_size, hk, d), block_table int32
    (b, max_num_blocks_per_seq), no cache_batch_idx): the new keys are written into their pages
    (index_put on the GPU, block indices clamped into 0..num_blocks - 1), then the paged-KV
    kernel reads every key from its page in place: row i's keys are logical positions
    [cache_leftpad[i], cache_seqlens[i] + s_new) of its pages. The kernel clamps the block
    indices it reads itself (no sync), and reads caches of any head dim up to its own
    (multiples of 8; see paged_kernel_head_dim).
    """
    check_supported(0.0, softcap, alibi_slopes is not None)
    extension()  # fail before touching the caches
    b, sq, hq, d = q.shape
    b_cache, s_cache, hk, _ = k_cache.shape
    paged = block_table is not None
    if paged:
        s_cache = block_table.shape[1] * k_cache.shape[1]  # capacity of a sequence
        dk = paged_kernel_head_dim(d)
    else:
        dk = kernel_head_dim(d)
    s_new = 0 if k is None else k.shape[1]
    device = q.device
    # Keys before the append, where something places writes or rotations with them: clamped into
    # 0..s_cache - s_new (int32; a no-op when valid), so the append stays inside the cache.
    seqlens = None
    if s_new > 0 or rotary_cos is not None or cache_leftpad is not None:
        seqlens = (torch.full((b,), s_cache, dtype=torch.int32, device=device) if cache_seqlens is None
                   else cache_seqlens.clamp(0, s_cache - s_new))
    rows = None if cache_batch_idx is None else cache_batch_idx.to(torch.int64).clamp(0, max(b_cache - 1, 0))
    # 0 <= leftpad <= seqlens (int32)
    starts = None if cache_leftpad is None else torch.minimum(cache_leftpad.clamp(min=0), seqlens)

    with torch.no_grad():
        if s_new > 0 and b > 0:
            _append_kv(k_cache, v_cache, k, v, seqlens, rows, rotary_cos, rotary_sin, rotary_interleaved, block_table)
    if rotary_cos is not None:
        q = _rotary_q(q, rotary_cos, rotary_sin, seqlens, rotary_interleaved, per_row=window != (-1, -1))
    if b == 0 or sq == 0 or s_cache == 0:
        return _empty_result(q, (b, hq, sq))
    # Keys of row i: [starts[i], seqlens[i] + s_new) of its cache row, starts[i] as key 0. int32,
    # contiguous (b,); None = all s_cache.
    if seqlens is None:
        seqused = None if cache_seqlens is None else cache_seqlens.contiguous()
    else:
        seqused = seqlens + s_new if s_new else seqlens
        seqused = seqused if starts is None else seqused - starts
    # GQA packing (flash-attn's seqlenq_ngroups_swapped, generalized): without a mask or ALiBi
    # every query row sees the same keys, so the query heads sharing a kv head can be the
    # rows of one sequence, and the kernel reads each kv head once instead of once per group.
    pack_gqa = hq > hk and window == (-1, -1) and alibi_slopes is None
    call = functools.partial(_kvcache_call, softmax_scale=softmax_scale, window=window, softcap=softcap,
                             alibi_slopes=alibi_slopes, pack_gqa=pack_gqa, num_splits=int(num_splits), kernel_d=dk)
    if paged:
        # The paged kernel reads the pages in place, key j of row i at logical position starts[i] + j;
        # it needs a key count per row.
        if seqused is None:
            seqused = torch.full((b,), s_cache, dtype=torch.int32, device=device)
        call = functools.partial(call, seqused_k=seqused, block_table=block_table.contiguous(), leftpad_k=starts)
        return _ForwardOnly.apply(q, _paged_cache_view(k_cache), _paged_cache_view(v_cache), call)

    if rows is None and starts is None and dk == d:
        keys, values = (k_cache, v_cache) if b_cache == b else (k_cache[:b], v_cache[:b])
    else:  # gather [start, seqlen + s_new) of each row, valid keys first
        first = torch.zeros(b, dtype=torch.int64, device=device) if starts is None else starts
        rows = torch.arange(b, device=device) if rows is None else rows
        index = (first[:, None] + torch.arange(s_cache, device=device)).clamp(max=s_cache - 1)  # (b, s_cache)
        keys = pad_head_dim(k_cache[rows[:, None], index], dk)
        values = pad_head_dim(v_cache[rows[:, None], index], dk)
    return _ForwardOnly.apply(q, keys, values, functools.partial(call, seqused_k=seqused))


def _append_kv(k_cache, v_cache, k, v, seqlens, rows, rotary_cos, rotary_sin, rotary_interleaved, block_table=None):
    """Writes k, v (b, s_new, hk, d) into cache rows ``rows`` (None = 0..b-1) at positions
    seqlens[i] + arange(s_new), rotating k at those positions first when rotary is on.
    seqlens: int32 (b,), already clamped into 0..capacity - s_new, so every position is inside the
    cache. block_table: int32 (b, max_num_blocks_per_seq) for paged caches: position p of row i is
    slot p % page_block_size of page block_table[i, p // page_block_size], clamped into the pool.
    Index tensors are int64, so the writes convert nothing on the GPU."""
    b, s_new = k.shape[:2]
    if rotary_cos is not None:
        k = apply_rotary_emb(k, rotary_cos, rotary_sin, rotary_interleaved, seqlen_offsets=seqlens)
    positions = seqlens.to(torch.int64).unsqueeze(1)  # (b, 1)
    if s_new > 1:
        positions = positions + torch.arange(s_new, device=k.device)  # (b, s_new)
    if block_table is not None:
        page = k_cache.shape[1]
        blocks = block_table.gather(1, positions // page).clamp(0, k_cache.shape[0] - 1).to(torch.int64)
        index = (blocks, positions % page)
    elif rows is None:
        # row i of the first b cache rows: a scatter along the sequence dim needs no row index
        index = positions.view(b, s_new, 1, 1).expand(k.shape)
        for cache, new in ((k_cache, k), (v_cache, v)):
            (cache if cache.shape[0] == b else cache[:b]).scatter_(1, index, new)
        return
    else:
        index = (rows[:, None], positions)
    k_cache.index_put_(index, k)
    v_cache.index_put_(index, v)


def _rotary_q(q, rotary_cos, rotary_sin, seqlens, rotary_interleaved, per_row):
    """q rotated at positions seqlens + arange(sq) (per_row: causal or local), else every
    row at position seqlens, as flash-attn does."""
    if per_row:
        return apply_rotary_emb(q, rotary_cos, rotary_sin, rotary_interleaved, seqlen_offsets=seqlens)
    b, sq, hq, d = q.shape
    flat = q.reshape(b, 1, sq * hq, d)
    return apply_rotary_emb(flat, rotary_cos, rotary_sin, rotary_interleaved,
                            seqlen_offsets=seqlens).reshape(b, sq, hq, d)


def _kvcache_call(q, k, v, seqused_k, softmax_scale, window, softcap, alibi_slopes, pack_gqa, num_splits=0,
                  block_table=None, leftpad_k=None, kernel_d=None):
    """q (b, sq, hq, d); k, v (b, s, hk, dk) caches (or gathered keys), dk the kernel head dim, row
    i using its first seqused_k[i] keys (None: all s) -> out (b, sq, hq, d), lse (b, hq, sq).

    One call of the extension's batched forward. pack_gqa: the g = hq / hk query heads of each kv
    head become g * sq query rows of that kv head (only valid without mask and ALiBi: rows then
    differ by nothing but q); see _gqa_rows for when that costs no copy.
    block_table, leftpad_k: paged KV (flash_api.cpp fwd); k, v are then the caches (num_blocks,
    page_block_size, hk, kv_d) and kernel_d the kernel head dim (>= kv_d).
    """
    ext = extension()
    b, sq, hq, d = q.shape
    hk = k.shape[-2]
    dk = k.shape[-1] if kernel_d is None else kernel_d
    g = hq // hk if pack_gqa else 1
    q = pad_head_dim(q, dk)
    result = rows_out = None
    if g > 1:
        q = _gqa_rows(q, g)  # (b, sq * g, hk, dk)
        if sq == 1 or hk == 1:  # the kernel writes the output in its final layout, through a view
            result = q.new_empty((b, sq, hq, dk))
            rows_out = _gqa_rows(result, g, view=True)
    out, lse = ext.fwd(q, k, v, rows_out, _contiguous(alibi_slopes), softmax_scale, window[0], window[1], softcap,
                       seqused_k=seqused_k, num_splits=num_splits, block_table=block_table,
                       leftpad_k=leftpad_k)[:2]
    if g > 1:
        # row s * g + j of kv head h -> query head h * g + j of row s
        out = result if result is not None else out.view(b, sq, g, hk, dk).transpose(2, 3).reshape(b, sq, hq, dk)
        # (b, hk, g) is (b, hq, 1) in memory
        lse = lse.view(b, hq, 1) if sq == 1 else lse.view(b, hk, sq, g).transpose(2, 3).reshape(b, hq, sq).contiguous()
    return (out if dk == d else out[..., :d].contiguous()), lse


def _gqa_rows(x, g, view=False):
    """x (b, sq, hq, d) -> (b, sq * g, hq / g, d): row s * g + j of kv head h is query head h * g + j
    of row s. A view when sq == 1 (a decode step: row stride d, head stride g * d) or when x is
    contiguous with hq == g (MQA); else a copy, or with view=True an error."""
    b, sq, hq, d = x.shape
    if sq == 1:
        return x.view(b, hq // g, g, d).transpose(1, 2)
    rows = x.view(b, sq, hq // g, g, d).transpose(2, 3)
    return rows.view(b, sq * g, hq // g, d) if view else rows.reshape(b, sq * g, hq // g, d)


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
