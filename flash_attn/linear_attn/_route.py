"""Where a checked call runs: CPU tensors run flash_attn.reference_linear (differentiable
through autograd); CUDA tensors raise until the kernels of csrc/linear_attn exist."""
from ..reference_linear import linear_attn_chunk_ref, linear_attn_recurrent_ref
from ._checks import require_cpu


def run_gated(fn, mode, q, k, v, g=None, g_gamma=None, gv=None, scale=None, initial_state=None,
              output_final_state=False, reverse=False, state_v_first=False, cu_seqlens=None):
    """mode "chunk" (chunkwise parallel) or "recurrent" (token by token). Arguments are checked.

    state_v_first: initial_state and the final state are [N, H, V, K] (transposed
    here; the references keep [N, H, K, V]). Returns (o, final_state or None).
    """
    require_cpu(fn, q.device)
    if state_v_first and initial_state is not None:
        initial_state = initial_state.transpose(-1, -2)
    if mode == "chunk":
        o, state = linear_attn_chunk_ref(q, k, v, g=g, g_gamma=g_gamma, scale=scale, initial_state=initial_state,
                                         output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    else:
        o, state = linear_attn_recurrent_ref(q, k, v, g=g, g_gamma=g_gamma, gv=gv, scale=scale,
                                             initial_state=initial_state, output_final_state=output_final_state,
                                             reverse=reverse, cu_seqlens=cu_seqlens)
    if state is not None and state_v_first:
        state = state.transpose(-1, -2).contiguous()
    return o, state
