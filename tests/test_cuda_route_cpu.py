"""The CUDA route's Python side, run on CPU against a fake flash_attn_2_cuda.

The fake checks the extension contract (compiled head dim, unit last stride,
out=None, fp32 contiguous ALiBi, int32 cu_seqlens) and computes with the
reference, so head-dim padding, slicing, empty inputs, build checks and the
forward-only autograd wrapper are all exercised without a GPU.
"""
import pytest
import torch

from flash_attn import _cpu, _cuda, build_info
from flash_attn._normalize import kernel_window, softmax_scale_or_default
from flash_attn.reference import attention_ref, attention_varlen_ref

HEAD_DIMS = [32, 64, 128]


class FakeExtension:
    """Stands in for flash_attn_2_cuda; records every call."""

    def __init__(self):
        self.calls = []

    def fwd(self, q, k, v, out, alibi_slopes, softmax_scale, window_size_left, window_size_right, softcap):
        self._check(q, k, v, out, alibi_slopes)
        self.calls.append(("fwd", q.shape[-1], softmax_scale, (window_size_left, window_size_right)))
        return list(attention_ref(q, k, v, softmax_scale, False, (window_size_left, window_size_right),
                                  softcap, alibi_slopes))

    def varlen_fwd(self, q, k, v, out, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k,
                   alibi_slopes, softmax_scale, window_size_left, window_size_right, softcap):
        self._check(q, k, v, out, alibi_slopes)
        for cu in (cu_seqlens_q, cu_seqlens_k):
            assert cu.dtype == torch.int32 and cu.is_contiguous()
        assert seqused_k is None and type(max_seqlen_q) is int and type(max_seqlen_k) is int
        self.calls.append(("varlen_fwd", q.shape[-1], softmax_scale, (window_size_left, window_size_right)))
        return list(attention_varlen_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                                         None, softmax_scale, False, (window_size_left, window_size_right),
                                         softcap, alibi_slopes))

    @staticmethod
    def _check(q, k, v, out, alibi_slopes):
        assert out is None
        assert q.shape[-1] in HEAD_DIMS and k.shape[-1] == v.shape[-1] == q.shape[-1]
        assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
        if alibi_slopes is not None:
            assert alibi_slopes.dtype == torch.float32 and alibi_slopes.is_contiguous()


@pytest.fixture
def fake(monkeypatch):
    ext = FakeExtension()
    monkeypatch.setattr(build_info, "cuda_extension", lambda: ext)
    monkeypatch.setattr(build_info, "compiled_head_dims", lambda: list(HEAD_DIMS))
    monkeypatch.setattr(build_info, "has_feature", lambda name: True)
    return ext


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).half()


def qkv(b=2, sq=5, sk=7, h=4, hk=2, d=20):
    return rand(b, sq, h, d), rand(b, sk, hk, d, seed=1), rand(b, sk, hk, d, seed=2)


@pytest.mark.parametrize("d,kernel_d", [(20, 32), (32, 32), (33, 64), (100, 128)])
def test_dense_pads_head_dim_and_slices_back(fake, d, kernel_d):
    q, k, v = qkv(d=d)
    alibi = torch.rand(4, 2).T  # (batch, nheads), not contiguous
    scale = softmax_scale_or_default(None, d)
    args = (q, k, v, 0.0, scale, (3, 0), 2.0, alibi)
    out, lse = _cuda.dense_forward(*args)
    ref, ref_lse, _ = _cpu.dense_forward(*args)
    assert fake.calls == [("fwd", kernel_d, d ** -0.5, (3, 0))]
    assert out.shape == q.shape and lse.shape == (2, 4, 5) and lse.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


def test_varlen_pads_head_dim_and_slices_back(fake):
    cu_q = torch.tensor([0, 3, 3, 8], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 6, 6], dtype=torch.int32)
    q, k, v = rand(8, 4, 40), rand(6, 1, 40, seed=1), rand(6, 1, 40, seed=2)
    args = (q, k, v, cu_q, cu_k, 5, 4, 0.0, 40 ** -0.5, (-1, 0), 0.0, None)
    out, lse = _cuda.varlen_forward(*args)
    ref, ref_lse, _ = _cpu.varlen_forward(*args)
    assert fake.calls == [("varlen_fwd", 64, 40 ** -0.5, (-1, 0))]
    assert out.shape == q.shape and lse.shape == (4, 8)
    torch.testing.assert_close(out, ref, rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [
    pytest.param((0, 5, 7), id="batch_0"),
    pytest.param((2, 0, 7), id="seqlen_q_0"),
    pytest.param((2, 5, 0), id="seqlen_k_0"),
])
def test_dense_empty_inputs_skip_the_kernel(fake, shape):
    b, sq, sk = shape
    q, k, v = qkv(b=b, sq=sq, sk=sk)
    out, lse = _cuda.dense_forward(q, k, v, 0.0, 0.5, (-1, -1), 0.0, None)
    assert fake.calls == []
    assert out.shape == q.shape and (out == 0).all()
    assert lse.shape == (b, 4, sq) and (lse == float("inf")).all()


