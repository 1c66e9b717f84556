"""flash_attn.bert_padding and flash_attn.layers.rotary (pure PyTorch)."""
import math

import pytest
import torch

from flash_attn import flash_attn_varlen_func
from flash_attn.bert_padding import index_first_axis, index_put_first_axis, pad_input, unpad_input
from flash_attn.layers.rotary import (RotaryEmbedding, apply_rotary_emb, apply_rotary_emb_kv_,
                                      apply_rotary_emb_qkv_)
from flash_attn.reference import attention_ref


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def prefix_mask(lengths, seqlen):
    return torch.arange(seqlen)[None, :] < torch.tensor(lengths)[:, None]


# --- bert_padding ---

MASKS = {
    "right_padded": prefix_mask([5, 2, 0, 6], 6),
    "scattered": torch.tensor([[1, 0, 1, 1, 0, 1], [0, 0, 0, 0, 0, 1], [1, 1, 1, 1, 1, 1], [0] * 6]),
    "full": torch.ones(4, 6, dtype=torch.int64),
}


@pytest.mark.parametrize("mask_name", list(MASKS))
def test_unpad_pad_round_trip(mask_name):
    mask = MASKS[mask_name]
    x = torch.randn(4, 6, 3, 2, generator=gen())
    packed, indices, cu_seqlens, max_seqlen, seqused = unpad_input(x, mask)
    lengths = mask.bool().sum(-1)
    assert packed.shape == (int(lengths.sum()), 3, 2)
    torch.testing.assert_close(packed, x[mask.bool()], rtol=0, atol=0)
    assert indices.dtype == torch.int64
    assert cu_seqlens.dtype == torch.int32 and cu_seqlens.tolist() == [0] + lengths.cumsum(0).tolist()
    assert type(max_seqlen) is int and max_seqlen == int(lengths.max())
    assert seqused.dtype == torch.int32 and seqused.tolist() == lengths.tolist()
    padded = pad_input(packed, indices, 4, 6)
    torch.testing.assert_close(padded, x * mask.bool()[:, :, None, None], rtol=0, atol=0)


def test_unpad_with_unused_mask():
    mask = prefix_mask([2, 3], 5)
    unused = torch.tensor([[0, 0, 1, 1, 0], [0, 0, 0, 1, 0]], dtype=torch.bool)
    x = torch.arange(10.0).reshape(2, 5, 1)
    packed, indices, cu_seqlens, max_seqlen, seqused = unpad_input(x, mask, unused)
    assert cu_seqlens.tolist() == [0, 4, 8]
    assert seqused.tolist() == [2, 3]
    assert max_seqlen == 4
    assert packed.flatten().tolist() == [0, 1, 2, 3, 5, 6, 7, 8]


def test_padding_is_differentiable():
    mask = MASKS["scattered"]
    x = torch.randn(4, 6, 3, dtype=torch.float64, generator=gen()).requires_grad_(True)
    packed, indices, *_ = unpad_input(x, mask)
    assert torch.autograd.gradcheck(lambda p: pad_input(p, indices, 4, 6), (packed.detach().requires_grad_(True),))
    assert torch.autograd.gradcheck(lambda t: index_first_axis(t.reshape(24, 3), indices), (x,))
    values = torch.randn(len(indices), 3, dtype=torch.float64, generator=gen(1)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: index_put_first_axis(t, indices, 24), (values,))


def test_int32_indices():
    """transformers 5.x passes int32 indices (indices_q = cu_seqlens_q[:-1] when decoding)."""
    mask = MASKS["scattered"]
    x = torch.randn(4, 6, 3, 2, dtype=torch.float64, generator=gen())
    packed, indices, *_ = unpad_input(x, mask)
    idx32 = indices.to(torch.int32)
    torch.testing.assert_close(pad_input(packed, idx32, 4, 6), pad_input(packed, indices, 4, 6), rtol=0, atol=0)
    flat = x.reshape(24, 3, 2)
    torch.testing.assert_close(index_first_axis(flat, idx32), packed, rtol=0, atol=0)
    torch.testing.assert_close(index_put_first_axis(packed, idx32, 24), index_put_first_axis(packed, indices, 24),
                               rtol=0, atol=0)
    # the decode step: one token per sequence, indices = cu_seqlens_q[:-1]
    cu_seqlens_q = torch.arange(5, dtype=torch.int32)
    out = torch.randn(4, 3, 2, generator=gen(2))
    padded = pad_input(out, cu_seqlens_q[:-1], 4, 1)
    assert padded.shape == (4, 1, 3, 2)
    torch.testing.assert_close(padded[:, 0], out, rtol=0, atol=0)
    values = packed.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda t: pad_input(t, idx32, 4, 6), (values,))
    assert torch.autograd.gradcheck(lambda t: index_first_axis(t, idx32), (flat.clone().requires_grad_(True),))


