"""RetNet retention: simple GLA with the fixed per-head log-decay
g_gamma[h] = log(1 - 2^(-5 - h)) (flash_attn.reference_linear.retention_log_decay)."""
from ._fixed_decay import retention_decay
from ._checks import check_common
from ._route import run_gated


def chunk_retention(q, k, v, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Retention, chunkwise parallel: chunk_simple_gla with g_gamma[h] = log(1 - 2^(-5 - h)).

    q, k [B, T, H, K]; v [B, T, H, V]; initial_state fp32 [N, H, K, V];
    cu_seqlens int32/int64 [N + 1] (B == 1). Returns (o [B, T, H, V],
    final_state [N, H, K, V] fp32 or None).
    """
    dims, scale = check_common(q, k, v, scale, initial_state, output_final_state, cu_seqlens)
    return run_gated("chunk_retention", "chunk", q, k, v, g_gamma=retention_decay(dims.H, q.device),
                     scale=scale, initial_state=initial_state, output_final_state=output_final_state,
                     cu_seqlens=cu_seqlens)


def fused_recurrent_retention(q, k, v, scale=None, initial_state=None, output_final_state=False, reverse=False,
                              state_v_first=False, cu_seqlens=None):
    """Retention, token by token: fused_recurrent_simple_gla with g_gamma[h] = log(1 - 2^(-5 - h)).

    Arguments and returns as chunk_retention, plus reverse and state_v_first
    (states [N, H, V, K]).
    """
    dims, scale = check_common(q, k, v, scale, initial_state, output_final_state, cu_seqlens, None,
                               state_v_first, reverse)
    return run_gated("fused_recurrent_retention", "recurrent", q, k, v,
                     g_gamma=retention_decay(dims.H, q.device), scale=scale, initial_state=initial_state,
                     output_final_state=output_final_state, reverse=reverse, state_v_first=state_v_first,
                     cu_seqlens=cu_seqlens)
