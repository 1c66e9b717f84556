"""CPU route: the reference implementation.

fwd, varlen_fwd, bwd, varlen_bwd are the CPU kernels of the flash_attn:: custom ops
(flash_attn._ops): the reference forward, and for the backward the reference forward
recomputed and differentiated with autograd (the CPU path does not save memory). With
dropout_p > 0 they use the CUDA kernels' mask (flash_attn.reference_dropout) for an
rng_state drawn from torch's CPU generator, so the backward rebuilds the forward's mask.
dense_forward, varlen_forward run the reference with dropout, differentiable through
autograd; the API uses them outside the ops when dropout_p > 0 (torch.rand masks).
"""
import contextlib

import torch

from . import reference
from ._normalize import s_dmask_shape
from .reference_dropout import dropout_keep_mask


def fwd(q, k, v, alibi_slopes, softmax_scale, window_left, window_right, softcap, deterministic=False,
        dropout_p=0.0, return_softmax=False):
    """flash_attn::fwd on CPU: q (b, sq, hq, d), k/v (b, sk, hk, d) -> out (b, sq, hq, d), lse (b, hq, sq),
    S_dmask (b, hq, sq_128, sk_128: normalized P, dropped entries negated) or empty, rng_state."""
    b, sq, hq, _ = q.shape
    rng_state = _draw_rng_state(dropout_p)
    keep = _keep(rng_state, dropout_p, b, hq, sq, k.shape[1])
    out, lse, probs, _ = reference.attention_ref_with_probs(
        q, k, v, softmax_scale, False, (window_left, window_right), softcap, alibi_slopes, dropout_p, keep)
    s_dmask = _s_dmask(probs, keep, q, return_softmax and dropout_p > 0, b, hq, sq, k.shape[1])
    return out.contiguous(), lse.contiguous(), s_dmask, rng_state


def varlen_fwd(q, k, v, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k, alibi_slopes,
               softmax_scale, window_left, window_right, softcap, deterministic=False, dropout_p=0.0,
               return_softmax=False):
    """flash_attn::varlen_fwd on CPU: q (total_q, hq, d), k/v (total_k, hk, d)
    -> out (total_q, hq, d), lse (hq, total_q), S_dmask (b, hq, max_seqlen_q_128, max_seqlen_k_128)
    or empty, rng_state."""
    b, hq = cu_seqlens_q.shape[0] - 1, q.shape[1]
    rng_state = _draw_rng_state(dropout_p)
    mq, mk = _varlen_extent(cu_seqlens_q, max_seqlen_q), _varlen_extent(cu_seqlens_k, max_seqlen_k)
    keep = _keep(rng_state, dropout_p, b, hq, mq, mk)
    out, lse, probs, _ = reference.attention_varlen_ref_with_probs(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_k, softmax_scale, False,
        (window_left, window_right), softcap, alibi_slopes, dropout_p, keep)
    s_dmask = _s_dmask(probs, keep, q, return_softmax and dropout_p > 0, b, hq, max_seqlen_q, max_seqlen_k)
    return out.contiguous(), lse.contiguous(), s_dmask, rng_state


def bwd(dout, q, k, v, out, lse, alibi_slopes, softmax_scale, window_left, window_right, softcap,
        deterministic, dropout_p=0.0, rng_state=None):
    """flash_attn::bwd on CPU: (dq, dk, dv) of fwd for the output gradient dout (out, lse unused),
    with the forward's dropout mask rebuilt from rng_state."""
    b, sq, hq, _ = q.shape
    keep = _keep(rng_state, dropout_p, b, hq, sq, k.shape[1])

    def attention(q, k, v):
        return reference.attention_ref(q, k, v, softmax_scale, False, (window_left, window_right), softcap,
                                       alibi_slopes, dropout_p, keep)[0]
    return _recompute_grads(attention, dout, q, k, v)


def varlen_bwd(dout, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k,
               alibi_slopes, softmax_scale, window_left, window_right, softcap, deterministic, dropout_p=0.0,
               rng_state=None):
    """flash_attn::varlen_bwd on CPU: (dq, dk, dv) of varlen_fwd for dout (out, lse unused)."""
    mq, mk = _varlen_extent(cu_seqlens_q, max_seqlen_q), _varlen_extent(cu_seqlens_k, max_seqlen_k)
    keep = _keep(rng_state, dropout_p, cu_seqlens_q.shape[0] - 1, q.shape[1], mq, mk)

    def attention(q, k, v):
        return reference.attention_varlen_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                              seqused_k, softmax_scale, False, (window_left, window_right),
                                              softcap, alibi_slopes, dropout_p, keep)[0]
    return _recompute_grads(attention, dout, q, k, v)


def _draw_rng_state(dropout_p):
    """int64 (seed, offset) from torch's CPU generator with dropout (reproducible under
    torch.manual_seed, fresh on every call), empty without."""
    if dropout_p <= 0:
        return torch.empty(0, dtype=torch.int64)
    return torch.randint(0, 2 ** 62, (2,), dtype=torch.int64)