def test_varlen_empty_inputs_skip_the_kernel(fake):
    cu = torch.tensor([0, 0], dtype=torch.int32)
    q, k, v = rand(3, 2, 32), rand(0, 2, 32), rand(0, 2, 32)
    out, lse = _cuda.varlen_forward(q, k, v, torch.tensor([0, 3], dtype=torch.int32), cu, 3, 0, 0.0, 1.0,
                                    (-1, -1), 0.0, None)
    assert fake.calls == []
    assert (out == 0).all() and (lse == float("inf")).all() and lse.shape == (2, 3)


def test_head_dim_without_kernel(fake):
    q, k, v = qkv(d=200)
    with pytest.raises(RuntimeError, match="head dim 200"):
        _cuda.dense_forward(q, k, v, 0.0, 1.0, (-1, -1), 0.0, None)


def test_no_extension_names_the_skip_reason(monkeypatch):
    monkeypatch.setattr(build_info, "cuda_extension", lambda: None)
    monkeypatch.setattr(build_info, "build_config", lambda: {"cuda": False, "skip_reason": "nvcc was not found"})
    with pytest.raises(RuntimeError, match="built without CUDA kernels.*nvcc was not found"):
        _cuda.dense_forward(*qkv(), 0.0, 1.0, (-1, -1), 0.0, None)


@pytest.mark.parametrize("feature,kwargs", [
    ("alibi", {"alibi_slopes": torch.ones(4)}),
    ("softcap", {"softcap": 1.0}),
])
def test_feature_not_built(fake, monkeypatch, feature, kwargs):
    monkeypatch.setattr(build_info, "has_feature", lambda name: name != feature)
    args = dict(dropout_p=0.0, softmax_scale=1.0, window=(-1, -1), softcap=0.0, alibi_slopes=None)
    args.update(kwargs)
    with pytest.raises(RuntimeError, match=f"{feature} was requested"):
        _cuda.dense_forward(*qkv(), **args)


def test_dropout_not_supported_yet(fake):
    with pytest.raises(NotImplementedError, match="dropout_p"):
        _cuda.dense_forward(*qkv(), 0.1, 1.0, (-1, -1), 0.0, None)


def test_backward_raises(fake):
    q, k, v = qkv(d=32)
    q.requires_grad_(True)
    out, lse = _cuda.dense_forward(q, k, v, 0.0, 1.0, (-1, -1), 0.0, None)
    assert out.requires_grad and not lse.requires_grad
    with pytest.raises(NotImplementedError, match="flash_attn backward is not implemented yet"):
        out.float().sum().backward()


WINDOWS = [
    # (id, causal, window_size, seqlen_q, seqlen_k, has_alibi, expected)
    ("unbounded", False, (-1, -1), 8, 8, False, (-1, -1)),
    ("causal", True, (-1, -1), 8, 8, False, (-1, 0)),
    ("causal_keeps_left", True, (3, 5), 8, 8, False, (3, 0)),
    ("decode_drops_causal", True, (2, 5), 1, 8, False, (2, 5)),
    ("decode_alibi_keeps_causal", True, (2, 5), 1, 8, True, (2, 0)),
    ("left_past_seqlen_k", False, (8, 2), 4, 8, False, (-1, 2)),
    ("right_past_seqlen_k", False, (2, 9), 4, 8, False, (2, -1)),
    ("just_inside", False, (7, 7), 4, 8, False, (7, 7)),
    ("no_keys", True, (0, 0), 4, 0, False, (-1, -1)),
]


@pytest.mark.parametrize("causal,window,sq,sk,alibi,expected", [w[1:] for w in WINDOWS], ids=[w[0] for w in WINDOWS])
def test_kernel_window(causal, window, sq, sk, alibi, expected):
    assert kernel_window(causal, window, sq, sk, alibi) == expected


def test_default_softmax_scale():
    assert softmax_scale_or_default(None, 20) == 20 ** -0.5
    assert softmax_scale_or_default(0.25, 20) == 0.25
