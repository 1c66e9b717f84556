"""GLA: one log-gate per key dimension (g [B, T, H, K])."""
from ._checks import check_common, check_gate
from ._route import run_gated


def chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, state_v_first=False,
              cu_seqlens=None, cu_seqlens_cpu=None):
    """GLA, chunkwise parallel (training, prefill):

        S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,   o_t = scale * q_t S_t

    q, k [B, T, H, K]; v [B, T, H, V]; g log forget gates [B, T, H, K] (<= 0);
    scale default K ** -0.5; initial_state fp32 [N, H, K, V] ([N, H, V, K]
    with state_v_first); cu_seqlens int32/int64 [N + 1] (B == 1), cu_seqlens_cpu
    its CPU copy. Numerically safe for very negative gates.
    Returns (o [B, T, H, V] in q.dtype, final_state fp32 or None).
    """
    dims, scale = check_common(q, k, v, scale, initial_state, output_final_state, cu_seqlens, cu_seqlens_cpu,
                               state_v_first)
    check_gate("g", g, (dims.B, dims.T, dims.H, dims.K), "[B, T, H, K]", q,
               " (one log-gate per key; a scalar gate [B, T, H] is chunk_simple_gla's)")
    return run_gated("chunk_gla", "chunk", q, k, v, g=g, scale=scale, initial_state=initial_state,
                     output_final_state=output_final_state, state_v_first=state_v_first, cu_seqlens=cu_seqlens)


def fused_recurrent_gla(q, k, v, gk=None, gv=None, scale=None, initial_state=None, output_final_state=False,
                        reverse=False, state_v_first=False, cu_seqlens=None):
    """GLA, token by token (decoding), with optional key and value gates:

        S_t = diag(exp(gk_t)) S_{t-1} diag(exp(gv_t)) + k_t^T v_t,   o_t = scale * q_t S_t

    gk [B, T, H, K] and gv [B, T, H, V] log-gates, each optional; other
    arguments as chunk_gla, plus reverse (run each sequence backwards).
    Differentiable in every input (on CUDA: with gv by a token-by-token
    backward kernel, else by chunk_gla's backward).
    Returns (o [B, T, H, V] in q.dtype, final_state fp32 or None).
    """
    dims, scale = check_common(q, k, v, scale, initial_state, output_final_state, cu_seqlens, None,
                               state_v_first, reverse)
    if gk is not None:
        check_gate("gk", gk, (dims.B, dims.T, dims.H, dims.K), "[B, T, H, K]", q)
    if gv is not None:
        check_gate("gv", gv, (dims.B, dims.T, dims.H, dims.V), "[B, T, H, V]", q)
    return run_gated("fused_recurrent_gla", "recurrent", q, k, v, g=gk, gv=gv, scale=scale,
                     initial_state=initial_state, output_final_state=output_final_state, reverse=reverse,
                     state_v_first=state_v_first, cu_seqlens=cu_seqlens)
