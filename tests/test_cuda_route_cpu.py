"""The CUDA route's Python side, run on CPU against a fake flash_attn_2_cuda.

The fake checks the extension contract (compiled head dim, unit last stride,
out=None, fp32 contiguous ALiBi, int32 cu_seqlens) and computes with the
reference, so head-dim padding, slicing, empty inputs, build checks and the
autograd routing (with and without an extension backward) are all exercised
without a GPU. While the `fake` fixture is active, the flash_attn:: ops run their
CUDA kernels (flash_attn._cuda) for CPU tensors.
"""
import pytest
import torch

from flash_attn import _cpu, _cuda, _ops, build_info
from flash_attn._normalize import kernel_window, softmax_scale_or_default
from flash_attn.reference import attention_ref, attention_varlen_ref

HEAD_DIMS = [32, 64, 128]


class FakeExtension:
    """Stands in for flash_attn_2_cuda; records every call. With dropout it computes with the
    kernels' mask (the CPU ops' kernels, whose rng_state comes from the CPU generator) and
    returns [out, lse, S_dmask or None, rng_state] like the extension."""

    def __init__(self):
        self.calls = []

    def fwd(self, q, k, v, out, alibi_slopes, softmax_scale, window_size_left, window_size_right, softcap,
            p_dropout=0.0, return_softmax=False, gen=None):
        self._check(q, k, v, out, alibi_slopes)
        self._check_dropout(p_dropout, return_softmax, softcap, gen)
        self.calls.append(("fwd", q.shape[-1], softmax_scale, (window_size_left, window_size_right)))
        out, lse, s_dmask, rng_state = _cpu.fwd(q, k, v, alibi_slopes, softmax_scale, window_size_left,
                                                window_size_right, softcap, False, p_dropout, return_softmax)
        self.rng_state = rng_state
        return [out, lse, s_dmask if return_softmax else None, rng_state]

    def varlen_fwd(self, q, k, v, out, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k,
                   alibi_slopes, softmax_scale, window_size_left, window_size_right, softcap, p_dropout=0.0,
                   return_softmax=False, gen=None):
        self._check(q, k, v, out, alibi_slopes)
        self._check_dropout(p_dropout, return_softmax, softcap, gen)
        for cu in (cu_seqlens_q, cu_seqlens_k):
            assert cu.dtype == torch.int32 and cu.is_contiguous()
        assert seqused_k is None and type(max_seqlen_q) is int and type(max_seqlen_k) is int
        self.calls.append(("varlen_fwd", q.shape[-1], softmax_scale, (window_size_left, window_size_right)))
        out, lse, s_dmask, rng_state = _cpu.varlen_fwd(
            q, k, v, cu_seqlens_q, cu_seqlens_k, None, max_seqlen_q, max_seqlen_k, alibi_slopes, softmax_scale,
            window_size_left, window_size_right, softcap, False, p_dropout, return_softmax)
        self.rng_state = rng_state
        return [out, lse, s_dmask if return_softmax else None, rng_state]

    @staticmethod
    def _check_dropout(p_dropout, return_softmax, softcap, gen):
        """The extension's dropout contract (flash_api.cpp check_dropout_args)."""
        assert type(p_dropout) is float and 0.0 <= p_dropout < 1.0 and type(return_softmax) is bool
        assert gen is None and (not return_softmax or p_dropout > 0)
        if softcap > 0 and p_dropout > 0:
            raise NotImplementedError("flash_attn: softcap with dropout is not supported (as in flash-attn)")

    @staticmethod
    def _check(q, k, v, out, alibi_slopes):
        assert out is None
        assert q.shape[-1] in HEAD_DIMS and k.shape[-1] == v.shape[-1] == q.shape[-1]
        assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
        if alibi_slopes is not None:
            assert alibi_slopes.dtype == torch.float32 and alibi_slopes.is_contiguous()


