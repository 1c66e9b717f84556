"""The flash-attn API on CPU tensors (the reference route) against flash_attn.reference."""
import inspect

import pytest
import torch

import flash_attn
from flash_attn import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func,
                        flash_attn_varlen_func, flash_attn_varlen_kvpacked_func,
                        flash_attn_varlen_qkvpacked_func)
from flash_attn.reference import attention_ref, attention_varlen_ref

INF = float("inf")


def rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


def cu(lens):
    return torch.tensor([0] + lens).cumsum(0).to(torch.int32)


OPTIONS = {
    "plain": {},
    "causal": {"causal": True},
    "window": {"window_size": (3, 1)},
    "alibi": {"alibi_slopes": torch.tensor([0.1, 0.3, 0.5, 0.9])},
    "softcap": {"softcap": 2.0},
    "scale": {"softmax_scale": 0.2},
    "causal_alibi_softcap": {"causal": True, "alibi_slopes": torch.tensor([0.2, 0.4, 0.6, 0.8]),
                             "softcap": 5.0},
}
SEQLENS = [(7, 7), (5, 9), (9, 6), (1, 8)]


@pytest.mark.parametrize("sq,sk", SEQLENS, ids=[f"sq{a}_sk{b}" for a, b in SEQLENS])
@pytest.mark.parametrize("name", list(OPTIONS))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_func_matches_reference(dtype, name, sq, sk):
    q = rand(2, sq, 4, 12, dtype=dtype)
    k, v = rand(2, sk, 2, 12, dtype=dtype, seed=1), rand(2, sk, 2, 12, dtype=dtype, seed=2)
    opts = OPTIONS[name]
    out = flash_attn_func(q, k, v, **opts)
    ref, _ = attention_ref(q, k, v, **opts)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_return_attn_probs_without_dropout():
    q, k, v = rand(2, 5, 4, 8), rand(2, 6, 4, 8, seed=1), rand(2, 6, 4, 8, seed=2)
    out, lse, s_dmask = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    ref, ref_lse = attention_ref(q, k, v, causal=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=0)
    assert lse.dtype == torch.float32 and lse.shape == (2, 4, 5)
    assert s_dmask is None


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_dropout_s_dmask_encoding(dtype):
    p = 0.3
    q = rand(2, 6, 4, 8, dtype=dtype)
    k, v = rand(2, 9, 2, 8, dtype=dtype, seed=1), rand(2, 9, 2, 8, dtype=dtype, seed=2)
    torch.manual_seed(11)
    out, lse, s_dmask = flash_attn_func(q, k, v, dropout_p=p, causal=True, return_attn_probs=True)
    assert s_dmask.shape == (2, 4, 6, 9) and s_dmask.dtype == dtype
    keep = ~torch.signbit(s_dmask)
    probs = s_dmask.abs().float()
    ref, ref_lse = attention_ref(q, k, v, causal=True, dropout_p=p, dropout_mask=keep)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 6), rtol=0, atol=1e-2)
    torch.manual_seed(11)
    assert torch.equal(flash_attn_func(q, k, v, dropout_p=p, causal=True), out)


def test_varlen_dropout_s_dmask_padded():
    lens = [3, 0, 5]
    q, k, v = rand(8, 2, 8), rand(8, 2, 8, seed=1), rand(8, 2, 8, seed=2)
    out, lse, s_dmask = flash_attn_varlen_func(q, k, v, cu(lens), cu(lens), 5, 5, dropout_p=0.5,
                                               return_attn_probs=True)
    assert s_dmask.shape == (3, 2, 5, 5)
    keep = ~torch.signbit(s_dmask)
    ref, _ = attention_varlen_ref(q, k, v, cu(lens), cu(lens), dropout_p=0.5, dropout_mask=keep)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("name", list(OPTIONS))
def test_packed_equal_unpacked(name):
    opts = OPTIONS[name]
    qkv = rand(2, 7, 3, 4, 16)
    out = flash_attn_qkvpacked_func(qkv, **opts)
    torch.testing.assert_close(out, flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], **opts),
                               rtol=0, atol=0)
    q, kv = rand(2, 5, 4, 16), rand(2, 9, 2, 2, 16, seed=1)
    out = flash_attn_kvpacked_func(q, kv, **opts)
    torch.testing.assert_close(out, flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], **opts), rtol=0, atol=0)


