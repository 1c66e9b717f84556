"""Where a checked call runs.

CPU tensors run flash_attn.reference_linear (differentiable through autograd). CUDA tensors
run the kernels of csrc/linear_attn (._kernels) when the inputs are fp16/bf16 with K and
V <= 256 (other dims padded); fp32 CUDA inputs and larger head dims run the reference on
the device. GLA (per-key gates) runs its chunked kernels (chunk_gla, and the backward of
fused_recurrent_gla, whose forward is token by token); with a value gate gv,
fused_recurrent_gla's backward is token by token too (csrc/linear_attn/recurrent_grad.cuh).
"""
from ..reference_linear import linear_attn_chunk_ref, linear_attn_recurrent_ref
from . import _kernels


def run_gated(fn, mode, q, k, v, g=None, g_gamma=None, gv=None, scale=None, initial_state=None,
              output_final_state=False, reverse=False, state_v_first=False, cu_seqlens=None):
    """mode "chunk" (chunkwise parallel) or "recurrent" (token by token). Arguments are checked.

    state_v_first: initial_state and the final state are [N, H, V, K] (transposed
    here; the kernels and references keep [N, H, K, V]). Returns (o, final_state or None).
    """
    if state_v_first and initial_state is not None:
        initial_state = initial_state.transpose(-1, -2)
    if _kernels.runs_on_kernels(q, v):
        o, state = _run_kernels(fn, mode, q, k, v, g, g_gamma, gv, scale, initial_state, output_final_state,
                                reverse, cu_seqlens)
    elif mode == "chunk":
        o, state = linear_attn_chunk_ref(q, k, v, g=g, g_gamma=g_gamma, scale=scale, initial_state=initial_state,
                                         output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    else:
        o, state = linear_attn_recurrent_ref(q, k, v, g=g, g_gamma=g_gamma, gv=gv, scale=scale,
                                             initial_state=initial_state, output_final_state=output_final_state,
                                             reverse=reverse, cu_seqlens=cu_seqlens)
    if state is not None and state_v_first:
        state = state.transpose(-1, -2).contiguous()
    return o, state


def _run_kernels(fn, mode, q, k, v, g, g_gamma, gv, scale, initial_state, output_final_state, reverse,
                 cu_seqlens):
    per_key = g is not None and g.dim() == 4
    if not per_key and gv is None:
        return _kernels.simple_gla(fn, mode, q, k, v, g, g_gamma, scale, initial_state, output_final_state, reverse,
                                   cu_seqlens)
    return _kernels.gla(fn, mode, q, k, v, g if per_key else None, gv, scale, initial_state, output_final_state,
                        reverse, cu_seqlens)
