"""The flash-attn 2.x exact-attention API (same names, signatures, layouts, returns).

Each function checks its arguments (flash_attn._checks), normalizes the options
as flash-attn does (flash_attn._normalize), then calls the flash_attn:: custom ops
(flash_attn._ops: forward, backward through their autograd formula, fake
implementations for torch.compile), whose kernels depend on the device: CUDA
tensors run the compiled kernels (flash_attn._cuda, which also pads the head dim
to a compiled one around the op), CPU tensors the reference implementation
(flash_attn._cpu). Dropout on CPU stays outside the ops: with dropout_p > 0, CPU
tensors run the reference with its dropout directly (a torch.rand mask), differentiable
through autograd (and torch.compile traces the reference itself).

Common options:
    dropout_p: probability of dropping an attention probability, in [0, 1). Kept
        probabilities are scaled by 1 / (1 - dropout_p); the softmax statistics (lse) are
        those before dropout. CUDA: the mask comes from torch's default CUDA generator (a
        fresh mask per call, reproducible under torch.manual_seed, CUDA-graph safe); an
        element is kept with probability floor((1 - dropout_p) * 256) / 256 (an 8-bit
        threshold, as flash-attn); not with softcap (NotImplementedError, as flash-attn).
        The CUDA backward with dropout is not available yet.
    softmax_scale: defaults to headdim ** -0.5.
    causal: mask aligned to the bottom-right corner; same as window (left, 0).
    window_size: (left, right); query i keeps keys j in
        [i + seqlen_k - seqlen_q - left, i + seqlen_k - seqlen_q + right], -1 = unbounded.
    softcap: > 0 turns scores into softcap * tanh(scores / softcap).
    alibi_slopes: fp32 (nheads,) or (batch, nheads); adds -slope * |i + seqlen_k - seqlen_q - j|.
    deterministic: concerns the backward only: passed to the CUDA backward kernel
        (bitwise reproducible dq); the CPU reference is deterministic either way.
    return_attn_probs: return (out, softmax_lse, S_dmask) instead of out.
        softmax_lse is fp32 (batch, nheads, seqlen_q), or (nheads, total_q) for
        varlen; a row that sees no key has lse +inf (and outputs 0).
        S_dmask is None without dropout. With dropout it encodes the mask in its sign:
        negative (sign bit set, -0.0 included) = dropped, otherwise kept.
        CPU: (batch, nheads, seqlen_q, seqlen_k), the probabilities before dropout
        (flash_attn._cpu.s_dmask). CUDA (flash-attn's layout and encoding): (batch,
        nheads, seqlen_q_rounded, seqlen_k_rounded), lengths rounded up to multiples of
        128 (varlen: max_seqlen_q/k, sequence i in the top-left corner of S_dmask[i]), in
        q's dtype, holding the kernel's P before dropout: exp(score - running row max)
        for each key block the kernel visited, i.e. the probabilities up to a factor per
        (row, key block) ("possibly with different scaling", as flash-attn says); entries
        outside the sequence or in key blocks the mask skips entirely are 0.
"""
import torch

