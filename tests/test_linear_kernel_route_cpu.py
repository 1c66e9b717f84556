"""flash_attn.linear_attn's CUDA route (flash_attn/linear_attn/_kernels.py) run on the CPU, with
tests/linear_ext_model.py (a float64 model of each flash_attn_linear_cuda launcher) in place of
the extension: the orchestration of the chunked forward and backward (operands, scales,
masks, state slots, padding, varlen offsets, reverse flips, the gate gradient) against
flash_attn.reference_linear, without a GPU. With float64 inputs only the route's fp32 gates,
states and row dots round, so it must match the reference to ~1e-6; in bf16 the dtype
plumbing and the tolerances of the GPU tests are checked. The kernels
themselves are compared with the same model in tests/test_linear_attn_gpu.py."""
import math

import pytest
import torch
import torch.nn.functional as F

import flash_attn.linear_attn as la
from flash_attn.linear_attn import _kernels
from flash_attn.reference_linear import (lightning_log_decay, linear_attn_recurrent_ref, linear_attn_ref,
                                         retention_log_decay)
from linear_ext_model import LinearExtModel

F64 = torch.float64


class CountingModel(LinearExtModel):
    def __init__(self):
        self.calls = []

    def __getattribute__(self, name):
        attr = object.__getattribute__(self, name)
        if name in ("chunk_state", "chunk_output", "chunk_fused_fwd", "gate_grad", "recurrent", "recurrent_grad",
                    "gla_cumsum", "gla_output", "gla_grad", "gla_fused_fwd"):
            object.__getattribute__(self, "calls").append(name)
        return attr


@pytest.fixture
def model(route_to_model):
    """CPU tensors take the CUDA route, whose extension is the model (float64 inputs too)."""
    return route_to_model(CountingModel())


def make(B, T, H, K, V, gate="g", n=1.0, dtype=F64, seed=0, h0=True, N=None):
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, K, generator=gen, dtype=F64) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen, dtype=F64)
    g = F.logsigmoid(torch.randn(B, T, H, generator=gen, dtype=F64)) / n if gate == "g" else None
    gamma = -torch.rand(H, generator=gen, dtype=F64) / n if gate == "gamma" else None
    state = torch.randn(N or B, H, K, V, generator=gen, dtype=F64) if h0 else None
    cast = lambda x: None if x is None else x.to(dtype)  # noqa: E731
    return cast(q), cast(k), cast(v), cast(g), cast(gamma), (None if state is None else state.float().to(
        F64 if dtype == F64 else torch.float32))


def make_case(T, K, V, lens, **kw):
    """make() for a case row, with 2 heads: 2 sequences of T tokens (batched) or one packed row
    of the lengths lens (T unused). Returns make's tuple and cu_seqlens (None when batched)."""
    B, T = (2, T) if lens is None else (1, sum(lens))
    return make(B, T, 2, K, V, N=None if lens is None else len(lens), **kw), None if lens is None else cu(lens)


def loss_weights(o_shape, state_shape):
    """Random weights of o and of the final state in the backward tests' loss."""
    gen = torch.Generator().manual_seed(7)
    return torch.randn(o_shape, generator=gen, dtype=F64), torch.randn(state_shape, generator=gen, dtype=F64)


def rms_ratio(a, b):
    return ((a.double() - b.double()).pow(2).mean().sqrt() / b.double().pow(2).mean().sqrt()).item()


def close(a, b, tol=1e-6):  # gates and states are fp32 on the route
    assert a.shape == b.shape
    assert rms_ratio(a, b) < tol, rms_ratio(a, b)


def cu(lens):
    return torch.tensor([0] + lens).cumsum(0).to(torch.int32)


SHAPES = [(1, 16, 16), (63, 64, 64), (64, 100, 72), (65, 8, 128), (130, 64, 64)]


# --------------------------------------------------------------------------- forward

@pytest.mark.parametrize("gate", ["g", "gamma", None], ids=["g", "gamma", "nogate"])
@pytest.mark.parametrize("T,K,V", SHAPES, ids=[f"T{t}-K{k}-V{v}" for t, k, v in SHAPES])
@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_forward_matches_reference(model, mode, T, K, V, gate):
    q, k, v, g, gamma, h0 = make(2, T, 2, K, V, gate)
    op = la.chunk_simple_gla if mode == "chunk" else la.fused_recurrent_simple_gla
    o, ht = op(q, k, v, g=g, g_gamma=gamma, scale=0.3, initial_state=h0, output_final_state=True)
    o_ref, ht_ref = linear_attn_recurrent_ref(q, k, v, g=g, g_gamma=gamma, scale=0.3, initial_state=h0,
                                              output_final_state=True)
    close(o, o_ref)
    close(ht, ht_ref)
    assert ("chunk_output" in model.calls) == (mode == "chunk")
    assert ("recurrent" in model.calls) == (mode == "recurrent")


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_varlen_with_empty_sequences(model, mode):
    lens = [0, 65, 1, 64, 0, 30]
    q, k, v, g, _, h0 = make(1, sum(lens), 2, 64, 64, N=len(lens))
    op = la.chunk_simple_gla if mode == "chunk" else la.fused_recurrent_simple_gla
    o, ht = op(q, k, v, g=g, initial_state=h0, output_final_state=True, cu_seqlens=cu(lens))
    o_ref, ht_ref = linear_attn_recurrent_ref(q, k, v, g=g, initial_state=h0, output_final_state=True,
                                              cu_seqlens=cu(lens))
    close(o, o_ref)
    close(ht, ht_ref)
    assert torch.equal(ht[0], h0[0]) and torch.equal(ht[4], h0[4])  # empty: the state passes through


def test_fixed_decay_ops(model):
    q, k, v, _, _, h0 = make(2, 70, 4, 64, 64, gate=None)
    for op, gamma in ((la.chunk_retention, retention_log_decay(4).double()),
                      (la.fused_recurrent_retention, retention_log_decay(4).double())):
        o, ht = op(q, k, v, initial_state=h0, output_final_state=True)
        o_ref, ht_ref = linear_attn_recurrent_ref(q, k, v, g_gamma=gamma, initial_state=h0, output_final_state=True)
        close(o, o_ref)
        close(ht, ht_ref)
    o = la.chunk_lightning_attn(q, k, v, layer_idx=1, num_layers=4)[0]
    close(o, linear_attn_recurrent_ref(q, k, v, g_gamma=lightning_log_decay(4, 1, 4).double())[0])


@pytest.mark.parametrize("normalize", [False, True])
def test_chunk_linear_attn(model, normalize):
    q, k, v, _, _, h0 = make(2, 70, 2, 64, 64, gate=None)
    q, k = q.sigmoid(), k.sigmoid()
    state = (h0, torch.rand(2, 1, 2, 64, dtype=F64)) if normalize else h0
    o, st = la.chunk_linear_attn(q, k, v, initial_state=state, output_final_state=True, normalize=normalize)
    o_ref, st_ref = linear_attn_ref(q, k, v, initial_state=state, output_final_state=True, normalize=normalize)
    close(o, o_ref)
    for a, b in zip(st, st_ref) if normalize else ((st, st_ref),):
        close(a, b)
    assert "chunk_output" in model.calls


@pytest.mark.parametrize("grad", [False, True])
def test_reverse_and_state_v_first(model, grad):
    lens = [40, 0, 90]
    q, k, v, g, _, h0 = make(1, sum(lens), 2, 64, 64, N=3)
    leaves = [x.clone().requires_grad_(grad) for x in (q, k, v, g, h0)]
    o, ht = la.fused_recurrent_simple_gla(*leaves[:3], g=leaves[3], initial_state=leaves[4].transpose(-1, -2),
                                          output_final_state=True, reverse=True, state_v_first=True,
                                          cu_seqlens=cu(lens))
    o_ref, ht_ref = linear_attn_recurrent_ref(q, k, v, g=g, initial_state=h0, output_final_state=True, reverse=True,
                                              cu_seqlens=cu(lens))
    close(o, o_ref)
    close(ht.transpose(-1, -2), ht_ref)
    assert "recurrent" in model.calls  # the forward is token by token either way
    if grad:
        (o.sum() + ht.sum()).backward()
        refs = [x.clone().requires_grad_(True) for x in (q, k, v, g, h0)]
        o_r, ht_r = linear_attn_recurrent_ref(*refs[:3], g=refs[3], initial_state=refs[4], output_final_state=True,
                                              reverse=True, cu_seqlens=cu(lens))
        (o_r.sum() + ht_r.sum()).backward()
        for a, b in zip(leaves, refs):
            close(a.grad, b.grad, 2e-5)
        assert "gate_grad" in model.calls  # the backward is the chunked one


