"""masked_linear_attention's CUDA route (flash_attn/linear_attn/_masked.py) run on the CPU, with
tests/masked_ext_model.py (a float64 model of the masked launchers) in place of the extension:
the operands and their roles in the four masked_attn passes, the transposed mask of dk / dv,
MQA head groups, head-dim padding, bool masks, and the mask gradient summed over broadcast
dimensions, against flash_attn.reference_linear through autograd. The kernels themselves are
compared with the same model in tests/test_masked_linear_gpu.py."""
import pytest
import torch

import flash_attn.linear_attn as la
from flash_attn.linear_attn import _kernels
from flash_attn.reference_linear import causal_decay_mask, masked_linear_attention_ref
from masked_ext_model import MaskedExtModel

F64 = torch.float64


class CountingModel(MaskedExtModel):
    def __init__(self):
        self.calls = []

    def masked_attn(self, *args):
        self.calls.append("masked_attn")
        return super().masked_attn(*args)

    def masked_mask_grad(self, *args):
        self.calls.append("masked_mask_grad")
        return super().masked_mask_grad(*args)


@pytest.fixture
def model(route_to_model):
    """CPU tensors take the CUDA route, whose extension is the model (float64 inputs too)."""
    return route_to_model(CountingModel())


def make(B, T, H, HK, K, V, mask_shape, seed=0, mask_dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, K, generator=gen, dtype=F64)
    k = torch.randn(B, T, HK, K, generator=gen, dtype=F64)
    v = torch.randn(B, T, HK, V, generator=gen, dtype=F64)
    mask = torch.rand(tuple(mask_shape), generator=gen, dtype=F64).to(mask_dtype)
    return q, k, v, mask


def grads(fn, inputs, w):
    leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    o = fn(*leaves)
    (o.double() * w).sum().backward()
    return o, [x.grad for x in leaves]


def close(a, b, tol=1e-10):
    """float64 inputs: only the mask gradient rounds on the route (its buffer is fp32): 1e-6 there."""
    assert a.shape == b.shape, (a.shape, b.shape)
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    err = ((a.double() - b.double()).pow(2).mean().sqrt() / b.double().pow(2).mean().sqrt().clamp_min(1e-30)).item()
    assert err < tol, err


B, T, H = 2, 70, 4
MASK_SHAPES = [(T, T), (B, H, T, T), (1, H, T, T), (B, 1, T, T), (B, H, 1, T), (H, T, 1), (1, 1, 1, 1), ()]


@pytest.mark.parametrize("mask_shape", MASK_SHAPES, ids=[f"mask{list(s)}" for s in MASK_SHAPES])
@pytest.mark.parametrize("HK", [4, 2, 1], ids=lambda h: f"HK{h}")
def test_forward_and_gradients(model, mask_shape, HK):
    q, k, v, mask = make(B, T, H, HK, 64, 128, mask_shape)
    w = torch.randn(B, T, H, 128, dtype=F64)
    o, got = grads(lambda *x: la.masked_linear_attention(*x, scale=0.3), (q, k, v, mask), w)
    o_ref, ref = grads(lambda *x: masked_linear_attention_ref(*x, scale=0.3), (q, k, v, mask), w)
    close(o, o_ref)
    for name, a, b in zip(("dq", "dk", "dv", "dmask"), got, ref):
        assert a is not None, name
        close(a, b, 1e-6 if name == "dmask" else 1e-10)
    assert model.calls == ["masked_attn"] * 4 + ["masked_mask_grad"]


@pytest.mark.parametrize("T_,K,V", [(1, 16, 24), (5, 100, 64), (65, 64, 256), (64, 256, 32)],
                         ids=lambda x: str(x))
def test_head_dims_are_padded(model, T_, K, V):
    q, k, v, mask = make(1, T_, 2, 1, K, V, (2, T_, T_))
    w = torch.randn(1, T_, 2, V, dtype=F64)
    o, got = grads(la.masked_linear_attention, (q, k, v, mask), w)
    o_ref, ref = grads(masked_linear_attention_ref, (q, k, v, mask), w)
    close(o, o_ref)
    for a, b, tol in zip(got, ref, (1e-10, 1e-10, 1e-10, 1e-6)):
        close(a, b, tol)