def _keep(rng_state, dropout_p, b, hq, sq, sk):
    """The kernels' keep mask (b, hq, sq, sk) for rng_state, or None without dropout."""
    if dropout_p <= 0:
        return None
    if rng_state is None or rng_state.numel() != 2:
        raise ValueError(f"flash_attn: rng_state must be the forward's int64 (seed, offset) with dropout_p > 0, "
                         f"got {None if rng_state is None else tuple(rng_state.shape)}")
    seed, offset = rng_state.tolist()
    return dropout_keep_mask(seed, offset, b, hq, sq, sk, dropout_p)


def _varlen_extent(cu_seqlens, max_seqlen):
    """Rows (or keys) the varlen mask must cover: max_seqlen or the longest sequence."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    return max([int(max_seqlen)] + lengths)


def _s_dmask(probs, keep, q, wanted, b, hq, sq, sk):
    """The ops' S_dmask: s_dmask() below, zero-padded to the CUDA layout (multiples of 128), or
    an empty tensor when not wanted."""
    if not wanted:
        return q.new_empty((0,))
    full = q.new_zeros(s_dmask_shape(b, hq, sq, sk))
    rows, cols = min(sq, probs.shape[2]), min(sk, probs.shape[3])
    full[:, :, :rows, :cols] = s_dmask(probs, keep, q.dtype)[:, :, :rows, :cols]
    return full


def _recompute_grads(attention, dout, q, k, v):
    """Gradients of attention(q, k, v) for dout (contiguous): the forward recomputed with autograd."""
    with _autograd_in_kernel():
        q, k, v = (x.detach().requires_grad_(True) for x in (q, k, v))
        grads = torch.autograd.grad(attention(q, k, v), (q, k, v), dout)
    return tuple(g.contiguous() for g in grads)


# What a custom op's kernel runs under: the dispatcher excludes the autograd keys below the
# op's Autograd kernel, so nothing inside it is recorded even with grad mode on. torch.func.vjp
# works there, but its wrapped tensors break tensor-inspecting dispatch modes (opcheck's
# SchemaCheckMode); lifting the exclusion for the recompute keeps plain tensors.
_AUTOGRAD_KEYS = [getattr(torch._C.DispatchKey, name) for name in
                  ("AutogradFunctionality", "AutogradOther", "AutogradNestedTensor", "ADInplaceOrView")]


@contextlib.contextmanager
def _autograd_in_kernel():
    """Grad mode on and autograd dispatch keys included, restored on exit."""
    excluded = [key for key in _AUTOGRAD_KEYS if torch._C._dispatch_tls_is_dispatch_key_excluded(key)]
    for key in excluded:
        torch._C._dispatch_tls_set_dispatch_key_excluded(key, False)
    try:
        with torch.enable_grad():
            yield
    finally:
        for key in excluded:
            torch._C._dispatch_tls_set_dispatch_key_excluded(key, True)


def dense_forward(q, k, v, dropout_p, softmax_scale, window, softcap, alibi_slopes):
    """q (b, sq, hq, d), k/v (b, sk, hk, d) -> (out (b, sq, hq, d), lse (b, hq, sq), S_dmask).

    window: normalized (left, right) with causal already folded in.
    S_dmask: see s_dmask; (b, hq, sq, sk).
    """
    out, lse, probs, keep = reference.attention_ref_with_probs(
        q, k, v, softmax_scale, False, window, softcap, alibi_slopes, dropout_p)
    return out, lse, s_dmask(probs, keep, q.dtype)


def varlen_forward(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                   softmax_scale, window, softcap, alibi_slopes):
    """q (total_q, hq, d), k/v (total_k, hk, d)
    -> (out (total_q, hq, d), lse (hq, total_q), S_dmask (b, hq, max_seqlen_q, max_seqlen_k))."""
    out, lse, probs, keep = reference.attention_varlen_ref_with_probs(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, None, softmax_scale,
        False, window, softcap, alibi_slopes, dropout_p)
    return out, lse, s_dmask(probs, keep, q.dtype)


def s_dmask(probs, keep, dtype):
    """The S_dmask returned with return_attn_probs=True on CPU.

    None without dropout. With dropout: the softmax probabilities before
    dropout (normalized, not rescaled by 1 / (1 - p)), with every dropped
    entry negated, in q.dtype and detached. Kept entries are >= 0; dropped
    ones have their sign bit set (torch.signbit), which also marks a dropped
    probability of exactly 0 as -0.0.
    """
    if keep is None:
        return None
    return torch.where(keep, probs, -probs).detach().to(dtype)


def kvcache_forward(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                    cache_leftpad, softmax_scale, window, softcap, rotary_interleaved, alibi_slopes,
                    block_table=None, num_splits=0):
    """flash_attn_with_kvcache on CPU: reference.kvcache_ref, which writes k, v into the
    caches (paged with block_table) in place. window: normalized, causal folded in.
    num_splits is a CUDA performance hint; the reference ignores it.
    Returns out (b, sq, hq, d) and lse (b, hq, sq)."""
    return reference.kvcache_ref(q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens,
                                 cache_batch_idx, cache_leftpad, softmax_scale, False, window, softcap,
                                 rotary_interleaved, alibi_slopes, block_table=block_table)