def test_missing_extension_raises(monkeypatch):
    monkeypatch.setattr(_kernels, "extension", lambda: None)
    monkeypatch.setattr(_kernels, "on_kernel_device", lambda x: True)
    q, k, v, g, _, _ = make(1, 8, 1, 64, 64, dtype=torch.bfloat16)
    with pytest.raises(NotImplementedError, match="chunk_simple_gla: the CUDA linear-attention kernels are not "
                                                  "available"):
        la.chunk_simple_gla(q, k, v, g=g)


# --------------------------------------------------------------------------- backward

GRAD_CASES = [
    ("g-T1", "g", 1, 64, 64, None),
    ("g-T63-K100-V72", "g", 63, 100, 72, None),
    ("g-T130", "g", 130, 64, 64, None),
    ("g-n0.1", "g", 129, 64, 64, None),
    ("gamma-T65", "gamma", 65, 64, 128, None),
    ("nogate-T100", None, 100, 16, 16, None),
    ("g-varlen", "g", None, 64, 64, [0, 65, 1, 64, 0, 30]),
    ("gamma-varlen", "gamma", None, 64, 64, [3, 0, 128]),
]


@pytest.mark.parametrize("with_final", [True, False], ids=["final", "nofinal"])
@pytest.mark.parametrize("case", GRAD_CASES, ids=[c[0] for c in GRAD_CASES])
def test_backward_matches_reference(model, case, with_final):
    n = 0.1 if "n0.1" in case[0] else 1.0
    check_route_against_reference(case, with_final, n)
    assert "gate_grad" in model.calls if case[1] is not None else "gate_grad" not in model.calls


@pytest.mark.parametrize("mode", ["0", "one", "split", None], ids=["off", "one", "split", "default"])
@pytest.mark.parametrize("case", [GRAD_CASES[2], GRAD_CASES[4], GRAD_CASES[6], GRAD_CASES[1]],
                         ids=["K64", "K64-V128", "varlen", "K128-V128-padded"])
def test_fused_backward_switch(model, monkeypatch, case, mode):
    """FLASH_ATTN_LINEAR_FUSED_BWD_SM90: dv, dk, dq by chunk_bwd_fused (one launch of all three, or
    dv + dk then dq) where K == V in {64, 128, 256} after padding, else (and with "0")
    the three chunk_output passes; the gradients are the reference's either way."""
    if mode is not None:
        monkeypatch.setenv(_kernels.FUSED_BWD_SM90_ENV, mode)
    else:
        monkeypatch.delenv(_kernels.FUSED_BWD_SM90_ENV, raising=False)
    calls = []
    real = model.chunk_bwd_fused
    monkeypatch.setattr(model, "chunk_bwd_fused", lambda *a: calls.append(a[-1]) or real(*a), raising=False)
    check_route_against_reference(case, True)
    K, V = _kernels.kernel_head_dim(case[3]), _kernels.kernel_head_dim(case[4])
    square = K == V and K in (64, 128, 256)
    want = [] if mode == "0" else list(_kernels.FUSED_BWD_SM90_JOBS[mode or _kernels.FUSED_BWD_SM90_DEFAULT])
    assert calls == (want if square else want[:1])  # (the extension says no at the first launch)
    if square and mode != "0":
        assert _kernels.last_backward_products == f"fused_{mode or _kernels.FUSED_BWD_SM90_DEFAULT}"
    else:
        assert _kernels.last_backward_products == "chunk_output"


def check_route_against_reference(case, with_final, n=1.0):
    """chunk_simple_gla on the route against the float64 recurrence for a case row: o, the final
    state and the gradients of q, k, v, g / gamma and h0 under a random linear loss."""
    _, gate, T, K, V, lens = case
    (q, k, v, g, gamma, h0), offsets = make_case(T, K, V, lens, gate=gate, n=n)
    w_o, w_s = loss_weights(v.shape, h0.shape)

    def run(fn):
        leaves = [None if x is None else x.clone().requires_grad_(True) for x in (q, k, v, g, gamma, h0)]
        o, ht = fn(*leaves[:3], g=leaves[3], g_gamma=leaves[4], scale=0.4, initial_state=leaves[5],
                   output_final_state=with_final, cu_seqlens=offsets)
        loss = (o * w_o).sum() + ((ht * w_s).sum() if with_final else 0)
        loss.backward()
        return [o, ht] + [None if x is None else x.grad for x in leaves]

    got = run(la.chunk_simple_gla)
    ref = run(lambda *a, **kw: linear_attn_recurrent_ref(*a, **kw))
    for name, a, b in zip(("o", "ht", "dq", "dk", "dv", "dg", "dgamma", "dh0"), got, ref):
        if b is None:
            assert a is None, name
        else:
            # the gate gradient is an fp32 reverse cumsum of fp32 row dots (as in the kernels)
            close(a, b, 2e-5 if name in ("dg", "dgamma") else 1e-6)


def check_bf16_against_reference(o, ht, leaves):
    """A bf16 run on the route, its loss o.sum() + ht.sum() backpropagated into leaves (q, k, v,
    g, h0), against the float64 recurrence to the GPU tests' tolerances."""
    refs = [x.detach().double().requires_grad_(True) for x in leaves]
    o_r, ht_r = linear_attn_recurrent_ref(*refs[:3], g=refs[3], initial_state=refs[4], output_final_state=True)
    (o_r.sum() + ht_r.sum()).backward()
    assert rms_ratio(o, o_r) < 0.005 and rms_ratio(ht, ht_r) < 1e-6
    for a, b in zip(leaves, refs):
        assert rms_ratio(a.grad, b.grad) < 0.008


def test_bf16_route_dtypes_and_accuracy(model):
    q, k, v, g, _, h0 = make(2, 100, 2, 64, 64, dtype=torch.bfloat16)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, g, h0)]
    o, ht = la.chunk_simple_gla(*leaves[:3], g=leaves[3], initial_state=leaves[4], output_final_state=True)
    assert o.dtype == torch.bfloat16 and ht.dtype == torch.float32
    (o.float().sum() + ht.sum()).backward()
    assert [x.grad.dtype for x in leaves] == [torch.bfloat16] * 4 + [torch.float32]
    check_bf16_against_reference(o, ht, leaves)


# --------------------------------------------------------------------------- one-pass forward
# The chunked forward of the scalar-gate ops runs chunk_fused_fwd unless FLASH_ATTN_LINEAR_FUSED_FWD=0;
# when N * H * (V / BV) is below the SM count (_kernels.num_sms, replaced here) it cuts the
# sequences into segments (fused_plan).

@pytest.fixture
def fused(model, monkeypatch):
    """The default switch (on) and a GPU of model.sms SMs (1: every grid fills it); returns the model.
    chunk_gla's one-pass forward (off by default, its own switch) is turned on too."""
    monkeypatch.delenv(_kernels.FUSED_FWD_ENV, raising=False)
    monkeypatch.setenv(_kernels.GLA_FUSED_FWD_ENV, "1")
    return model


def test_fused_forward_is_on_by_default_and_can_be_turned_off(fused, monkeypatch):
    model = fused
    assert _kernels.fused_forward_enabled()
    q, k, v, g, _, h0 = make(2, 70, 2, 64, 64)
    o_on, ht_on = la.chunk_simple_gla(q, k, v, g=g, initial_state=h0, output_final_state=True)
    assert model.calls == ["chunk_fused_fwd"]
    for off in ("0", "", "false", "off"):
        monkeypatch.setenv(_kernels.FUSED_FWD_ENV, off)
        assert not _kernels.fused_forward_enabled()
    model.calls.clear()
    o_off, ht_off = la.chunk_simple_gla(q, k, v, g=g, initial_state=h0, output_final_state=True)
    assert "chunk_fused_fwd" not in model.calls and "chunk_output" in model.calls
    close(o_on, o_off)
    close(ht_on, ht_off)