VARLEN_OPTIONS = dict(OPTIONS, alibi_batch={"alibi_slopes": torch.rand(3, 4)})


@pytest.mark.parametrize("name", list(VARLEN_OPTIONS))
def test_varlen_matches_reference_and_packed(name):
    opts = VARLEN_OPTIONS[name]
    lens_q, lens_k = [4, 0, 6], [5, 3, 2]
    q, k, v = rand(10, 4, 12), rand(10, 2, 12, seed=1), rand(10, 2, 12, seed=2)
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu(lens_q), cu(lens_k), 6, 5, return_attn_probs=True, **opts)
    ref, ref_lse = attention_varlen_ref(q, k, v, cu(lens_q), cu(lens_k), **opts)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=0)
    assert lse.shape == (4, 10)

    kv = torch.stack([k, v], dim=1)
    torch.testing.assert_close(
        flash_attn_varlen_kvpacked_func(q, kv, cu(lens_q), cu(lens_k), 6, 5, **opts), out, rtol=0, atol=0)
    qkv = torch.stack([q, rand(10, 4, 12, seed=3), rand(10, 4, 12, seed=4)], dim=1)
    torch.testing.assert_close(
        flash_attn_varlen_qkvpacked_func(qkv, cu(lens_q), 6, **opts),
        flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu(lens_q), cu(lens_q), 6, 6, **opts),
        rtol=0, atol=0)


