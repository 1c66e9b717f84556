"""The per-head fixed log-decays of retention and Lightning Attention, built once per (kind,
parameters, device) and reused: a decode step calls the recurrent op once per token, and
building the decay each time (four small float64 kernels) cost a one-token
fused_recurrent_retention 7x the time of fused_recurrent_simple_gla on an H100
(benchmarks/results/linear_decode_*_252c899cd9e1.json). The cached tensors are never
written. During CUDA-graph capture nothing is cached (a tensor made there belongs to the
graph's memory pool)."""
import functools

import torch

from ..reference_linear import lightning_log_decay, retention_log_decay


def retention_decay(num_heads, device):
    """retention_log_decay(num_heads, device), cached."""
    return _get("retention", (num_heads,), device)


def lightning_decay(num_heads, layer_idx, num_layers, device):
    """lightning_log_decay(num_heads, layer_idx, num_layers, device), cached."""
    return _get("lightning", (num_heads, layer_idx, num_layers), device)


_BUILDERS = {"retention": retention_log_decay, "lightning": lightning_log_decay}


def _get(kind, args, device):
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return _BUILDERS[kind](*args, device=device)
    return _cached(kind, args, device)


@functools.lru_cache(maxsize=256)
def _cached(kind, args, device):
    return _BUILDERS[kind](*args, device=device)