@pytest.mark.parametrize("gate", ["g", "gamma", None], ids=["g", "gamma", "nogate"])
@pytest.mark.parametrize("T,K,V", SHAPES, ids=[f"T{t}-K{k}-V{v}" for t, k, v in SHAPES])
def test_fused_forward_matches_reference(fused, T, K, V, gate):
    q, k, v, g, gamma, h0 = make(2, T, 2, K, V, gate)
    o, ht = la.chunk_simple_gla(q, k, v, g=g, g_gamma=gamma, scale=0.3, initial_state=h0, output_final_state=True)
    o_ref, ht_ref = linear_attn_recurrent_ref(q, k, v, g=g, g_gamma=gamma, scale=0.3, initial_state=h0,
                                              output_final_state=True)
    close(o, o_ref)
    close(ht, ht_ref)
    assert fused.calls == ["chunk_fused_fwd"]  # no chunk states, no second pass


def test_fused_forward_varlen_and_no_states(fused):
    lens = [0, 65, 1, 64, 0, 30]
    q, k, v, g, _, h0 = make(1, sum(lens), 2, 64, 64, N=len(lens))
    o, ht = la.chunk_simple_gla(q, k, v, g=g, initial_state=h0, output_final_state=True, cu_seqlens=cu(lens))
    o_ref, ht_ref = linear_attn_recurrent_ref(q, k, v, g=g, initial_state=h0, output_final_state=True,
                                              cu_seqlens=cu(lens))
    close(o, o_ref)
    close(ht, ht_ref)
    assert torch.equal(ht[0], h0[0]) and torch.equal(ht[4], h0[4])
    o2, ht2 = la.chunk_simple_gla(q, k, v, g=g, cu_seqlens=cu(lens))  # no initial, no final state
    close(o2, linear_attn_recurrent_ref(q, k, v, g=g, cu_seqlens=cu(lens))[0])
    assert ht2 is None
    assert fused.calls == ["chunk_fused_fwd"] * 2


class _PlanExt:
    def chunk_fused_tile_v(self, k_dim):
        return 64 if k_dim <= 128 else 32


@pytest.mark.parametrize("B,T,H,K,V,sms,want", [
    (2, 70, 2, 64, 128, 8, (0, 1)),         # 8 CTAs fill 8 SMs
    (2, 70, 2, 64, 128, 9, (0, 1)),         # 2 chunks: too short to cut
    (2, 4096, 16, 128, 128, 132, (16, 4)),  # 64 CTAs: 4 segments (264 // 64) of 16 chunks
    (1, 65536, 16, 128, 128, 132, (128, 8)),  # 32 CTAs: 8 segments of 128 chunks, 256 CTAs
    (1, 1000, 16, 128, 128, 132, (4, 4)),     # 16 chunks: 4 segments of the least 4 chunks
    (1, 400, 16, 128, 128, 132, (0, 1)),      # 7 chunks: too few for two segments of 4
    (1, 16384, 16, 128, 128, 132, (32, 8)),   # 256 chunks in 8 segments -> 256 CTAs
    (4, 4096, 16, 128, 128, 132, (32, 2)),    # 128 CTAs -> two segments each
    (1, 600, 1, 256, 256, 132, (5, 2)),       # 10 chunks: two segments of 5 (odd lengths ran on the H100, 766b2f8)
    (1, 1 << 20, 1, 64, 64, 132, (512, 32)),  # at most 32 segments
], ids=["fills", "short", "2x4096", "1x65536", "1x1000", "1x400", "1x16384", "4x4096", "min-chunks", "max-segments"])
def test_fused_plan(monkeypatch, B, T, H, K, V, sms, want):
    """fused_plan's segments: (seg_chunks, segments per sequence), covering every chunk."""
    monkeypatch.delenv(_kernels.FUSED_FWD_ENV, raising=False)
    monkeypatch.setattr(_kernels, "num_sms", lambda device: sms)
    q = torch.empty(B, T, H, K, device="meta")
    v = torch.empty(B, T, H, V, device="meta")
    plan = _kernels.fused_plan(_PlanExt(), q, v, _kernels.Seqs(B, T, None, q.device))
    assert plan == want
    seg_chunks, segs = plan
    chunks = -(-T // 64)
    assert seg_chunks == 0 or (segs * seg_chunks >= chunks and (segs - 1) * seg_chunks < chunks)


@pytest.mark.parametrize("lens", [None, [0, 700, 65, 300, 1]], ids=["batched", "varlen"])
@pytest.mark.parametrize("gate", ["g", "gamma", None], ids=["g", "gamma", "nogate"])
def test_fused_forward_segments_match_reference(fused, lens, gate):
    """Many SMs, few CTAs: the sequences run in segments (seg_state / seg_decay folded in)."""
    fused.sms = 1000
    (q, k, v, g, gamma, h0), cu_ = make_case(600, 64, 64, lens, gate=gate)
    seen = []
    real = fused.chunk_fused_fwd

    def spy(*args, **kw):
        seen.append(args[10:] if len(args) > 10 else ())
        return real(*args, **kw)
    fused.chunk_fused_fwd = spy
    o, ht = la.chunk_simple_gla(q, k, v, g=g, g_gamma=gamma, scale=0.7, initial_state=h0, output_final_state=True,
                                cu_seqlens=cu_)
    o_ref, ht_ref = linear_attn_recurrent_ref(q, k, v, g=g, g_gamma=gamma, scale=0.7, initial_state=h0,
                                              output_final_state=True, cu_seqlens=cu_)
    close(o, o_ref)
    close(ht, ht_ref)
    (seg_chunks, seg_state, seg_decay), = seen
    assert seg_chunks >= 4 and seg_state.shape[0] > (1 if lens is None else 5)  # cut into segments


def test_fused_forward_ops_and_backward(fused):
    q, k, v, _, _, h0 = make(2, 70, 4, 64, 64, gate=None)
    gamma = retention_log_decay(4).double()
    o, ht = la.chunk_retention(q, k, v, initial_state=h0, output_final_state=True)
    o_ref, ht_ref = linear_attn_recurrent_ref(q, k, v, g_gamma=gamma, initial_state=h0, output_final_state=True)
    close(o, o_ref)
    close(ht, ht_ref)
    o = la.chunk_lightning_attn(q, k, v, layer_idx=1, num_layers=4)[0]
    close(o, linear_attn_recurrent_ref(q, k, v, g_gamma=lightning_log_decay(4, 1, 4).double())[0])
    assert "chunk_output" not in fused.calls
    # the backward recomputes the states itself: the two-pass backward after a one-pass forward
    q, k, v, g, _, h0 = make(2, 70, 2, 64, 64)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, g, h0)]
    o, ht = la.chunk_simple_gla(*leaves[:3], g=leaves[3], initial_state=leaves[4], output_final_state=True)
    (o.sum() + ht.sum()).backward()
    refs = [x.clone().requires_grad_(True) for x in (q, k, v, g, h0)]
    o_r, ht_r = linear_attn_recurrent_ref(*refs[:3], g=refs[3], initial_state=refs[4], output_final_state=True)
    (o_r.sum() + ht_r.sum()).backward()
    for a, b in zip(leaves, refs):
        close(a.grad, b.grad, 2e-5)
    assert "chunk_fused_fwd" in fused.calls and "gate_grad" in fused.calls


# --------------------------------------------------------------------------- segmented chunk states
# FLASH_ATTN_LINEAR_SEGMENTED_STATES=1 cuts the chunk_state passes (two-pass forward, the backward's
# h and dH) into segments when their CTAs are fewer than two per SM (_kernels.states_plan).

SEG_CASES = [
    ("g-T700", "g", 700, 64, 64, None),
    ("gamma-T600-K100", "gamma", 600, 100, 72, None),
    ("nogate-T520", None, 520, 64, 64, None),
    ("g-varlen", "g", None, 64, 64, [0, 700, 1, 333, 64]),
]