def test_unpad_varlen_pad_equals_padded_attention():
    mask = prefix_mask([5, 2, 6], 6)
    q, k, v = (torch.randn(3, 6, 4, 8, generator=gen(s)) for s in range(3))
    q_p, indices, cu_seqlens, max_seqlen, _ = unpad_input(q, mask)
    k_p, v_p = unpad_input(k, mask)[0], unpad_input(v, mask)[0]
    out = flash_attn_varlen_func(q_p, k_p, v_p, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, causal=True)
    ref, _ = attention_ref(q, k, v, causal=True, key_padding_mask=mask, query_padding_mask=mask)
    torch.testing.assert_close(pad_input(out, indices, 3, 6), ref, rtol=1e-6, atol=1e-6)


# --- rotary ---

def naive_rotary(x, cos, sin, interleaved, positions):
    """x (..., nheads, headdim) float64; positions (...) ints, one per token."""
    out = x.double().clone()
    half = cos.shape[-1]
    flat, pos = out.reshape(-1, x.shape[-2], x.shape[-1]), positions.reshape(-1).tolist()
    for n, p in enumerate(pos):
        if p >= cos.shape[0]:
            continue
        for h in range(flat.shape[1]):
            for f in range(half):
                i, j = (2 * f, 2 * f + 1) if interleaved else (f, f + half)
                c, s = float(cos[p, f]), float(sin[p, f])
                a, b = float(flat[n, h, i]), float(flat[n, h, j])
                flat[n, h, i], flat[n, h, j] = a * c - b * s, a * s + b * c
    return out