from . import _checks, _cpu, _cuda, _ops
from ._normalize import kernel_window, softmax_scale_or_default


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                    softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (batch, seqlen_q, nheads, headdim); k, v (batch, seqlen_k, nheads_k, headdim).

    Returns out (batch, seqlen_q, nheads, headdim), or (out, softmax_lse, S_dmask).
    """
    _checks.check_dense(q, k, v)
    window = _checks.check_options(q, dropout_p, window_size, softcap, alibi_slopes, q.shape[0])
    scale = softmax_scale_or_default(softmax_scale, q.shape[-1])
    window = kernel_window(causal, window, q.shape[1], k.shape[1], alibi_slopes is not None)
    s_dmask = None
    if q.is_cuda:
        out, lse, s_dmask = _cuda.dense_forward(q, k, v, dropout_p, scale, window, softcap, alibi_slopes,
                                                deterministic, return_attn_probs)
    elif dropout_p > 0:
        out, lse, s_dmask = _cpu.dense_forward(q, k, v, dropout_p, scale, window, softcap, alibi_slopes)
    else:
        out, lse = _ops.fwd(q, k, v, alibi_slopes, scale, window[0], window[1], softcap, deterministic)[:2]
    return (out, lse, s_dmask) if return_attn_probs else out


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False,
                              window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                              deterministic=False, return_attn_probs=False):
    """qkv (batch, seqlen, 3, nheads, headdim); otherwise as flash_attn_func."""
    _checks.check_packed("qkv", qkv, ("batch", "seqlen", "3", "nheads", "headdim"), index=2, count=3)
    return flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal,
                           window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False,
                             window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                             deterministic=False, return_attn_probs=False):
    """q (batch, seqlen_q, nheads, headdim); kv (batch, seqlen_k, 2, nheads_k, headdim)."""
    _checks.check_packed("kv", kv, ("batch", "seqlen_k", "2", "nheads_k", "headdim"), index=2, count=2)
    return flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal,
                           window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                           softcap=0.0, alibi_slopes=None, deterministic=False,
                           return_attn_probs=False, block_table=None):
    """q (total_q, nheads, headdim); k, v (total_k, nheads_k, headdim);
    cu_seqlens_q/k int32 (batch + 1,) sequence offsets; max_seqlen_q/k ints.

    Returns out (total_q, nheads, headdim), or (out, softmax_lse, S_dmask).

    block_table: int32 (batch, max_num_blocks_per_seq) or None (paged prefill). With it,
        k and v are paged caches (num_blocks, page_block_size, nheads_k, headdim), any
        page_block_size a multiple of 16; sequence i has cu_seqlens_k[i + 1] -
        cu_seqlens_k[i] keys, its logical positions 0..len_i - 1, position p in slot
        p % page_block_size of page block_table[i, p // page_block_size]. Block indices
        and the capacity (len_i <= max_num_blocks_per_seq * page_block_size) are checked
        for CPU tensors, for CUDA tensors with FLASH_ATTN_DEBUG=1; otherwise block indices
        are clamped into 0..num_blocks - 1 (wrong numbers, never an access outside k, v).
        CPU: the reference gathers each sequence's keys from its pages (differentiable). CUDA:
        the paged-KV kernel reads each key from its page in place; forward only, no dropout.
    """
    if block_table is not None:
        return _varlen_paged(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                             softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                             return_attn_probs, block_table)
    max_seqlen_q, max_seqlen_k = _checks.check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k,
                                                      max_seqlen_q, max_seqlen_k)
    batch = cu_seqlens_q.shape[0] - 1
    window = _checks.check_options(q, dropout_p, window_size, softcap, alibi_slopes, batch)
    scale = softmax_scale_or_default(softmax_scale, q.shape[-1])
    window = kernel_window(causal, window, max_seqlen_q, max_seqlen_k, alibi_slopes is not None)
    args = (q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p, scale, window,
            softcap, alibi_slopes)
    s_dmask = None
    if q.is_cuda:
        out, lse, s_dmask = _cuda.varlen_forward(*args, deterministic, return_attn_probs)
    elif dropout_p > 0:
        out, lse, s_dmask = _cpu.varlen_forward(*args)
    else:
        out, lse = _ops.varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, None, max_seqlen_q, max_seqlen_k,
                                   alibi_slopes, scale, window[0], window[1], softcap, deterministic)[:2]
    return (out, lse, s_dmask) if return_attn_probs else out


def _varlen_paged(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs,
                  block_table):
    """flash_attn_varlen_func with block_table (paged prefill)."""
    max_seqlen_q, max_seqlen_k = _checks.check_varlen_paged(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k,
                                                            max_seqlen_q, max_seqlen_k, block_table)
    batch = cu_seqlens_q.shape[0] - 1
    window = _checks.check_options(q, dropout_p, window_size, softcap, alibi_slopes, batch)
    scale = softmax_scale_or_default(softmax_scale, q.shape[-1])
    window = kernel_window(causal, window, max_seqlen_q, max_seqlen_k, alibi_slopes is not None)
    s_dmask = None
    if q.is_cuda:
        out, lse, s_dmask = _cuda.varlen_paged_forward(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k,
                                                       block_table, max_seqlen_q, dropout_p, scale, window, softcap,
                                                       alibi_slopes, deterministic, return_attn_probs)
    else:
        # the reference's gather: each sequence's keys from its pages, packed (differentiable)
        from .reference import gather_paged_varlen
        k, v, cu_k = gather_paged_varlen(k_cache, v_cache, cu_seqlens_k, block_table)
        if dropout_p > 0:
            out, lse, s_dmask = _cpu.varlen_forward(q, k, v, cu_seqlens_q, cu_k, max_seqlen_q, max_seqlen_k,
                                                    dropout_p, scale, window, softcap, alibi_slopes)
        else:
            out, lse = _ops.varlen_fwd(q, k, v, cu_seqlens_q, cu_k, None, max_seqlen_q, max_seqlen_k,
                                       alibi_slopes, scale, window[0], window[1], softcap, deterministic)[:2]
    return (out, lse, s_dmask) if return_attn_probs else out


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None,
                                     causal=False, window_size=(-1, -1), softcap=0.0,
                                     alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """qkv (total, 3, nheads, headdim); cu_seqlens int32 (batch + 1,); max_seqlen int."""
    _checks.check_packed("qkv", qkv, ("total", "3", "nheads", "headdim"), index=1, count=3)
    return flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen,
                                  max_seqlen, dropout_p, softmax_scale, causal, window_size, softcap,
                                  alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                    dropout_p=0.0, softmax_scale=None, causal=False,
                                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                                    deterministic=False, return_attn_probs=False):
    """q (total_q, nheads, headdim); kv (total_k, 2, nheads_k, headdim)."""
    _checks.check_packed("kv", kv, ("total_k", "2", "nheads_k", "headdim"), index=1, count=2)
    return flash_attn_varlen_func(q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                  max_seqlen_k, dropout_p, softmax_scale, causal, window_size, softcap,
                                  alibi_slopes, deterministic, return_attn_probs)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0,
                            return_softmax_lse=False):
    """Attention of q against a KV cache, appending new keys and values to it first (decoding).

    q: (batch, seqlen_q, nheads, headdim).
    k_cache, v_cache: (batch_cache, seqlen_cache, nheads_k, headdim), last dim
        contiguous; batch_cache >= batch, or any size with cache_batch_idx.
    k, v: (batch, seqlen_new, nheads_k, headdim) or None. When given they are
        written IN PLACE into the caches at positions cache_seqlens[i] ..
        cache_seqlens[i] + seqlen_new - 1 of cache row cache_batch_idx[i] (default
        i), before the attention; the caller makes sure they fit.
    rotary_cos, rotary_sin: (seqlen_ro >= seqlen_cache, rotary_dim / 2) in q.dtype,
        only with k and v. The new k is rotated at positions cache_seqlens[i] +
        0, 1, ...; q too when causal or local, otherwise every q row at position
        cache_seqlens[i]. Positions are cache indices (cache_leftpad is not
        subtracted), as in flash-attn. rotary_interleaved: pair features 2f and
        2f + 1 (GPT-J) instead of f and f + rotary_dim / 2 (GPT-NeoX).
    cache_seqlens: int, or int32 (batch,): keys already in each cache row.
        None means the whole cache (seqlen_cache), and then k, v cannot be given.
    cache_batch_idx: int32 (batch,): the cache row of each batch row. With
        duplicate rows and k, v given, which write lands is unspecified.
    cache_leftpad: int32 (batch,): the first valid key of each cache row (default 0).
    block_table: int32 (batch, max_num_blocks_per_seq) or None: paged KV. The caches are then
        (num_blocks, page_block_size, nheads_k, headdim), page_block_size any multiple of 16;
        batch row i's logical position p (the cache row above) is slot p % page_block_size of
        page block_table[i, p // page_block_size], and its capacity (seqlen_cache above) is
        max_num_blocks_per_seq * page_block_size. Not with cache_batch_idx (as in flash-attn).
        Block indices each row uses are checked like the other values below (clamped into
        0..num_blocks - 1 on CUDA without FLASH_ATTN_DEBUG=1). On CUDA the new keys are
        written into their pages, then the paged-KV kernel reads every key from its page in
        place (no copy of the cache).
    Batch row i attends to keys [cache_leftpad[i], cache_seqlens[i] + seqlen_new) of
    its cache row; causal / window_size / alibi_slopes are aligned to that key
    length as in flash_attn_func, softmax_scale and softcap likewise.
    num_splits: split-KV on CUDA: each sequence's keys are cut into up to num_splits
        shares processed in parallel and merged by a combine kernel, which fills the GPU
        when batch x heads is small and the cache long. 0 (default) = chosen from the actual
        cache_seqlens: the grid is sized on the host from the grid size, the SM count and
        the cache capacity (no device value is read, so a captured CUDA graph replays with
        new cache_seqlens), and the kernel runs, per sequence, only as many shares as its
        actual key count calls for (at least two key blocks each; the others are empty);
        1 = no split. Capped at 128 and at the key blocks; ignored (unsplit, same result)
        where no split kernel exists (head dims other than 64/128/256 after padding, builds
        with FLASH_ATTN_DISABLE_SPLITKV=1).
    return_softmax_lse: also return softmax_lse fp32 (batch, nheads, seqlen_q).
    Forward only (no backward), as in flash-attn.

    Returns out (batch, seqlen_q, nheads, headdim), or (out, softmax_lse).
    Values that need a device-to-host copy (cache_seqlens + seqlen_new <=
    seqlen_cache, cache_batch_idx and cache_leftpad in range) are checked for CPU
    tensors always and for CUDA tensors with FLASH_ATTN_DEBUG=1; on CUDA without it
    out-of-range values are clamped (wrong results, but no access outside the
    tensors).
    """
    q, k, v = (_last_dim_contiguous(x) for x in (q, k, v))
    _checks.check_kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                          cache_leftpad, block_table)
    window = _checks.check_options(q, 0.0, window_size, softcap, alibi_slopes, q.shape[0])
    _checks.check_num_splits(num_splits)
    scale = softmax_scale_or_default(softmax_scale, q.shape[-1])
    seqlen_cache = k_cache.shape[1] if block_table is None else block_table.shape[1] * k_cache.shape[1]
    window = kernel_window(causal, window, q.shape[1], seqlen_cache, alibi_slopes is not None)
    if cache_seqlens is not None and not isinstance(cache_seqlens, torch.Tensor):
        cache_seqlens = torch.full((q.shape[0],), int(cache_seqlens), dtype=torch.int32, device=q.device)
    args = (q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
            scale, window, softcap, rotary_interleaved, alibi_slopes, block_table, num_splits)
    out, lse = _cuda.kvcache_forward(*args) if q.is_cuda else _cpu.kvcache_forward(*args)
    return (out, lse) if return_softmax_lse else out


def _last_dim_contiguous(x):
    """x with stride(-1) == 1 (a copy only when needed), as flash-attn does for q, k, v."""
    if isinstance(x, torch.Tensor) and x.dim() > 0 and x.stride(-1) != 1:
        return x.contiguous()
    return x