@pytest.fixture
def segmented(model, monkeypatch):
    """Segmented chunk states on, the two-pass forward (so its chunk_state is segmented too), and
    a GPU of many SMs: every chunk_state call here is cut into segments. The backward recomputes
    h (FLASH_ATTN_LINEAR_SAVE_STATES=0) so that all three passes are covered."""
    monkeypatch.setenv(_kernels.SEGMENTED_STATES_ENV, "1")
    monkeypatch.setenv(_kernels.SAVE_STATES_ENV, "0")
    model.sms = 1000
    seen = []
    real = model.chunk_state

    def spy(*args, **kw):
        seen.append(kw.get("seg_chunks", args[15] if len(args) > 15 else 0))
        return real(*args, **kw)
    model.chunk_state = spy
    model.seg_calls = seen
    return model


@pytest.mark.parametrize("with_final", [True, False], ids=["final", "nofinal"])
@pytest.mark.parametrize("case", SEG_CASES, ids=[c[0] for c in SEG_CASES])
def test_segmented_states_forward_and_backward(segmented, case, with_final):
    check_route_against_reference(case, with_final)
    # forward h, backward h and the reverse dH: all three cut into segments
    assert len(segmented.seg_calls) == 3 and all(c > 0 for c in segmented.seg_calls), segmented.seg_calls


@pytest.mark.parametrize("case", SEG_CASES[:2], ids=[c[0] for c in SEG_CASES[:2]])
def test_segmented_states_with_kept_states(segmented, monkeypatch, case):
    monkeypatch.delenv(_kernels.SAVE_STATES_ENV)  # default: the forward's h is kept
    check_route_against_reference(case, True)
    # forward h and the reverse dH; the backward reads the forward's h
    assert len(segmented.seg_calls) == 2 and all(c > 0 for c in segmented.seg_calls), segmented.seg_calls


def test_segmented_states_off_by_default(model, monkeypatch):
    monkeypatch.delenv(_kernels.SEGMENTED_STATES_ENV, raising=False)
    model.sms = 1000
    q = torch.empty(1, 65536, 16, 128, device="meta")
    assert not _kernels.segmented_states_enabled()
    assert _kernels.states_plan(q, q, _kernels.Seqs(1, 65536, None, q.device)) is None


@pytest.mark.parametrize("B,T,H,R,Z,sms,want", [
    (1, 65536, 16, 128, 128, 132, (128, 8)),   # 64 CTAs of 64 x 64: 8 segments (528 // 64)
    (8, 2048, 16, 128, 128, 132, None),        # 512 CTAs >= 2 per SM
    (1, 16384, 16, 128, 128, 132, (32, 8)),
    (1, 300, 16, 128, 128, 132, None),         # 5 chunks: too short to cut
    (2, 8192, 4, 256, 256, 132, (32, 4)),      # 2 * 4 * 16 = 128 CTAs: 4 segments (528 // 128)
], ids=["1x65536", "8x2048", "1x16384", "short", "K256"])
def test_states_plan(monkeypatch, B, T, H, R, Z, sms, want):
    monkeypatch.setenv(_kernels.SEGMENTED_STATES_ENV, "1")
    monkeypatch.setattr(_kernels, "num_sms", lambda device: sms)
    x = torch.empty(B, T, H, R, device="meta")
    z = torch.empty(B, T, H, Z, device="meta")
    assert _kernels.states_plan(x, z, _kernels.Seqs(B, T, None, x.device)) == want


def test_segmented_model_matches_whole_model():
    """The model's chunk_state in segments (forward and reverse with pair_dot, odd and even
    segment lengths) equals its one-walk chunk_state: states, final state and pair_dot."""
    m = LinearExtModel()
    q, k, v, g, _, h0 = make(2, 700, 2, 64, 128)
    seqs = _kernels.Seqs(2, 700, None, q.device)
    h = torch.empty(seqs.slots, 2, 64, 128, dtype=F64)
    m.chunk_state(k, v, g, None, h0, h, None, None, None, 1.0, False)
    for reverse in (False, True):
        for seg_chunks in (1, 3, 4):
            S = -(-11 // seg_chunks)
            outs = []
            for sc in (0, seg_chunks):
                st, fin = torch.empty(seqs.slots, 2, 64, 128, dtype=F64), torch.empty(2, 2, 64, 128)
                pair = torch.empty(seqs.slots, 2, 2, dtype=torch.float32) if reverse else None
                ws = (torch.full((2 * S, 2, 64, 128), math.nan), torch.full((2 * S, 2), math.nan)) if sc else (None,
                                                                                                               None)
                m.chunk_state(q if reverse else k, v, g, None, h0, st, fin, None, None, 0.5, reverse,
                              h if reverse else None, pair, 0, None, sc, *ws)
                outs.append((st, fin, pair))
            (a_st, a_fin, a_pair), (b_st, b_fin, b_pair) = outs
            close(b_st, a_st)
            close(b_fin.double(), a_fin.double())
            if reverse:
                close(b_pair.double(), a_pair.double())
    # GLA's per-key gates: one log-decay per state row
    gk = F.logsigmoid(torch.randn(2, 700, 2, 64, dtype=F64)) / 4
    b = torch.empty_like(gk)
    m.gla_cumsum(gk, b, None, None, seqs.slots)
    for reverse in (False, True):
        outs = []
        for sc in (0, 3):
            st, fin = torch.empty(seqs.slots, 2, 64, 128, dtype=F64), torch.empty(2, 2, 64, 128)
            ws = (torch.full((8, 2, 64, 128), math.nan), torch.full((8, 2, 64), math.nan)) if sc else (None, None)
            m.chunk_state(q if reverse else k, v, None, None, h0, st, fin, None, None, 0.5, reverse, None, None, 0, b,
                          sc, *ws)
            outs.append((st, fin))
        close(outs[1][0], outs[0][0])
        close(outs[1][1].double(), outs[0][1].double())


def test_fused_model_matches_two_pass_model_in_bf16():
    """The model's one-pass forward against its chunk_state + chunk_output in bf16, where both
    round the chunk states to bf16 for q S_c: what the GPU test asks of the two kernels."""
    m = LinearExtModel()
    q, k, v, g, _, h0 = make(2, 130, 2, 64, 128, dtype=torch.bfloat16)
    seqs = _kernels.Seqs(2, 130, None, q.device)
    o1, f1 = torch.empty_like(v), torch.empty(2, 2, 64, 128)
    m.chunk_fused_fwd(q, k, v, g.float(), None, h0, o1, f1, None, 0.5)
    states, f2 = torch.empty(seqs.slots, 2, 64, 128, dtype=torch.bfloat16), torch.empty(2, 2, 64, 128)
    m.chunk_state(k, v, g.float(), None, h0, states, f2, None, None, 1.0, False)
    o2 = torch.empty_like(v)
    m.chunk_output(q, k, v, states, o2, None, None, g.float(), None, None, None, 0.5, 0.5, False, False)
    assert rms_ratio(o1, o2) < 2e-3  # bf16 output rounding at most
    assert torch.equal(f1, f2)
    # in segments of 1 chunk (3 per sequence): the states regroup, the result does not change
    o3, f3 = torch.empty_like(v), torch.empty(2, 2, 64, 128)
    m.chunk_fused_fwd(q, k, v, g.float(), None, h0, o3, f3, None, 0.5, 1, torch.empty(6, 2, 64, 128),
                      torch.empty(6, 2))
    assert rms_ratio(o3, o1) < 2e-3
    assert rms_ratio(f3, f1) < 1e-6


# --------------------------------------------------------------------------- GLA (per-key gates)
# The model's GLA launchers follow the kernels' sub-chunk algorithm and assert that no
# exponent they use is positive, so these tests also check that claim on every case.

def gla_gates(B, T, H, K, n=1.0, seed=3):
    """logsigmoid(x) / n, rounded to fp32 values (the route's gates and their sums are fp32)."""
    gen = torch.Generator().manual_seed(seed)
    return (F.logsigmoid(torch.randn(B, T, H, K, generator=gen, dtype=F64)) / n).float().double()


def gla_tol(n):
    """The route's cumulative gates b are fp32 sums (as in the kernels): their rounding, relative
    to |b|, grows with the gates' size, 1 / n."""
    return 1e-6 * max(1.0, 2.0 / n)


GLA_CASES = [  # id, T, K, V, n (gates logsigmoid(x) / n), scale, lens
    ("T1", 1, 64, 64, 1.0, 1.0, None),
    ("T63-K100-V72", 63, 100, 72, 1.0, 0.1, None),
    ("T64-n0.1", 64, 64, 64, 0.1, 1.0, None),
    ("T65-K16-V128-n10", 65, 16, 128, 10.0, 0.1, None),
    ("T130-K72-V64", 130, 72, 64, 1.0, 1.0, None),
    ("varlen", None, 64, 64, 1.0, 0.3, [0, 65, 1, 64, 0, 30]),
]


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
@pytest.mark.parametrize("case", GLA_CASES, ids=[c[0] for c in GLA_CASES])
def test_gla_forward_matches_reference(model, case, mode):
    _, T, K, V, n, scale, lens = case
    (q, k, v, _, _, h0), offsets = make_case(T, K, V, lens, gate=None)
    g = gla_gates(*q.shape, n)  # [B, T, H, K] like q
    if mode == "chunk":
        o, ht = la.chunk_gla(q, k, v, g, scale=scale, initial_state=h0, output_final_state=True, cu_seqlens=offsets)
    else:
        o, ht = la.fused_recurrent_gla(q, k, v, gk=g, scale=scale, initial_state=h0, output_final_state=True,
                                       cu_seqlens=offsets)
    o_ref, ht_ref = linear_attn_recurrent_ref(q, k, v, g=g, scale=scale, initial_state=h0, output_final_state=True,
                                              cu_seqlens=offsets)
    tol = gla_tol(n)
    close(o, o_ref, tol)
    close(ht, ht_ref, tol)
    assert ("gla_output" in model.calls) == (mode == "chunk")
    assert ("recurrent" in model.calls) == (mode == "recurrent")


@pytest.mark.parametrize("with_final", [True, False], ids=["final", "nofinal"])
@pytest.mark.parametrize("case", GLA_CASES, ids=[c[0] for c in GLA_CASES])
def test_gla_backward_matches_reference(model, case, with_final):
    check_gla_route_against_reference(case, with_final)
    assert {"gla_cumsum", "gla_output", "gla_grad"} <= set(model.calls)


def check_gla_route_against_reference(case, with_final):
    """chunk_gla on the route against the float64 recurrence for a GLA case row: the gradients of
    q, k, v, g and h0 under a random linear loss."""
    _, T, K, V, n, scale, lens = case
    (q, k, v, _, _, h0), offsets = make_case(T, K, V, lens, gate=None)
    g = gla_gates(*q.shape, n)  # [B, T, H, K] like q
    w_o, w_s = loss_weights(v.shape, h0.shape)

    def run(fn):
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v, g, h0)]
        o, ht = fn(*leaves[:3], leaves[3], scale=scale, initial_state=leaves[4], output_final_state=with_final,
                   cu_seqlens=offsets)
        loss = (o * w_o).sum() + ((ht * w_s).sum() if with_final else 0)
        loss.backward()
        return [x.grad for x in leaves]

    got = run(la.chunk_gla)
    ref = run(lambda q, k, v, g, **kw: linear_attn_recurrent_ref(q, k, v, g=g, **kw))
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dh0"), got, ref):
        close(a, b, gla_tol(n) * (20 if name == "dg" else 1))