class FakeExtensionWithBackward(FakeExtension):
    """FakeExtension with bwd / varlen_bwd: the reference's gradients (dk, dv reduced over
    each kv head's query heads), after checking the backward's extension contract."""

    def bwd(self, dout, q, k, v, out, softmax_lse, dq, dk, dv, alibi_slopes, softmax_scale, window_size_left,
            window_size_right, softcap, deterministic, p_dropout=0.0, rng_state=None):
        self._check_bwd(dout, q, k, v, out, softmax_lse, (dq, dk, dv), alibi_slopes, deterministic, p_dropout,
                        rng_state)
        self.calls.append(("bwd", q.shape[-1], softmax_scale, (window_size_left, window_size_right)))
        self.deterministic = deterministic
        grads = _cpu.bwd(dout, q, k, v, out, softmax_lse, alibi_slopes, softmax_scale, window_size_left,
                         window_size_right, softcap, deterministic, p_dropout, rng_state)
        return list(grads) + [torch.zeros_like(softmax_lse)]

    def varlen_bwd(self, dout, q, k, v, out, softmax_lse, dq, dk, dv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                   max_seqlen_k, alibi_slopes, softmax_scale, window_size_left, window_size_right, softcap,
                   deterministic, p_dropout=0.0, rng_state=None):
        self._check_bwd(dout, q, k, v, out, softmax_lse, (dq, dk, dv), alibi_slopes, deterministic, p_dropout,
                        rng_state)
        assert type(max_seqlen_q) is int and type(max_seqlen_k) is int
        self.calls.append(("varlen_bwd", q.shape[-1], softmax_scale, (window_size_left, window_size_right)))
        grads = _cpu.varlen_bwd(dout, q, k, v, out, softmax_lse, cu_seqlens_q, cu_seqlens_k, None, max_seqlen_q,
                                max_seqlen_k, alibi_slopes, softmax_scale, window_size_left, window_size_right,
                                softcap, deterministic, p_dropout, rng_state)
        return list(grads) + [torch.zeros_like(softmax_lse)]

    def _check_bwd(self, dout, q, k, v, out, lse, grads, alibi_slopes, deterministic, p_dropout, rng_state):
        self._check(q, k, v, None, alibi_slopes)
        assert grads == (None, None, None) and type(deterministic) is bool
        assert dout.shape == out.shape == q.shape and dout.stride(-1) == 1 and lse.dtype == torch.float32
        # with dropout: the forward's rng_state comes back (the real extension reads it on the GPU)
        assert (rng_state is None) == (p_dropout == 0.0)
        if rng_state is not None:
            assert rng_state.dtype == torch.int64 and rng_state.shape == (2,)
            self.bwd_rng_state = rng_state


# What each op runs on CPU tensors while a fake extension stands in: its CUDA kernel.
_OP_KERNELS = [(_ops.fwd, _cuda.fwd, _cpu.fwd), (_ops.varlen_fwd, _cuda.varlen_fwd, _cpu.varlen_fwd),
               (_ops.bwd, _cuda.bwd, _cpu.bwd), (_ops.varlen_bwd, _cuda.varlen_bwd, _cpu.varlen_bwd)]


def _install(monkeypatch, ext):
    monkeypatch.setattr(build_info, "cuda_extension", lambda: ext)
    monkeypatch.setattr(build_info, "compiled_head_dims", lambda: list(HEAD_DIMS))
    monkeypatch.setattr(build_info, "has_feature", lambda name: True)
    for op, cuda_kernel, _ in _OP_KERNELS:
        op.register_kernel("cpu", cuda_kernel)
    yield ext
    for op, _, cpu_kernel in _OP_KERNELS:
        op.register_kernel("cpu", cpu_kernel)


@pytest.fixture
def fake(monkeypatch):
    yield from _install(monkeypatch, FakeExtension())


