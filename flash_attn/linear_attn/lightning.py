"""Lightning Attention: simple GLA with a fixed per-head log-decay set by the
layer's depth (TransNormerLLM):

    g_gamma[h] = -(8 h / H) * (1 - layer_idx / num_layers),  h = 0..H-1

(flash_attn.reference_linear.lightning_log_decay)."""
from ._fixed_decay import lightning_decay
from ._checks import check_common, check_layers
from ._route import run_gated


def chunk_lightning_attn(q, k, v, layer_idx, num_layers, scale=None, initial_state=None, output_final_state=False,
                         cu_seqlens=None):
    """Lightning Attention, chunkwise parallel: chunk_simple_gla with
    g_gamma[h] = -(8 h / H) * (1 - layer_idx / num_layers).

    layer_idx: this layer's index, from 0; num_layers: the model's layer count.
    q, k [B, T, H, K]; v [B, T, H, V]; initial_state fp32 [N, H, K, V];
    cu_seqlens int32/int64 [N + 1] (B == 1). Returns (o [B, T, H, V],
    final_state [N, H, K, V] fp32 or None).
    """
    check_layers(layer_idx, num_layers)
    dims, scale = check_common(q, k, v, scale, initial_state, output_final_state, cu_seqlens)
    return run_gated("chunk_lightning_attn", "chunk", q, k, v,
                     g_gamma=lightning_decay(dims.H, layer_idx, num_layers, q.device), scale=scale,
                     initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def fused_recurrent_lightning_attn(q, k, v, layer_idx, num_layers, scale=None, initial_state=None,
                                   output_final_state=False, reverse=False, cu_seqlens=None):
    """Lightning Attention, token by token; arguments and returns as
    chunk_lightning_attn, plus reverse (run each sequence backwards)."""
    check_layers(layer_idx, num_layers)
    dims, scale = check_common(q, k, v, scale, initial_state, output_final_state, cu_seqlens, None, False, reverse)
    return run_gated("fused_recurrent_lightning_attn", "recurrent", q, k, v,
                     g_gamma=lightning_decay(dims.H, layer_idx, num_layers, q.device), scale=scale,
                     initial_state=initial_state, output_final_state=output_final_state, reverse=reverse,
                     cu_seqlens=cu_seqlens)