@pytest.mark.parametrize("lens", [None, [0, 600, 1, 333]], ids=["batched", "varlen"])
def test_gla_segmented_states(segmented, monkeypatch, lens):
    """chunk_gla with its chunk_state passes (forward h, reverse dH) in segments."""
    monkeypatch.delenv(_kernels.SAVE_STATES_ENV)  # default: the forward's h is kept
    check_gla_route_against_reference(("seg", 600, 64, 64, 1.0, 0.5, lens), True)
    # the forward's h (kept for the backward, save_states) and the reverse dH
    assert len(segmented.seg_calls) == 2 and all(c > 0 for c in segmented.seg_calls), segmented.seg_calls


@pytest.mark.parametrize("lens", [None, [0, 600, 1, 333]], ids=["batched", "varlen"])
def test_gla_segmented_states_recomputed(segmented, monkeypatch, lens):
    """FLASH_ATTN_LINEAR_SAVE_STATES=0: the backward recomputes h (three segmented passes)."""
    monkeypatch.setenv(_kernels.SAVE_STATES_ENV, "0")
    check_gla_route_against_reference(("seg", 600, 64, 64, 1.0, 0.5, lens), True)
    assert len(segmented.seg_calls) == 3 and all(c > 0 for c in segmented.seg_calls), segmented.seg_calls


@pytest.mark.parametrize("reverse", [False, True])
def test_fused_recurrent_gla_backward_is_the_chunked_one(model, reverse):
    lens = [40, 0, 90]
    q, k, v, _, _, h0 = make(1, sum(lens), 2, 64, 64, gate=None, N=3)
    g = gla_gates(1, sum(lens), 2, 64)
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, g, h0)]
    o, ht = la.fused_recurrent_gla(*leaves[:3], gk=leaves[3], initial_state=leaves[4], output_final_state=True,
                                   reverse=reverse, cu_seqlens=cu(lens))
    (o.sum() + ht.sum()).backward()
    refs = [x.clone().requires_grad_(True) for x in (q, k, v, g, h0)]
    o_r, ht_r = linear_attn_recurrent_ref(*refs[:3], g=refs[3], initial_state=refs[4], output_final_state=True,
                                          reverse=reverse, cu_seqlens=cu(lens))
    (o_r.sum() + ht_r.sum()).backward()
    close(o, o_r)
    close(ht, ht_r)
    for a, b in zip(leaves, refs):
        close(a.grad, b.grad, 2e-5)
    assert "recurrent" in model.calls and "gla_grad" in model.calls  # forward token by token, backward chunked


def test_gla_very_negative_gates(model):
    """Gates of -1000 and logsigmoid(x) / 0.01: the model raises if any used exponent is > 0."""
    q, k, v, _, _, h0 = make(1, 200, 2, 64, 64, gate=None)
    g = gla_gates(1, 200, 2, 64, n=0.01)
    g[:, ::3, :, ::2] = -1000.0
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, g, h0)]
    o, ht = la.chunk_gla(*leaves[:3], leaves[3], initial_state=leaves[4], output_final_state=True)
    (o.sum() + ht.sum()).backward()
    refs = [x.clone().requires_grad_(True) for x in (q, k, v, g, h0)]
    o_r, ht_r = linear_attn_recurrent_ref(*refs[:3], g=refs[3], initial_state=refs[4], output_final_state=True)
    (o_r.sum() + ht_r.sum()).backward()
    close(o, o_r, gla_tol(0.01))
    close(ht, ht_r, gla_tol(0.01))
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dh0"), leaves, refs):
        assert torch.isfinite(a.grad).all(), name
        if name != "dh0":  # dh0 is ~0: every gate path to it passes a -1000
            close(a.grad, b.grad, gla_tol(0.01) * (20 if name == "dg" else 1))


VALUE_GATE_CASES = [  # id, K, V, lens (None: 2 sequences of 70 tokens), gates
    ("gk-gv", 64, 64, None, "gk+gv"),
    ("gv", 100, 72, None, "gv"),
    ("gk", 64, 128, None, "gk"),
    ("gk-gv-varlen", 72, 100, [0, 65, 1, 64, 0, 30], "gk+gv"),
    ("gv-varlen", 64, 64, [40, 0, 90], "gv"),
]


