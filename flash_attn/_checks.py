"""Argument checks for the exact-attention API, written once.

Every check raises before any kernel runs, with a message naming the
argument, what was expected and what was given: TypeError for a wrong type
or dtype, ValueError for a wrong value, shape, stride or device.
Content checks that read device memory (cu_seqlens values) run for CPU
tensors always and for CUDA tensors only with FLASH_ATTN_DEBUG=1.
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


def check_block_table(block_table):
    if block_table is not None:
        raise NotImplementedError("flash_attn: block_table (paged KV) is not supported yet; "
                                  "pass block_table=None")


def check_cu_seqlens(name, cu_seqlens, device, total):
    """cu_seqlens: int32, 1-D, contiguous, length >= 1, on ``device``; its values
    (start 0, non-decreasing, last <= total) are checked when that needs no sync."""
    _check_tensor(name, cu_seqlens)
    if cu_seqlens.dtype != torch.int32:
        _fail(TypeError, f"{name}.dtype", "torch.int32", cu_seqlens.dtype)
    if cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 1:
        _fail(ValueError, f"{name}.shape", "(batch + 1,)", tuple(cu_seqlens.shape))
    if cu_seqlens.device != device:
        _fail(ValueError, f"{name}.device", f"q.device = {device}", cu_seqlens.device)
    if not cu_seqlens.is_contiguous():
        _fail(ValueError, name, "contiguous", f"strides {cu_seqlens.stride()}")
    if cu_seqlens.device.type == "cpu" or os.environ.get("FLASH_ATTN_DEBUG") == "1":
        values = cu_seqlens.tolist()
        if values[0] != 0 or any(b < a for a, b in zip(values, values[1:])) or values[-1] > total:
            _fail(ValueError, name, f"non-decreasing offsets from 0 to at most {total}", values)


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


def _check_qkv(q, k, v, rank, layout):
    for name, x in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, x)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dim() != rank:
            _fail(ValueError, f"{name}.dim()", f"{rank} {layout}", f"{x.dim()} (shape {tuple(x.shape)})")
    _check_device(q, k, v)
    _check_dtype(q, k, v)
    if v.shape != k.shape:
        _fail(ValueError, "v.shape", f"k.shape = {tuple(k.shape)}", tuple(v.shape))
    head_dim = q.shape[-1]
    if not 0 < head_dim <= MAX_HEAD_DIM:
        _fail(ValueError, "q.shape[-1] (head dim)", f"in 1..{MAX_HEAD_DIM}", head_dim)
    if k.shape[-1] != head_dim:
        _fail(ValueError, "k.shape[-1] (head dim)", f"q.shape[-1] = {head_dim}", k.shape[-1])
    nheads, nheads_k = q.shape[-2], k.shape[-2]
    if nheads_k == 0 or nheads % nheads_k != 0:
        _fail(ValueError, "k.shape[-2] (nheads_k)",
              f"a divisor of q.shape[-2] = {nheads} (nheads % nheads_k == 0)", nheads_k)
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.stride(-1) != 1:
            _fail(ValueError, f"{name}.stride(-1)", "1 (last dim contiguous)", x.stride(-1))


def _check_device(q, k, v):
    if q.device.type not in ("cpu", "cuda"):
        _fail(ValueError, "q.device", "a CUDA or CPU device", q.device)
    for name, x in (("k", k), ("v", v)):
        if x.device != q.device:
            _fail(ValueError, f"{name}.device", f"q.device = {q.device}", x.device)


def _check_dtype(q, k, v):
    allowed = _CPU_DTYPES if q.device.type == "cpu" else _KERNEL_DTYPES
    if q.dtype not in allowed:
        names = ", ".join(str(d) for d in allowed)
        _fail(TypeError, "q.dtype", f"one of {names} for {q.device.type} tensors", q.dtype)
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            _fail(TypeError, f"{name}.dtype", f"q.dtype = {q.dtype}", x.dtype)


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
