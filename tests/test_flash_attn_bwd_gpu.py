"""GPU backward tests: the extension's bwd / varlen_bwd against autograd through the
fp32 reference.

Rule (shared/TESTING.md, gradients): max |dx - dx_ref32| <= 3 * max |dx_pt - dx_ref32| + eps,
where dx_pt is autograd through the same reference run in the input precision. The
kernels are called directly (forward `fwd`, then `bwd` with the forward's out and lse),
so this checks the kernels whatever the Python autograd wiring does. Gradient
buffers handed to the extension are NaN-poisoned.

Environment: FLASH_ATTN_TEST_QUICK=1 (subset), FLASH_ATTN_REQUIRE_CUDA=1 (fail, not skip,
when the extension or its backward is missing).
"""
import itertools
import os

import pytest
import torch

from flash_attn import build_info
from flash_attn.reference import attention_ref, attention_varlen_ref
from gpu_env import QUICK, gpu_marks, require_compiled, unavailable_reason

UNAVAILABLE = unavailable_reason(need_backward=True)
pytestmark = gpu_marks(UNAVAILABLE)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def _kernel_dim(d):
    """The head dim flash_api.cpp runs the backward of d at (64, 128 or 256), or a skip when
    this build lacks that kernel."""
    built = sorted(build_info.build_config().get("backward_head_dims", []))
    k = 64 if d <= 64 else 128 if d <= 128 else 256
    if k not in built:
        pytest.skip(f"no backward kernel for head dim {d} (runs at {k}) in this build ({built})")
    return k


def _pad(x, d):
    return torch.nn.functional.pad(x, (0, d - x.shape[-1])) if x.shape[-1] != d else x


def _window(mask, sq, sk):
    """(window for the reference, window for the kernel: causal folded in, -1 unbounded)."""
    if mask == "causal":
        return (-1, 0), (-1, 0)
    if mask == "window":
        return (37, 19), (37, 19)
    return (-1, -1), (-1, -1)


def _ref_grads(q, k, v, dout, upcast, **kw):
    qs, ks, vs = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
    out, _ = attention_ref(qs, ks, vs, upcast=upcast, **kw)
    out.backward(dout)
    return qs.grad, ks.grad, vs.grad


def _check(name, got, ref32, ref_pt):
    assert torch.isfinite(got).all(), f"{name}: non-finite gradient"
    err = (got.float() - ref32.float()).abs().max().item()
    bound = 3 * (ref_pt.float() - ref32.float()).abs().max().item() + 1e-4
    assert err <= bound, f"{name}: max err {err:.3e} > allowed {bound:.3e}"


SEQLENS = [(1, 1), (113, 203), (128, 217), (256, 512), (512, 256), (1023, 1024)]
CASES = [
    pytest.param(dt, d, mask, alibi, softcap, ratio, sl,
                 id=f"{dt}-d{d}-{mask}-{'alibi' if alibi else 'noalibi'}-{'cap' if softcap else 'nocap'}-g{ratio}-{sl[0]}x{sl[1]}")
    for dt, d, mask, alibi, softcap, ratio, sl in itertools.product(
        DTYPES, (32, 59, 64, 96, 128, 160, 192, 256), ("full", "causal", "window"), (False, True), (False, True),
        (1, 4), SEQLENS)
    if not QUICK or (d in (64, 128, 256) and sl in ((113, 203), (512, 256)) and ratio == (4 if alibi else 1))
]


def _runs_sm90_code():
    archs = [str(a) for a in build_info.build_config().get("archs", [])]
    return torch.cuda.get_device_capability() == (9, 0) and "90" in archs


def _expected_dk_dv_kernel(kernel_dim):
    """90 where the wgmma dK/dV kernel must run (an sm90 device, a build with sm90 code, and
    FLASH_ATTN_BWD_SM90 not "0" where the build kept the mma.sync kernels in sm90 code), else
    80 (the mma.sync kernel)."""
    kept = build_info.build_config().get("sm90_mma_sync_bwd", False)
    enabled = not kept or os.environ.get("FLASH_ATTN_BWD_SM90") != "0"
    return 90 if _runs_sm90_code() and enabled and kernel_dim in (64, 128, 256) else 80


# deterministic=False: dQ accumulated with atomics in the dK/dV kernel (the default);
# True: the separate dQ kernel, no atomics.
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype_name,d,mask,alibi,softcap,ratio,seqlens", CASES)
def test_bwd_matches_reference(dtype_name, d, mask, alibi, softcap, ratio, seqlens, deterministic):
    _check_case(dtype_name, d, mask, alibi, softcap, ratio, seqlens, deterministic)