@pytest.mark.parametrize("with_final", [True, False], ids=["final", "nofinal"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("case", VALUE_GATE_CASES, ids=[c[0] for c in VALUE_GATE_CASES])
def test_fused_recurrent_gla_value_gate_backward(model, case, reverse, with_final):
    """Gradients through gv (and gk) of fused_recurrent_gla: the token-by-token backward
    (recurrent_grad, fp32 parts per 32 value columns summed on the route) against the reference."""
    _, K, V, lens, which = case
    (q, k, v, _, _, h0), offsets = make_case(70, K, V, lens, gate=None)
    B, T, H = q.shape[:3]
    gk = gla_gates(B, T, H, K, n=2.0) if "gk" in which else None
    gv = gla_gates(B, T, H, V, n=2.0, seed=4) if "gv" in which else None
    w_o, w_s = loss_weights(v.shape, h0.shape)

    def run(fn):
        leaves = [None if x is None else x.clone().requires_grad_(True) for x in (q, k, v, gk, gv, h0)]
        o, ht = fn(*leaves[:3], gk=leaves[3], gv=leaves[4], scale=0.3, initial_state=leaves[5],
                   output_final_state=with_final, reverse=reverse, cu_seqlens=offsets)
        loss = (o * w_o).sum() + ((ht * w_s).sum() if with_final else 0)
        loss.backward()
        return [None if x is None else x.grad for x in leaves]

    got = run(la.fused_recurrent_gla)
    ref = run(lambda q, k, v, gk, gv, **kw: linear_attn_recurrent_ref(q, k, v, g=gk, gv=gv, **kw))
    for name, a, b in zip(("dq", "dk", "dv", "dgk", "dgv", "dh0"), got, ref):
        if b is None:
            assert a is None, name
            continue
        assert a is not None and a.dtype == b.dtype, name
        close(a, b, 2e-5 if name in ("dgk", "dgv") else 2e-6)
    assert "recurrent" in model.calls
    if gv is not None:  # token by token, no chunked kernel
        assert "recurrent_grad" in model.calls and not {"gla_cumsum", "gla_output", "gla_grad"} & set(model.calls)
    else:  # gk only: the chunked backward
        assert "gla_grad" in model.calls and "recurrent_grad" not in model.calls


def test_fused_recurrent_gla_value_gate_bf16(model):
    """bf16 inputs through the gv backward: the dtypes of the gradients and the GPU tests'
    tolerances against the float64 recurrence."""
    q, k, v, _, _, h0 = make(2, 100, 2, 64, 64, gate=None, dtype=torch.bfloat16)
    gk, gv = gla_gates(2, 100, 2, 64).float(), gla_gates(2, 100, 2, 64, seed=4).float()
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, gk, gv, h0)]
    o, ht = la.fused_recurrent_gla(*leaves[:3], gk=leaves[3], gv=leaves[4], initial_state=leaves[5],
                                   output_final_state=True)
    assert o.dtype == torch.bfloat16 and ht.dtype == torch.float32
    (o.float().sum() + ht.sum()).backward()
    assert [x.grad.dtype for x in leaves] == [torch.bfloat16] * 3 + [torch.float32] * 3
    refs = [x.detach().double().requires_grad_(True) for x in leaves]
    o_r, ht_r = linear_attn_recurrent_ref(*refs[:3], g=refs[3], gv=refs[4], initial_state=refs[5],
                                          output_final_state=True)
    (o_r.sum() + ht_r.sum()).backward()
    assert rms_ratio(o, o_r) < 0.005 and rms_ratio(ht, ht_r) < 1e-6
    for a, b in zip(leaves, refs):
        assert rms_ratio(a.grad, b.grad) < 0.008


def test_gla_bf16_route_dtypes_and_accuracy(model):
    q, k, v, _, _, h0 = make(2, 100, 2, 64, 64, gate=None, dtype=torch.bfloat16)
    g = gla_gates(2, 100, 2, 64).float()
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, g, h0)]
    o, ht = la.chunk_gla(*leaves[:3], leaves[3], initial_state=leaves[4], output_final_state=True)
    assert o.dtype == torch.bfloat16 and ht.dtype == torch.float32
    (o.float().sum() + ht.sum()).backward()
    assert [x.grad.dtype for x in leaves] == [torch.bfloat16] * 3 + [torch.float32] * 2
    check_bf16_against_reference(o, ht, leaves)


@pytest.mark.parametrize("lens", [None, [0, 70, 1, 64, 0, 65]], ids=["batched", "varlen"])
def test_gla_algorithm_is_exact_in_float64(lens):
    """The model's GLA launchers composed by hand, everything in float64 (gates, b, states): the
    sub-chunk algorithm itself must equal autograd of the recurrence to rounding."""
    m = LinearExtModel()
    B, T, H, K, V, scale = (2, 150, 2, 32, 24, 0.3) if lens is None else (1, sum(lens), 2, 16, 8, 0.5)
    N = B if lens is None else len(lens)
    q, k, v, _, _, h0 = make(B, T, H, K, V, gate=None, N=N)
    g = F.logsigmoid(torch.randn(B, T, H, K, generator=torch.Generator().manual_seed(5), dtype=F64))
    gen = torch.Generator().manual_seed(6)
    do, dht = torch.randn(B, T, H, V, generator=gen, dtype=F64), torch.randn(N, H, K, V, generator=gen, dtype=F64)
    seqs = _kernels.Seqs(B, T, None if lens is None else cu(lens), torch.device("cpu"))
    c, off, S = seqs.cu, seqs.offsets, seqs.slots

    b = torch.empty_like(g)
    m.gla_cumsum(g, b, c, off, S)
    h, ht = torch.empty(S, H, K, V, dtype=F64), torch.empty(N, H, K, V, dtype=F64)
    m.chunk_state(k, v, None, None, h0, h, ht, c, off, 1.0, False, gk_cum=b)
    o = torch.empty_like(v)
    m.gla_output(q, k, v, h, b, o, c, off, scale, scale, False)
    dH, dh0 = torch.empty(S, H, K, V, dtype=F64), torch.empty(N, H, K, V, dtype=F64)
    m.chunk_state(q, do, None, None, dht, dH, dh0, c, off, scale, True, gk_cum=b)
    dv = torch.empty_like(v)
    m.gla_output(k, q, do, dH, b, dv, c, off, 1.0, scale, True)
    dq, dk, dg = torch.empty_like(q), torch.empty_like(k), torch.empty_like(g)
    m.gla_grad(q, k, v, do, b, h, dH, dq, dk, dg, c, off, scale)

    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, g, h0)]
    o_r, ht_r = linear_attn_recurrent_ref(*leaves[:3], g=leaves[3], scale=scale, initial_state=leaves[4],
                                          output_final_state=True, cu_seqlens=c)
    ((o_r * do).sum() + (ht_r * dht).sum()).backward()
    for name, a, r in (("o", o, o_r), ("ht", ht, ht_r), ("dq", dq, leaves[0].grad), ("dk", dk, leaves[1].grad),
                       ("dv", dv, leaves[2].grad), ("dg", dg, leaves[3].grad), ("dh0", dh0, leaves[4].grad)):
        assert rms_ratio(a, r) < 1e-12, name


# --------------------------------------------------------------------------- GLA: one-pass forward
# chunk_gla's forward runs gla_fused_fwd (gla_cumsum, then one pass) when the one-pass switch is on
# and its N * H * (V / BV) CTAs fill the SMs (gla_fused_plan); else the three launches.

def one_pass_calls(K, V):
    """The launches of chunk_gla's one-pass forward: the 256-thread kernel (K = 128, V a multiple
    of 128 after padding) sums the raw gates itself; the 128-thread one after gla_cumsum."""
    if _kernels.kernel_head_dim(K) == 128 and _kernels.kernel_head_dim(V) % 128 == 0:
        return ["gla_fused_fwd"]
    return ["gla_cumsum", "gla_fused_fwd"]


@pytest.mark.parametrize("case", GLA_CASES, ids=[c[0] for c in GLA_CASES])
def test_gla_fused_forward_matches_reference(fused, case):
    _, T, K, V, n, scale, lens = case
    (q, k, v, _, _, h0), offsets = make_case(T, K, V, lens, gate=None)
    g = gla_gates(*q.shape, n)
    o, ht = la.chunk_gla(q, k, v, g, scale=scale, initial_state=h0, output_final_state=True, cu_seqlens=offsets)
    o_ref, ht_ref = linear_attn_recurrent_ref(q, k, v, g=g, scale=scale, initial_state=h0, output_final_state=True,
                                              cu_seqlens=offsets)
    close(o, o_ref, gla_tol(n))
    close(ht, ht_ref, gla_tol(n))
    assert fused.calls == one_pass_calls(K, V)  # no chunk states, no gla_output
    if lens is not None:  # empty sequences: the state passes through
        assert torch.equal(ht[0], h0[0]) and torch.equal(ht[4], h0[4])