def test_bool_mask(model):
    q, k, v, _ = make(B, T, H, 2, 64, 64, (T, T))
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    w = torch.randn(B, T, H, 64, dtype=F64)
    o, got = grads(la.masked_linear_attention, (q, k, v, causal), w)
    o_ref, ref = grads(masked_linear_attention_ref, (q, k, v, causal), w)
    close(o, o_ref)
    for a, b in zip(got[:3], ref[:3]):
        close(a, b)
    assert got[3] is None


def test_decay_mask_equals_simple_gla(model):
    q, k, v, _ = make(B, T, H, H, 64, 64, (T, T))
    g = torch.nn.functional.logsigmoid(torch.randn(B, T, H, dtype=F64))
    o = la.masked_linear_attention(q, k, v, causal_decay_mask(g))
    from flash_attn.reference_linear import linear_attn_recurrent_ref
    close(o, linear_attn_recurrent_ref(q, k, v, g=g)[0])


def test_strided_masks_are_not_copied_and_get_their_gradient(model):
    """A transposed mask and an expanded one: the route hands the kernels views; the gradient
    has the mask's shape (and flows back through the view)."""
    q, k, v, _ = make(B, T, H, H, 64, 64, (T, T))
    base = torch.rand(T, T, dtype=F64, requires_grad=True)
    base_ref = base.detach().clone().requires_grad_(True)
    w = torch.randn(B, T, H, 64, dtype=F64)
    for make_mask in (lambda m: m.t(), lambda m: m.expand(B, H, T, T), lambda m: m[::2, ::2].repeat(2, 2)):
        base.grad = base_ref.grad = None
        (la.masked_linear_attention(q, k, v, make_mask(base)) * w).sum().backward()
        (masked_linear_attention_ref(q, k, v, make_mask(base_ref)) * w).sum().backward()
        close(base.grad, base_ref.grad, 1e-6)


def test_mask_dtype_differs_from_inputs(model):
    q, k, v, mask = make(1, T, 2, 2, 64, 64, (1, 2, T, T), mask_dtype=torch.float32)
    mask.requires_grad_(True)
    o = la.masked_linear_attention(q, k, v, mask)
    close(o, masked_linear_attention_ref(q, k, v, mask))
    o.sum().backward()
    assert mask.grad.dtype == torch.float32 and mask.grad.shape == mask.shape


def test_only_the_needed_passes_run(model):
    q, k, v, mask = make(B, T, H, 2, 64, 64, (T, T))
    la.masked_linear_attention(q, k, v, mask.requires_grad_(True)).sum().backward()
    assert model.calls == ["masked_attn", "masked_mask_grad"]
    model.calls.clear()
    la.masked_linear_attention(q, k.requires_grad_(True), v, mask.detach()).sum().backward()
    assert model.calls == ["masked_attn", "masked_attn"]


def test_gradcheck_through_the_route(model):
    q, k, v, mask = (x.requires_grad_(True) for x in make(1, 9, 2, 1, 8, 8, (1, 2, 1, 9)))
    assert torch.autograd.gradcheck(la.masked_linear_attention, (q, k, v, mask), fast_mode=True)


def test_empty_sequences_run_the_reference(model):
    q, k, v, mask = make(2, 0, 2, 1, 8, 8, (0, 0))
    o = la.masked_linear_attention(q, k, v, mask)
    assert o.shape == (2, 0, 2, 8) and model.calls == []


def test_missing_extension_raises(monkeypatch):
    monkeypatch.setattr(_kernels, "extension", lambda: None)
    monkeypatch.setattr(_kernels, "on_kernel_device", lambda x: True)
    q, k, v, mask = make(1, 8, 1, 1, 64, 64, (8, 8))
    with pytest.raises(NotImplementedError, match="masked_linear_attention: the CUDA linear-attention kernels are "
                                                  "not available"):
        la.masked_linear_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)
