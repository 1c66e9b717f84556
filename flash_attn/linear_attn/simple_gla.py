"""Simple GLA: one scalar log-gate per head and step (g [B, T, H]), or a fixed
per-head log-decay (g_gamma [H]), or no decay. Retention and Lightning are
this op with a fixed g_gamma."""
from ._checks import check_common, check_scalar_gates
from ._route import run_gated


def chunk_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None, output_final_state=False,
                     state_v_first=False, cu_seqlens=None, cu_seqlens_cpu=None):
    """Simple GLA, chunkwise parallel (training, prefill):

        S_t = exp(g_t) S_{t-1} + k_t^T v_t,   o_t = scale * q_t S_t

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V] (fp16, bf16 or fp32; fp64 too on the CPU).
        g: log forget gates [B, T, H] (natural log, <= 0), or None.
        g_gamma: a fixed log-decay per head [H], or None; not together with g.
        scale: score scale, default K ** -0.5.
        initial_state: fp32 [N, H, K, V] ([N, H, V, K] with state_v_first); N = B,
            or the number of sequences with cu_seqlens; None = zeros.
        output_final_state: also return the final state.
        state_v_first: states in the [N, H, V, K] layout.
        cu_seqlens: int32/int64 [N + 1] offsets of N sequences packed along T
            (B == 1); each starts from its own initial_state[n].
        cu_seqlens_cpu: a CPU copy of cu_seqlens (read instead of it), or None.
    Returns:
        (o [B, T, H, V] in q.dtype, final_state [N, H, K, V] fp32, or None).
    """
    dims, scale = check_common(q, k, v, scale, initial_state, output_final_state, cu_seqlens, cu_seqlens_cpu,
                               state_v_first)
    check_scalar_gates(g, g_gamma, dims, q)
    return run_gated("chunk_simple_gla", "chunk", q, k, v, g=g, g_gamma=g_gamma, scale=scale,
                     initial_state=initial_state, output_final_state=output_final_state,
                     state_v_first=state_v_first, cu_seqlens=cu_seqlens)


def fused_recurrent_simple_gla(q, k, v, g=None, g_gamma=None, scale=None, initial_state=None,
                               output_final_state=False, reverse=False, state_v_first=False, cu_seqlens=None):
    """Simple GLA, token by token (decoding): chunk_simple_gla's recurrence and
    arguments (no cu_seqlens_cpu), plus reverse: run each sequence from its last
    token to its first, S_t = exp(g_t) S_{t+1} + k_t^T v_t.

    Returns (o [B, T, H, V] in q.dtype, final_state [N, H, K, V] fp32, or None).
    """
    dims, scale = check_common(q, k, v, scale, initial_state, output_final_state, cu_seqlens, None,
                               state_v_first, reverse)
    check_scalar_gates(g, g_gamma, dims, q)
    return run_gated("fused_recurrent_simple_gla", "recurrent", q, k, v, g=g, g_gamma=g_gamma, scale=scale,
                     initial_state=initial_state, output_final_state=output_final_state, reverse=reverse,
                     state_v_first=state_v_first, cu_seqlens=cu_seqlens)