def test_gla_fused_forward_varlen_without_states(fused):
    lens = [0, 65, 1, 64, 0, 30]
    q, k, v, _, _, _ = make(1, sum(lens), 2, 64, 64, gate=None, h0=False)
    g = gla_gates(*q.shape)
    o, ht = la.chunk_gla(q, k, v, g, cu_seqlens=cu(lens))
    assert ht is None
    close(o, linear_attn_recurrent_ref(q, k, v, g=g, cu_seqlens=cu(lens))[0])
    assert fused.calls == one_pass_calls(64, 64)


def test_gla_fused_forward_switch_and_grid(fused, monkeypatch):
    """The switch off, a grid below the SM count, or an extension without gla_fused_fwd: the
    three launches, with the same result."""
    q, k, v, _, _, h0 = make(2, 100, 2, 64, 128, gate=None)  # 2 x 2 x 2 = 8 CTAs
    g = gla_gates(*q.shape)

    def run():
        fused.calls.clear()
        return la.chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True)

    fused.sms = 8
    o_on, ht_on = run()
    assert fused.calls == ["gla_cumsum", "gla_fused_fwd"]
    three = ["gla_cumsum", "chunk_state", "gla_output"]
    fused.sms = 9
    o_few, ht_few = run()
    assert fused.calls == three
    fused.sms = 1
    monkeypatch.setenv(_kernels.FUSED_FWD_ENV, "0")
    o_off, ht_off = run()
    assert fused.calls == three
    monkeypatch.delenv(_kernels.FUSED_FWD_ENV)

    class Older(CountingModel):  # a build from before gla_fused_fwd
        def __getattribute__(self, name):
            if name in ("gla_fused_fwd", "gla_fused_tile_v"):
                raise AttributeError(name)
            return super().__getattribute__(name)

    older = Older()
    older.sms = 1
    monkeypatch.setattr(_kernels, "extension", lambda: older)
    o_old, ht_old = la.chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    assert older.calls == three
    for o, ht in ((o_few, ht_few), (o_off, ht_off), (o_old, ht_old)):
        close(o_on, o)
        close(ht_on, ht)


def test_gla_fused_forward_grid_at_k128(fused):
    """K = 128 with V a multiple of 128: one CTA per (sequence, head, 128 V columns) (the 256-thread
    kernel), else 64-column tiles; the grid may leave 1/16 of the SMs idle (128 CTAs on 132)."""
    assert [fused.gla_fused_tile_v(k, v) for k, v in ((128, 128), (128, 256), (128, 192), (64, 128), (256, 256))] \
        == [128, 128, 64, 64, 32]
    q, k, v, _, _, h0 = make(2, 70, 3, 128, 256, gate=None)  # 2 x 3 x 2 = 12 CTAs
    g = gla_gates(*q.shape)
    three = ["gla_cumsum", "chunk_state", "gla_output"]
    for sms, calls in ((12, ["gla_fused_fwd"]), (13, three), (132, three)):  # (T = 70: too short for segments)
        fused.sms = sms
        fused.calls.clear()
        la.chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True)
        assert fused.calls == calls, sms
    q, k, v, _, _, h0 = make(8, 3, 16, 128, 128, gate=None, seed=1)  # 8 x 16 = 128 CTAs
    g = gla_gates(*q.shape)
    for sms, calls in ((132, ["gla_fused_fwd"]), (137, three)):
        fused.sms = sms
        fused.calls.clear()
        o, ht = la.chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True)
        assert fused.calls == calls, sms
        o_ref, ht_ref = linear_attn_recurrent_ref(q, k, v, g=g, initial_state=h0, output_final_state=True)
        close(o, o_ref)
        close(ht, ht_ref)


def test_gla_fused_forward_then_backward(fused):
    """The backward recomputes the states itself (chunk_state): gradients after a one-pass forward."""
    check_gla_route_against_reference(("fused", 130, 64, 72, 1.0, 0.5, [0, 65, 1, 64]), True)
    assert "gla_fused_fwd" in fused.calls and "gla_output" in fused.calls and "gla_grad" in fused.calls


def test_gla_fused_very_negative_gates(fused):
    """Gates of -1000 and logsigmoid(x) / 0.01 through the one pass: the model raises if any used
    exponent is > 0."""
    q, k, v, _, _, h0 = make(1, 200, 2, 64, 64, gate=None)
    g = gla_gates(1, 200, 2, 64, n=0.01)
    g[:, ::3, :, ::2] = -1000.0
    o, ht = la.chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    o_r, ht_r = linear_attn_recurrent_ref(q, k, v, g=g, initial_state=h0, output_final_state=True)
    assert fused.calls == ["gla_cumsum", "gla_fused_fwd"]
    close(o, o_r, gla_tol(0.01))
    close(ht, ht_r, gla_tol(0.01))


@pytest.mark.parametrize("K,V", [(64, 128), (128, 64), (256, 64)])
def test_gla_fused_model_matches_three_launch_model_in_bf16(K, V):
    """The model's one-pass forward against its chunk_state + gla_output in bf16, where both round
    the chunk states to bf16 for q S_c: what the GPU test asks of the two paths."""
    m = LinearExtModel()
    q, k, v, _, _, h0 = make(2, 130, 2, K, V, gate=None, dtype=torch.bfloat16)
    seqs = _kernels.Seqs(2, 130, None, q.device)
    b = torch.empty(2, 130, 2, K)
    m.gla_cumsum(gla_gates(2, 130, 2, K).float(), b, None, None, seqs.slots)
    o1, f1 = torch.empty_like(v), torch.empty(2, 2, K, V)
    m.gla_fused_fwd(q, k, v, b, h0, o1, f1, None, 0.5)
    states, f2 = torch.empty(seqs.slots, 2, K, V, dtype=torch.bfloat16), torch.empty(2, 2, K, V)
    m.chunk_state(k, v, None, None, h0, states, f2, None, None, 1.0, False, gk_cum=b)
    o2 = torch.empty_like(v)
    m.gla_output(q, k, v, states, b, o2, None, None, 0.5, 0.5, False)
    assert torch.equal(o1, o2)  # the same float64 arithmetic on the same rounded states
    assert torch.equal(f1, f2)


def test_gla_bad_arguments_fail_before_the_kernels(model):
    """On the CUDA route, malformed GLA calls raise naming the argument, and no launcher runs."""
    q, k, v, _, _, h0 = make(2, 20, 2, 64, 32, gate=None)
    g = gla_gates(2, 20, 2, 64)
    bad = [
        (lambda: la.chunk_gla(q, k, v, g[..., 0]), ValueError, "g.shape must be [B, T, H, K]"),
        (lambda: la.chunk_gla(q, k, v, g[:, :10]), ValueError, "g.shape must be [B, T, H, K]"),
        (lambda: la.chunk_gla(q, k, v, g.to(torch.int32)), TypeError, "g.dtype"),
        (lambda: la.chunk_gla(q, k, v, g, initial_state=h0[..., :16]), ValueError, "initial_state.shape"),
        (lambda: la.chunk_gla(q, k, v, g, initial_state=h0.half()), TypeError, "initial_state.dtype"),
        (lambda: la.chunk_gla(q, k, v, g, cu_seqlens=cu([10, 10])), ValueError, "q.shape[0] (B)"),
        (lambda: la.chunk_gla(q, k, v, g, scale=float("nan")), ValueError, "scale"),
        (lambda: la.fused_recurrent_gla(q, k, v, gk=g, gv=g), ValueError, "gv.shape must be [B, T, H, V]"),
    ]
    for call, exc, text in bad:
        with pytest.raises(exc) as info:
            call()
        assert text in str(info.value), str(info.value)
    assert model.calls == []