@pytest.fixture
def fake_bwd(monkeypatch):
    yield from _install(monkeypatch, FakeExtensionWithBackward())


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
    out, lse, _ = _cuda.dense_forward(*args)
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
    out, lse, _ = _cuda.varlen_forward(*args)
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
    out, lse, _ = _cuda.dense_forward(q, k, v, 0.0, 0.5, (-1, -1), 0.0, None)
    assert fake.calls == []
    assert out.shape == q.shape and (out == 0).all()
    assert lse.shape == (b, 4, sq) and (lse == float("inf")).all()


def test_varlen_empty_inputs_skip_the_kernel(fake):
    cu = torch.tensor([0, 0], dtype=torch.int32)
    q, k, v = rand(3, 2, 32), rand(0, 2, 32), rand(0, 2, 32)
    out, lse, _ = _cuda.varlen_forward(q, k, v, torch.tensor([0, 3], dtype=torch.int32), cu, 3, 0, 0.0, 1.0,
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
    ("dropout", {"dropout_p": 0.1}),
])
def test_feature_not_built(fake, monkeypatch, feature, kwargs):
    monkeypatch.setattr(build_info, "has_feature", lambda name: name != feature)
    args = dict(dropout_p=0.0, softmax_scale=1.0, window=(-1, -1), softcap=0.0, alibi_slopes=None)
    args.update(kwargs)
    with pytest.raises(RuntimeError, match=f"{feature} was requested"):
        _cuda.dense_forward(*qkv(), **args)


@pytest.mark.parametrize("route", ["dense", "varlen"])
def test_softcap_with_dropout_is_refused(fake, route):
    """As flash-attn: a clear NotImplementedError before any kernel runs (dropout kernels have
    no softcap)."""
    q, k, v = qkv(d=32)
    with pytest.raises(NotImplementedError, match="softcap with dropout is not supported"):
        if route == "dense":
            _cuda.dense_forward(q, k, v, 0.1, 1.0, (-1, -1), 2.0, None)
        else:
            cu_q, cu_k = (torch.tensor([0, n, 2 * n], dtype=torch.int32) for n in (5, 7))
            _cuda.varlen_forward(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, 5, 7, 0.1, 1.0,
                                 (-1, -1), 2.0, None)
    assert fake.calls == []


def test_backward_without_extension_bwd_raises(fake):
    q, k, v = qkv(d=32)
    q.requires_grad_(True)
    out, lse, _ = _cuda.dense_forward(q, k, v, 0.0, 1.0, (-1, -1), 0.0, None)
    assert out.requires_grad and not lse.requires_grad
    with pytest.raises(NotImplementedError, match="flash_attn_2_cuda has no bwd"):
        out.float().sum().backward()


@pytest.mark.parametrize("d,kernel_d", [(20, 32), (64, 64)])
@pytest.mark.parametrize("deterministic", [False, True])
def test_dense_backward_pads_and_matches_cpu(fake_bwd, d, kernel_d, deterministic):
    q, k, v = (x.float().requires_grad_(True) for x in qkv(d=d))
    alibi = torch.rand(2, 4)
    args = (0.0, d ** -0.5, (2, 0), 3.0, alibi)
    dout = rand(2, 5, 4, d, seed=3).float()
    out, lse, _ = _cuda.dense_forward(q, k, v, *args, deterministic)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    assert fake_bwd.calls == [("fwd", kernel_d, d ** -0.5, (2, 0)), ("bwd", kernel_d, d ** -0.5, (2, 0))]
    assert fake_bwd.deterministic is deterministic
    ref, _, _ = _cpu.dense_forward(q, k, v, *args)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    for g, r in zip(grads, ref_grads):
        assert g.shape == r.shape
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)


