"""The flash_attn:: custom ops on CPU: registration (torch.library.opcheck), fake
implementations (FakeTensorMode, CPU and CUDA devices, no GPU needed), and
torch.compile(fullgraph=True) of the public API matching eager, forward and gradients.

The CUDA route's Python side under torch.compile is in test_cuda_route_cpu.py; the
CUDA kernels under torch.compile in test_compile_gpu.py.
"""
import pytest
import torch
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensorMode

from flash_attn import _ops, build_info, flash_attn_func, flash_attn_varlen_func

OP_NAMES = ["fwd", "varlen_fwd", "bwd", "varlen_bwd"]


def rand(*shape, dtype=torch.float32, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def cu(lengths):
    return torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(torch.int32)


# (id, q shape, kv shape, alibi shape, (scale, window_left, window_right, softcap))
DENSE_CASES = [
    ("plain", (2, 5, 2, 8), (2, 5, 2, 8), None, (0.35, -1, -1, 0.0)),
    ("causal_gqa_empty_rows", (2, 6, 4, 8), (2, 3, 2, 8), None, (0.35, -1, 0, 0.0)),
    ("window_softcap_alibi", (1, 7, 4, 16), (1, 9, 1, 16), (1, 4), (0.25, 2, 1, 4.0)),
    ("no_keys", (1, 3, 2, 8), (1, 0, 2, 8), None, (0.35, -1, -1, 0.0)),
]
# (id, q lengths, k lengths, seqused_k, tail rows of q past the last sequence, alibi, window, softcap)
VARLEN_CASES = [
    ("uneven_causal", [3, 1, 4], [5, 2, 4], None, 0, False, (-1, 0), 0.0),
    ("empty_seq_alibi_softcap", [2, 0, 3], [4, 3, 0], None, 2, True, (1, 1), 3.0),
    ("seqused_k", [2, 3], [4, 5], [3, 0], 0, False, (-1, -1), 0.0),
]


def dense_args(case, dtype, requires_grad=False):
    _, q_shape, kv_shape, alibi_shape, options = case
    q, k, v = (rand(*s, dtype=dtype, seed=i).requires_grad_(requires_grad)
               for i, s in enumerate((q_shape, kv_shape, kv_shape)))
    alibi = None if alibi_shape is None else torch.rand(alibi_shape, generator=torch.Generator().manual_seed(3))
    return (q, k, v, alibi) + options


def varlen_args(case, dtype, requires_grad=False):
    _, lens_q, lens_k, seqused, tail, alibi, window, softcap = case
    h, hk, d = 4, 2, 8
    q = rand(sum(lens_q) + tail, h, d, dtype=dtype).requires_grad_(requires_grad)
    k, v = (rand(sum(lens_k), hk, d, dtype=dtype, seed=i).requires_grad_(requires_grad) for i in (1, 2))
    seqused_k = None if seqused is None else torch.tensor(seqused, dtype=torch.int32)
    slopes = torch.rand(len(lens_q), h, generator=torch.Generator().manual_seed(3)) if alibi else None
    return (q, k, v, cu(lens_q), cu(lens_k), seqused_k, max(lens_q), max(lens_k), slopes, 0.3) + window + (softcap,)


def bwd_args(op, fwd_args, deterministic=False):
    """The backward op's arguments for a forward call: (dout, q, k, v, out, lse, rest of fwd_args)."""
    out, lse = op(*fwd_args)[:2]
    dout = rand(*out.shape, dtype=out.dtype, seed=7)
    return (dout,) + tuple(fwd_args[:3]) + (out, lse) + tuple(fwd_args[3:]) + (deterministic,)


def _ids(cases):
    return [c[0] for c in cases]


# --- registration ---

def test_ops_are_registered_with_their_schemas():
    for name in OP_NAMES:
        schema = str(getattr(torch.ops.flash_attn, name).default._schema)
        assert schema.startswith(f"flash_attn::{name}(")
    assert str(torch.ops.flash_attn.fwd.default._schema) == (
        "flash_attn::fwd(Tensor q, Tensor k, Tensor v, Tensor? alibi_slopes, float softmax_scale, "
        "SymInt window_left, SymInt window_right, float softcap, bool deterministic=False, float dropout_p=0., "
        "bool return_softmax=False) -> (Tensor, Tensor, Tensor, Tensor)")
    assert str(torch.ops.flash_attn.bwd.default._schema).endswith(
        "float softcap, bool deterministic, float dropout_p=0., Tensor? rng_state=None) -> (Tensor, Tensor, Tensor)")


def _pairs(cases, pairs):
    """(case, dtype) parameters, each with a readable id: every case and every dtype, not all pairs."""
    by_id = {c[0]: c for c in cases}
    return [pytest.param(by_id[name], dtype, id=f"{name}-{str(dtype)[6:]}") for name, dtype in pairs]


F32, F64, BF16 = torch.float32, torch.float64, torch.bfloat16


@pytest.mark.parametrize("case,dtype", _pairs(DENSE_CASES, [
    ("plain", F32), ("causal_gqa_empty_rows", BF16), ("window_softcap_alibi", F64),
    ("window_softcap_alibi", BF16), ("no_keys", F32)]))
def test_opcheck_fwd(case, dtype):
    torch.library.opcheck(_ops.fwd, dense_args(case, dtype, requires_grad=True))


@pytest.mark.parametrize("case,dtype", _pairs(VARLEN_CASES, [
    ("uneven_causal", F32), ("empty_seq_alibi_softcap", F64), ("empty_seq_alibi_softcap", BF16),
    ("seqused_k", F32)]))
def test_opcheck_varlen_fwd(case, dtype):
    torch.library.opcheck(_ops.varlen_fwd, varlen_args(case, dtype, requires_grad=True))


@pytest.mark.parametrize("case,dtype", _pairs(DENSE_CASES, [
    ("causal_gqa_empty_rows", F64), ("window_softcap_alibi", F64), ("window_softcap_alibi", BF16),
    ("no_keys", F32)]))
def test_opcheck_bwd(case, dtype):
    torch.library.opcheck(_ops.bwd, bwd_args(_ops.fwd, dense_args(case, dtype)))


@pytest.mark.parametrize("case,dtype", _pairs(VARLEN_CASES, [
    ("uneven_causal", F64), ("empty_seq_alibi_softcap", BF16), ("seqused_k", F64)]))
def test_opcheck_varlen_bwd(case, dtype):
    torch.library.opcheck(_ops.varlen_bwd, bwd_args(_ops.varlen_fwd, varlen_args(case, dtype)))


def test_bwd_op_equals_autograd_through_the_reference():
    from flash_attn.reference import attention_ref

    q, k, v, alibi, scale, left, right, softcap = dense_args(DENSE_CASES[2], torch.float64, requires_grad=True)
    args = bwd_args(_ops.fwd, (q.detach(), k.detach(), v.detach(), alibi, scale, left, right, softcap))
    grads = _ops.bwd(*args)
    out, _ = attention_ref(q, k, v, scale, False, (left, right), softcap, alibi)
    want = torch.autograd.grad(out, (q, k, v), args[0])
    for g, w in zip(grads, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)


def test_lse_and_alibi_get_no_gradient():
    q, k, v, _, *options = dense_args(DENSE_CASES[2], torch.float64, requires_grad=True)
    alibi = torch.rand(1, 4, dtype=torch.float32, requires_grad=True)
    out, lse, s_dmask, rng_state = _ops.fwd(q, k, v, alibi, *options)
    assert out.requires_grad and not lse.requires_grad and not s_dmask.requires_grad
    assert s_dmask.shape == rng_state.shape == (0,)  # no dropout
    out.sum().backward()
    assert alibi.grad is None and q.grad is not None and k.grad.shape == k.shape


# --- fake tensors ---

def _expect_fwd(q, lse_shape, lse_dtype):
    """out, lse, and without dropout an empty S_dmask and rng_state."""
    return [(tuple(q.shape), q.dtype), (lse_shape, lse_dtype), ((0,), q.dtype), ((0,), torch.int64)]


def _meta(tensors, device):
    assert all(t.device.type == device and t.is_contiguous() for t in tensors)
    return [(tuple(t.shape), t.dtype) for t in tensors]


@pytest.mark.parametrize("device,dtype", [("cpu", torch.float64), ("cpu", torch.bfloat16),
                                          ("cuda", torch.float16), ("cuda", torch.bfloat16)])
def test_fake_shapes(device, dtype):
    """Every op under FakeTensorMode, on CPU and on (fake) CUDA tensors: no kernel runs."""
    lse_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    with FakeTensorMode():
        q = torch.empty(2, 5, 4, 40, device=device, dtype=dtype).transpose(1, 2).transpose(1, 2)
        k = v = torch.empty(2, 7, 2, 40, device=device, dtype=dtype)
        fwd = _ops.fwd(q, k, v, None, 0.3, -1, 0, 0.0)
        assert _meta(fwd, device) == _expect_fwd(q, (2, 4, 5), lse_dtype)
        grads = _ops.bwd(fwd[0], q, k, v, *fwd[:2], None, 0.3, -1, 0, 0.0, True)
        assert _meta(grads, device) == [(tuple(x.shape), dtype) for x in (q, k, v)]

        qv, kv = torch.empty(9, 4, 40, device=device, dtype=dtype), torch.empty(6, 2, 40, device=device, dtype=dtype)
        cu_q = torch.empty(3, dtype=torch.int32, device=device)
        varlen = (qv, kv, kv, cu_q, cu_q, None, 5, 4, None, 0.3, -1, -1, 0.0)
        out = _ops.varlen_fwd(*varlen)
        assert _meta(out, device) == _expect_fwd(qv, (4, 9), lse_dtype)
        grads = _ops.varlen_bwd(out[0], qv, kv, kv, *out[:2], *varlen[3:], False)
        assert _meta(grads, device) == [(tuple(x.shape), dtype) for x in (qv, kv, kv)]


def test_fake_cuda_route_pads_head_dim(monkeypatch):
    """flash_attn_func and flash_attn_varlen_func on fake CUDA tensors: head dim 40 padded to 64
    around the op and sliced back. (Autograd on fake CUDA tensors needs a CUDA build of torch;
    the backward op's fake is checked above.)"""
    monkeypatch.setattr(build_info, "cuda_extension", lambda: object())
    monkeypatch.setattr(build_info, "compiled_head_dims", lambda: [32, 64, 128])
    monkeypatch.setattr(build_info, "has_feature", lambda name: True)
    with FakeTensorMode():
        q = torch.empty(2, 5, 4, 40, device="cuda", dtype=torch.bfloat16)
        k = torch.empty(2, 7, 2, 40, device="cuda", dtype=torch.bfloat16)
        out, lse, _ = flash_attn_func(q, k, k, causal=True, return_attn_probs=True)
        assert out.shape == q.shape and out.device.type == "cuda" and lse.shape == (2, 4, 5)
        assert out.stride() == (5 * 4 * 64, 4 * 64, 64, 1)  # a view of the padded (.., 64) output
        qv, kv = q.flatten(0, 1), k.flatten(0, 1)
        cu_q = torch.empty(3, dtype=torch.int32, device="cuda")
        out, lse, _ = flash_attn_varlen_func(qv, kv, kv, cu_q, cu_q, 5, 7, return_attn_probs=True)
        assert out.shape == qv.shape and out.stride() == (4 * 64, 64, 1) and lse.shape == (4, 10)


# --- torch.compile of the public API ---

class Attention(torch.nn.Module):
    """A small self-attention block: projections around flash_attn_func / flash_attn_varlen_func."""

    def __init__(self, dim=32, heads=4, kv_heads=2, varlen=False):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim, self.varlen = heads, kv_heads, dim // heads, varlen
        torch.manual_seed(0)
        self.qkv = torch.nn.Linear(dim, (heads + 2 * kv_heads) * self.head_dim, dtype=torch.float64)
        self.proj = torch.nn.Linear(heads * self.head_dim, dim, dtype=torch.float64)
        self.slopes = torch.linspace(0.1, 0.8, heads)

    def forward(self, x, cu_seqlens=None, max_seqlen=None):
        q, k, v = self.qkv(x).split([self.heads * self.head_dim] + [self.kv_heads * self.head_dim] * 2, dim=-1)
        shape = x.shape[:-1]
        q = q.unflatten(-1, (self.heads, self.head_dim))
        k, v = (t.unflatten(-1, (self.kv_heads, self.head_dim)) for t in (k, v))
        if self.varlen:
            out, lse, _ = flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
                                                 causal=True, softcap=5.0, alibi_slopes=self.slopes,
                                                 return_attn_probs=True)
        else:
            out, lse, _ = flash_attn_func(q, k, v, causal=True, window_size=(3, -1), softcap=5.0,
                                          alibi_slopes=self.slopes, return_attn_probs=True)
        return self.proj(out.reshape(*shape, -1)), lse