def tables(seqlen_ro, rotary_dim, dtype=torch.float64):
    angles = torch.rand(seqlen_ro, rotary_dim // 2, generator=gen(9), dtype=torch.float64) * 2 * math.pi
    return angles.cos().to(dtype), angles.sin().to(dtype)


OFFSETS = {"none": 0, "int_3": 3, "tensor": torch.tensor([0, 4])}


@pytest.mark.parametrize("inplace", [False, True], ids=["copy", "inplace"])
@pytest.mark.parametrize("offsets", list(OFFSETS))
@pytest.mark.parametrize("rotary_dim", [10, 4], ids=["full_dim", "partial_dim"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "interleaved"])
def test_rotary_matches_naive(interleaved, rotary_dim, offsets, inplace):
    b, s, h, d = 2, 5, 3, 10
    x = torch.randn(b, s, h, d, generator=gen(), dtype=torch.float64)
    cos, sin = tables(8, rotary_dim)  # offset 4 + seqlen 5 runs past 8: those stay unrotated
    off = OFFSETS[offsets]
    positions = torch.arange(s)[None, :] + torch.as_tensor(off).reshape(-1, 1)
    expected = naive_rotary(x, cos, sin, interleaved, positions.expand(b, s))
    original = x.clone()
    out = apply_rotary_emb(x, cos, sin, interleaved=interleaved, inplace=inplace, seqlen_offsets=off)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    assert (out is x) == inplace
    if not inplace:
        assert torch.equal(x, original)


@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "interleaved"])
def test_rotary_varlen(interleaved):
    lens, h, d = [3, 0, 5], 2, 8
    cu_seqlens = torch.tensor([0, 3, 3, 8], dtype=torch.int32)
    x = torch.randn(sum(lens), h, d, generator=gen(), dtype=torch.float64)
    cos, sin = tables(10, 6)
    offsets = torch.tensor([1, 7, 2])
    out = apply_rotary_emb(x, cos, sin, interleaved, seqlen_offsets=offsets, cu_seqlens=cu_seqlens, max_seqlen=5)
    positions = torch.tensor([1, 2, 3, 2, 3, 4, 5, 6])
    torch.testing.assert_close(out, naive_rotary(x, cos, sin, interleaved, positions), rtol=1e-12, atol=1e-12)
    dense = apply_rotary_emb(x[None, 3:], cos, sin, interleaved, seqlen_offsets=2)
    torch.testing.assert_close(out[3:], dense[0], rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_rotary_low_precision(dtype):
    x = torch.randn(2, 6, 2, 16, generator=gen()).to(dtype)
    cos, sin = tables(6, 16, dtype=torch.float32)
    out = apply_rotary_emb(x, cos, sin)
    assert out.dtype == dtype
    expected = naive_rotary(x, cos, sin, False, torch.arange(6).expand(2, 6))
    torch.testing.assert_close(out.double(), expected, rtol=0, atol=2e-2)


def test_rotary_gradcheck():
    x = torch.randn(1, 3, 2, 6, generator=gen(), dtype=torch.float64).requires_grad_(True)
    cos, sin = tables(4, 4)
    assert torch.autograd.gradcheck(lambda t: apply_rotary_emb(t, cos, sin, interleaved=True), (x,))


def test_rotary_rejects_too_wide_tables():
    with pytest.raises(ValueError, match="rotary_dim"):
        apply_rotary_emb(torch.randn(1, 2, 1, 4), *tables(2, 6))


def test_qkv_and_kv_in_place():
    cos, sin = tables(6, 8)
    qkv = torch.randn(2, 6, 3, 2, 8, generator=gen(), dtype=torch.float64)
    original = qkv.clone()
    assert apply_rotary_emb_qkv_(qkv, cos, sin, seqlen_offsets=0) is qkv
    for i in (0, 1):
        torch.testing.assert_close(qkv[:, :, i], apply_rotary_emb(original[:, :, i], cos, sin), rtol=0, atol=0)
    assert torch.equal(qkv[:, :, 2], original[:, :, 2])

    cos_k, sin_k = tables(6, 8)[1], tables(6, 8)[0]
    gqa = torch.randn(2, 6, 4 + 2 * 1, 8, generator=gen(1), dtype=torch.float64)  # 4 q heads, 1 kv head
    original = gqa.clone()
    apply_rotary_emb_qkv_(gqa, cos, sin, cos_k, sin_k, interleaved=True, num_heads_q=4)
    torch.testing.assert_close(gqa[:, :, :4], apply_rotary_emb(original[:, :, :4], cos, sin, True), rtol=0, atol=0)
    torch.testing.assert_close(gqa[:, :, 4:5], apply_rotary_emb(original[:, :, 4:5], cos_k, sin_k, True),
                               rtol=0, atol=0)
    assert torch.equal(gqa[:, :, 5:], original[:, :, 5:])

    kv = torch.randn(2, 6, 2, 1, 8, generator=gen(2), dtype=torch.float64)
    original = kv.clone()
    assert apply_rotary_emb_kv_(kv, cos, sin, seqlen_offsets=torch.tensor([0, 0])) is kv
    torch.testing.assert_close(kv[:, :, 0], apply_rotary_emb(original[:, :, 0], cos, sin), rtol=0, atol=0)
    assert torch.equal(kv[:, :, 1], original[:, :, 1])


def _scores_by_position(module, seqlen):
    """Rotate the same q and k vector at every position; return q_m . k_n (seqlen, seqlen)."""
    g = gen(3)
    qk = torch.randn(2, module.dim, generator=g)
    qkv = torch.zeros(1, seqlen, 3, 1, module.dim)
    qkv[0, :, 0, 0], qkv[0, :, 1, 0] = qk[0], qk[1]
    qkv = module(qkv)
    return qkv[0, :, 0, 0] @ qkv[0, :, 1, 0].T


@pytest.mark.parametrize("scale_base", [None, 16.0], ids=["rope", "xpos"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["neox", "interleaved"])
def test_rotary_embedding_depends_on_relative_position(interleaved, scale_base):
    scores = _scores_by_position(RotaryEmbedding(8, interleaved=interleaved, scale_base=scale_base), 7)
    for delta in range(-6, 7):
        diagonal = torch.diagonal(scores, offset=delta)
        torch.testing.assert_close(diagonal, diagonal[:1].expand_as(diagonal), rtol=1e-4, atol=1e-4)


def test_rotary_embedding_tables_and_kv_path():
    module = RotaryEmbedding(8, base=100.0)
    q = torch.randn(2, 5, 3, 8, generator=gen())
    kv = torch.randn(2, 5, 2, 3, 8, generator=gen(1))
    q0, kv0 = q.clone(), kv.clone()
    out_q, out_kv = module(q, kv, seqlen_offset=2)
    assert out_q is q and out_kv is kv
    t = torch.arange(7, dtype=torch.float32)
    freqs = torch.outer(t, 100.0 ** (-torch.arange(0, 8, 2) / 8))
    torch.testing.assert_close(out_q, apply_rotary_emb(q0, freqs.cos(), freqs.sin(), seqlen_offsets=2))
    torch.testing.assert_close(out_kv[:, :, 0], apply_rotary_emb(kv0[:, :, 0], freqs.cos(), freqs.sin(),
                                                                 seqlen_offsets=2))
    assert torch.equal(out_kv[:, :, 1], kv0[:, :, 1])