def test_gla_fused_forward_default_is_the_wide_kernel_only(fused, monkeypatch):
    """FLASH_ATTN_LINEAR_GLA_FUSED_FWD unset ("auto"): one pass only where the 256-thread kernel
    runs (K = 128, V a multiple of 128); the narrower tiles need =1; =0 is off everywhere."""
    fused.sms = 1
    three = ["gla_cumsum", "chunk_state", "gla_output"]
    one = ["gla_fused_fwd"]  # (the 256-thread kernel sums the gates itself)
    # (V 192 and K 100 are padded to 256 and 128)
    shapes = {(128, 128): one, (128, 256): one, (128, 192): one, (100, 128): one, (64, 128): three, (256, 256): three}
    narrow = ["gla_cumsum", "gla_fused_fwd"]
    for env, expect in ((None, None), ("auto", None), ("1", "on"), ("0", three), ("off", three)):
        if env is None:
            monkeypatch.delenv(_kernels.GLA_FUSED_FWD_ENV, raising=False)
        else:
            monkeypatch.setenv(_kernels.GLA_FUSED_FWD_ENV, env)
        for (K, V), auto in shapes.items():
            q, k, v, _, _, h0 = make(1, 70, 1, K, V, gate=None)
            g = gla_gates(*q.shape)
            fused.calls.clear()
            o, ht = la.chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True)
            want = (one if auto == one else narrow) if expect == "on" else (expect or auto)
            assert fused.calls == want, (env, K, V)
            o_ref, ht_ref = linear_attn_recurrent_ref(q, k, v, g=g, initial_state=h0, output_final_state=True)
            close(o, o_ref)
            close(ht, ht_ref)


class SegmentSpy(CountingModel):
    """Records gla_fused_fwd's segment arguments (seg_chunks, segments per sequence) and reverse."""

    def __init__(self):
        super().__init__()
        self.segs = []
        self.reverse = []  # its reverse argument per call

    def gla_fused_fwd(self, *args, **kwargs):
        seg_chunks, seg_state = (args[11], args[12]) if len(args) > 12 else (0, None)
        self.segs.append((seg_chunks, None if seg_state is None else seg_state.shape[0]))
        self.reverse.append(kwargs.get("reverse", False))
        return super().gla_fused_fwd(*args, **kwargs)


@pytest.mark.parametrize("B,T,H,lens,sms,segments", [
    (1, 600, 2, None, 8, 2),                 # 10 chunks, 2 CTAs: 2 segments of 5
    (1, 1000, 1, None, 3, 3),                # 16 chunks, 1 CTA: 3 segments of 6 (the last shorter)
    (1, 1065, 1, [0, 300, 1, 700, 64], 20, 4),  # 5 sequences, 4 segment slots each, most sequences fewer
], ids=["two", "uneven", "varlen-empty"])
def test_gla_fused_wide_segments(route_to_model, monkeypatch, B, T, H, lens, sms, segments):
    """The 256-thread kernel (K = V = 128) with fewer CTAs than SMs cuts each sequence into
    segments (pass 1: local states and per-key log-decays; pass 2: the fold, then the chunks):
    o, the final state and the gradients (through b_out) against the float64 recurrence."""
    spy = route_to_model(SegmentSpy())
    for env in (_kernels.GLA_FUSED_FWD_ENV, _kernels.FUSED_FWD_ENV):  # the defaults (one pass on)
        monkeypatch.delenv(env, raising=False)
    spy.sms = sms
    N = B if lens is None else len(lens)
    q, k, v, _, _, h0 = make(B, T, H, 128, 128, gate=None, N=N)
    g = gla_gates(*q.shape)
    o, ht = la.chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True,
                         cu_seqlens=None if lens is None else cu(lens))
    assert spy.calls == ["gla_fused_fwd"] and spy.segs == [(math.ceil(math.ceil(T / 64) / segments), N * segments)]
    o_ref, ht_ref = linear_attn_recurrent_ref(q, k, v, g=g, initial_state=h0, output_final_state=True,
                                              cu_seqlens=None if lens is None else cu(lens))
    close(o, o_ref)
    close(ht, ht_ref)
    if lens is not None:
        assert torch.equal(ht[0], h0[0])  # the empty sequence passes its state through


@pytest.mark.parametrize("fused_bwd", ["1", "0"], ids=["reverse-one-pass", "reverse-two-launches"])
@pytest.mark.parametrize("save", ["1", "0"], ids=["states-kept", "states-recomputed"])
@pytest.mark.parametrize("lens", [None, [0, 600, 1, 333]], ids=["batched", "varlen"])
def test_gla_fused_wide_segments_then_backward(route_to_model, monkeypatch, lens, save, fused_bwd):
    """Gradients after the segmented one-pass forward: it writes b (b_out) for the backward,
    which then runs no gla_cumsum, and the chunk states (h_out) unless
    FLASH_ATTN_LINEAR_SAVE_STATES=0. The backward's reverse pass (dv, dH) is the same kernel
    in reverse, in segments too (FLASH_ATTN_LINEAR_GLA_FUSED_BWD=0: chunk_state + gla_output)."""
    monkeypatch.setenv(_kernels.SAVE_STATES_ENV, save)
    monkeypatch.setenv(_kernels.GLA_FUSED_BWD_ENV, fused_bwd)
    spy = route_to_model(SegmentSpy())
    for env in (_kernels.GLA_FUSED_FWD_ENV, _kernels.FUSED_FWD_ENV):
        monkeypatch.delenv(env, raising=False)
    spy.sms = 12 if lens is None else 24  # 2 x 2 CTAs (or 4 sequences x 2 heads): 2 or 3 segments
    check_gla_route_against_reference(("wide-seg", 600, 128, 128, 1.0, 0.5, lens), True)
    assert "gla_cumsum" not in spy.calls and "gla_grad" in spy.calls, spy.calls
    one_pass = fused_bwd == "1"
    assert spy.calls.count("chunk_state") == (save == "0") + (not one_pass), spy.calls
    assert ("gla_output" in spy.calls) != one_pass, spy.calls
    assert spy.reverse == ([False, True] if one_pass else [False]), spy.reverse
    assert spy.segs and all(n > 0 for n, _ in spy.segs), spy.segs


# --------------------------------------------------------------------------- kept chunk states
# FLASH_ATTN_LINEAR_SAVE_STATES=1: the simple-GLA family's forward keeps its chunk states (the
# one-pass kernel's h_out, or the two-pass forward's chunk_state) and the backward's only
# chunk_state is the reverse dH; unset means the same (_kernels.save_states), =0 recomputes them.

KEPT_STATE_CASES = [
    ("g-T130", "g", 130, 64, 64, None),
    ("g-T600-segments", "g", 600, 64, 64, None),  # one pass: 4 CTAs on 16 SMs, 2 segments
    ("gamma-varlen", "gamma", None, 64, 64, [3, 0, 128]),
]


@pytest.mark.parametrize("one_pass", [True, False], ids=["one-pass", "two-pass"])
@pytest.mark.parametrize("case", KEPT_STATE_CASES, ids=[c[0] for c in KEPT_STATE_CASES])
def test_simple_gla_kept_states(model, monkeypatch, case, one_pass):
    monkeypatch.setenv(_kernels.SAVE_STATES_ENV, "1")
    if one_pass:
        monkeypatch.delenv(_kernels.FUSED_FWD_ENV, raising=False)
    model.sms = 16
    check_route_against_reference(case, True)
    assert model.calls.count("chunk_state") == (1 if one_pass else 2), model.calls  # forward (two-pass), dH
    assert ("chunk_fused_fwd" in model.calls) == one_pass


def test_simple_gla_states_kept_by_default(model, monkeypatch):
    monkeypatch.delenv(_kernels.SAVE_STATES_ENV, raising=False)
    monkeypatch.delenv(_kernels.FUSED_FWD_ENV, raising=False)
    assert _kernels.save_states()
    check_route_against_reference(GRAD_CASES[0], True)
    assert model.calls.count("chunk_state") == 1, model.calls  # only the backward's dH
    monkeypatch.setenv(_kernels.SAVE_STATES_ENV, "auto")
    assert _kernels.save_states()
    monkeypatch.setenv(_kernels.SAVE_STATES_ENV, "0")
    assert not _kernels.save_states()
    model.calls.clear()
    check_route_against_reference(GRAD_CASES[0], True)
    assert model.calls.count("chunk_state") == 2, model.calls  # the backward's h recompute and dH
