"""Argument checks for flash_attn.linear_attn, written once.

Every check raises before anything runs, with a message naming the argument,
what was expected and what was given (flash_attn._checks' format): TypeError
for a wrong type or dtype, ValueError for a wrong value, shape or device.
Values of cu_seqlens are read for CPU tensors (or from cu_seqlens_cpu), and
for CUDA tensors only with FLASH_ATTN_DEBUG=1 (a device-to-host copy).
"""
import math
import numbers
from typing import NamedTuple

import torch

from .._checks import _fail, _reads_values

_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_CPU_DTYPES = _KERNEL_DTYPES + (torch.float64,)
_INDEX_DTYPES = (torch.int32, torch.int64)


class Dims(NamedTuple):
    B: int  # batch (1 with cu_seqlens)
    T: int  # tokens per batch row (all sequences together with cu_seqlens)
    H: int  # query heads
    K: int  # query / key head dim
    V: int  # value head dim
    N: int  # sequences: B, or len(cu_seqlens) - 1


def check_tensor(name, x):
    if not isinstance(x, torch.Tensor):
        _fail(TypeError, name, "a torch.Tensor", type(x).__name__)


def check_qkv(q, k, v, allow_fewer_kv_heads=False):
    """q, k [B, T, H, K]; v [B, T, H, V]; with allow_fewer_kv_heads k, v may have
    HK heads, H % HK == 0 (MQA/GQA). Returns Dims with N = B."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, x)
    layouts = (("q", q, "[B, T, H, K]"), ("k", k, "[B, T, H, K]"), ("v", v, "[B, T, H, V]"))
    for name, x, layout in layouts:
        if x.dim() != 4:
            _fail(ValueError, f"{name}.dim()", f"4 {layout}", f"{x.dim()} (shape {tuple(x.shape)})")
    if q.device.type not in ("cpu", "cuda"):
        _fail(ValueError, "q.device", "a CUDA or CPU device", q.device)
    for name, x in (("k", k), ("v", v)):
        if x.device != q.device:
            _fail(ValueError, f"{name}.device", f"q.device = {q.device}", x.device)
    allowed = _dtypes_for(q.device)
    if q.dtype not in allowed:
        _fail(TypeError, "q.dtype", f"one of {_names(allowed)} for {q.device.type} tensors", q.dtype)
    for name, x in (("k", k), ("v", v)):
        if x.dtype != q.dtype:
            _fail(TypeError, f"{name}.dtype", f"q.dtype = {q.dtype}", x.dtype)
    B, T, H, K = q.shape
    if tuple(k.shape[:2]) != (B, T):
        _fail(ValueError, "k.shape[:2] (B, T)", f"q.shape[:2] = {(B, T)}", tuple(k.shape[:2]))
    HK = k.shape[2]
    if allow_fewer_kv_heads:
        if HK == 0 or H % HK != 0:
            _fail(ValueError, "k.shape[2] (kv heads)", f"a divisor of q.shape[2] = {H} (H % HK == 0)", HK)
    elif HK != H:
        _fail(ValueError, "k.shape[2] (heads)", f"q.shape[2] = {H}", HK)
    if k.shape[3] != K:
        _fail(ValueError, "k.shape[3] (K)", f"q.shape[3] = {K}", k.shape[3])
    if K < 1:
        _fail(ValueError, "q.shape[3] (K)", ">= 1", K)
    if tuple(v.shape[:3]) != tuple(k.shape[:3]):
        _fail(ValueError, "v.shape[:3]", f"k.shape[:3] = {tuple(k.shape[:3])}", tuple(v.shape[:3]))
    if v.shape[3] < 1:
        _fail(ValueError, "v.shape[3] (V)", ">= 1", v.shape[3])
    return Dims(B, T, H, K, v.shape[3], B)


def check_gate(name, g, shape, layout, q, hint=""):
    """A log-gate tensor of exactly ``shape`` on q's device, in a float dtype."""
    check_tensor(name, g)
    if g.device != q.device:
        _fail(ValueError, f"{name}.device", f"q.device = {q.device}", g.device)
    allowed = _dtypes_for(q.device)
    if g.dtype not in allowed:
        _fail(TypeError, f"{name}.dtype", f"one of {_names(allowed)}", g.dtype)
    if tuple(g.shape) != tuple(shape):
        _fail(ValueError, f"{name}.shape", f"{layout} = {tuple(shape)}{hint}", tuple(g.shape))


def check_scalar_gates(g, g_gamma, dims, q):
    """simple GLA: g [B, T, H] or g_gamma [H] or neither."""
    if g is not None and g_gamma is not None:
        _fail(ValueError, "g and g_gamma", "one of them or neither (a data-dependent or a fixed decay)",
              "both")
    if g is not None:
        check_gate("g", g, (dims.B, dims.T, dims.H), "[B, T, H]", q,
                   " (one log-gate per head and step; per-key gates [B, T, H, K] are chunk_gla's)")
    if g_gamma is not None:
        check_gate("g_gamma", g_gamma, (dims.H,), "[H]", q, " (one fixed log-decay per head)")


def check_scale(scale, K):
    """None (K ** -0.5) or a finite real number. Returns a float."""
    if scale is None:
        return K ** -0.5
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        _fail(TypeError, "scale", "a float or None (K ** -0.5)", f"{type(scale).__name__} {scale!r}")
    if not math.isfinite(scale):
        _fail(ValueError, "scale", "finite", scale)
    return float(scale)


def check_flag(name, value):
    if not isinstance(value, bool):
        _fail(TypeError, name, "a bool", f"{type(value).__name__} {value!r}")