def _run(module, x, *extra):
    x = x.detach().requires_grad_(True)
    y, lse = module(x, *extra)
    (y.square().sum() + lse.sum()).backward()
    grads = [x.grad] + [p.grad.clone() for p in module.parameters()]
    module.zero_grad(set_to_none=True)
    return y, lse, grads


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_compile_fullgraph_matches_eager(backend, varlen):
    torch._dynamo.reset()
    module = Attention(varlen=varlen)
    if varlen:
        x, extra = rand(10, 32, dtype=torch.float64), (cu([4, 1, 5]), 5)
    else:
        x, extra = rand(2, 6, 32, dtype=torch.float64), ()
    compiled = torch.compile(module, fullgraph=True, backend=backend)
    got, want = _run(compiled, x, *extra), _run(module, x, *extra)
    torch.testing.assert_close(got[0], want[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got[1], want[1], rtol=1e-12, atol=1e-12)
    for g, w in zip(got[2], want[2]):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_compiled_graph_calls_the_ops():
    """With aot_eager the traced forward and backward graphs hold the custom ops, not the
    reference's aten ops (the ops are opaque to the compiler)."""
    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        from functorch.compile import make_boxed_func
        from torch._dynamo.backends.common import aot_autograd

        def keep(gm, _):
            graphs.append(str(gm.graph))
            return make_boxed_func(gm.forward)
        return aot_autograd(fw_compiler=keep, bw_compiler=keep)(gm, example_inputs)

    q = rand(1, 4, 2, 8, dtype=torch.float64).requires_grad_(True)
    out = torch.compile(lambda q: flash_attn_func(q, q, q, causal=True), fullgraph=True, backend=backend)(q)
    out.sum().backward()
    assert len(graphs) == 2
    assert "flash_attn.fwd" in graphs[0] and "flash_attn.bwd" in graphs[1]
    assert "einsum" not in graphs[0] + graphs[1]


def test_gradcheck_through_compiled_api():
    torch._dynamo.reset()
    q = rand(1, 4, 2, 6, dtype=torch.float64).requires_grad_(True)
    k, v = (rand(1, 5, 1, 6, dtype=torch.float64, seed=s).requires_grad_(True) for s in (1, 2))
    slopes = torch.tensor([0.2, 0.5])

    def attention(q, k, v):
        return flash_attn_func(q, k, v, causal=True, softcap=2.0, alibi_slopes=slopes)
    assert torch.autograd.gradcheck(torch.compile(attention, fullgraph=True, backend="aot_eager"), (q, k, v))


@pytest.mark.parametrize("case", VARLEN_CASES[:2], ids=_ids(VARLEN_CASES[:2]))
def test_gradcheck_varlen(case):
    q, k, v, cu_q, cu_k, _, max_q, max_k, slopes, scale, left, right, softcap = varlen_args(
        case, torch.float64, requires_grad=True)

    def attention(q, k, v):
        return flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, softmax_scale=scale,
                                      window_size=(left, right), softcap=softcap, alibi_slopes=slopes)
    assert torch.autograd.gradcheck(attention, (q, k, v), fast_mode=True)


def test_gradient_flows_through_padding_and_slicing():
    """Differentiable ops around the ops (as the CUDA route's head-dim padding) carry the gradient."""
    q = rand(1, 3, 2, 5, dtype=torch.float64).requires_grad_(True)

    def padded(q):
        out = _ops.fwd(F.pad(q, (0, 3)), F.pad(q, (0, 3)), F.pad(q, (0, 3)), None, 5 ** -0.5, -1, -1, 0.0)[0]
        return out[..., :5]
    assert torch.autograd.gradcheck(padded, (q,))
    torch.testing.assert_close(padded(q), flash_attn_func(q, q, q), rtol=1e-12, atol=1e-12)