def test_varlen_backward_pads_and_matches_cpu(fake_bwd):
    cu_q = torch.tensor([0, 3, 3, 8], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 6, 6], dtype=torch.int32)
    q, k, v = (x.float().requires_grad_(True) for x in (rand(8, 4, 40), rand(6, 2, 40, seed=1),
                                                        rand(6, 2, 40, seed=2)))
    args = (q, k, v, cu_q, cu_k, 5, 4, 0.0, 40 ** -0.5, (-1, 0), 0.0, None)
    out, _, _ = _cuda.varlen_forward(*args)
    out.sum().backward()
    grads = [x.grad for x in (q, k, v)]
    assert [c[0] for c in fake_bwd.calls] == ["varlen_fwd", "varlen_bwd"]
    q.grad = k.grad = v.grad = None
    _cpu.varlen_forward(*args)[0].sum().backward()
    for g, x in zip(grads, (q, k, v)):
        torch.testing.assert_close(g, x.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_padding_uses_the_forward_kernel_head_dim(fake_bwd, monkeypatch, requires_grad):
    """Training or not, the forward runs at the smallest compiled head dim (the extension pads
    the backward to a head dim with a backward kernel itself)."""
    q, k, v = qkv(d=20)
    _cuda.dense_forward(q.requires_grad_(requires_grad), k, v, 0.0, 1.0, (-1, -1), 0.0, None)
    assert fake_bwd.calls == [("fwd", 32, 1.0, (-1, -1))]


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_cuda_route_compiles_without_graph_breaks(fake_bwd, backend):
    """The route (build checks, padding, op, slicing) traced with fullgraph=True; the op runs
    its CUDA kernel (fake extension) in the compiled graph, forward and backward."""
    torch._dynamo.reset()

    def attention(q, k, v, cu_q, cu_k):
        dense = _cuda.dense_forward(q, k, v, 0.0, 0.3, (-1, 0), 0.0, None)[0]
        varlen = _cuda.varlen_forward(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, 5, 7,
                                      0.0, 0.3, (2, -1), 0.0, None)[0]
        return dense.sum() + varlen.sum()

    cu_q, cu_k = (torch.tensor([0, n, 2 * n], dtype=torch.int32) for n in (5, 7))
    inputs = [x.float().requires_grad_(True) for x in qkv(d=20)]
    compiled = torch.compile(attention, fullgraph=True, backend=backend)
    got = torch.autograd.grad(compiled(*inputs, cu_q, cu_k), inputs)
    kernels = sorted({c[0] for c in fake_bwd.calls})
    assert kernels == ["bwd", "fwd", "varlen_bwd", "varlen_fwd"] and {c[1] for c in fake_bwd.calls} == {32}
    want = torch.autograd.grad(attention(*inputs, cu_q, cu_k), inputs)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_opcheck_cuda_kernels(fake_bwd):
    """The ops' CUDA kernels (run here for CPU tensors) agree with the fakes: shapes, dtypes, strides."""
    q, k, v = (x.float().requires_grad_(True) for x in qkv(d=32))
    dense = (q, k, v, torch.rand(2, 4), 0.3, 2, 0, 0.0)
    torch.library.opcheck(_ops.fwd, dense)
    cu_q, cu_k = (torch.tensor([0, n, 2 * n], dtype=torch.int32) for n in (5, 7))
    varlen = (q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, None, 5, 7, None, 0.3, -1, 0, 0.0)
    torch.library.opcheck(_ops.varlen_fwd, varlen)
    assert {c[0] for c in fake_bwd.calls} == {"fwd", "varlen_fwd", "bwd", "varlen_bwd"}


def test_backward_of_empty_inputs_skips_the_kernel(fake_bwd):
    q, k, v = (x.float().requires_grad_(True) for x in qkv(sk=0, d=32))
    out = _cuda.dense_forward(q, k, v, 0.0, 1.0, (-1, -1), 0.0, None)[0]
    out.sum().backward()
    assert [c[0] for c in fake_bwd.calls] == []
    assert (q.grad == 0).all() and k.grad.shape == k.shape


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
