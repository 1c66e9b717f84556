"""The CUDA kernels' dropout mask in PyTorch: Philox4x32-10 and the (b, h, i, j) mapping of
csrc/flash_attn/dropout.h, for tests and for CPU runs that must match the kernels.

The mask is a pure function of (seed, offset, b, h, i, j) (batch or varlen sequence b,
query head h, query row i and key column j from the start of the sequence):

    counter = (x, y) = 64-bit (offset + b * nheads + h), z = i, w = (j // 64) * 4 + (j % 8) // 2
    key     = (seed low 32 bits, seed high 32 bits)
    byte k  = bits 8 (k % 4) .. 8 (k % 4) + 7 of word k // 4 of Philox4x32-10(counter, key)
    keep (i, j)  iff  byte ((j % 64) // 8) * 2 + j % 2  <  keep_threshold(dropout_p)

(seed, offset) is the forward's rng_state. Everything runs on int64 tensors on any device.
"""
import math

import torch

_M32 = 0xFFFFFFFF
_M0, _M1 = 0xD2511F53, 0xCD9E8D57  # round multipliers
_W0, _W1 = 0x9E3779B9, 0xBB67AE85  # key schedule increments


def keep_threshold(dropout_p):
    """Bytes below this value are kept: min(255, floor((1 - dropout_p) * 256))."""
    return min(255, math.floor((1.0 - dropout_p) * 256.0))


def _mulhilo(m, x):
    """(hi, lo) 32-bit halves of m * x for a constant m < 2^32 and int64 x < 2^32, without
    overflowing int64 (m is split into 16-bit halves)."""
    p0 = x * (m & 0xFFFF)
    p1 = x * (m >> 16)
    mid = p0 + ((p1 & 0xFFFF) << 16)
    return (p1 >> 16) + (mid >> 32), mid & _M32


def philox4x32_10(counter, key):
    """counter: four int64 tensors (broadcastable) holding uint32 values; key: two ints.
    Returns the four output words as int64 tensors."""
    c0, c1, c2, c3 = counter
    k0, k1 = key[0] & _M32, key[1] & _M32
    for r in range(10):
        if r > 0:
            k0, k1 = (k0 + _W0) & _M32, (k1 + _W1) & _M32
        hi0, lo0 = _mulhilo(_M0, c0)
        hi1, lo1 = _mulhilo(_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def _as_uint64(x):
    x = int(x.item()) if isinstance(x, torch.Tensor) else int(x)
    return x & 0xFFFFFFFFFFFFFFFF


def dropout_bytes(seed, offset, batch, nheads, seqlen_q, seqlen_k, device="cpu"):
    """The random byte of every element: int64 (batch, nheads, seqlen_q, seqlen_k) in 0..255."""
    seed, offset = _as_uint64(seed), _as_uint64(offset)
    groups = max(1, -(-seqlen_k // 64))
    def arange(n):
        return torch.arange(n, dtype=torch.int64, device=device)
    b = arange(batch).view(-1, 1, 1, 1, 1)
    h = arange(nheads).view(1, -1, 1, 1, 1)
    i = arange(seqlen_q).view(1, 1, -1, 1, 1)
    w = (arange(groups).view(-1, 1) * 4 + arange(4).view(1, -1)).view(1, 1, 1, groups, 4)
    # 64-bit subsequence offset + b * nheads + h, split into two 32-bit words (with carry)
    sub = b * nheads + h + (offset & _M32)
    x, y = sub & _M32, ((sub >> 32) + (offset >> 32)) & _M32
    shape = (batch, nheads, seqlen_q, groups, 4)
    words = philox4x32_10((x.expand(shape), y.expand(shape), i.expand(shape), w.expand(shape)),
                          (seed & _M32, seed >> 32))
    words = torch.stack(words, dim=-1)  # (b, h, sq, g, t, word)
    shifts = torch.arange(4, dtype=torch.int64, device=device) * 8
    by = (words.unsqueeze(-1) >> shifts) & 0xFF  # (b, h, sq, g, t, word, byte): byte k = 4 word + byte
    # byte k = 2 a + e belongs to column 64 g + 8 a + 2 t + e
    by = by.reshape(batch, nheads, seqlen_q, groups, 4, 8, 2)  # (..., g, t, a, e)
    by = by.permute(0, 1, 2, 3, 5, 4, 6).reshape(batch, nheads, seqlen_q, groups * 64)
    return by[..., :seqlen_k]


def dropout_keep_mask(seed, offset, batch, nheads, seqlen_q, seqlen_k, dropout_p, device="cpu"):
    """bool (batch, nheads, seqlen_q, seqlen_k), True = kept: the kernels' mask for a call
    whose rng_state is (seed, offset). For varlen, sequence b is the top-left corner of
    mask[b] (rows and columns counted from the start of the sequence)."""
    by = dropout_bytes(seed, offset, batch, nheads, seqlen_q, seqlen_k, device)
    return by < keep_threshold(dropout_p)
