"""Argument checks for the exact-attention API, written once.

Every check raises before any kernel runs, with a message naming the
argument, what was expected and what was given: TypeError for a wrong type
or dtype, ValueError for a wrong value, shape, stride or device.
Content checks that read device memory (cu_seqlens values) run for CPU
tensors always and for CUDA tensors only with FLASH_ATTN_DEBUG=1, and are
skipped while torch.compile traces.
"""
import numbers
import operator
import os

import torch

MAX_HEAD_DIM = 256
_KERNEL_DTYPES = (torch.float16, torch.bfloat16)
_CPU_DTYPES = _KERNEL_DTYPES + (torch.float32, torch.float64)


def _fail(exc, name, expected, actual):
    raise exc(f"flash_attn: {name} must be {expected}, got {actual}")


def check_dense(q, k, v):
    """q (b, sq, hq, d); k, v (b, sk, hk, d)."""
    _check_qkv(q, k, v, rank=4, layout="(batch, seqlen, nheads, headdim)")
    if k.shape[0] != q.shape[0]:
        _fail(ValueError, "k.shape[0] (batch)", f"q.shape[0] = {q.shape[0]}", k.shape[0])


def check_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k):
    """q (total_q, hq, d); k, v (total_k, hk, d); cu_seqlens int32 (b + 1,).

    Returns (max_seqlen_q, max_seqlen_k) as Python ints.
    """
    _check_qkv(q, k, v, rank=3, layout="(total, nheads, headdim)")
    check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.device, q.shape[0])
    check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device, k.shape[0])
    if cu_seqlens_k.shape != cu_seqlens_q.shape:
        _fail(ValueError, "cu_seqlens_k.shape", f"cu_seqlens_q.shape = {tuple(cu_seqlens_q.shape)}",
              tuple(cu_seqlens_k.shape))
    return check_max_seqlen("max_seqlen_q", max_seqlen_q), check_max_seqlen("max_seqlen_k", max_seqlen_k)


def check_packed(name, x, layout, index, count):
    """A packed qkv (count 3) or kv (count 2) tensor: rank len(layout), x.shape[index] == count.

    layout: dim names for messages, e.g. ("batch", "seqlen", "3", "nheads", "headdim").
    """
    _check_tensor(name, x)
    if x.dim() != len(layout):
        _fail(ValueError, f"{name}.dim()", f"{len(layout)} ({', '.join(layout)})",
              f"{x.dim()} (shape {tuple(x.shape)})")
    if x.shape[index] != count:
        _fail(ValueError, f"{name}.shape[{index}]", count, f"{x.shape[index]} (shape {tuple(x.shape)})")


def check_options(q, dropout_p, window_size, softcap, alibi_slopes, batch):
    """Scalar options and ALiBi slopes (fp32 (nheads,) or (batch, nheads)).

    Returns window_size as a tuple of two ints.
    """
    if not isinstance(dropout_p, numbers.Real) or not 0.0 <= dropout_p < 1.0:
        _fail(ValueError, "dropout_p", "a float in [0, 1)", repr(dropout_p))
    if not isinstance(softcap, numbers.Real) or softcap < 0:
        _fail(ValueError, "softcap", "a float >= 0 (0 = off)", repr(softcap))
    window = _check_window(window_size)
    if alibi_slopes is not None:
        _check_alibi(alibi_slopes, q, batch)
    return window


PAGE_MULTIPLE = 16


