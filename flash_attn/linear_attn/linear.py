"""Plain linear attention (no decay), with chunk_linear_attn's normalize option."""
from .._checks import _fail
from ..reference_linear import NORMALIZE_EPS, linear_attn_normalizer_ref, linear_attn_ref
from . import _kernels
from ._checks import check_common, check_flag, check_state


def chunk_linear_attn(q, k, v, scale=None, initial_state=None, output_final_state=False, normalize=True,
                      cu_seqlens=None):
    """Linear attention, chunkwise parallel:

        S_t = S_{t-1} + k_t^T v_t,   o_t = scale * q_t S_t

    normalize=True (the default, as in fla) divides by the running key sum:
    z_t = z_0 + k_1 + ... + k_t, o_t = scale q_t S_t / (scale q_t . z_t + 1e-10).

    Args:
        q, k: [B, T, H, K]; v: [B, T, H, V]; scale default K ** -0.5.
        initial_state: normalize=False: fp32 [N, H, K, V]; normalize=True: a
            tuple (kv_state fp32 [N, H, K, V], z_state fp32 [N, 1, H, K]); or None.
        output_final_state: also return the final state (same form as initial_state).
        cu_seqlens: int32/int64 [N + 1] offsets of sequences packed along T (B == 1).
    Returns:
        (o [B, T, H, V] in q.dtype, final_state or None).
    """
    check_flag("normalize", normalize)
    kv_state = initial_state
    if normalize and initial_state is not None:
        if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
            _fail(TypeError, "initial_state", "a tuple (kv_state [N, H, K, V], z_state [N, 1, H, K]) when "
                  "normalize=True", type(initial_state).__name__)
        kv_state = initial_state[0]
    elif isinstance(initial_state, (tuple, list)):
        _fail(TypeError, "initial_state", "a tensor [N, H, K, V] when normalize=False (a (kv, z) tuple is for "
              "normalize=True)", type(initial_state).__name__)
    dims, scale = check_common(q, k, v, scale, kv_state, output_final_state, cu_seqlens)
    if normalize and initial_state is not None:
        check_state("initial_state[1] (z_state)", initial_state[1], (dims.N, 1, dims.H, dims.K), "[N, 1, H, K]", q)
    state = tuple(initial_state) if normalize and initial_state is not None else initial_state
    if _kernels.runs_on_kernels(q, v):
        return _chunk_linear_attn_cuda(q, k, v, scale, state, output_final_state, normalize, cu_seqlens)
    return linear_attn_ref(q, k, v, scale=scale, initial_state=state, output_final_state=output_final_state,
                           normalize=normalize, cu_seqlens=cu_seqlens)


def _chunk_linear_attn_cuda(q, k, v, scale, state, output_final_state, normalize, cu_seqlens):
    """The kernels run chunk_simple_gla without a gate; the normalizer (a running key sum,
    O(T K) work) is PyTorch on the device, differentiable through autograd."""
    kv0, z0 = state if normalize and state is not None else (state, None)
    o, kv = _kernels.simple_gla("chunk_linear_attn", "chunk", q, k, v, None, None, scale, kv0, output_final_state,
                                False, cu_seqlens)
    if not normalize:
        return o, kv
    den, z_state = linear_attn_normalizer_ref(q, k, scale, z0, cu_seqlens)
    o = (o.float() / (den.unsqueeze(-1) + NORMALIZE_EPS)).to(q.dtype)
    return o, ((kv, z_state) if output_final_state else None)
