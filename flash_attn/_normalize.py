"""Option normalization shared by the CPU and CUDA routes, as flash-attn does it,
so both routes see the same (scale, window) for the same call."""


def softmax_scale_or_default(softmax_scale, head_dim):
    """The given scale, or head_dim ** -0.5 of the true (unpadded) head dim."""
    return head_dim ** -0.5 if softmax_scale is None else float(softmax_scale)


def kernel_window(causal, window_size, seqlen_q, seqlen_k, has_alibi):
    """Fold ``causal`` into the window and drop sides that cannot bind.

    - seqlen_q == 1 without ALiBi: causal is dropped (one query row sees
      every key either way; flash-attn keeps causal when ALiBi is on).
    - causal: right = 0, left kept.
    - a side >= seqlen_k becomes -1 (unbounded); for varlen seqlen_k is
      max_seqlen_k. This never changes the left side; it widens the right
      side only when seqlen_q > seqlen_k, exactly as flash-attn does.
    Returns (left, right) with -1 = unbounded.
    """
    left, right = window_size
    if causal and not (seqlen_q == 1 and not has_alibi):
        right = 0
    if left >= seqlen_k:
        left = -1
    if right >= seqlen_k:
        right = -1
    return left, right


def s_dmask_shape(batch, nheads, seqlen_q, seqlen_k):
    """S_dmask of the CUDA route (return_attn_probs with dropout): (batch, nheads, seqlen_q,
    seqlen_k) rounded up to multiples of 128 (as flash-attn); varlen uses max_seqlen_q/k."""
    return (batch, nheads, (seqlen_q + 127) // 128 * 128, (seqlen_k + 127) // 128 * 128)


def rng_state_shape(dropout_p):
    """The ops' rng_state: int64 (seed, offset) with dropout, empty without."""
    return (2,) if dropout_p > 0 else (0,)