def check_block_table(block_table, k_cache, batch, device, cache_batch_idx=None):
    """Paged KV: block_table int32 (batch, max_num_blocks_per_seq) on q's device, k_cache
    (num_blocks, page_block_size, nheads_k, headdim) with page_block_size a positive multiple
    of 16 (any such size, not only flash-attn's 256); no cache_batch_idx (flash-attn disallows it).

    Returns the logical capacity of a sequence: max_num_blocks_per_seq * page_block_size.
    Values (block indices, capacity) are checked apart (check_block_table_values).
    """
    if cache_batch_idx is not None:
        _fail(ValueError, "cache_batch_idx", "None when block_table is given (paged KV picks the pages "
              "of each sequence through block_table; flash-attn disallows both)", "a tensor")
    _check_tensor("block_table", block_table)
    if block_table.dtype != torch.int32:
        _fail(TypeError, "block_table.dtype", "torch.int32", block_table.dtype)
    if block_table.dim() != 2:
        _fail(ValueError, "block_table.dim()", "2 (batch, max_num_blocks_per_seq)",
              f"{block_table.dim()} (shape {tuple(block_table.shape)})")
    if block_table.shape[0] != batch:
        _fail(ValueError, "block_table.shape[0] (batch)", f"the batch size {batch}", block_table.shape[0])
    if block_table.device != device:
        _fail(ValueError, "block_table.device", f"q.device = {device}", block_table.device)
    num_blocks, page = k_cache.shape[0], k_cache.shape[1]
    if page == 0 or page % PAGE_MULTIPLE != 0:
        _fail(ValueError, "k_cache.shape[1] (page_block_size)",
              f"a positive multiple of {PAGE_MULTIPLE} with block_table", page)
    if num_blocks == 0 and block_table.numel() > 0:
        _fail(ValueError, "k_cache.shape[0] (num_blocks)", ">= 1 when block_table has entries", num_blocks)
    return block_table.shape[1] * page