def test_varlen_equals_dense_per_sequence():
    lens = [5, 7]
    q, k, v = rand(12, 4, 8), rand(12, 4, 8, seed=1), rand(12, 4, 8, seed=2)
    out = flash_attn_varlen_func(q, k, v, cu(lens), cu(lens), 7, 7, causal=True)
    for s, e in ((0, 5), (5, 12)):
        dense = flash_attn_func(q[None, s:e], k[None, s:e], v[None, s:e], causal=True)
        torch.testing.assert_close(out[s:e], dense[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("head_dim", [1, 5, 12, 33, 100, 256])
def test_head_dims_not_multiple_of_8(head_dim):
    q, k, v = rand(1, 4, 2, head_dim), rand(1, 6, 1, head_dim, seed=1), rand(1, 6, 1, head_dim, seed=2)
    out = flash_attn_func(q, k, v, causal=True)
    ref, _ = attention_ref(q, k, v, causal=True, softmax_scale=head_dim ** -0.5)
    assert out.shape == q.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_non_contiguous_inputs_with_unit_last_stride():
    base = rand(2, 4, 11, 16)  # (b, h, s, d) viewed as (b, s, h, d)
    q = base.transpose(1, 2)[:, 1:8]
    big_k = rand(2, 9, 6, 16, seed=1)
    k, v = big_k[:, :, 0:2], big_k[:, :, 3:5]
    assert not q.is_contiguous() and not k.is_contiguous() and q.stride(-1) == 1
    out = flash_attn_func(q, k, v, causal=True)
    ref = flash_attn_func(q.contiguous(), k.contiguous(), v.contiguous(), causal=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_window_is_normalized_as_flash_attn_does():
    """A window side >= seqlen_k is unbounded, even where seqlen_q > seqlen_k made it bind."""
    q, k, v = rand(1, 9, 2, 8), rand(1, 3, 2, 8, seed=1), rand(1, 3, 2, 8, seed=2)
    out = flash_attn_func(q, k, v, window_size=(-1, 3))
    ref, _ = attention_ref(q, k, v)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


def test_rows_without_keys_give_zero_and_inf_lse():
    q, k, v = rand(1, 6, 2, 8), rand(1, 2, 2, 8, seed=1), rand(1, 2, 2, 8, seed=2)
    out, lse, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert (out[:, :4] == 0).all() and (lse[:, :, :4] == INF).all()
    assert torch.isfinite(lse[:, :, 4:]).all()


def test_empty_inputs():
    q, k, v = rand(0, 4, 2, 8), rand(0, 5, 2, 8), rand(0, 5, 2, 8)
    assert flash_attn_func(q, k, v).shape == (0, 4, 2, 8)
    out, lse, _ = flash_attn_func(rand(2, 3, 2, 8), rand(2, 0, 2, 8), rand(2, 0, 2, 8), return_attn_probs=True)
    assert (out == 0).all() and (lse == INF).all()
    empty_cu = torch.zeros(1, dtype=torch.int32)
    out = flash_attn_varlen_func(rand(0, 2, 8), rand(0, 2, 8), rand(0, 2, 8), empty_cu, empty_cu, 0, 0)
    assert out.shape == (0, 2, 8)


def test_max_seqlen_accepts_int_tensors():
    lens = [3, 4]
    q = rand(7, 2, 8)
    out = flash_attn_varlen_func(q, q, q, cu(lens), cu(lens), torch.tensor(4), torch.tensor(4))
    torch.testing.assert_close(out, flash_attn_varlen_func(q, q, q, cu(lens), cu(lens), 4, 4), rtol=0, atol=0)


# --- gradients through the CPU route ---

def _f64(*shape, seed):
    return rand(*shape, dtype=torch.float64, seed=seed).requires_grad_(True)


@pytest.mark.parametrize("opts", [
    pytest.param({}, id="plain"),
    pytest.param({"causal": True}, id="causal_empty_rows"),
    pytest.param({"window_size": (1, 0), "softcap": 3.0, "alibi_slopes": torch.tensor([0.3, 0.7])}, id="all"),
])
def test_gradcheck_func(opts):
    q, k, v = _f64(1, 4, 2, 3, seed=0), _f64(1, 3, 1, 3, seed=1), _f64(1, 3, 1, 3, seed=2)
    assert torch.autograd.gradcheck(lambda q, k, v: flash_attn_func(q, k, v, **opts), (q, k, v))


def test_gradcheck_packed_and_varlen():
    qkv = _f64(1, 3, 3, 2, 3, seed=0)
    assert torch.autograd.gradcheck(lambda x: flash_attn_qkvpacked_func(x, causal=True), (qkv,))
    q, kv = _f64(5, 2, 3, seed=1), _f64(4, 2, 1, 3, seed=2)
    cu_q, cu_k = cu([2, 3]), cu([1, 3])
    assert torch.autograd.gradcheck(
        lambda q, kv: flash_attn_varlen_kvpacked_func(q, kv, cu_q, cu_k, 3, 3, causal=True), (q, kv))


def test_fp16_gradients_flow():
    q = rand(2, 5, 4, 8, dtype=torch.float16).requires_grad_(True)
    k, v = rand(2, 5, 2, 8, dtype=torch.float16, seed=1), rand(2, 5, 2, 8, dtype=torch.float16, seed=2)
    flash_attn_func(q, k, v, causal=True).float().sum().backward()
    assert q.grad.dtype == torch.float16 and torch.isfinite(q.grad).all()


# --- API shape ---

_COMMON = [("dropout_p", 0.0), ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
           ("softcap", 0.0), ("alibi_slopes", None), ("deterministic", False), ("return_attn_probs", False)]
_REQUIRED = object()
FLASH_ATTN_28_SIGNATURES = {
    flash_attn_func: ["q", "k", "v"],
    flash_attn_qkvpacked_func: ["qkv"],
    flash_attn_kvpacked_func: ["q", "kv"],
    flash_attn_varlen_func: ["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"],
    flash_attn_varlen_qkvpacked_func: ["qkv", "cu_seqlens", "max_seqlen"],
    flash_attn_varlen_kvpacked_func: ["q", "kv", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"],
}


@pytest.mark.parametrize("fn", list(FLASH_ATTN_28_SIGNATURES), ids=lambda f: f.__name__)
def test_signature_matches_flash_attn(fn):
    expected = [(name, _REQUIRED) for name in FLASH_ATTN_28_SIGNATURES[fn]] + _COMMON
    if fn is flash_attn_varlen_func:
        expected.append(("block_table", None))
    params = inspect.signature(fn).parameters.values()
    actual = [(p.name, _REQUIRED if p.default is inspect.Parameter.empty else p.default) for p in params]
    assert actual == expected


def test_package_exports():
    assert flash_attn.__version__ == "2.8.3"
    # flash_attn_with_kvcache's signature is checked in test_kvcache_cpu.py
    assert set(flash_attn.__all__) == {f.__name__ for f in FLASH_ATTN_28_SIGNATURES} | {"flash_attn_with_kvcache"}