# On sm90 the cases above run the wgmma kernels; these run the mma.sync kernels there too (what
# sm80 runs), in a build that kept them in sm90 code (FLASH_ATTN_SM90_MMA_SYNC_BWD=1).
MMA_SYNC_CASES = [
    pytest.param(dt, d, mask, alibi, softcap, 1, sl, id=f"{dt}-d{d}-{mask}-a{int(alibi)}-c{int(softcap)}-{sl[0]}x{sl[1]}")
    for dt, d, mask, (alibi, softcap), sl in itertools.product(
        DTYPES, (64, 128, 256), ("full", "causal", "window"), ((False, False), (True, True)),
        ((113, 203), (1023, 1024)))
]


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype_name,d,mask,alibi,softcap,ratio,seqlens", MMA_SYNC_CASES)
def test_bwd_mma_sync_kernel_matches_reference(dtype_name, d, mask, alibi, softcap, ratio, seqlens,
                                               deterministic, monkeypatch):
    if _runs_sm90_code() and not build_info.build_config().get("sm90_mma_sync_bwd", False):
        pytest.skip("this build's sm90 code has only the wgmma backward kernels at these head dims "
                    "(FLASH_ATTN_SM90_MMA_SYNC_BWD=1 keeps the mma.sync ones)")
    monkeypatch.setenv("FLASH_ATTN_BWD_SM90", "0")
    _check_case(dtype_name, d, mask, alibi, softcap, ratio, seqlens, deterministic)


def _check_case(dtype_name, d, mask, alibi, softcap, ratio, seqlens, deterministic):
    require_compiled(DTYPES[dtype_name], alibi=alibi, softcap=softcap)
    dk_ = _kernel_dim(d)
    ext = build_info.cuda_extension()
    dtype = DTYPES[dtype_name]
    sq, sk = seqlens
    b, hk = 2, 2
    h = hk * ratio
    torch.manual_seed(sq * 1000 + sk + d)
    q = torch.randn(b, sq, h, d, device="cuda", dtype=dtype)
    k = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype)
    v = torch.randn(b, sk, hk, d, device="cuda", dtype=dtype)
    dout = torch.randn(b, sq, h, d, device="cuda", dtype=dtype)
    slopes = torch.rand(h, device="cuda", dtype=torch.float32) * 0.3 if alibi else None
    cap = 5.0 if softcap else 0.0
    scale = d ** -0.5
    ref_window, kernel_window = _window(mask, sq, sk)
    kw = dict(softmax_scale=scale, window_size=ref_window, softcap=cap, alibi_slopes=slopes)

    qp, kp, vp, dop = (_pad(x, dk_) for x in (q, k, v, dout))
    out, lse = ext.fwd(qp, kp, vp, None, slopes, scale, kernel_window[0], kernel_window[1], cap)[:2]
    nan = float("nan")
    dq = torch.full_like(qp, nan)
    dk = torch.full_like(kp, nan)
    dv = torch.full_like(vp, nan)
    dq, dk, dv, _ = ext.bwd(dop, qp, kp, vp, out, lse, dq, dk, dv, slopes, scale,
                            kernel_window[0], kernel_window[1], cap, deterministic)
    assert ext.last_bwd_kernel() == _expected_dk_dv_kernel(dk_)
    dq, dk, dv = dq[..., :d], dk[..., :d], dv[..., :d]

    g32 = _ref_grads(q, k, v, dout, True, **kw)
    gpt = _ref_grads(q, k, v, dout, False, **kw)
    for name, got, r32, rpt in zip(("dq", "dk", "dv"), (dq, dk, dv), g32, gpt):
        _check(name, got, r32, rpt)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("mask", ["full", "causal", "window"])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_varlen_bwd_with_empty_sequences(d, mask, deterministic):
    require_compiled(torch.bfloat16)
    _kernel_dim(d)
    ext = build_info.cuda_extension()
    dtype = torch.bfloat16
    lens_q = [17, 0, 130, 1, 64]
    lens_k = [33, 5, 0, 129, 64]
    h, hk = 4, 2
    cu_q = torch.tensor([0] + list(itertools.accumulate(lens_q)), device="cuda", dtype=torch.int32)
    cu_k = torch.tensor([0] + list(itertools.accumulate(lens_k)), device="cuda", dtype=torch.int32)
    torch.manual_seed(7)
    q = torch.randn(sum(lens_q), h, d, device="cuda", dtype=dtype)
    k = torch.randn(sum(lens_k), hk, d, device="cuda", dtype=dtype)
    v = torch.randn(sum(lens_k), hk, d, device="cuda", dtype=dtype)
    dout = torch.randn_like(q)
    scale = d ** -0.5
    ref_window, kernel_window = _window(mask, 0, 0)
    out, lse = ext.varlen_fwd(q, k, v, None, cu_q, cu_k, None, max(lens_q), max(lens_k), None, scale,
                              kernel_window[0], kernel_window[1], 0.0)[:2]
    dq, dk, dv, _ = ext.varlen_bwd(dout, q, k, v, out, lse, None, None, None, cu_q, cu_k, max(lens_q),
                                   max(lens_k), None, scale, kernel_window[0], kernel_window[1], 0.0,
                                   deterministic)

    def grads(upcast):
        qs, ks, vs = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
        o, _ = attention_varlen_ref(qs, ks, vs, cu_q, cu_k, max(lens_q), max(lens_k), softmax_scale=scale,
                                    window_size=ref_window, upcast=upcast)
        o.backward(dout)
        return qs.grad, ks.grad, vs.grad

    for name, got, r32, rpt in zip(("dq", "dk", "dv"), (dq, dk, dv), grads(True), grads(False)):
        _check(name, got, r32, rpt)