def check_block_table_values(block_table, num_blocks, page, lengths, length_name):
    """The block indices each sequence uses (the first ceil(lengths[i] / page) of row i) lie in
    0..num_blocks - 1, and lengths[i] <= max_num_blocks_per_seq * page. lengths: python ints.
    Call only where values may be read (_reads_values)."""
    capacity = block_table.shape[1] * page
    for i, n in enumerate(lengths):
        if n > capacity:
            _fail(ValueError, length_name, f"<= max_num_blocks_per_seq * page_block_size = "
                  f"{block_table.shape[1]} * {page} = {capacity} (the pages of block_table row {i})",
                  f"{n} at index {i}")
    rows = block_table.tolist()
    for i, n in enumerate(lengths):
        used = rows[i][:-(-max(n, 0) // page)]
        bad = [(j, x) for j, x in enumerate(used) if not 0 <= x < num_blocks]
        if bad:
            j, x = bad[0]
            _fail(ValueError, f"block_table[{i}, {j}]", f"in 0..{num_blocks - 1} (k_cache.shape[0] = num_blocks)",
                  x)


def check_varlen_paged(q, k_cache, v_cache, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                       block_table):
    """flash_attn_varlen_func with block_table (paged prefill): q (total_q, hq, d); k_cache,
    v_cache (num_blocks, page_block_size, hk, d); cu_seqlens_q/k int32 (b + 1,), the k
    offsets giving each sequence's key count; block_table int32 (b, max_num_blocks_per_seq).

    Returns (max_seqlen_q, max_seqlen_k) as Python ints.
    """
    _check_qkv(q, k_cache, v_cache, rank=4, layout="(num_blocks, page_block_size, nheads_k, headdim)",
               names=("q", "k", "v"), q_rank=3)
    check_cu_seqlens("cu_seqlens_q", cu_seqlens_q, q.device, q.shape[0])
    check_cu_seqlens("cu_seqlens_k", cu_seqlens_k, q.device, None)
    if cu_seqlens_k.shape != cu_seqlens_q.shape:
        _fail(ValueError, "cu_seqlens_k.shape", f"cu_seqlens_q.shape = {tuple(cu_seqlens_q.shape)}",
              tuple(cu_seqlens_k.shape))
    batch = cu_seqlens_q.shape[0] - 1
    check_block_table(block_table, k_cache, batch, q.device)
    if _reads_values(q.device):
        cu = cu_seqlens_k.tolist()
        lengths = [b - a for a, b in zip(cu, cu[1:])]
        check_block_table_values(block_table, k_cache.shape[0], k_cache.shape[1], lengths,
                                 "cu_seqlens_k[i + 1] - cu_seqlens_k[i] (keys of sequence i)")
    return check_max_seqlen("max_seqlen_q", max_seqlen_q), check_max_seqlen("max_seqlen_k", max_seqlen_k)


def check_kvcache(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                  cache_leftpad, block_table=None):
    """flash_attn_with_kvcache's tensors.

    q (b, sq, hq, d); k_cache, v_cache (b_cache, s_cache, hk, d), last dim
    contiguous (they are written in place); k, v (b, s_new, hk, d), both or
    neither; rotary_cos, rotary_sin (seqlen_ro >= s_cache, rotary_dim / 2) in
    q.dtype, only with k and v; cache_seqlens an int or int32 (b,) (required
    with k and v); cache_batch_idx, cache_leftpad int32 (b,). b_cache >= b
    unless cache_batch_idx picks the rows.
    Values: the capacity cache_seqlens + s_new <= s_cache, 0 <= cache_batch_idx
    < b_cache and 0 <= cache_leftpad <= cache_seqlens are checked for CPU tensors
    and for an int cache_seqlens; for CUDA tensors only with FLASH_ATTN_DEBUG=1
    (they need a device-to-host copy).
    With block_table (paged KV, see check_block_table) the caches are (num_blocks,
    page_block_size, hk, d), s_cache above is the capacity max_num_blocks_per_seq *
    page_block_size, and the block indices each row uses are checked like the capacity.
    """
    _check_qkv(q, k_cache, v_cache, rank=4, layout="(batch, seqlen, nheads, headdim)",
               names=("q", "k_cache", "v_cache"))
    b = q.shape[0]
    b_cache, s_cache, hk, d = k_cache.shape
    paged = block_table is not None
    if paged:
        s_cache = check_block_table(block_table, k_cache, b, q.device, cache_batch_idx)
    if not paged and cache_batch_idx is None and b_cache < b:
        _fail(ValueError, "k_cache.shape[0] (batch_size_cache)",
              f">= q.shape[0] = {b} (or pass cache_batch_idx to pick the cache rows)", b_cache)
    if not paged and b_cache == 0 and b > 0:
        _fail(ValueError, "k_cache.shape[0] (batch_size_cache)", ">= 1 when q has rows", b_cache)
    if (k is None) != (v is None):
        _fail(ValueError, "k and v", "both given or both None",
              f"k {'None' if k is None else 'given'}, v {'None' if v is None else 'given'}")
    s_new = 0
    if k is not None:
        _check_new_kv(q, k, v, (b, hk, d))
        s_new = k.shape[1]
    capacity = ("max_num_blocks_per_seq * page_block_size" if paged else "k_cache.shape[1]")
    _check_rotary(q, rotary_cos, rotary_sin, k is not None, s_cache, d, capacity)
    _check_cache_seqlens(q, cache_seqlens, b, s_cache, s_new, capacity)
    for name, x in (("cache_batch_idx", cache_batch_idx), ("cache_leftpad", cache_leftpad)):
        if x is not None:
            _check_int32_vector(name, x, b, q.device)
    if not _reads_values(q.device):
        return
    seqlens = [s_cache] * b if cache_seqlens is None else (
        [int(cache_seqlens)] * b if not isinstance(cache_seqlens, torch.Tensor) else cache_seqlens.tolist())
    if isinstance(cache_seqlens, torch.Tensor):
        bad = [(i, n) for i, n in enumerate(seqlens) if not 0 <= n <= s_cache - s_new]
        if bad:
            _fail(ValueError, "cache_seqlens",
                  f"in 0..{capacity} - seqlen_new = {s_cache} - {s_new} (the new keys must fit in the cache)",
                  f"{bad[0][1]} at index {bad[0][0]}")
    if paged:
        check_block_table_values(block_table, b_cache, k_cache.shape[1], [n + s_new for n in seqlens],
                                 "cache_seqlens + seqlen_new")
    if cache_batch_idx is not None:
        bad = [(i, r) for i, r in enumerate(cache_batch_idx.tolist()) if not 0 <= r < b_cache]
        if bad:
            _fail(ValueError, "cache_batch_idx", f"in 0..{b_cache - 1} (rows of k_cache)",
                  f"{bad[0][1]} at index {bad[0][0]}")
    if cache_leftpad is not None:
        bad = [(i, p, n) for i, (p, n) in enumerate(zip(cache_leftpad.tolist(), seqlens)) if not 0 <= p <= n]
        if bad:
            i, p, n = bad[0]
            _fail(ValueError, "cache_leftpad", f"in 0..cache_seqlens[i] (= {n} at index {i})", p)


def check_num_splits(num_splits):
    if isinstance(num_splits, bool) or not isinstance(num_splits, numbers.Integral) or num_splits < 0:
        _fail(ValueError, "num_splits", "an int >= 0 (0 = chosen from the lengths)", repr(num_splits))


def _reads_values(device):
    """Whether content checks may read tensor values: always on CPU, on CUDA with FLASH_ATTN_DEBUG=1;
    never while torch.compile traces (a value read would break the graph)."""
    if torch.compiler.is_compiling():
        return False
    return device.type == "cpu" or os.environ.get("FLASH_ATTN_DEBUG") == "1"


def _check_new_kv(q, k, v, expected):
    """k, v (b, s_new, hk, d): the keys and values appended to the cache."""
    b, hk, d = expected
    for name, x in (("k", k), ("v", v)):
        _check_tensor(name, x)
        if x.dim() != 4:
            _fail(ValueError, f"{name}.dim()", "4 (batch, seqlen_new, nheads_k, headdim)",
                  f"{x.dim()} (shape {tuple(x.shape)})")
        if x.device != q.device:
            _fail(ValueError, f"{name}.device", f"q.device = {q.device}", x.device)
        if x.dtype != q.dtype:
            _fail(TypeError, f"{name}.dtype", f"q.dtype = {q.dtype}", x.dtype)
    want = (b, k.shape[1], hk, d)
    if tuple(k.shape) != want:
        _fail(ValueError, "k.shape", f"(batch, seqlen_new, nheads_k, headdim) = {want} (q's batch, k_cache's "
              f"heads and head dim)", tuple(k.shape))
    if v.shape != k.shape:
        _fail(ValueError, "v.shape", f"k.shape = {tuple(k.shape)}", tuple(v.shape))


def _check_rotary(q, cos, sin, has_new_kv, s_cache, d, capacity="k_cache.shape[1]"):
    if cos is None and sin is None:
        return
    if cos is None or sin is None:
        _fail(ValueError, "rotary_cos and rotary_sin", "both given or both None",
              f"rotary_cos {'None' if cos is None else 'given'}, rotary_sin {'None' if sin is None else 'given'}")
    if not has_new_kv:
        _fail(ValueError, "k and v", "given when rotary_cos / rotary_sin are (rotary applies to the new keys)",
              "None")
    for name, x in (("rotary_cos", cos), ("rotary_sin", sin)):
        _check_tensor(name, x)
        if x.dim() != 2:
            _fail(ValueError, f"{name}.dim()", "2 (seqlen_ro, rotary_dim / 2)", f"{x.dim()} (shape {tuple(x.shape)})")
        if x.device != q.device:
            _fail(ValueError, f"{name}.device", f"q.device = {q.device}", x.device)
        if x.dtype != q.dtype:
            _fail(TypeError, f"{name}.dtype", f"q.dtype = {q.dtype}", x.dtype)
    if sin.shape != cos.shape:
        _fail(ValueError, "rotary_sin.shape", f"rotary_cos.shape = {tuple(cos.shape)}", tuple(sin.shape))
    seqlen_ro, half = cos.shape
    if not 0 < 2 * half <= d:
        _fail(ValueError, "rotary_cos.shape[1] (rotary_dim / 2)", f"in 1..headdim / 2 = {d // 2}", half)
    if seqlen_ro < s_cache:
        _fail(ValueError, "rotary_cos.shape[0] (seqlen_ro)", f">= {capacity} = {s_cache} (the cache length)",
              seqlen_ro)


def _check_cache_seqlens(q, cache_seqlens, b, s_cache, s_new, capacity="k_cache.shape[1]"):
    """An int, an int32 (b,) tensor, or None (the whole cache, only without new keys)."""
    if cache_seqlens is None:
        if s_new > 0:
            _fail(ValueError, "cache_seqlens", "given when k and v are (it says where they are written)", None)
        return
    if isinstance(cache_seqlens, torch.Tensor):
        _check_int32_vector("cache_seqlens", cache_seqlens, b, q.device)
        if s_new > s_cache:
            _fail(ValueError, "k.shape[1] (seqlen_new)", f"<= {capacity} = {s_cache} (the cache capacity)",
                  s_new)
        return
    if isinstance(cache_seqlens, bool) or not isinstance(cache_seqlens, numbers.Integral):
        _fail(TypeError, "cache_seqlens", "an int or an int32 tensor (batch,)", type(cache_seqlens).__name__)
    if not 0 <= cache_seqlens <= s_cache - s_new:
        _fail(ValueError, "cache_seqlens",
              f"in 0..{capacity} - seqlen_new = {s_cache} - {s_new} (the new keys must fit in the cache)",
              cache_seqlens)


def _check_int32_vector(name, x, batch, device):
    _check_tensor(name, x)
    if x.dtype != torch.int32:
        _fail(TypeError, f"{name}.dtype", "torch.int32", x.dtype)
    if tuple(x.shape) != (batch,):
        _fail(ValueError, f"{name}.shape", f"(batch,) = ({batch},)", tuple(x.shape))
    if x.device != device:
        _fail(ValueError, f"{name}.device", f"q.device = {device}", x.device)


def check_cu_seqlens(name, cu_seqlens, device, total):
    """cu_seqlens: int32, 1-D, contiguous, length >= 1, on ``device``; its values
    (start 0, non-decreasing, last <= total unless total is None) are checked when that needs no sync."""
    _check_tensor(name, cu_seqlens)
    if cu_seqlens.dtype != torch.int32:
        _fail(TypeError, f"{name}.dtype", "torch.int32", cu_seqlens.dtype)
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        _fail(ValueError, f"{name}.shape", "(batch + 1,)", tuple(cu_seqlens.shape))
    if cu_seqlens.device != device:
        _fail(ValueError, f"{name}.device", f"q.device = {device}", cu_seqlens.device)
    if not cu_seqlens.is_contiguous():
        _fail(ValueError, name, "contiguous", f"strides {cu_seqlens.stride()}")
    if _reads_values(cu_seqlens.device):
        values = cu_seqlens.tolist()
        if (values[0] != 0 or any(b < a for a, b in zip(values, values[1:]))
                or (total is not None and values[-1] > total)):
            bound = "" if total is None else f" to at most {total}"
            _fail(ValueError, name, f"non-decreasing offsets from 0{bound}", values)


def check_max_seqlen(name, value):
    """An integer >= 0 (a Python int, or anything with __index__ such as a 0-d int tensor)."""
    if isinstance(value, bool):
        _fail(TypeError, name, "an int", repr(value))
    try:
        value = operator.index(value)
    except TypeError:
        _fail(TypeError, name, "an int", f"{type(value).__name__} {value!r}")
    if value < 0:
        _fail(ValueError, name, ">= 0", value)
    return value


def _check_tensor(name, x):
    if not isinstance(x, torch.Tensor):
        _fail(TypeError, name, "a torch.Tensor", type(x).__name__)


def _check_qkv(q, k, v, rank, layout, names=("q", "k", "v"), q_rank=None):
    """names: what q, k, v are called in messages (("q", "k_cache", "v_cache") for the KV cache).
    q_rank: q's rank when it differs from k's (paged varlen: q (total_q, nheads, headdim))."""
    qn, kn, vn = names
    tensors = ((qn, q), (kn, k), (vn, v))
    for name, x in tensors:
        _check_tensor(name, x)
    if q_rank is not None and q.dim() != q_rank:
        _fail(ValueError, f"{qn}.dim()", f"{q_rank} (total, nheads, headdim)", f"{q.dim()} (shape {tuple(q.shape)})")
    for name, x in tensors[0 if q_rank is None else 1:]:
        if x.dim() != rank:
            _fail(ValueError, f"{name}.dim()", f"{rank} {layout}", f"{x.dim()} (shape {tuple(x.shape)})")
    _check_device(q, k, v, names)
    _check_dtype(q, k, v, names)
    if v.shape != k.shape:
        _fail(ValueError, f"{vn}.shape", f"{kn}.shape = {tuple(k.shape)}", tuple(v.shape))
    head_dim = q.shape[-1]
    if not 0 < head_dim <= MAX_HEAD_DIM:
        _fail(ValueError, f"{qn}.shape[-1] (head dim)", f"in 1..{MAX_HEAD_DIM}", head_dim)
    if k.shape[-1] != head_dim:
        _fail(ValueError, f"{kn}.shape[-1] (head dim)", f"{qn}.shape[-1] = {head_dim}", k.shape[-1])
    nheads, nheads_k = q.shape[-2], k.shape[-2]
    if nheads_k == 0 or nheads % nheads_k != 0:
        _fail(ValueError, f"{kn}.shape[-2] (nheads_k)",
              f"a divisor of {qn}.shape[-2] = {nheads} (nheads % nheads_k == 0)", nheads_k)
    for name, x in tensors:
        if x.stride(-1) != 1:
            _fail(ValueError, f"{name}.stride(-1)", "1 (last dim contiguous)", x.stride(-1))


def _check_device(q, k, v, names=("q", "k", "v")):
    if q.device.type not in ("cpu", "cuda"):
        _fail(ValueError, f"{names[0]}.device", "a CUDA or CPU device", q.device)
    for name, x in zip(names[1:], (k, v)):
        if x.device != q.device:
            _fail(ValueError, f"{name}.device", f"{names[0]}.device = {q.device}", x.device)


def _check_dtype(q, k, v, names=("q", "k", "v")):
    allowed = _CPU_DTYPES if q.device.type == "cpu" else _KERNEL_DTYPES
    if q.dtype not in allowed:
        dtypes = ", ".join(str(d) for d in allowed)
        _fail(TypeError, f"{names[0]}.dtype", f"one of {dtypes} for {q.device.type} tensors", q.dtype)
    for name, x in zip(names[1:], (k, v)):
        if x.dtype != q.dtype:
            _fail(TypeError, f"{name}.dtype", f"{names[0]}.dtype = {q.dtype}", x.dtype)


def _check_window(window_size):
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, numbers.Integral) and not isinstance(w, bool) for w in window_size)):
        _fail(TypeError, "window_size", "a pair of ints (left, right)", repr(window_size))
    left, right = (int(w) for w in window_size)
    if left < -1 or right < -1:
        _fail(ValueError, "window_size", "(left, right) with each >= -1 (-1 = unbounded)", (left, right))
    return left, right


def _check_alibi(alibi_slopes, q, batch):
    _check_tensor("alibi_slopes", alibi_slopes)
    if alibi_slopes.dtype != torch.float32:
        _fail(TypeError, "alibi_slopes.dtype", "torch.float32", alibi_slopes.dtype)
    nheads = q.shape[-2]
    if tuple(alibi_slopes.shape) not in ((nheads,), (batch, nheads)):
        _fail(ValueError, "alibi_slopes.shape", f"({nheads},) or ({batch}, {nheads}) (nheads or batch, nheads)",
              tuple(alibi_slopes.shape))
    if alibi_slopes.device != q.device:
        _fail(ValueError, "alibi_slopes.device", f"q.device = {q.device}", alibi_slopes.device)
