"""Convert between padded batches and packed (varlen) tokens, flash-attn compatible.

Hugging Face transformers imports these names; their signatures and return
values match flash-attn 2.7+. All functions are differentiable.

Indices may be int64 or int32: Hugging Face transformers passes int32 ones
(``indices_q = cu_seqlens_q[:-1]`` in its decoding step), which torch's
index_copy rejects, so they are widened to int64 first.
"""
import torch
import torch.nn.functional as F


def index_first_axis(input, indices):
    """Rows of ``input`` at ``indices``: input (n, ...), indices int64 or int32 (m,) -> (m, ...)."""
    return torch.index_select(input, 0, _int64(indices))


def index_put_first_axis(values, indices, first_axis_dim):
    """Scatter rows into zeros: values (m, ...), indices int64 or int32 (m,) -> (first_axis_dim, ...)."""
    out = values.new_zeros((first_axis_dim, *values.shape[1:]))
    return out.index_copy(0, _int64(indices), values)


def _int64(indices):
    """indices as int64 (index_copy takes nothing else); the tensor itself when already int64."""
    return indices if indices.dtype == torch.int64 else indices.to(torch.int64)


def unpad_input(hidden_states, attention_mask, unused_mask=None):
    """Pack the valid tokens of a padded batch.

    hidden_states: (batch, seqlen, ...); attention_mask: (batch, seqlen), nonzero
    = used token; unused_mask: (batch, seqlen) or None, nonzero = token that is
    packed (counted in cu_seqlens) but not used.
    Returns (hidden_states (total, ...), indices int64 (total,) into the flattened
    (batch * seqlen) tokens, cu_seqlens int32 (batch + 1,) with a leading 0,
    max_seqlen_in_batch (Python int), seqused int32 (batch,) used tokens per sequence).
    """
    packed = attention_mask.bool() if unused_mask is None else attention_mask.bool() | unused_mask.bool()
    seqlens = packed.sum(dim=-1, dtype=torch.int32)
    seqused = attention_mask.bool().sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(packed.flatten()).flatten()
    max_seqlen = int(seqlens.max()) if seqlens.numel() else 0
    cu_seqlens = F.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return index_first_axis(flat, indices), indices, cu_seqlens, max_seqlen, seqused


def pad_input(hidden_states, indices, batch, seqlen):
    """Inverse of unpad_input: hidden_states (total, ...) -> (batch, seqlen, ...), zeros at padding.

    indices: int64 or int32 (total,) positions in the flattened (batch * seqlen) tokens.
    """
    out = index_put_first_axis(hidden_states, indices, batch * seqlen)
    return out.reshape(batch, seqlen, *hidden_states.shape[1:])