@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_bwd_is_deterministic(d, deterministic):
    """50 reruns: dk, dv bitwise equal always; dq bitwise only with deterministic=True
    (the atomic path adds dQ partials in a varying order, so it stays within rounding)."""
    require_compiled(torch.bfloat16)
    d = _kernel_dim(d)
    ext = build_info.cuda_extension()
    torch.manual_seed(3)
    q, k, v, dout = (torch.randn(2, 1000, 4, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    out, lse = ext.fwd(q, k, v, None, None, d ** -0.5, -1, 0, 0.0)[:2]

    def run():
        return ext.bwd(dout, q, k, v, out, lse, None, None, None, None, d ** -0.5, -1, 0, 0.0, deterministic)[:3]

    first = run()
    for _ in range(50):
        dq, dk, dv = run()
        assert torch.equal(dk, first[1]) and torch.equal(dv, first[2])
        if deterministic:
            assert torch.equal(dq, first[0])
        else:
            torch.testing.assert_close(dq, first[0], atol=2e-2, rtol=2e-2)


def test_bwd_large_logits_stay_finite():
    require_compiled(torch.bfloat16)
    d = _kernel_dim(64)
    ext = build_info.cuda_extension()
    torch.manual_seed(5)
    q, k, v, dout = (torch.randn(1, 777, 4, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    q, k = q * 4, k * 4
    out, lse = ext.fwd(q, k, v, None, None, d ** -0.5, -1, 0, 0.0)[:2]
    grads = ext.bwd(dout, q, k, v, out, lse, None, None, None, None, d ** -0.5, -1, 0, 0.0, False)[:3]
    for g in grads:
        assert torch.isfinite(g).all()


@pytest.mark.parametrize("d", [32, 96, 192])
def test_bwd_pads_head_dims_without_a_kernel(d):
    """d = 32 / 96 / 192 have forward kernels but run the backward zero-padded to 64 / 128 /
    256 inside the extension; the gradients come back with the caller's head dim (and in
    given buffers)."""
    require_compiled(torch.bfloat16)
    if d not in build_info.compiled_head_dims():
        pytest.skip(f"forward head dim {d} not built")
    _kernel_dim(d)
    ext = build_info.cuda_extension()
    torch.manual_seed(d)
    q = torch.randn(2, 200, 4, d, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, 150, 2, d, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    dout = torch.randn_like(q)
    out, lse = ext.fwd(q, k, v, None, None, d ** -0.5, -1, 0, 0.0)[:2]
    dq = torch.full_like(q, float("nan"))
    dq, dk, dv, _ = ext.bwd(dout, q, k, v, out, lse, dq, None, None, None, d ** -0.5, -1, 0, 0.0, False)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape
    kw = dict(softmax_scale=d ** -0.5, window_size=(-1, 0))
    for name, got, r32, rpt in zip(("dq", "dk", "dv"), (dq, dk, dv), _ref_grads(q, k, v, dout, True, **kw),
                                   _ref_grads(q, k, v, dout, False, **kw)):
        _check(name, got, r32, rpt)
