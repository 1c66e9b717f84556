"""torch.compile and opcheck of the CUDA kernels behind the flash_attn:: custom ops (GPU).

- flash_attn_func / flash_attn_varlen_func compiled with fullgraph=True (default
  inductor backend) give what eager gives, forward (always) and forward + backward
  (when the extension has bwd / varlen_bwd); head dims that need padding included.
- torch.library.opcheck of the CUDA kernels of the forward ops, and of the backward
  ops when the extension has them (otherwise the autograd-related checks are left out).

Every test is marked `cuda` and skips without a GPU or the compiled extension;
FLASH_ATTN_REQUIRE_CUDA=1 turns those skips into failures (as in test_flash_attn_gpu.py).
"""

import pytest
import torch
from gpu_env import gpu_marks, unavailable_reason

from flash_attn import _ops, build_info, flash_attn_func, flash_attn_varlen_func

UNAVAILABLE = unavailable_reason()
pytestmark = gpu_marks(UNAVAILABLE)


def _has_backward():
    ext = build_info.cuda_extension()
    return hasattr(ext, "bwd") and hasattr(ext, "varlen_bwd")


def _require_backward():
    if not _has_backward():
        pytest.skip("the extension has no bwd / varlen_bwd")


def _dtype():
    return torch.bfloat16 if "bf16" in build_info.build_config().get("dtypes", []) else torch.float16


def _kernel_dim():
    """A compiled head dim (64 when there is one)."""
    dims = sorted(build_info.compiled_head_dims())
    if not dims:
        pytest.skip("no compiled head dims")
    return 64 if 64 in dims else dims[0]


# "exact": a compiled head dim; "padded": 8 less, padded around the op and sliced back
HEAD_DIMS = ["exact", "padded"]


def _head_dim(which):
    d = _kernel_dim()
    if which == "padded":
        if d <= 8:
            pytest.skip(f"kernel head dim {d} leaves no smaller head dim to pad")
        return d - 8
    return d


def _randn(*shape, seed, requires_grad=False):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(*shape, device="cuda", dtype=torch.float32, generator=gen).to(_dtype())
    return x.requires_grad_(requires_grad)


def _dense(d, requires_grad=False):
    return (_randn(2, 129, 4, d, seed=0, requires_grad=requires_grad),
            _randn(2, 200, 2, d, seed=1, requires_grad=requires_grad),
            _randn(2, 200, 2, d, seed=2, requires_grad=requires_grad))


def _varlen(d, requires_grad=False):
    lens_q, lens_k = [37, 0, 91, 1], [64, 17, 120, 5]
    cu = [torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32) for lens in (lens_q, lens_k)]
    q = _randn(sum(lens_q), 4, d, seed=3, requires_grad=requires_grad)
    k, v = (_randn(sum(lens_k), 2, d, seed=s, requires_grad=requires_grad) for s in (4, 5))
    return (q, k, v, cu[0], cu[1], max(lens_q), max(lens_k))


def _dense_attention(q, k, v):
    out, lse, _ = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    return out, lse


def _varlen_attention(q, k, v, cu_q, cu_k, max_q, max_k):
    out, lse, _ = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max_q, max_k, window_size=(48, 16),
                                         return_attn_probs=True)
    return out, lse


CALLS = [pytest.param(_dense_attention, _dense, id="dense"), pytest.param(_varlen_attention, _varlen, id="varlen")]


@pytest.mark.parametrize("which", HEAD_DIMS)
@pytest.mark.parametrize("attention,inputs", CALLS)
def test_compile_forward_matches_eager(attention, inputs, which):
    torch._dynamo.reset()
    args = inputs(_head_dim(which))
    with torch.no_grad():
        want = attention(*args)
        got = torch.compile(attention, fullgraph=True)(*args)
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w)


@pytest.mark.parametrize("which", HEAD_DIMS)
@pytest.mark.parametrize("attention,inputs", CALLS)
def test_compile_backward_matches_eager(attention, inputs, which):
    _require_backward()
    torch._dynamo.reset()
    args = inputs(_head_dim(which), requires_grad=True)
    tensors = args[:3]
    dout = _randn(*args[0].shape, seed=9)

    def grads(fn):
        out, _ = fn(*args)
        return (out,) + torch.autograd.grad(out, tensors, dout)
    want = grads(attention)
    got = grads(torch.compile(attention, fullgraph=True))
    for g, w in zip(got, want):
        assert g.shape == w.shape and g.dtype == w.dtype
        torch.testing.assert_close(g, w)


def test_opcheck_cuda_ops():
    """opcheck of the ops' CUDA kernels; the autograd checks only when the extension has a backward."""
    d, backward = _kernel_dim(), _has_backward()
    utils = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    if not backward:
        utils = ("test_schema", "test_faketensor")
    q, k, v = _dense(d, requires_grad=backward)
    dense = (q, k, v, None, d ** -0.5, -1, 0, 0.0)
    torch.library.opcheck(_ops.fwd, dense, test_utils=utils)
    q, k, v, cu_q, cu_k, max_q, max_k = _varlen(d, requires_grad=backward)
    varlen = (q, k, v, cu_q, cu_k, None, max_q, max_k, None, d ** -0.5, 48, 16, 0.0)
    torch.library.opcheck(_ops.varlen_fwd, varlen, test_utils=utils)
    if not backward:
        return
    for op, backward_op, args in ((_ops.fwd, _ops.bwd, dense), (_ops.varlen_fwd, _ops.varlen_bwd, varlen)):
        detached = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
        out, lse = op(*detached)[:2]
        dout = _randn(*out.shape, seed=9)
        torch.library.opcheck(backward_op, (dout,) + detached[:3] + (out, lse) + detached[3:] + (True,))