def check_varlen(dims, cu_seqlens, cu_seqlens_cpu, device):
    """cu_seqlens: int32/int64 [N + 1], on q's device, 0 = c_0 <= c_1 <= ... <= c_N = T,
    with B == 1 (the sequences are packed along T). Returns dims with N set."""
    if cu_seqlens is None:
        if cu_seqlens_cpu is not None:
            _fail(ValueError, "cu_seqlens_cpu", "None when cu_seqlens is None", "a tensor")
        return dims
    _check_offsets("cu_seqlens", cu_seqlens)
    if cu_seqlens.device != device:
        _fail(ValueError, "cu_seqlens.device", f"q.device = {device}", cu_seqlens.device)
    if dims.B != 1:
        _fail(ValueError, "q.shape[0] (B)", "1 with cu_seqlens (the sequences are packed along T)", dims.B)
    values = None
    if cu_seqlens_cpu is not None:
        _check_offsets("cu_seqlens_cpu", cu_seqlens_cpu)
        if cu_seqlens_cpu.device.type != "cpu":
            _fail(ValueError, "cu_seqlens_cpu.device", "cpu", cu_seqlens_cpu.device)
        if cu_seqlens_cpu.shape != cu_seqlens.shape:
            _fail(ValueError, "cu_seqlens_cpu.shape", f"cu_seqlens.shape = {tuple(cu_seqlens.shape)}",
                  tuple(cu_seqlens_cpu.shape))
        values = cu_seqlens_cpu.tolist()
    if _reads_values(device):
        device_values = cu_seqlens.tolist()
        if values is not None and device_values != values:
            _fail(ValueError, "cu_seqlens_cpu", f"equal to cu_seqlens = {device_values}", values)
        values = device_values
    if values is not None and (values[0] != 0 or values[-1] != dims.T
                               or any(b < a for a, b in zip(values, values[1:]))):
        _fail(ValueError, "cu_seqlens", f"non-decreasing offsets from 0 to q.shape[1] = {dims.T}", values)
    return dims._replace(N=cu_seqlens.shape[0] - 1)


def check_state(name, x, shape, layout, q):
    """A recurrent state: fp32 (fp64 allowed with fp64 inputs) of exactly ``shape``."""
    check_tensor(name, x)
    if x.device != q.device:
        _fail(ValueError, f"{name}.device", f"q.device = {q.device}", x.device)
    allowed = (torch.float32, torch.float64) if q.dtype == torch.float64 else (torch.float32,)
    if x.dtype not in allowed:
        _fail(TypeError, f"{name}.dtype", "torch.float32 (states are kept in fp32)", x.dtype)
    if tuple(x.shape) != tuple(shape):
        _fail(ValueError, f"{name}.shape", f"{layout} = {tuple(shape)}", tuple(x.shape))


def check_common(q, k, v, scale, initial_state, output_final_state, cu_seqlens, cu_seqlens_cpu=None,
                 state_v_first=False, reverse=False):
    """What every gated op shares: q/k/v, scale, flags, varlen and initial_state
    [N, H, K, V] ([N, H, V, K] with state_v_first). Returns (dims, scale)."""
    dims = check_qkv(q, k, v)
    scale = check_scale(scale, dims.K)
    for name, value in (("output_final_state", output_final_state), ("state_v_first", state_v_first),
                        ("reverse", reverse)):
        check_flag(name, value)
    dims = check_varlen(dims, cu_seqlens, cu_seqlens_cpu, q.device)
    if initial_state is not None:
        if state_v_first:
            check_state("initial_state", initial_state, (dims.N, dims.H, dims.V, dims.K), "[N, H, V, K]", q)
        else:
            check_state("initial_state", initial_state, (dims.N, dims.H, dims.K, dims.V), "[N, H, K, V]", q)
    return dims, scale


def check_layers(layer_idx, num_layers):
    """Lightning's layer position: ints with 0 <= layer_idx < num_layers."""
    for name, value in (("layer_idx", layer_idx), ("num_layers", num_layers)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            _fail(TypeError, name, "an int", f"{type(value).__name__} {value!r}")
    if num_layers < 1:
        _fail(ValueError, "num_layers", ">= 1", num_layers)
    if not 0 <= layer_idx < num_layers:
        _fail(ValueError, "layer_idx", f"in 0..num_layers - 1 = {num_layers - 1} (counted from 0)", layer_idx)


def check_mask(mask, dims, q):
    """A float (or bool) mask broadcastable to [B, H, T, T]."""
    check_tensor("mask", mask)
    if mask.device != q.device:
        _fail(ValueError, "mask.device", f"q.device = {q.device}", mask.device)
    allowed = _dtypes_for(q.device) + (torch.bool,)
    if mask.dtype not in allowed:
        _fail(TypeError, "mask.dtype", f"one of {_names(allowed)}", mask.dtype)
    target = (dims.B, dims.H, dims.T, dims.T)
    padded = (1,) * (4 - mask.dim()) + tuple(mask.shape)
    if mask.dim() > 4 or any(m not in (1, t) for m, t in zip(padded, target)):
        _fail(ValueError, "mask.shape", f"broadcastable to [B, H, T, T] = {target}", tuple(mask.shape))


def _check_offsets(name, x):
    check_tensor(name, x)
    if x.dtype not in _INDEX_DTYPES:
        _fail(TypeError, f"{name}.dtype", "torch.int32 or torch.int64", x.dtype)
    if x.dim() != 1 or x.shape[0] < 2:
        _fail(ValueError, f"{name}.shape", "[N + 1] with N >= 1 sequences", tuple(x.shape))


def _dtypes_for(device):
    return _CPU_DTYPES if device.type == "cpu" else _KERNEL_DTYPES


def _names(dtypes):
    return ", ".join(str(d) for d in dtypes)
