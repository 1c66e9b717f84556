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
