"""GPU tests of the linear-attention kernels (csrc/linear_attn, extension flash_attn_linear_cuda).
GLA (per-key gates: gla_cumsum, chunk_state with gk_cum, gla_output, gla_grad, the one-pass
gla_fused_fwd; chunk_gla and fused_recurrent_gla) has its own section near the end (select it
with -k gla; the one-pass forward alone with -k gla_fused), and the token-by-token backward of
fused_recurrent_gla with a value gate gv (recurrent_grad) the last one (select it with
-k "value_gate or recurrent_grad").

Two layers:
  1. each launcher against tests/linear_ext_model.py (a float64 model of it) on the same
     inputs, so a failure names the kernel that is wrong;
  2. the public ops (flash_attn.linear_attn) against the fp32 naive recurrence
     (flash_attn.reference_linear.linear_attn_recurrent_ref; for T = 8192 its chunked form,
     which tests/test_linear_reference.py checks against the recurrence), forward and
     gradients through autograd.
Rule (shared/TESTING.md, linear attention): RMS(out - ref) / RMS(ref) < 0.005 for outputs
and final states, < 0.008 for gradients. Outputs and workspaces are NaN-poisoned through the
caching allocator, so an element a kernel never writes shows.

Environment: FLASH_ATTN_TEST_QUICK=1 (subset), FLASH_ATTN_REQUIRE_CUDA=1 (fail, not skip,
when the GPU or the extension is missing).
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

import flash_attn.linear_attn as la
from flash_attn import build_info
from flash_attn.linear_attn import _kernels
from flash_attn.reference_linear import (lightning_log_decay, linear_attn_chunk_ref, linear_attn_recurrent_ref,
                                         linear_attn_ref, retention_log_decay)
from gpu_env import QUICK, gpu_marks, poison_allocator
from linear_ext_model import LinearExtModel


def _reason():
    reason = _kernels.unavailable_reason()
    if reason is None and not torch.cuda.is_available():
        reason = "no CUDA device is visible to torch"
    return reason


UNAVAILABLE = _reason()
pytestmark = gpu_marks(UNAVAILABLE)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
OUT_TOL, GRAD_TOL = 0.005, 0.008
MODEL = LinearExtModel()


def rms_ratio(a, b):
    # the float64 model (tests/linear_ext_model.py) runs on the CPU: compare there
    a, b = a.double().cpu(), b.double().cpu()
    den = b.pow(2).mean().sqrt().item()
    return (a - b).pow(2).mean().sqrt().item() / max(den, 1e-30)


def check(name, got, ref, tol):
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite values"
    err = rms_ratio(got, ref)
    assert err < tol, f"{name}: RMS ratio {err:.2e} >= {tol}"


def ext():
    return _kernels.extension()


def rand(*shape, dtype=torch.bfloat16, seed=0, scale=1.0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return (scale * torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32)).to(dtype)


def gates(*shape, n=1.0, seed=1):
    return F.logsigmoid(rand(*shape, dtype=torch.float32, seed=seed)) / n


def offsets(lens):
    return torch.tensor([0] + list(lens), device="cuda").cumsum(0).to(torch.int32)


def seqs(B, T, lens):
    return _kernels.Seqs(B, T, None if lens is None else offsets(lens), torch.device("cuda"))


# --------------------------------------------------------------------------- 1. launchers vs the model

STATE_CASES = [
    pytest.param(dt, r, n, gate, rev, tile, lens, id=f"{dt}-R{r}-N{n}-{gate}-{'rev' if rev else 'fwd'}-bn{tile}-"
                 f"{'varlen' if lens else 'batched'}")
    for dt, r, n, gate, rev, tile, lens in [
        ("bf16", 128, 128, "g", False, 64, None), ("bf16", 128, 128, "g", True, 64, None),
        ("bf16", 64, 256, "gamma", False, 32, None), ("fp16", 256, 64, None, True, 32, None),
        ("bf16", 128, 64, "g", False, 32, (0, 65, 1, 200, 0)), ("fp16", 64, 128, "g", True, 64, (130, 0, 63)),
    ]
]


def check_chunk_state(dt, R, N, gate, reverse, tile_n, lens, seg_chunks=0):
    """chunk_state against the model. gate: "g", "gamma" or None (scalar gates; reverse also
    checks the pair dot) or "gla" (GLA's per-key gk_cum, the cumulative gates). seg_chunks > 0:
    the kernel in segments (NaN-filled workspace) against the model's one walk per sequence."""
    dtype = DTYPES[dt]
    B, T, H = (2, 200, 3) if lens is None else (1, sum(lens), 3)
    x, z = rand(B, T, H, R, dtype=dtype, seed=2), rand(B, T, H, N, dtype=dtype, seed=3)
    g = gates(B, T, H) if gate == "g" else None
    gamma = -torch.rand(H, device="cuda") if gate == "gamma" else None
    s = seqs(B, T, lens)
    b = gla_cum(gates(B, T, H, R, n=0.5), s) if gate == "gla" else None
    init = rand(s.num_seqs, H, R, N, dtype=torch.float32, seed=4)
    poison_allocator(((s.slots, H, R, N), dtype), ((s.num_seqs, H, R, N), torch.float32))
    states = torch.empty(s.slots, H, R, N, device="cuda", dtype=dtype)
    final = torch.empty(s.num_seqs, H, R, N, device="cuda", dtype=torch.float32)
    # scalar gates, reverse: also the pair dot with some "forward states"
    with_pair = reverse and gate != "gla"
    fwd = rand(s.slots, H, R, N, dtype=dtype, seed=5) if with_pair else None
    pair = torch.empty(s.slots, H, (R // 64) * (N // 32), device="cuda", dtype=torch.float32) if with_pair else None
    ws = (None, None)
    if seg_chunks:
        S = -(-(-(-T // 64)) // seg_chunks)  # segments per sequence: ceil(ceil(T / 64) / seg_chunks)
        ws = (torch.full((s.num_seqs * S, H, R, N), math.nan, device="cuda"),
              torch.full((s.num_seqs * S, H) + ((R,) if gate == "gla" else ()), math.nan, device="cuda"))
    ext().chunk_state(x, z, g, gamma, init, states, final, s.cu, s.offsets, 0.7, reverse, fwd, pair, tile_n, b,
                      seg_chunks, *ws)
    states_ref = torch.zeros(s.slots, H, R, N, dtype=torch.float64)
    final_ref = torch.zeros(s.num_seqs, H, R, N, dtype=torch.float64)
    pair_ref = None if pair is None else torch.zeros(pair.shape, dtype=torch.float64)
    MODEL.chunk_state(x, z, g, gamma, init, states_ref, final_ref, s.cu, s.offsets, 0.7, reverse, fwd, pair_ref,
                      gk_cum=b)
    used = int(s.offsets[-1]) if lens is not None else s.slots  # varlen: slots past the last chunk are unused
    check("states", states[:used], states_ref[:used], OUT_TOL)
    check("final", final, final_ref, OUT_TOL)
    if with_pair:
        check("pair_dot", pair[:used].sum(-1), pair_ref[:used].sum(-1), OUT_TOL)


@pytest.mark.parametrize("dt,R,N,gate,reverse,tile_n,lens", STATE_CASES)
def test_chunk_state_kernel(dt, R, N, gate, reverse, tile_n, lens):
    check_chunk_state(dt, R, N, gate, reverse, tile_n, lens)


# chunk_state in segments (FLASH_ATTN_LINEAR_SEGMENTED_STATES on the route): batched T = 200 is 4
# chunks (segments of 1, 2 and 3 chunks: odd starts, a shorter last one), varlen has empty sequences
# and ones shorter than a segment
STATE_SEG_CASES = [
    pytest.param(dt, r, n, gate, rev, tile, lens, sc,
                 id=f"{dt}-R{r}-N{n}-{gate}-{'rev' if rev else 'fwd'}-bn{tile}-{'varlen' if lens else 'batched'}-"
                 f"seg{sc}")
    for dt, r, n, gate, rev, tile, lens, sc in [
        (dt, 128, 128, gate, rev, 64, None, sc) for dt in DTYPES for gate in ("g", "gamma", None, "gla")
        for rev in (False, True) for sc in (1, 2, 3)
    ] + [("bf16", 128, 64, "gla", rev, 32, (0, 65, 1, 200, 0), sc) for rev in (False, True) for sc in (1, 2)] + [(dt, r, n, "g", rev, tile, (0, 65, 1, 200, 0), sc) for dt in DTYPES for r, n, tile in
         ((64, 256, 32), (256, 64, 64)) for rev in (False, True) for sc in (1, 2)]
]


@pytest.mark.parametrize("dt,R,N,gate,reverse,tile_n,lens,seg_chunks", STATE_SEG_CASES)
def test_chunk_state_kernel_segments(dt, R, N, gate, reverse, tile_n, lens, seg_chunks):
    check_chunk_state(dt, R, N, gate, reverse, tile_n, lens, seg_chunks)


def test_chunk_state_segment_arguments():
    """GLA's seg_decay has a log-decay per state row; the workspace must cover T."""
    s = seqs(2, 200, None)
    x = rand(2, 200, 2, 64, dtype=torch.bfloat16, seed=1)
    states = torch.empty(s.slots, 2, 64, 64, device="cuda", dtype=torch.bfloat16)
    ws = (torch.empty(4, 2, 64, 64, device="cuda"), torch.empty(4, 2, device="cuda"))
    b = gla_cum(gates(2, 200, 2, 64, n=0.5), s)
    with pytest.raises(ValueError, match="seg_decay"):  # [4, 2] where GLA needs [4, 2, 64]
        ext().chunk_state(x, x, None, None, None, states, None, None, None, 1.0, False, None, None, 64, b, 2, *ws)
    with pytest.raises(ValueError, match="must cover T"):  # 2 segments of 1 chunk < 4 chunks
        ext().chunk_state(x, x, gates(2, 200, 2), None, None, states, None, None, None, 1.0, False, None, None, 64,
                          None, 1, *ws)


OUTPUT_CASES = [
    pytest.param(dt, r, n, tm, up, gate, lens,
                 id=f"{dt}-R{r}-N{n}-{'mT' if tm else 'm'}-{'upper' if up else 'lower'}-{gate}-"
                 f"{'varlen' if lens else 'batched'}")
    for dt, r, n, tm, up, gate, lens in [
        (dt, r, 128, tm, up, "g", None) for dt in DTYPES for r in (64, 128, 256) for tm in (False, True)
        for up in (False, True)
    ] + [("bf16", 128, 64, False, False, "gamma", None), ("bf16", 128, 256, True, True, None, None),
         ("fp16", 64, 192, False, True, "g", None), ("bf16", 128, 128, True, False, "g", (0, 65, 1, 200, 0))]
]


@pytest.mark.parametrize("dt,R,N,trans_m,upper,gate,lens", OUTPUT_CASES)
def test_chunk_output_kernel(dt, R, N, trans_m, upper, gate, lens):
    dtype = DTYPES[dt]
    B, T, H = (2, 150, 2) if lens is None else (1, sum(lens), 2)
    x, y = rand(B, T, H, R, dtype=dtype, seed=2), rand(B, T, H, R, dtype=dtype, seed=3)
    z, dot = rand(B, T, H, N, dtype=dtype, seed=4), rand(B, T, H, N, dtype=dtype, seed=5)
    g = gates(B, T, H, n=0.5) if gate == "g" else None
    gamma = -torch.rand(H, device="cuda") if gate == "gamma" else None
    s = seqs(B, T, lens)
    m = rand(s.slots, H, *((N, R) if trans_m else (R, N)), dtype=dtype, seed=6, scale=0.2)
    poison_allocator(((B, T, H, N), dtype), ((N // 64, B, T, H), torch.float32))
    out = torch.empty(B, T, H, N, device="cuda", dtype=dtype)
    rowdot = torch.empty(N // 64, B, T, H, device="cuda", dtype=torch.float32)
    ext().chunk_output(x, y, z, m, out, dot, rowdot, g, gamma, s.cu, s.offsets, 0.3, 0.2, trans_m, upper)
    out_ref = torch.zeros(B, T, H, N, dtype=torch.float64)
    rowdot_ref = torch.zeros(N // 64, B, T, H, dtype=torch.float64)
    MODEL.chunk_output(x, y, z, m, out_ref, dot, rowdot_ref, g, gamma, s.cu, s.offsets, 0.3, 0.2, trans_m, upper)
    check("out", out, out_ref, OUT_TOL)
    check("rowdot", rowdot, rowdot_ref, OUT_TOL)


def grad_kernel_inputs(dtype, K, V, lens):
    """What the gradient kernels' tests share: (B, T, H), the Seqs, and q, k [B, T, H, K] and
    v, do [B, T, H, V] in dtype."""
    B, T, H = (2, 300, 3) if lens is None else (1, sum(lens), 3)
    q, k = rand(B, T, H, K, dtype=dtype, seed=2), rand(B, T, H, K, dtype=dtype, seed=3)
    v, do = rand(B, T, H, V, dtype=dtype, seed=4), rand(B, T, H, V, dtype=dtype, seed=5)
    return (B, T, H), seqs(B, T, lens), (q, k, v, do)


GATE_CASES = [("bf16", 128, 128, "g", None), ("fp16", 64, 256, "gamma", None), ("bf16", 256, 64, "g", (0, 300, 1, 64, 0))]


@pytest.mark.parametrize("dt,K,V,gate,lens", GATE_CASES,
                         ids=[f"{d}-K{k}-V{v}-{g}-{'varlen' if n else 'batched'}" for d, k, v, g, n in GATE_CASES])
def test_gate_grad_kernel(dt, K, V, gate, lens):
    dtype = DTYPES[dt]
    (B, T, H), s, (q, k, v, do) = grad_kernel_inputs(dtype, K, V, lens)
    g = gates(B, T, H) if gate == "g" else None
    gamma = -torch.rand(H, device="cuda") if gate == "gamma" else None
    rq, rk = rand(K // 64, B, T, H, dtype=torch.float32, seed=6), rand(K // 64, B, T, H, dtype=torch.float32, seed=7)
    pair = rand(s.slots, H, 3, dtype=torch.float32, seed=8)
    poison_allocator(((B, T, H), torch.float32))
    dg = torch.empty(B, T, H, device="cuda", dtype=torch.float32)
    ext().gate_grad(q, k, v, do, g, gamma, rq, rk, pair, dg, s.cu, s.offsets, 0.3)
    dg_ref = torch.zeros(B, T, H, dtype=torch.float64)
    MODEL.gate_grad(q, k, v, do, g, gamma, rq, rk, pair, dg_ref, s.cu, s.offsets, 0.3)
    check("dg", dg, dg_ref, 1e-4)


RECURRENT_CASES = [("bf16", 64, 64, "g", False), ("bf16", 128, 128, "gamma", True), ("fp16", 256, 96, "gkgv", False),
                   ("bf16", 128, 256, None, False), ("fp16", 64, 128, "gkgv", True)]


@pytest.mark.parametrize("dt,K,V,gate,reverse", RECURRENT_CASES,
                         ids=[f"{d}-K{k}-V{v}-{g}-{'rev' if r else 'fwd'}" for d, k, v, g, r in RECURRENT_CASES])
@pytest.mark.parametrize("lens", [None, (0, 70, 1, 0), "wide", "decode"], ids=["batched", "varlen", "wide", "decode"])
def test_recurrent_kernel(dt, K, V, gate, reverse, lens):
    """recurrent.cuh's layouts (run_recurrent picks by the grid; H100 / H200: 132 SMs): 32 columns
    and 4 state rows per thread below 4 CTAs per SM (few long sequences: batched, varlen); 8 rows
    above ("wide": 136 sequences x 2 heads x V / 32 >= 544 CTAs, 2 steps each); whole 128-column rows
    when decoding with V a multiple of 128 on at least 2 CTAs per SM ("decode": 136 x 2 x V / 128 >=
    272 CTAs, one step each; V = 64 / 96 fall back to 32 columns)."""
    dtype = DTYPES[dt]
    if lens in ("wide", "decode"):
        B, T, H, lens = 136, 2 if lens == "wide" else 1, 2, None
    else:
        B, T, H = (2, 90, 2) if lens is None else (1, sum(lens), 2)
    q, k, v = rand(B, T, H, K, dtype=dtype, seed=2), rand(B, T, H, K, dtype=dtype, seed=3), \
        rand(B, T, H, V, dtype=dtype, seed=4)
    g = gates(B, T, H) if gate == "g" else None
    gamma = -torch.rand(H, device="cuda") if gate == "gamma" else None
    gk = gates(B, T, H, K, n=4) if gate == "gkgv" else None
    gv = gates(B, T, H, V, n=4, seed=5) if gate == "gkgv" else None
    s = seqs(B, T, lens)
    init = rand(s.num_seqs, H, K, V, dtype=torch.float32, seed=6)
    poison_allocator(((B, T, H, V), dtype), ((s.num_seqs, H, K, V), torch.float32))
    out = torch.empty(B, T, H, V, device="cuda", dtype=dtype)
    final = torch.empty(s.num_seqs, H, K, V, device="cuda", dtype=torch.float32)
    ext().recurrent(q, k, v, g, gamma, gk, gv, init, out, final, s.cu, s.offsets, 0.3, reverse)
    out_ref = torch.zeros(B, T, H, V, dtype=torch.float64)
    final_ref = torch.zeros(s.num_seqs, H, K, V, dtype=torch.float64)
    MODEL.recurrent(q, k, v, g, gamma, gk, gv, init, out_ref, final_ref, s.cu, s.offsets, 0.3, reverse)
    check("out", out, out_ref, OUT_TOL)
    check("final", final, final_ref, 1e-5)


# --------------------------------------------------------------------------- 2. the ops vs the recurrence

def reference(q, k, v, T, **kw):
    """The fp32 naive recurrence (its chunked form beyond T = 2048, for time)."""
    fn = linear_attn_recurrent_ref if T <= 2048 else linear_attn_chunk_ref
    kw = {n: x for n, x in kw.items() if not (n == "reverse" and not x)}
    return fn(q.float(), k.float(), v.float(), **kw)


def make_inputs(B, T, H, K, V, gate, n, dtype, seed=0, N=None):
    q, k = rand(B, T, H, K, dtype=dtype, seed=seed), rand(B, T, H, K, dtype=dtype, seed=seed + 1)
    v = rand(B, T, H, V, dtype=dtype, seed=seed + 2)
    g = gates(B, T, H, n=n, seed=seed + 3) if gate == "g" else None
    gamma = (-torch.rand(H, device="cuda") / n) if gate == "gamma" else None
    h0 = rand(N or B, H, K, V, dtype=torch.float32, seed=seed + 4)
    return q, k, v, g, gamma, h0


def _fwd_cases():
    cases = [(t, 128, 128, "g", 1.0, None, "bf16") for t in (1, 63, 64, 65, 500, 2048, 8192)]
    cases += [(500, 64, 64, "g", n, s, "bf16") for n in (0.1, 1.0, 10.0) for s in (1.0, 0.1)]
    cases += [(t, k, v, "g", 1.0, None, "bf16") for t in (65, 500)
              for k, v in ((64, 64), (100, 100), (256, 256), (64, 256), (256, 100), (100, 64))]
    cases += [(500, 128, 128, gate, 1.0, None, dt) for gate in ("gamma", None) for dt in DTYPES]
    cases += [(2048, 128, 128, "g", 1.0, None, "fp16")]
    if QUICK:
        cases = [c for c in cases if c[0] in (65, 2048) and c[1] in (100, 128)]
    return [pytest.param(*c, id=f"T{c[0]}-K{c[1]}-V{c[2]}-{c[3]}-n{c[4]}-s{c[5]}-{c[6]}") for c in cases]


@pytest.mark.parametrize("T,K,V,gate,n,scale,dt", _fwd_cases())
@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_simple_gla_forward(mode, T, K, V, gate, n, scale, dt):
    if mode == "recurrent" and T > 2048:
        pytest.skip("the token-by-token kernel is for decoding; T <= 2048 covers it")
    dtype = DTYPES[dt]
    B, H = (1, 2) if T >= 2048 else (2, 3)
    q, k, v, g, gamma, h0 = make_inputs(B, T, H, K, V, gate, n, dtype)
    op = la.chunk_simple_gla if mode == "chunk" else la.fused_recurrent_simple_gla
    poison_allocator(((B, T, H, V), dtype), ((B, H, K, V), torch.float32))
    o, ht = op(q, k, v, g=g, g_gamma=gamma, scale=scale, initial_state=h0, output_final_state=True)
    o_ref, ht_ref = reference(q, k, v, T, g=g, g_gamma=gamma, scale=scale, initial_state=h0, output_final_state=True)
    assert o.dtype == dtype and ht.dtype == torch.float32
    check("o", o, o_ref, OUT_TOL)
    check("final_state", ht, ht_ref, OUT_TOL)


def _grad_cases():
    cases = [(t, 128, 128, "g", 1.0, "bf16") for t in (1, 63, 64, 65, 500, 2048, 8192)]
    cases += [(500, 64, 64, "g", n, "bf16") for n in (0.1, 10.0)]
    cases += [(200, k, v, "g", 1.0, "bf16") for k, v in ((64, 64), (100, 100), (256, 256), (64, 256), (256, 100))]
    cases += [(500, 128, 128, "gamma", 1.0, "bf16"), (500, 128, 128, None, 1.0, "bf16"),
              (500, 128, 128, "g", 1.0, "fp16")]
    if QUICK:
        cases = [c for c in cases if c[0] in (65, 500) and c[1] == 128]
    return [pytest.param(*c, id=f"T{c[0]}-K{c[1]}-V{c[2]}-{c[3]}-n{c[4]}-{c[5]}") for c in cases]


def _grads(fn, inputs, w_o, w_s):
    """The gradients of sum(o * w_o) + sum(ht * w_s), (o, ht) = fn(*inputs), for each input
    (None for an input that is None)."""
    leaves = [None if x is None else x.detach().clone().requires_grad_(True) for x in inputs]
    o, ht = fn(*leaves)
    ((o.float() * w_o).sum() + (ht * w_s).sum()).backward()
    return [None if x is None else x.grad for x in leaves]


@pytest.mark.parametrize("T,K,V,gate,n,dt", _grad_cases())
def test_chunk_simple_gla_backward(T, K, V, gate, n, dt):
    dtype = DTYPES[dt]
    B, H = (1, 2) if T >= 2048 else (2, 3)
    inputs = make_inputs(B, T, H, K, V, gate, n, dtype)
    # w_o is representable in the input dtype, so do = w_o exactly on both sides (autograd
    # hands the kernels' backward do in o's dtype)
    w_o, w_s = rand(B, T, H, V, dtype=dtype, seed=9).float(), rand(B, H, K, V, dtype=torch.float32, seed=10)
    poison_allocator(((B, T, H, max(K, V)), dtype), ((B, H, K, V), torch.float32))
    got = _grads(lambda q, k, v, g, gm, h0: la.chunk_simple_gla(q, k, v, g=g, g_gamma=gm, initial_state=h0,
                                                                output_final_state=True), inputs, w_o, w_s)
    fp32 = [None if x is None else x.float() for x in inputs]
    ref = _grads(lambda q, k, v, g, gm, h0: reference(q, k, v, T, g=g, g_gamma=gm, initial_state=h0,
                                                      output_final_state=True), fp32, w_o, w_s)
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dg_gamma", "dh0"), got, ref):
        if b is not None:
            assert a is not None, f"{name}: no gradient"
            assert name not in ("dq", "dk", "dv") or a.dtype == dtype, f"{name}: dtype {a.dtype}"
            check(name, a, b, GRAD_TOL)


EMPTY_LENS = (0, 300, 1, 64, 0, 129)  # sequences 0 and 4 are empty


def check_varlen_with_empty_sequences(run, inputs, grad):
    """run(q, k, v, g, h0, cu_seqlens) -> (o, ht) on one packed row of EMPTY_LENS against the fp32
    recurrence: o, the final states (an empty sequence's is its initial state), and with
    grad the gradients of q, k, v, g, h0."""
    cu = offsets(EMPTY_LENS)
    leaves = [x.clone().requires_grad_(grad) for x in inputs]
    o, ht = run(*leaves, cu)
    refs = [x.float().clone().requires_grad_(grad) for x in inputs]
    o_r, ht_r = linear_attn_recurrent_ref(*refs[:3], g=refs[3], initial_state=refs[4], output_final_state=True,
                                          cu_seqlens=cu)
    check("o", o, o_r, OUT_TOL)
    check("final_state", ht, ht_r, OUT_TOL)
    h0 = inputs[4]
    assert torch.equal(ht[0], h0[0]) and torch.equal(ht[4], h0[4])  # empty: the state passes through
    if grad:
        w = rand(*o.shape, seed=11).float()
        ((o.float() * w).sum() + ht.sum()).backward()
        ((o_r * w).sum() + ht_r.sum()).backward()
        for name, a, b in zip(("dq", "dk", "dv", "dg", "dh0"), leaves, refs):
            check(name, a.grad, b.grad, GRAD_TOL)


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "fwdbwd"])
def test_varlen_with_empty_sequence(mode, grad):
    q, k, v, g, _, h0 = make_inputs(1, sum(EMPTY_LENS), 2, 128, 128, "g", 1.0, torch.bfloat16, N=len(EMPTY_LENS))
    op = la.chunk_simple_gla if mode == "chunk" else la.fused_recurrent_simple_gla
    check_varlen_with_empty_sequences(
        lambda q, k, v, g, h0, cu: op(q, k, v, g=g, initial_state=h0, output_final_state=True, cu_seqlens=cu),
        (q, k, v, g, h0), grad)


@pytest.mark.parametrize("chunk_op,recurrent_op,kwargs", [
    (la.chunk_simple_gla, la.fused_recurrent_simple_gla, dict(g="g")),
    (la.chunk_retention, la.fused_recurrent_retention, dict()),
    (la.chunk_lightning_attn, la.fused_recurrent_lightning_attn, dict(layer_idx=1, num_layers=3)),
], ids=["simple_gla", "retention", "lightning"])
def test_chunk_and_recurrent_agree(chunk_op, recurrent_op, kwargs):
    q, k, v, g, _, h0 = make_inputs(2, 777, 4, 128, 128, "g", 1.0, torch.bfloat16)
    kwargs = {n: (g if x == "g" else x) for n, x in kwargs.items()}
    o_c, s_c = chunk_op(q, k, v, **kwargs, initial_state=h0, output_final_state=True)
    o_r, s_r = recurrent_op(q, k, v, **kwargs, initial_state=h0, output_final_state=True)
    check("o", o_c, o_r.float(), OUT_TOL)
    check("final_state", s_c, s_r, OUT_TOL)


def test_fixed_decays_match_reference():
    q, k, v, _, _, h0 = make_inputs(2, 300, 8, 64, 64, None, 1.0, torch.bfloat16)
    o, ht = la.chunk_retention(q, k, v, initial_state=h0, output_final_state=True)
    o_r, ht_r = reference(q, k, v, 300, g_gamma=retention_log_decay(8, "cuda"), initial_state=h0,
                          output_final_state=True)
    check("retention o", o, o_r, OUT_TOL)
    check("retention final", ht, ht_r, OUT_TOL)
    o = la.chunk_lightning_attn(q, k, v, layer_idx=0, num_layers=4)[0]
    check("lightning o", o, reference(q, k, v, 300, g_gamma=lightning_log_decay(8, 0, 4, "cuda"))[0], OUT_TOL)


@pytest.mark.parametrize("normalize", [False, True])
def test_chunk_linear_attn(normalize):
    q, k, v, _, _, h0 = make_inputs(2, 300, 2, 64, 64, None, 1.0, torch.bfloat16)
    q, k = q.sigmoid(), k.sigmoid()
    o, _ = la.chunk_linear_attn(q, k, v, normalize=normalize)
    o_r, _ = linear_attn_ref(q.float(), k.float(), v.float(), normalize=normalize)
    check("o", o, o_r, OUT_TOL)


def test_decoding_steps_carry_the_state():
    """fused_recurrent_simple_gla one token at a time equals one call over the sequence."""
    q, k, v, g, _, h0 = make_inputs(4, 40, 4, 128, 128, "g", 1.0, torch.bfloat16)
    o_all, s_all = la.fused_recurrent_simple_gla(q, k, v, g=g, initial_state=h0, output_final_state=True)
    state, outs = h0, []
    for t in range(40):
        o_t, state = la.fused_recurrent_simple_gla(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], g=g[:, t:t + 1],
                                                   initial_state=state, output_final_state=True)
        outs.append(o_t)
    check("o", torch.cat(outs, 1), o_all, 1e-5)
    check("final_state", state, s_all, 1e-5)


def test_very_negative_gates_stay_finite():
    q, k, v, _, _, h0 = make_inputs(1, 300, 2, 64, 64, None, 1.0, torch.bfloat16)
    g = torch.full((1, 300, 2), -1000.0, device="cuda")
    g[:, ::7] = F.logsigmoid(rand(1, 43, 2, dtype=torch.float32)) / 0.01
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, g)]
    o, ht = la.chunk_simple_gla(*leaves[:3], g=leaves[3], initial_state=h0, output_final_state=True)
    o_r, ht_r = reference(q, k, v, 300, g=g, initial_state=h0, output_final_state=True)
    check("o", o, o_r, OUT_TOL)
    check("final_state", ht, ht_r, OUT_TOL)
    o.float().sum().backward()
    for x in leaves:
        assert torch.isfinite(x.grad).all()


def test_fused_recurrent_gla_forward():
    q, k, v, _, _, h0 = make_inputs(2, 300, 2, 128, 128, None, 1.0, torch.bfloat16)
    gk, gv = gates(2, 300, 2, 128, n=2.0, seed=7), gates(2, 300, 2, 128, n=2.0, seed=8)
    o, ht = la.fused_recurrent_gla(q, k, v, gk=gk, gv=gv, initial_state=h0, output_final_state=True)
    o_r, ht_r = reference(q, k, v, 300, g=gk, gv=gv, initial_state=h0, output_final_state=True)
    check("o", o, o_r, OUT_TOL)
    check("final_state", ht, ht_r, OUT_TOL)


def test_deterministic():
    inputs = make_inputs(2, 1000, 4, 128, 128, "g", 1.0, torch.bfloat16)
    w = rand(2, 1000, 4, 128, seed=12).float()
    runs = [_grads(lambda q, k, v, g, gm, h0: la.chunk_simple_gla(q, k, v, g=g, initial_state=h0,
                                                                  output_final_state=True), inputs, w, 1.0)
            for _ in range(2)]
    for a, b in zip(*runs):
        if a is not None:
            assert torch.equal(a, b)


# --------------------------------------------------------------------------- one-pass forward (chunk_fused_fwd)
# csrc/linear_attn/chunk_fused.cuh: chunk_state + chunk_output in one kernel, the default forward
# of the scalar-gate ops (FLASH_ATTN_LINEAR_FUSED_FWD=0 turns it off; _kernels.fused_plan), with
# the sequences cut into segments where the grid would be smaller than the GPU.

def _fused_cases():
    """(dt, T, K, V, gate, scale, states, lens, seg_chunks): every T at K = V = 128, every head-dim
    pair at two T, the gates and dtypes, scale 0.1, no initial / final state, varlen with empty
    sequences; and the same in segments (seg_chunks > 0: a last segment shorter, segments of one
    chunk, a last chunk of 1 row, varlen sequences of fewer chunks than others' segments)."""
    cases = [("bf16", t, 128, 128, "g", 1.0, True, None, 0) for t in (1, 17, 63, 64, 65, 500, 2048)]
    cases += [("bf16", t, k, v, "g", 1.0, True, None, 0) for t in (65, 500)
              for k, v in ((64, 64), (256, 256), (64, 256), (256, 64), (128, 256), (256, 128))]
    cases += [(dt, t, 128, 128, gate, 1.0, True, None, 0) for dt in DTYPES for gate in ("g", "gamma", None)
              for t in (63, 2048)]
    cases += [(dt, 500, k, k, gate, 0.1, states, None, 0) for dt in DTYPES for k in (64, 256)
              for gate in ("g", "gamma") for states in (True, False)]
    cases += [(dt, None, k, k, "g", 0.3, states, EMPTY_LENS, 0) for dt in DTYPES for k in (64, 128, 256)
              for states in (True, False)]
    # segments
    cases += [(dt, 2048, 128, 128, gate, 1.0, True, None, sc) for dt in DTYPES for gate in ("g", "gamma", None)
              for sc in (3, 8)]
    cases += [("bf16", t, k, k, "g", 0.5, states, None, sc) for t, sc in ((65, 1), (129, 1), (500, 2), (1000, 4))
              for k in (64, 128, 256) for states in (True, False)]
    cases += [(dt, None, k, k, gate, 0.3, True, EMPTY_LENS, sc) for dt in DTYPES for k in (64, 128, 256)
              for gate in ("g", None) for sc in (1, 2)]
    if QUICK:
        cases = [c for c in cases if c[1] in (65, 2048, None) and c[2] == 128]
    return [pytest.param(*c, id=f"{c[0]}-T{c[1] if c[7] is None else 'varlen'}-K{c[2]}-V{c[3]}-{c[4]}-s{c[5]}-"
                         f"{'states' if c[6] else 'nostates'}" + (f"-seg{c[8]}" if c[8] else ""))
            for c in cases]


def _expected_fused_kernel():
    """90 where chunk_fused_fwd must run its wgmma kernel (chunk_fused_sm90.cuh: an sm90 device, a
    build with sm90 code, FLASH_ATTN_LINEAR_SM90 not "0"), else 80 (the mma.sync kernel)."""
    archs = [str(a) for a in build_info.build_config().get("archs", [])]
    sm90 = torch.cuda.get_device_capability() == (9, 0) and "90" in archs
    return 90 if sm90 and os.environ.get("FLASH_ATTN_LINEAR_SM90") != "0" else 80


@pytest.mark.parametrize("dt,T,K,V,gate,scale,states,lens,seg_chunks", _fused_cases())
def test_chunk_fused_fwd_kernel(dt, T, K, V, gate, scale, states, lens, seg_chunks):
    """The kernel against the two-pass forward (chunk_state + chunk_output, same inputs) and the
    fp32 recurrence: o and the final state; with states, also the chunk states it keeps for the
    backward (h_out, NaN-poisoned) against chunk_state's. With segments, the workspace starts as
    NaN. On sm90 this is the wgmma kernel (asserted)."""
    check_chunk_fused(dt, T, K, V, gate, scale, states, lens, seg_chunks)


# The mma.sync kernel where the cases above run the wgmma one (sm90: FLASH_ATTN_LINEAR_SM90=0), and
# the wgmma one with one V tile per CTA everywhere (FLASH_ATTN_LINEAR_SM90_PAIR=0) and with two
# wherever V holds two (=1, K 128 and 256): every K, gate kind, segments, varlen, both dtypes, V of
# an odd number of tiles at K = 128 (no pairs there).
@pytest.mark.parametrize("switch", ["mma_sync", "wgmma_single", "wgmma_pairs"])
@pytest.mark.parametrize("dt,T,K,V,gate,scale,states,lens,seg_chunks", [
    ("bf16", 500, 128, 128, "g", 1.0, True, None, 0), ("fp16", 2048, 128, 256, "gamma", 0.1, True, None, 0),
    ("bf16", 113, 64, 64, None, 1.0, False, None, 0), ("fp16", 500, 256, 256, "g", 0.5, True, None, 0),
    ("bf16", 1000, 256, 64, "g", 1.0, True, None, 3), ("bf16", None, 128, 128, "g", 0.3, True, EMPTY_LENS, 2),
    ("fp16", None, 64, 128, "gamma", 1.0, True, EMPTY_LENS, 0), ("bf16", 300, 256, 192, "g", 1.0, True, None, 0),
    ("bf16", 700, 128, 192, None, 1.0, True, None, 2), ("fp16", None, 256, 128, "g", 1.0, True, EMPTY_LENS, 1),
])
def test_chunk_fused_fwd_kernel_switch(monkeypatch, switch, dt, T, K, V, gate, scale, states, lens, seg_chunks):
    monkeypatch.setenv("FLASH_ATTN_LINEAR_SM90", "0" if switch == "mma_sync" else "1")
    monkeypatch.setenv("FLASH_ATTN_LINEAR_SM90_PAIR", "1" if switch == "wgmma_pairs" else "0")
    check_chunk_fused(dt, T, K, V, gate, scale, states, lens, seg_chunks)


def check_chunk_fused(dt, T, K, V, gate, scale, states, lens, seg_chunks):
    dtype = DTYPES[dt]
    B, T, H = (2, T, 3) if lens is None else (1, sum(lens), 2)
    N = B if lens is None else len(lens)
    q, k, v, g, gamma, h0 = make_inputs(B, T, H, K, V, gate, 1.0, dtype, N=N)
    h0 = h0 if states else None
    s = seqs(B, T, lens)
    poison_allocator(((B, T, H, V), dtype), ((N, H, K, V), torch.float32))
    o = torch.empty(B, T, H, V, device="cuda", dtype=dtype)
    final = torch.empty(N, H, K, V, device="cuda", dtype=torch.float32) if states else None
    h_out = torch.full((s.slots, H, K, V), math.nan, device="cuda", dtype=dtype) if states else None
    kept = (h_out, s.offsets) if states else ()
    if seg_chunks:
        S = -(-(-(-T // 64)) // seg_chunks)  # segments per sequence: ceil(ceil(T / 64) / seg_chunks)
        seg_state = torch.full((N * S, H, K, V), math.nan, device="cuda")
        seg_decay = torch.full((N * S, H), math.nan, device="cuda")
        ext().chunk_fused_fwd(q, k, v, g, gamma, h0, o, final, s.cu, scale, seg_chunks, seg_state, seg_decay, *kept)
    else:
        ext().chunk_fused_fwd(q, k, v, g, gamma, h0, o, final, s.cu, scale, 0, None, None, *kept)
    assert ext().last_chunk_fused_kernel() == _expected_fused_kernel()
    # the two passes (chunk_state, chunk_output) called directly, whatever the switch says
    final2 = torch.empty(N, H, K, V, device="cuda", dtype=torch.float32) if states else None
    h = _kernels._states(ext(), k, v, g, gamma, h0, s, final2)
    if states:
        used = s.slots if lens is None else int(s.offsets[-1])  # (packed: Seqs.slots is an upper bound)
        check("h_out vs chunk_state", h_out[:used], h[:used], OUT_TOL)
    o2 = torch.empty_like(v)
    ext().chunk_output(q, k, v, h, o2, None, None, g, gamma, s.cu, s.offsets, scale, scale, False, False)
    o_ref, ht_ref = linear_attn_recurrent_ref(q.float(), k.float(), v.float(), g=g, g_gamma=gamma, scale=scale,
                                              initial_state=h0, output_final_state=True, cu_seqlens=s.cu)
    check("o vs two-pass", o, o2, OUT_TOL)
    check("o vs reference", o, o_ref, OUT_TOL)
    if states:
        # the same fp32 sums in the same order without segments; regrouped with them
        check("final_state vs two-pass", final, final2, 1e-4 if not seg_chunks else 1e-3)
        check("final_state vs reference", final, ht_ref, OUT_TOL)
        if lens is not None:  # empty sequences: the state passes through
            assert torch.equal(final[0], h0[0]) and torch.equal(final[4], h0[4])


def test_chunk_fused_fwd_segment_arguments():
    """Bad segment workspaces are refused before any launch."""
    q, k, v, g, _, h0 = make_inputs(2, 300, 2, 128, 128, "g", 1.0, torch.bfloat16)
    o = torch.empty_like(v)
    f32 = dict(device="cuda", dtype=torch.float32)
    with pytest.raises(ValueError, match="seg_state and seg_decay"):
        ext().chunk_fused_fwd(q, k, v, g, None, h0, o, None, None, 1.0, 2)
    with pytest.raises(ValueError, match="must cover T"):  # 2 x 2 chunks < 5 chunks
        ext().chunk_fused_fwd(q, k, v, g, None, h0, o, None, None, 1.0, 2, torch.empty(4, 2, 128, 128, **f32),
                              torch.empty(4, 2, **f32))
    with pytest.raises(ValueError, match="seg_decay"):
        ext().chunk_fused_fwd(q, k, v, g, None, h0, o, None, None, 1.0, 2, torch.empty(6, 2, 128, 128, **f32),
                              torch.empty(6, 3, **f32))
    with pytest.raises(ValueError, match="seg_state"):
        ext().chunk_fused_fwd(q, k, v, g, None, h0, o, None, None, 1.0, 2, torch.empty(5, 2, 128, 128, **f32),
                              torch.empty(5, 2, **f32))


@pytest.mark.parametrize("op,kwargs,B,T,lens,sms", [
    (la.chunk_simple_gla, dict(g="g"), 2, 700, None, None),
    (la.chunk_retention, dict(), 1, 3000, None, 64),        # segments (one pass on 64 "SMs")
    (la.chunk_simple_gla, dict(g="g"), 1, None, EMPTY_LENS, None),
], ids=["simple_gla", "retention-segments", "simple_gla-varlen"])
def test_simple_gla_kept_states_gradients(fused_switch, monkeypatch, op, kwargs, B, T, lens, sms):
    """FLASH_ATTN_LINEAR_SAVE_STATES=1: the forward's chunk states (h_out) feed the backward, whose
    only chunk_state is then the reverse dH; the gradients equal the recomputing route's up to
    the states' fp32 summation order."""
    T = sum(lens) if lens is not None else T
    N = B if lens is None else len(lens)
    q, k, v, g, _, h0 = make_inputs(B, T, 4, 128, 128, "g", 1.0, torch.bfloat16, N=N)
    cu = None if lens is None else offsets(lens)
    w = rand(B, T, 4, 128, seed=11).float()
    grads = []
    for save in ("0", "1"):
        monkeypatch.setenv(_kernels.SAVE_STATES_ENV, save)
        spy = fused_switch(True, sms=sms)
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v, g, h0)]
        extra = dict(g=leaves[3]) if "g" in kwargs else {}
        o, ht = op(*leaves[:3], initial_state=leaves[4], output_final_state=True, cu_seqlens=cu, **extra)
        ((o.float() * w).sum() + ht.sum()).backward()
        grads.append([x.grad for x in leaves if x.grad is not None])
        assert spy.calls[0] == "chunk_fused_fwd", spy.calls
        assert spy.calls.count("chunk_state") == (1 if save == "1" else 2), spy.calls
    for a, b in zip(*grads):
        check("gradient", a, b, GRAD_TOL)


# --------------------------------------------------------------------------- fused backward (chunk_bwd_fused)
# csrc/linear_attn/chunk_bwd_sm90.cuh: dv, dk and dq of the simple-GLA backward in one pass over the
# chunks on sm90a (K = V in {64, 128, 256}), against the float64 model of the three chunk_output passes.

def _fused_backward_runs():
    """Whether chunk_bwd_fused has a kernel here: an sm90 device and a build with sm90 code."""
    archs = [str(a) for a in build_info.build_config().get("archs", [])]
    return torch.cuda.get_device_capability() == (9, 0) and "90" in archs


BWD_FUSED_CASES = [
    pytest.param(dt, d, T, gate, lens, jobs, dots,
                 id=f"{dt}-D{d}-{'varlen' if lens else f'T{T}'}-{gate}-jobs{jobs}-{'dots' if dots else 'nodots'}")
    for dt, d, T, gate, lens, jobs, dots in [
        (dt, d, 300, "g", None, jobs, True) for dt in DTYPES for d in (64, 128, 256) for jobs in (7, 3, 4)
    ] + [("bf16", 128, t, gate, None, jobs, dots) for t in (1, 17, 64, 113) for gate, jobs, dots in
         (("g", 7, True), ("gamma", 3, False), (None, 4, True))]
      + [("bf16", 128, None, "g", EMPTY_LENS, jobs, True) for jobs in (7, 3, 4)]
      + [("fp16", 64, None, "gamma", (1, 0, 129, 17), 7, False), ("bf16", 64, 1000, None, None, 7, True)]
      + [("bf16", 256, t, "g", None, 7, True) for t in (1, 17, 113)]
      + [("bf16", 256, None, gate, EMPTY_LENS, jobs, True) for gate, jobs in (("g", 7), ("gamma", 3), (None, 4))]
]


@pytest.mark.parametrize("dt,D,T,gate,lens,jobs,dots", BWD_FUSED_CASES)
def test_chunk_bwd_fused_kernel(dt, D, T, gate, lens, jobs, dots):
    """chunk_bwd_fused with random states h, dH against the model: the jobs' outputs (and row dots)
    NaN-initialized, every row written; the other products' outputs stay untouched."""
    if not _fused_backward_runs():
        pytest.skip("chunk_bwd_fused runs on sm90 devices with an sm90 build only")
    dtype = DTYPES[dt]
    B, T, H = (2, T, 3) if lens is None else (1, sum(lens), 2)
    s = seqs(B, T, lens)
    q, k = rand(B, T, H, D, dtype=dtype, seed=2), rand(B, T, H, D, dtype=dtype, seed=3)
    v, do = rand(B, T, H, D, dtype=dtype, seed=4), rand(B, T, H, D, dtype=dtype, seed=5)
    g = gates(B, T, H, n=0.5) if gate == "g" else None
    gamma = -torch.rand(H, device="cuda") if gate == "gamma" else None
    h = rand(s.slots, H, D, D, dtype=dtype, seed=6, scale=0.2)
    dh = rand(s.slots, H, D, D, dtype=dtype, seed=7, scale=0.2)
    nan = lambda *shape, dtype=dtype: torch.full(shape, float("nan"), device="cuda", dtype=dtype)  # noqa: E731
    dq, dk, dv = nan(B, T, H, D), nan(B, T, H, D), nan(B, T, H, D)
    rq, rk = (nan(D // 64, B, T, H, dtype=torch.float32) for _ in range(2)) if dots else (None, None)
    scale = 0.3
    assert ext().chunk_bwd_fused(q, k, v, do, h, dh, dq, dk, dv, rq, rk, g, gamma, s.cu, s.offsets, scale, jobs)
    refs = [torch.zeros(B, T, H, D, dtype=torch.float64) for _ in range(3)]
    rrefs = [torch.zeros(D // 64, B, T, H, dtype=torch.float64) for _ in range(2)] if dots else (None, None)
    assert MODEL.chunk_bwd_fused(q, k, v, do, h, dh, *refs, *rrefs, g, gamma, s.cu, s.offsets, scale, jobs)
    for bit, name, got, ref, rgot, rref in ((1, "dv", dv, refs[2], None, None), (2, "dk", dk, refs[1], rk, rrefs[1]),
                                            (4, "dq", dq, refs[0], rq, rrefs[0])):
        if jobs & bit:
            check(name, got, ref, OUT_TOL)
            if rgot is not None:
                check(f"{name} row dots", rgot, rref, OUT_TOL)
        else:
            assert torch.isnan(got).all(), f"{name} was written by jobs {jobs}"
            assert rgot is None or torch.isnan(rgot).all(), f"{name}'s row dots were written by jobs {jobs}"


def test_chunk_bwd_fused_arguments():
    """Bad jobs, mismatched states and half of (rq, rk) raise; K != V returns False."""
    q = rand(1, 64, 2, 128)
    h = rand(1, 2, 128, 128)
    out = [torch.empty_like(q) for _ in range(3)]
    args = lambda jobs, hh=h: (q, q, q, q, h, hh, *out, None, None, None, None, None, None, 1.0, jobs)  # noqa: E731
    with pytest.raises(ValueError, match="jobs"):
        ext().chunk_bwd_fused(*args(5))
    with pytest.raises(ValueError, match="dh"):
        ext().chunk_bwd_fused(*args(7, hh=rand(1, 2, 128, 64)))
    r = torch.empty(2, 1, 64, 2, device="cuda")
    with pytest.raises(ValueError, match="rq and rk"):
        ext().chunk_bwd_fused(q, q, q, q, h, h, *out, r, None, None, None, None, None, 1.0, 7)
    q2, v2 = rand(1, 64, 2, 256), rand(1, 64, 2, 64)
    h2 = rand(1, 2, 256, 64)
    outs2 = (torch.empty_like(q2), torch.empty_like(q2), torch.empty_like(v2))
    assert not ext().chunk_bwd_fused(q2, q2, v2, v2, h2, h2, *outs2, None, None, None, None, None, None, 1.0, 7)


@pytest.mark.parametrize("mode", ["0", "one", "split"])
@pytest.mark.parametrize("op,kwargs,K,V,T,lens", [
    (la.chunk_simple_gla, dict(g="g"), 128, 128, 500, None),
    (la.chunk_simple_gla, dict(g="g"), 100, 100, 65, None),   # padded to 128
    (la.chunk_retention, dict(), 64, 64, 1, None),
    (la.chunk_simple_gla, dict(g="g"), 64, 64, None, EMPTY_LENS),
    (la.chunk_retention, dict(), 128, 256, 300, None),       # K != V: the three passes
    (la.chunk_retention, dict(), 256, 256, 300, None),       # N tiles of 64
    (la.chunk_simple_gla, dict(g="g"), 200, 200, None, EMPTY_LENS),  # padded to 256
], ids=["simple_gla", "padded", "retention-T1", "varlen", "retention-K128-V256", "retention-K256", "varlen-K200"])
def test_fused_backward_switch(monkeypatch, mode, op, kwargs, K, V, T, lens):
    """FLASH_ATTN_LINEAR_FUSED_BWD_SM90 (0, one, split): the gradients against the fp32 recurrence,
    and the route taken (_kernels.last_backward_products)."""
    monkeypatch.setenv(_kernels.FUSED_BWD_SM90_ENV, mode)
    B, T = (2, T) if lens is None else (1, sum(lens))
    N = B if lens is None else len(lens)
    q, k, v, g, _, h0 = make_inputs(B, T, 2, K, V, "g", 1.0, torch.bfloat16, N=N)
    cu = None if lens is None else offsets(lens)
    w = rand(B, T, 2, V, seed=11).float()
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, g, h0)]
    refs = [x.float().clone().requires_grad_(True) for x in (q, k, v, g, h0)]
    gated = "g" in kwargs
    o, ht = op(*leaves[:3], initial_state=leaves[4], output_final_state=True, cu_seqlens=cu,
               **(dict(g=leaves[3]) if gated else {}))
    ((o.float() * w).sum() + ht.sum()).backward()
    ref_kw = dict(g=refs[3]) if gated else dict(g_gamma=retention_log_decay(2).cuda())
    o_r, ht_r = linear_attn_recurrent_ref(*refs[:3], initial_state=refs[4], output_final_state=True, cu_seqlens=cu,
                                          **ref_kw)
    ((o_r * w).sum() + ht_r.sum()).backward()
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dh0"), leaves, refs):
        if name != "dg" or gated:
            check(name, a.grad, b.grad, GRAD_TOL)
    kd, vd = _kernels.kernel_head_dim(K), _kernels.kernel_head_dim(V)
    fused = mode != "0" and kd == vd and _fused_backward_runs()
    assert _kernels.last_backward_products == (f"fused_{mode}" if fused else "chunk_output")


class _Spy:
    """The extension with the names of the launchers the route takes from it recorded."""

    def __init__(self, mod):
        self.mod, self.calls = mod, []

    def __getattr__(self, name):
        if name not in ("chunk_fused_tile_v", "gla_fused_tile_v"):
            self.calls.append(name)
        return getattr(self.mod, name)


@pytest.fixture
def fused_switch(monkeypatch):
    """fused_switch(on, sms=None) -> a spy on the extension; sets FLASH_ATTN_LINEAR_FUSED_FWD (and
    chunk_gla's one-pass switches, forward and backward reverse pass) and, with sms, the SM count
    the route compares the grid with."""
    def set_switch(on, sms=None):
        monkeypatch.setenv(_kernels.FUSED_FWD_ENV, "1" if on else "0")
        monkeypatch.setenv(_kernels.GLA_FUSED_FWD_ENV, "1" if on else "0")  # chunk_gla's, every tile
        monkeypatch.setenv(_kernels.GLA_FUSED_BWD_ENV, "1" if on else "0")
        if sms is not None:
            monkeypatch.setattr(_kernels, "num_sms", lambda device: sms)
        spy = _Spy(_kernels._load()[0])
        monkeypatch.setattr(_kernels, "extension", lambda: spy)
        return spy
    return set_switch


@pytest.mark.parametrize("op,kwargs,K,V,lens", [
    (la.chunk_simple_gla, dict(g="g"), 128, 128, None),
    (la.chunk_simple_gla, dict(g="g"), 100, 100, None),  # padded to 128
    (la.chunk_simple_gla, dict(g="g"), 64, 256, EMPTY_LENS),
    (la.chunk_retention, dict(), 256, 256, None),
    (la.chunk_lightning_attn, dict(layer_idx=1, num_layers=3), 64, 64, None),
    (la.chunk_linear_attn, dict(normalize=False), 128, 128, None),
], ids=["simple_gla", "simple_gla-K100", "simple_gla-varlen", "retention-K256", "lightning-K64", "linear"])
def test_fused_forward_switch_routes(fused_switch, op, kwargs, K, V, lens):
    """Switch on (and a grid that fills the GPU): the op runs chunk_fused_fwd alone and gives the
    switch-off result; the backward after it is the usual one."""
    B, T, H = (2, 300, 4) if lens is None else (1, sum(lens), 4)
    N = B if lens is None else len(lens)
    q, k, v, g, _, h0 = make_inputs(B, T, H, K, V, "g", 1.0, torch.bfloat16, N=N)
    kwargs = {n: (g if x == "g" else x) for n, x in kwargs.items()}
    cu = None if lens is None else offsets(lens)
    spy = fused_switch(False)
    o_off, ht_off = op(q, k, v, **kwargs, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    assert "chunk_fused_fwd" not in spy.calls
    spy = fused_switch(True, sms=1)
    poison_allocator(((B, T, H, V), torch.bfloat16), ((N, H, K, V), torch.float32))
    o_on, ht_on = op(q, k, v, **kwargs, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    assert spy.calls == ["chunk_fused_fwd"], spy.calls
    check("o", o_on, o_off.float(), OUT_TOL)
    check("final_state", ht_on, ht_off, 1e-4)
    if op is la.chunk_simple_gla:  # gradients through the one-pass forward
        w = rand(*o_on.shape, seed=11).float()
        grads = []
        for on in (False, True):
            fused_switch(on, sms=1)
            leaves = [x.clone().requires_grad_(True) for x in (q, k, v, g, h0)]
            o, ht = op(*leaves[:3], g=leaves[3], initial_state=leaves[4], output_final_state=True, cu_seqlens=cu)
            ((o.float() * w).sum() + ht.sum()).backward()
            grads.append([x.grad for x in leaves])
        for name, a, b in zip(("dq", "dk", "dv", "dg", "dh0"), *grads):
            assert torch.equal(a, b), name  # the backward does not depend on the forward's path


@pytest.mark.parametrize("lens", [None, (0, 3000, 64, 900, 1)], ids=["batched", "varlen"])
def test_fused_forward_segments_on_the_device(fused_switch, lens):
    """With the device's own SM count, a grid of few CTAs (1 sequence or a packed row, 2 heads)
    runs in segments (fused_plan), and equals the two-pass forward and the reference, gradients
    included."""
    B, T, H = (1, 4000, 2) if lens is None else (1, sum(lens), 2)
    N = B if lens is None else len(lens)
    q, k, v, g, _, h0 = make_inputs(B, T, H, 128, 128, "g", 1.0, torch.bfloat16, N=N)
    cu = None if lens is None else offsets(lens)
    spy = fused_switch(True)
    seg_chunks, segments = _kernels.fused_plan(spy, q, v, seqs(B, T, lens))
    assert seg_chunks > 0 and segments > 1, (seg_chunks, segments)
    poison_allocator(((B, T, H, 128), torch.bfloat16), ((N, H, 128, 128), torch.float32))
    o_on, ht_on = la.chunk_simple_gla(q, k, v, g=g, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    assert spy.calls == ["chunk_fused_fwd"], spy.calls
    fused_switch(False)
    o_off, ht_off = la.chunk_simple_gla(q, k, v, g=g, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    o_ref, ht_ref = linear_attn_recurrent_ref(q.float(), k.float(), v.float(), g=g, initial_state=h0,
                                              output_final_state=True, cu_seqlens=cu)
    check("o vs two-pass", o_on, o_off, OUT_TOL)
    check("o vs reference", o_on, o_ref, OUT_TOL)
    check("final_state vs two-pass", ht_on, ht_off, 1e-3)
    check("final_state vs reference", ht_on, ht_ref, OUT_TOL)


@pytest.mark.parametrize("op", ["simple_gla", "gla"])
@pytest.mark.parametrize("lens", [None, (0, 3000, 64, 900, 1)], ids=["batched", "varlen"])
def test_segmented_states_on_the_device(monkeypatch, lens, op):
    """FLASH_ATTN_LINEAR_SEGMENTED_STATES=1 with the device's SM count: the two-pass forward and the
    backward (h, dH and the gate gradient's pair dots; GLA's per-key decays) in segments equal the
    whole-sequence route."""
    B, T, H = (1, 4000, 2) if lens is None else (1, sum(lens), 2)
    N = B if lens is None else len(lens)
    q, k, v, g, _, h0 = make_inputs(B, T, H, 128, 128, "g", 1.0, torch.bfloat16, N=N)
    if op == "gla":
        g = gates(B, T, H, 128, n=4.0)
    cu = None if lens is None else offsets(lens)
    w = rand(B, T, H, 128, seed=11).float()
    monkeypatch.setenv(_kernels.FUSED_FWD_ENV, "0")
    results = []
    for on in ("0", "1"):
        monkeypatch.setenv(_kernels.SEGMENTED_STATES_ENV, on)
        assert (_kernels.states_plan(k, v, seqs(B, T, lens)) is not None) == (on == "1")
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v, g, h0)]
        if op == "gla":
            o, ht = la.chunk_gla(*leaves[:4], initial_state=leaves[4], output_final_state=True, cu_seqlens=cu)
        else:
            o, ht = la.chunk_simple_gla(*leaves[:3], g=leaves[3], initial_state=leaves[4], output_final_state=True,
                                        cu_seqlens=cu)
        ((o.float() * w).sum() + ht.sum()).backward()
        results.append([o, ht] + [x.grad for x in leaves])
    for name, a, b in zip(("o", "ht", "dq", "dk", "dv", "dg", "dh0"), *results):
        check(name, a, b, 1e-3 if name in ("ht", "dh0") else OUT_TOL)


# --------------------------------------------------------------------------- GLA: launchers vs the model

def gla_cum(g, s):
    """b = the model's chunk-local cumulative gates of g (fp32, on the GPU), so that a kernel
    and the model read the same b."""
    b = torch.empty(g.shape, dtype=torch.float32)
    MODEL.gla_cumsum(g, b, s.cu, s.offsets, s.slots)
    return b.cuda()


@pytest.mark.parametrize("K", [64, 256])
@pytest.mark.parametrize("lens", [None, (0, 65, 1, 200, 0)], ids=["batched", "varlen"])
def test_gla_cumsum_kernel(K, lens):
    B, T, H = (2, 150, 3) if lens is None else (1, sum(lens), 3)
    g = gates(B, T, H, K, n=0.1)
    s = seqs(B, T, lens)
    poison_allocator(((B, T, H, K), torch.float32))
    b = torch.empty(B, T, H, K, device="cuda", dtype=torch.float32)
    ext().gla_cumsum(g, b, s.cu, s.offsets, s.slots)
    ref = torch.zeros(B, T, H, K, dtype=torch.float64)
    MODEL.gla_cumsum(g, ref, s.cu, s.offsets, s.slots)
    check("b", b, ref, 1e-6)
    if lens is None:  # exactly non-increasing inside every chunk (the kernels' exponents rely on it)
        chunk_start = (torch.arange(1, T, device="cuda") % 64 == 0).view(1, -1, 1, 1)
        assert bool(((b[:, 1:] <= b[:, :-1]) | chunk_start).all())


GLA_STATE_CASES = [
    pytest.param(dt, r, n, rev, tile, lens, id=f"{dt}-R{r}-N{n}-{'rev' if rev else 'fwd'}-bn{tile}-"
                 f"{'varlen' if lens else 'batched'}")
    for dt, r, n, rev, tile, lens in [
        ("bf16", 128, 128, False, 64, None), ("bf16", 128, 128, True, 64, None), ("fp16", 64, 256, False, 32, None),
        ("bf16", 256, 64, True, 32, None), ("bf16", 128, 64, False, 32, (0, 65, 1, 200, 0)),
        ("fp16", 64, 128, True, 64, (130, 0, 63)),
    ]
]


@pytest.mark.parametrize("dt,R,N,reverse,tile_n,lens", GLA_STATE_CASES)
def test_chunk_state_gla_kernel(dt, R, N, reverse, tile_n, lens):
    check_chunk_state(dt, R, N, "gla", reverse, tile_n, lens)


GLA_OUTPUT_CASES = [
    pytest.param(dt, r, n, up, gn, lens, id=f"{dt}-R{r}-N{n}-{'upper' if up else 'lower'}-n{gn}-"
                 f"{'varlen' if lens else 'batched'}")
    for dt, r, n, up, gn, lens in [
        (dt, r, 128, up, 0.5, None) for dt in DTYPES for r in (64, 128, 256) for up in (False, True)
    ] + [("bf16", 128, 64, False, 0.5, None), ("bf16", 128, 192, True, 0.5, None),
         ("fp16", 64, 256, False, 0.5, None), ("bf16", 128, 128, False, 0.02, None),
         ("bf16", 128, 128, True, 0.02, None), ("bf16", 128, 128, False, 0.5, (0, 65, 1, 200, 0)),
         ("fp16", 64, 64, True, 0.5, (130, 0, 63))]
]


@pytest.mark.parametrize("dt,R,N,upper,n,lens", GLA_OUTPUT_CASES)
def test_gla_output_kernel(dt, R, N, upper, n, lens):
    dtype = DTYPES[dt]
    B, T, H = (2, 150, 2) if lens is None else (1, sum(lens), 2)
    x, y = rand(B, T, H, R, dtype=dtype, seed=2), rand(B, T, H, R, dtype=dtype, seed=3)
    z = rand(B, T, H, N, dtype=dtype, seed=4)
    s = seqs(B, T, lens)
    b = gla_cum(gates(B, T, H, R, n=n), s)
    m = rand(s.slots, H, R, N, dtype=dtype, seed=6, scale=0.2)
    poison_allocator(((B, T, H, N), dtype))
    out = torch.empty(B, T, H, N, device="cuda", dtype=dtype)
    ext().gla_output(x, y, z, m, b, out, s.cu, s.offsets, 0.3, 0.2, upper)
    out_ref = torch.zeros(B, T, H, N, dtype=torch.float64)
    MODEL.gla_output(x, y, z, m, b, out_ref, s.cu, s.offsets, 0.3, 0.2, upper)
    check("out", out, out_ref, OUT_TOL)


GLA_GRAD_CASES = [("bf16", 128, 128, 1.0, None), ("fp16", 64, 256, 1.0, None), ("bf16", 128, 192, 0.05, None),
                  ("bf16", 256, 64, 1.0, (0, 300, 1, 64, 0))]


@pytest.mark.parametrize("dt,K,V,n,lens", GLA_GRAD_CASES,
                         ids=[f"{d}-K{k}-V{v}-n{n}-{'varlen' if ls else 'batched'}" for d, k, v, n, ls in GLA_GRAD_CASES])
def test_gla_grad_kernel(dt, K, V, n, lens):
    dtype = DTYPES[dt]
    (B, T, H), s, (q, k, v, do) = grad_kernel_inputs(dtype, K, V, lens)
    b = gla_cum(gates(B, T, H, K, n=n), s)
    h, dh = rand(s.slots, H, K, V, dtype=dtype, seed=6, scale=0.2), rand(s.slots, H, K, V, dtype=dtype, seed=7, scale=0.2)
    poison_allocator(((B, T, H, K), dtype), ((B, T, H, K), torch.float32))
    dq, dk = torch.empty(B, T, H, K, device="cuda", dtype=dtype), torch.empty(B, T, H, K, device="cuda", dtype=dtype)
    dg = torch.empty(B, T, H, K, device="cuda", dtype=torch.float32)
    ext().gla_grad(q, k, v, do, b, h, dh, dq, dk, dg, s.cu, s.offsets, 0.3)
    refs = [torch.zeros(B, T, H, K, dtype=torch.float64) for _ in range(3)]
    MODEL.gla_grad(q, k, v, do, b, h, dh, *refs, s.cu, s.offsets, 0.3)
    for name, got, ref in zip(("dq", "dk", "dg"), (dq, dk, dg), refs):
        check(name, got, ref, OUT_TOL)


def _gla_wide_segment_cases():
    """(B, T, H, lens, segments, dtype): the 256-thread kernel (K = V = 128) from raw gates, in
    segments of odd and even lengths (the last one shorter), varlen with empty sequences."""
    cases = [(1, 2048, 2, None, 4, "bf16"),    # 32 chunks: 4 segments of 8
             (1, 1000, 1, None, 3, "bf16"),    # 16 chunks: 6, 6, 4
             (2, 700, 1, None, 2, "fp16"),     # 11 chunks: 6, 5
             (1, 65, 2, None, 1, "bf16"),      # no segments (2 chunks), raw gates
             (1, None, 2, EMPTY_LENS + (1500,), 3, "bf16")]
    return [pytest.param(*c, id=f"B{c[0]}-T{c[1]}-H{c[2]}-{'varlen' if c[3] else 'batched'}-S{c[4]}-{c[5]}")
            for c in cases]


def _gla_wide_segment_inputs(B, T, H, lens, segments, dtype):
    """A _gla_wide_segment_cases row's inputs at K = V = 128: (T, N, q, k, v, the initial state,
    raw gates g, seqs, b = gla_cumsum(g), seg_chunks, the segment workspace or (None, None))."""
    T = sum(lens) if lens is not None else T
    N = B if lens is None else len(lens)
    q, k, v, _, _, h0 = make_inputs(B, T, H, 128, 128, None, 1.0, dtype, N=N)
    g = gla_fused_gates(B, T, H, 128, 1.0)
    s = seqs(B, T, lens)
    b = torch.empty_like(g)
    ext().gla_cumsum(g, b, s.cu, s.offsets, s.slots)
    chunks = -(-T // 64)
    seg_chunks = -(-chunks // segments) if segments > 1 else 0
    ws = _kernels._segment_workspace(q, v, s, segments, per_row=True) if segments > 1 else (None, None)
    return T, N, q, k, v, h0, g, s, b, seg_chunks, ws


@pytest.mark.parametrize("B,T,H,lens,segments,dt", _gla_wide_segment_cases())
def test_gla_fused_wide_raw_gates_and_segments(B, T, H, lens, segments, dt):
    """gla_fused_fwd at K = V = 128 from raw gates g (summed in the kernel; b_out bitwise
    gla_cumsum's b) and in segments (pass 1 local states and per-key log-decays, pass 2 the fold):
    o and the final state against the same kernel from b without segments (the same sums), the
    three launches and the fp32 recurrence; outputs NaN-poisoned."""
    dtype = DTYPES[dt]
    T, N, q, k, v, h0, g, s, b, seg_chunks, ws = _gla_wide_segment_inputs(B, T, H, lens, segments, dtype)
    poison_allocator(((B, T, H, 128), dtype), ((N, H, 128, 128), torch.float32), ((B, T, H, 128), torch.float32))
    o = torch.empty(B, T, H, 128, device="cuda", dtype=dtype)
    final = torch.empty(N, H, 128, 128, device="cuda", dtype=torch.float32)
    b_out = torch.full_like(g, float("nan"))
    h_out = torch.full((s.slots, H, 128, 128), float("nan"), device="cuda", dtype=dtype)
    ext().gla_fused_fwd(q, k, v, None, h0, o, final, s.cu, 1.0, g, b_out, seg_chunks, *ws, h_out, s.offsets)
    # rows of b_out are those of the sequences (between them: padding rows of none when packed)
    assert torch.equal(b_out, b), "b_out must be gla_cumsum's b bit for bit"
    o1, final1 = torch.empty_like(o), torch.empty_like(final)
    ext().gla_fused_fwd(q, k, v, b, h0, o1, final1, s.cu, 1.0)
    if segments == 1:
        assert torch.equal(o, o1) and torch.equal(final, final1)  # raw gates change nothing else
    else:
        check("o vs unsegmented", o, o1, OUT_TOL)
        check("final_state vs unsegmented", final, final1, 1e-4)
    h = _kernels._states(ext(), k, v, None, None, h0, s, None, gk_cum=b)
    used = s.slots if lens is None else int(s.offsets[-1])  # (packed: Seqs.slots is an upper bound)
    check("h_out vs chunk_state", h_out[:used], h[:used], OUT_TOL)  # every chunk's slot written (NaN-poisoned)
    o2 = torch.empty_like(v)
    ext().gla_output(q, k, v, h, b, o2, s.cu, s.offsets, 1.0, 1.0, False)
    o_ref, ht_ref = linear_attn_recurrent_ref(q.float(), k.float(), v.float(), g=g, scale=1.0, initial_state=h0,
                                              output_final_state=True, cu_seqlens=s.cu)
    check("o vs three-launch", o, o2, OUT_TOL)
    check("o vs reference", o, o_ref, OUT_TOL)
    check("final_state vs reference", final, ht_ref, OUT_TOL)
    if lens is not None:  # empty sequences: the state passes through
        assert torch.equal(final[0], h0[0]) and torch.equal(final[4], h0[4])


def test_gla_fused_wide_segments_route(fused_switch, monkeypatch):
    """chunk_gla at K = V = 128 by default (no switch set) on a GPU of more SMs than the grid:
    one gla_fused_fwd call in segments, no gla_cumsum in the forward or the backward (b_out),
    no chunk_state for h in the backward (h_out), the backward's reverse pass in the same kernel
    (dv, dH; no chunk_state, no gla_output), the gradients of the three-launch route."""
    B, T, H = 1, 3000, 2
    q, k, v, g, h0 = make_gla_inputs(B, T, H, 128, 128, 1.0, torch.bfloat16)
    spy = fused_switch(True, sms=16)
    monkeypatch.delenv(_kernels.GLA_FUSED_FWD_ENV)  # the defaults
    monkeypatch.delenv(_kernels.GLA_FUSED_BWD_ENV)
    assert _kernels.gla_fused_plan(spy, q, v, seqs(B, T, None))[1] > 1
    assert _kernels.gla_reverse_plan(spy, q, v, seqs(B, T, None))[1] > 1
    w = rand(B, T, H, 128, seed=11).float()
    grads = []
    for on in (True, False):
        if not on:
            spy = fused_switch(False)
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v, g, h0)]
        o, ht = la.chunk_gla(*leaves[:3], leaves[3], initial_state=leaves[4], output_final_state=True)
        ((o.float() * w).sum() + ht.sum()).backward()
        grads.append([o, ht] + [x.grad for x in leaves])
        if on:
            assert spy.calls == ["gla_fused_fwd", "gla_fused_fwd", "gla_grad"], spy.calls
    for name, a, c in zip(("o", "final_state", "dq", "dk", "dv", "dg", "dh0"), *grads):
        # the backward sees the same b; its chunk states are the forward's (the one-pass kernel's
        # h_out or chunk_state's), equal up to fp32 summation order
        check(name, a, c.float() if name == "o" else c, OUT_TOL if name in ("o", "final_state") else GRAD_TOL)


@pytest.mark.parametrize("B,T,H,lens,segments,dt", _gla_wide_segment_cases())
def test_gla_fused_reverse_kernel(B, T, H, lens, segments, dt):
    """gla_fused_fwd with reverse (the backward's dv and dH in one pass, chunks from the last one
    down, segments folded from the sequence's end): dv, dH (h_out, every chunk's slot) and dh0
    against chunk_state's reverse pass + gla_output (upper) and the float64 model, scale 0.3,
    outputs NaN-poisoned."""
    dtype, scale = DTYPES[dt], 0.3
    T, N, q, k, do, dht, _, s, b, seg_chunks, ws = _gla_wide_segment_inputs(B, T, H, lens, segments, dtype)
    poison_allocator(((B, T, H, 128), dtype), ((N, H, 128, 128), torch.float32))
    dv = torch.full((B, T, H, 128), float("nan"), device="cuda", dtype=dtype)
    dh0 = torch.full((N, H, 128, 128), float("nan"), device="cuda", dtype=torch.float32)
    dH = torch.full((s.slots, H, 128, 128), float("nan"), device="cuda", dtype=dtype)
    ext().gla_fused_fwd(k, q, do, b, dht, dv, dh0, s.cu, scale, None, None, seg_chunks, *ws, dH, s.offsets,
                        reverse=True)
    # the two launches it replaces
    dh0_2 = torch.empty_like(dh0)
    dH_2 = _kernels._states(ext(), q, do, None, None, dht, s, dh0_2, scale=scale, reverse=True, gk_cum=b)
    dv_2 = torch.empty_like(dv)
    ext().gla_output(k, q, do, dH_2, b, dv_2, s.cu, s.offsets, 1.0, scale, True)
    used = s.slots if lens is None else int(s.offsets[-1])  # (packed: Seqs.slots is an upper bound)
    check("dH vs chunk_state", dH[:used], dH_2[:used], OUT_TOL)
    check("dv vs two launches", dv, dv_2, OUT_TOL)
    check("dh0 vs chunk_state", dh0, dh0_2, 1e-4 if segments == 1 else OUT_TOL)
    # the float64 model of the same pass
    ref = [torch.zeros(B, T, H, 128, dtype=torch.float64), torch.zeros(N, H, 128, 128, dtype=torch.float64),
           torch.zeros(s.slots, H, 128, 128, dtype=dtype)]  # (h_out in q's dtype, as the kernel's)
    MODEL.gla_fused_fwd(k, q, do, b, dht, ref[0], ref[1], s.cu, scale, h_out=ref[2], chunk_offsets=s.offsets,
                        reverse=True)
    check("dv vs model", dv, ref[0], OUT_TOL)
    check("dh0 vs model", dh0, ref[1], OUT_TOL)
    check("dH vs model", dH[:used], ref[2][:used], OUT_TOL)
    if lens is not None:  # empty sequences: the gradient passes through
        assert torch.equal(dh0[0], dht[0]) and torch.equal(dh0[4], dht[4])


def test_gla_fused_reverse_arguments():
    """reverse: the 256-thread kernel (K = 128, V a multiple of 128) from b, not raw gates."""
    q, k, v, _, _, _ = make_inputs(1, 100, 2, 128, 128, None, 1.0, torch.bfloat16)
    g = gla_fused_gates(1, 100, 2, 128, 1.0)
    o = torch.empty_like(v)
    with pytest.raises(ValueError, match="reverse"):
        ext().gla_fused_fwd(q, k, v, None, None, o, None, None, 1.0, g, reverse=True)
    q64, v64 = q[..., :64].contiguous(), v[..., :64].contiguous()
    with pytest.raises(ValueError, match="reverse"):
        ext().gla_fused_fwd(q64, q64, v64, g[..., :64].contiguous(), None, torch.empty_like(v64), None, None, 1.0,
                            reverse=True)


def test_gla_fused_raw_gate_arguments():
    """Raw gates, b_out and segments: the 256-thread kernel only, one of b and g."""
    q, k, v, _, _, _ = make_inputs(1, 100, 2, 64, 64, None, 1.0, torch.bfloat16)
    g = torch.zeros(1, 100, 2, 64, device="cuda")
    o = torch.empty_like(v)
    with pytest.raises(ValueError, match="raw gates g and segments need the 256-thread kernel"):
        ext().gla_fused_fwd(q, k, v, None, None, o, None, None, 1.0, g)
    with pytest.raises(ValueError, match="exactly one of b"):
        ext().gla_fused_fwd(q, k, v, g, None, o, None, None, 1.0, g)
    with pytest.raises(ValueError, match="b_out needs raw gates"):
        ext().gla_fused_fwd(q, k, v, g, None, o, None, None, 1.0, None, torch.empty_like(g))
    with pytest.raises(ValueError, match="h_out needs the 256-thread kernel"):
        ext().gla_fused_fwd(q, k, v, g, None, o, None, None, 1.0, h_out=torch.empty(2, 2, 64, 64, device="cuda",
                                                                                  dtype=q.dtype))
    q, k, v, _, _, _ = make_inputs(1, 100, 2, 128, 128, None, 1.0, torch.bfloat16)
    g, o = torch.zeros(1, 100, 2, 128, device="cuda"), torch.empty_like(v)
    with pytest.raises(ValueError, match="h_out must have B \\* ceil"):
        ext().gla_fused_fwd(q, k, v, None, None, o, None, None, 1.0, g,
                            h_out=torch.empty(1, 2, 128, 128, device="cuda", dtype=q.dtype))
    with pytest.raises(ValueError, match="h_out with cu_seqlens needs chunk_offsets"):
        ext().gla_fused_fwd(q, k, v, None, None, o, None, offsets([40, 60]), 1.0, g,
                            h_out=torch.empty(2, 2, 128, 128, device="cuda", dtype=q.dtype))


# --------------------------------------------------------------------------- GLA: the ops vs the recurrence

def make_gla_inputs(B, T, H, K, V, n, dtype, seed=0, N=None):
    q, k, v, _, _, h0 = make_inputs(B, T, H, K, V, None, 1.0, dtype, seed=seed, N=N)
    return q, k, v, gates(B, T, H, K, n=n, seed=seed + 3), h0


def _gla_fwd_cases():
    cases = [(t, 128, 128, 1.0, None, "bf16") for t in (1, 63, 64, 65, 500, 2048)]
    cases += [(500, 64, 64, n, s, "bf16") for n in (0.1, 1.0, 10.0) for s in (1.0, 0.1)]
    cases += [(t, k, v, 1.0, None, "bf16") for t in (65, 500)
              for k, v in ((64, 64), (100, 100), (256, 256), (64, 256), (256, 100), (100, 64))]
    cases += [(500, 128, 128, 1.0, None, "fp16"), (2048, 128, 128, 1.0, None, "fp16")]
    if QUICK:
        cases = [c for c in cases if c[0] in (65, 2048) and c[1] in (100, 128)]
    return [pytest.param(*c, id=f"T{c[0]}-K{c[1]}-V{c[2]}-n{c[3]}-s{c[4]}-{c[5]}") for c in cases]


@pytest.mark.parametrize("T,K,V,n,scale,dt", _gla_fwd_cases())
@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
def test_gla_forward(mode, T, K, V, n, scale, dt):
    dtype = DTYPES[dt]
    B, H = (1, 2) if T >= 2048 else (2, 3)
    q, k, v, g, h0 = make_gla_inputs(B, T, H, K, V, n, dtype)
    poison_allocator(((B, T, H, V), dtype), ((B, T, H, max(K, 64)), torch.float32), ((B, H, K, V), torch.float32))
    if mode == "chunk":
        o, ht = la.chunk_gla(q, k, v, g, scale=scale, initial_state=h0, output_final_state=True)
    else:
        o, ht = la.fused_recurrent_gla(q, k, v, gk=g, scale=scale, initial_state=h0, output_final_state=True)
    o_ref, ht_ref = reference(q, k, v, T, g=g, scale=scale, initial_state=h0, output_final_state=True)
    assert o.dtype == dtype and ht.dtype == torch.float32
    check("o", o, o_ref, OUT_TOL)
    check("final_state", ht, ht_ref, OUT_TOL)


def _gla_grad_cases():
    cases = [(t, 128, 128, 1.0, None, "bf16") for t in (1, 63, 64, 65, 500, 2048)]
    cases += [(500, 64, 64, n, s, "bf16") for n in (0.1, 10.0) for s in (1.0, 0.1)]
    cases += [(200, k, v, 1.0, None, "bf16") for k, v in ((64, 64), (100, 100), (256, 256), (64, 256), (256, 100))]
    cases += [(500, 128, 128, 1.0, None, "fp16")]
    if QUICK:
        cases = [c for c in cases if c[0] in (65, 500) and c[1] == 128]
    return [pytest.param(*c, id=f"T{c[0]}-K{c[1]}-V{c[2]}-n{c[3]}-s{c[4]}-{c[5]}") for c in cases]


@pytest.mark.parametrize("T,K,V,n,scale,dt", _gla_grad_cases())
def test_chunk_gla_backward(T, K, V, n, scale, dt):
    dtype = DTYPES[dt]
    B, H = (1, 2) if T >= 2048 else (2, 3)
    inputs = make_gla_inputs(B, T, H, K, V, n, dtype)
    # w_o is representable in the input dtype, so do = w_o exactly on both sides
    w_o, w_s = rand(B, T, H, V, dtype=dtype, seed=9).float(), rand(B, H, K, V, dtype=torch.float32, seed=10)
    poison_allocator(((B, T, H, max(K, V, 64)), dtype), ((B, T, H, max(K, 64)), torch.float32),
                     ((B, H, K, V), torch.float32))
    got = _grads(lambda q, k, v, g, h0: la.chunk_gla(q, k, v, g, scale=scale, initial_state=h0,
                                                     output_final_state=True), inputs, w_o, w_s)
    fp32 = [x.float() for x in inputs]
    ref = _grads(lambda q, k, v, g, h0: reference(q, k, v, T, g=g, scale=scale, initial_state=h0,
                                                  output_final_state=True), fp32, w_o, w_s)
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dh0"), got, ref):
        assert a is not None, f"{name}: no gradient"
        assert name in ("dg", "dh0") or a.dtype == dtype, f"{name}: dtype {a.dtype}"
        check(name, a, b, GRAD_TOL)


@pytest.mark.parametrize("mode", ["chunk", "recurrent"])
@pytest.mark.parametrize("grad", [False, True], ids=["fwd", "fwdbwd"])
def test_gla_varlen_with_empty_sequence(mode, grad):
    q, k, v, g, h0 = make_gla_inputs(1, sum(EMPTY_LENS), 2, 128, 128, 1.0, torch.bfloat16, N=len(EMPTY_LENS))

    def run(q, k, v, g, h0, cu):
        if mode == "chunk":
            return la.chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu)
        return la.fused_recurrent_gla(q, k, v, gk=g, initial_state=h0, output_final_state=True, cu_seqlens=cu)

    check_varlen_with_empty_sequences(run, (q, k, v, g, h0), grad)


def test_gla_chunk_and_recurrent_agree():
    q, k, v, g, h0 = make_gla_inputs(2, 777, 4, 128, 128, 1.0, torch.bfloat16)
    o_c, s_c = la.chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    o_r, s_r = la.fused_recurrent_gla(q, k, v, gk=g, initial_state=h0, output_final_state=True)
    check("o", o_c, o_r.float(), OUT_TOL)
    check("final_state", s_c, s_r, OUT_TOL)


@pytest.mark.parametrize("reverse", [False, True])
def test_fused_recurrent_gla_backward(reverse):
    """fused_recurrent_gla with gradients: the token-by-token forward, the chunked backward."""
    lens = (0, 200, 1, 64, 129)
    T, H, K, V = sum(lens), 2, 64, 128
    q, k, v, g, h0 = make_gla_inputs(1, T, H, K, V, 1.0, torch.bfloat16, N=len(lens))
    cu = offsets(lens)
    w = rand(1, T, H, V, seed=12).float()
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, g, h0)]
    o, ht = la.fused_recurrent_gla(*leaves[:3], gk=leaves[3], initial_state=leaves[4], output_final_state=True,
                                   reverse=reverse, cu_seqlens=cu)
    ((o.float() * w).sum() + ht.sum()).backward()
    refs = [x.float().clone().requires_grad_(True) for x in (q, k, v, g, h0)]
    o_r, ht_r = linear_attn_recurrent_ref(*refs[:3], g=refs[3], initial_state=refs[4], output_final_state=True,
                                          reverse=reverse, cu_seqlens=cu)
    ((o_r * w).sum() + ht_r.sum()).backward()
    check("o", o, o_r, OUT_TOL)
    check("final_state", ht, ht_r, OUT_TOL)
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dh0"), leaves, refs):
        check(name, a.grad, b.grad, GRAD_TOL)


def test_gla_very_negative_gates():
    """Gates of -1000 on some keys and steps, logsigmoid(x) / 0.01 elsewhere: nothing overflows."""
    q, k, v, _, h0 = make_gla_inputs(1, 300, 2, 64, 64, 1.0, torch.bfloat16)
    g = gates(1, 300, 2, 64, n=0.01, seed=7)
    g[:, ::3, :, ::2] = -1000.0
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, g, h0)]
    o, ht = la.chunk_gla(*leaves[:4], initial_state=leaves[4], output_final_state=True)
    (o.float().sum() + ht.sum()).backward()
    refs = [x.float().clone().requires_grad_(True) for x in (q, k, v, g, h0)]
    o_r, ht_r = reference(*refs[:3], 300, g=refs[3], initial_state=refs[4], output_final_state=True)
    (o_r.sum() + ht_r.sum()).backward()
    check("o", o, o_r, OUT_TOL)
    check("final_state", ht, ht_r, OUT_TOL)
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dh0"), leaves, refs):
        assert torch.isfinite(a.grad).all(), name
        if name != "dh0":  # ~0: every path to h0 passes a gate of -1000 or a strong one
            check(name, a.grad, b.grad, GRAD_TOL)


def test_gla_deterministic():
    inputs = make_gla_inputs(2, 1000, 4, 128, 128, 1.0, torch.bfloat16)
    w = rand(2, 1000, 4, 128, seed=12).float()
    runs = [_grads(lambda q, k, v, g, h0: la.chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True),
                       inputs, w, 1.0) for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- GLA: one-pass forward (gla_fused_fwd)
# csrc/linear_attn/gla_fused.cuh: chunk_state (per-key) + gla_output in one kernel, chunk_gla's forward
# when FLASH_ATTN_LINEAR_GLA_FUSED_FWD allows its tile (default: the 256-thread kernel only; these
# tests set 1) and FLASH_ATTN_LINEAR_FUSED_FWD are on and its
# N * H * (V / BV) CTAs fill the SMs (_kernels.gla_fused_plan).

def gla_fused_gates(B, T, H, K, n):
    """logsigmoid(x) / n, or (n = "neg") logsigmoid(x) / 0.01 with every third row's even keys at -1000."""
    if n != "neg":
        return gates(B, T, H, K, n=n, seed=5)
    g = gates(B, T, H, K, n=0.01, seed=5)
    g[:, ::3, :, ::2] = -1000.0
    return g


def _gla_fused_cases():
    """(dt, T, K, V, n, scale, states, lens): every T at K = V = 128, the head-dim pairs at two T (K = 128:
    V 128 and 256 take the 256-thread kernel with 128-column V tiles, V 192 the 128-thread one),
    the gate sizes (and very negative gates) in both dtypes with and without initial / final
    states, varlen with empty sequences."""
    cases = [("bf16", t, 128, 128, 1.0, 1.0, True, None) for t in (1, 63, 64, 65, 500, 2048)]
    cases += [("bf16", t, k, v, 1.0, 1.0, True, None) for t in (65, 500)
              for k, v in ((64, 64), (256, 256), (64, 256), (256, 64), (128, 256), (64, 128), (128, 192))]
    cases += [(dt, 500, k, k, n, 0.1, states, None) for dt in DTYPES for k in (64, 128, 256)
              for n in (0.1, 1.0, 10.0, "neg") for states in (True, False)]
    cases += [(dt, 2048, 128, 128, 1.0, 1.0, True, None) for dt in DTYPES]
    cases += [(dt, None, k, k, 1.0, 0.3, states, EMPTY_LENS) for dt in DTYPES for k in (64, 128, 256)
              for states in (True, False)]
    if QUICK:
        cases = [c for c in cases if c[1] in (65, 2048, None) and c[2] == 128]
    return [pytest.param(*c, id=f"{c[0]}-T{c[1] if c[7] is None else 'varlen'}-K{c[2]}-V{c[3]}-n{c[4]}-s{c[5]}-"
                         f"{'states' if c[6] else 'nostates'}") for c in cases]


@pytest.mark.parametrize("dt,T,K,V,n,scale,states,lens", _gla_fused_cases())
def test_gla_fused_fwd_kernel(dt, T, K, V, n, scale, states, lens):
    """The kernel against the three-launch forward (chunk_state with gk_cum + gla_output, the same b)
    and the fp32 recurrence: o and the final state (outputs NaN-poisoned)."""
    dtype = DTYPES[dt]
    B, T, H = (2, T, 3) if lens is None else (1, sum(lens), 2)
    N = B if lens is None else len(lens)
    q, k, v, _, _, h0 = make_inputs(B, T, H, K, V, None, 1.0, dtype, N=N)
    h0 = h0 if states else None
    g = gla_fused_gates(B, T, H, K, n)
    s = seqs(B, T, lens)
    b = torch.empty_like(g)
    ext().gla_cumsum(g, b, s.cu, s.offsets, s.slots)
    poison_allocator(((B, T, H, V), dtype), ((N, H, K, V), torch.float32))
    o = torch.empty(B, T, H, V, device="cuda", dtype=dtype)
    final = torch.empty(N, H, K, V, device="cuda", dtype=torch.float32) if states else None
    ext().gla_fused_fwd(q, k, v, b, h0, o, final, s.cu, scale)
    # the three launches called directly, whatever the switch says
    final2 = torch.empty(N, H, K, V, device="cuda", dtype=torch.float32) if states else None
    h = _kernels._states(ext(), k, v, None, None, h0, s, final2, gk_cum=b)
    o2 = torch.empty_like(v)
    ext().gla_output(q, k, v, h, b, o2, s.cu, s.offsets, scale, scale, False)
    o_ref, ht_ref = linear_attn_recurrent_ref(q.float(), k.float(), v.float(), g=g, scale=scale, initial_state=h0,
                                              output_final_state=True, cu_seqlens=s.cu)
    check("o vs three-launch", o, o2, OUT_TOL)
    check("o vs reference", o, o_ref, OUT_TOL)
    if states:
        check("final_state vs three-launch", final, final2, 1e-4)  # the same fp32 sums in the same order
        check("final_state vs reference", final, ht_ref, OUT_TOL)
        if lens is not None:  # empty sequences: the state passes through
            assert torch.equal(final[0], h0[0]) and torch.equal(final[4], h0[4])


def test_gla_fused_fwd_arguments():
    """Malformed calls are refused, naming the argument, before any launch."""
    q, k, v, _, _, h0 = make_inputs(2, 100, 2, 128, 128, None, 1.0, torch.bfloat16)
    b = torch.zeros(2, 100, 2, 128, device="cuda")
    o = torch.empty_like(v)
    with pytest.raises(ValueError, match="K must be 64, 128 or 256"):
        q2 = q[..., :96].contiguous()
        ext().gla_fused_fwd(q2, q2, v, b[..., :96].contiguous(), None, o, None, None, 1.0)
    with pytest.raises(ValueError, match="V must be a multiple of 64"):
        ext().gla_fused_fwd(q, k, v[..., :96].contiguous(), b, None, o[..., :96].contiguous(), None, None, 1.0)
    with pytest.raises(ValueError, match="b must be"):
        ext().gla_fused_fwd(q, k, v, b.bfloat16(), None, o, None, None, 1.0)
    with pytest.raises(ValueError, match="b must have shape"):
        ext().gla_fused_fwd(q, k, v, b[:, :50].contiguous(), None, o, None, None, 1.0)
    with pytest.raises(ValueError, match="init must have shape"):
        ext().gla_fused_fwd(q, k, v, b, h0[:1].contiguous(), o, None, None, 1.0)
    with pytest.raises(ValueError, match="final_state must be"):
        ext().gla_fused_fwd(q, k, v, b, None, o, h0.half(), None, 1.0)


@pytest.mark.parametrize("K,V,lens", [(128, 128, None), (100, 100, None), (64, 256, EMPTY_LENS), (256, 72, None)],
                         ids=["K128", "K100-padded", "varlen-K64-V256", "K256-V72-padded"])
def test_gla_fused_forward_switch_routes(fused_switch, K, V, lens):
    """chunk_gla with the switch on (and a grid that fills the GPU) runs gla_cumsum and gla_fused_fwd
    alone and gives the switch-off (three-launch) result; the gradients do not depend on the path."""
    B, T, H = (2, 300, 4) if lens is None else (1, sum(lens), 4)
    N = B if lens is None else len(lens)
    q, k, v, g, h0 = make_gla_inputs(B, T, H, K, V, 1.0, torch.bfloat16, N=N)
    cu = None if lens is None else offsets(lens)
    spy = fused_switch(False)
    o_off, ht_off = la.chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    assert "gla_fused_fwd" not in spy.calls and "gla_output" in spy.calls
    spy = fused_switch(True, sms=1)
    kd, vd = _kernels.kernel_head_dim(K), _kernels.kernel_head_dim(V)  # the kernel's padded outputs
    poison_allocator(((B, T, H, vd), torch.bfloat16), ((N, H, kd, vd), torch.float32))
    o_on, ht_on = la.chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    wide = kd == 128 and vd % 128 == 0  # the 256-thread kernel sums the raw gates itself
    assert spy.calls == (["gla_fused_fwd"] if wide else ["gla_cumsum", "gla_fused_fwd"]), spy.calls
    check("o", o_on, o_off.float(), OUT_TOL)
    check("final_state", ht_on, ht_off, 1e-4)
    o_ref, ht_ref = linear_attn_recurrent_ref(q.float(), k.float(), v.float(), g=g, initial_state=h0,
                                              output_final_state=True, cu_seqlens=cu)
    check("o vs reference", o_on, o_ref, OUT_TOL)
    check("final_state vs reference", ht_on, ht_ref, OUT_TOL)
    w = rand(*o_on.shape, seed=11).float()
    grads = []
    for on in (False, True):
        fused_switch(on, sms=1)
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v, g, h0)]
        o, ht = la.chunk_gla(*leaves[:3], leaves[3], initial_state=leaves[4], output_final_state=True, cu_seqlens=cu)
        ((o.float() * w).sum() + ht.sum()).backward()
        grads.append([x.grad for x in leaves])
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dh0"), *grads):
        # the same backward kernels; the chunk states it reads are the forward's (save_states),
        # the one-pass kernel's or chunk_state's, equal up to fp32 summation order
        check(name, a, b, GRAD_TOL)


# --------------------------------------------------------------------------- GLA with gv: the token-by-token backward

RECURRENT_GRAD_CASES = [("bf16", 64, 64, "gk+gv", False), ("fp16", 128, 128, "gv", True),
                        ("bf16", 256, 96, "gk", False), ("bf16", 128, 256, "gk+gv", True),
                        ("fp16", 64, 32, "gv", False)]


@pytest.mark.parametrize("dt,K,V,which,reverse", RECURRENT_GRAD_CASES,
                         ids=[f"{d}-K{k}-V{v}-{w}-{'rev' if r else 'fwd'}" for d, k, v, w, r in RECURRENT_GRAD_CASES])
@pytest.mark.parametrize("lens", [None, (0, 70, 1, 0)], ids=["batched", "varlen"])
@pytest.mark.parametrize("states", [True, False], ids=["states", "nostates"])
def test_recurrent_grad_kernel(dt, K, V, which, reverse, lens, states):
    """recurrent_grad (recurrent_grad.cuh) against the model, part by part."""
    dtype = DTYPES[dt]
    B, T, H = (2, 90, 2) if lens is None else (1, sum(lens), 2)
    q, k, v = rand(B, T, H, K, dtype=dtype, seed=2), rand(B, T, H, K, dtype=dtype, seed=3), \
        rand(B, T, H, V, dtype=dtype, seed=4)
    do = rand(B, T, H, V, dtype=dtype, seed=5)
    gk = gates(B, T, H, K, n=4) if "gk" in which else None
    gv = gates(B, T, H, V, n=4, seed=5) if "gv" in which else None
    s = seqs(B, T, lens)
    N, Z = s.num_seqs, V // 32
    init = rand(N, H, K, V, dtype=torch.float32, seed=6) if states else None
    dfinal = rand(N, H, K, V, dtype=torch.float32, seed=7) if states else None
    poison_allocator(((Z, B, T, H, K), torch.float32), ((B, T, H, V), dtype), ((B, T, H, V), torch.float32),
                     ((N, H, K, V), torch.float32))
    part = dict(device="cuda", dtype=torch.float32)
    outs = [torch.empty(Z, B, T, H, K, **part), torch.empty(Z, B, T, H, K, **part),
            torch.empty(Z, B, T, H, K, **part) if gk is not None else None,
            torch.empty(B, T, H, V, device="cuda", dtype=dtype),
            torch.empty(B, T, H, V, **part) if gv is not None else None, torch.empty(N, H, K, V, **part)]
    ext().recurrent_grad(q, k, v, gk, gv, init, do, dfinal, *outs, s.cu, s.offsets, 0.3, reverse)
    refs = [None if x is None else torch.zeros(x.shape, dtype=torch.float64) for x in outs]
    MODEL.recurrent_grad(q, k, v, gk, gv, init, do, dfinal, *refs, s.cu, s.offsets, 0.3, reverse)
    for name, got, ref in zip(("dq_part", "dk_part", "dgk_part", "dv", "dgv", "dinit"), outs, refs):
        if ref is not None:
            check(name, got, ref, OUT_TOL if name == "dv" else 1e-4)


def _gv_grad_cases():
    cases = [(t, kv, kv, w, "bf16") for t in (1, 63, 64, 65, 500) for kv in (64, 100, 128)
             for w in ("gk", "gv", "gk+gv")]
    cases += [(65, kd, vd, "gk+gv", "bf16") for kd in (64, 100, 128) for vd in (64, 100, 128) if kd != vd]
    cases += [(t, 128, 100, w, "fp16") for t in (1, 65, 500) for w in ("gk", "gv", "gk+gv")]
    cases += [(500, 64, 64, "gk+gv", "bf16", n) for n in (0.1, 10.0)]
    cases = [c if len(c) == 6 else c + (2.0,) for c in cases]
    if QUICK:
        cases = [c for c in cases if c[0] in (65, 500) and c[1] in (100, 128)]
    return [pytest.param(*c, id=f"T{c[0]}-K{c[1]}-V{c[2]}-{c[3]}-{c[4]}-n{c[5]}") for c in cases]


def _gv_inputs(B, T, H, K, V, which, n, dtype, N=None):
    q, k, v, _, _, h0 = make_inputs(B, T, H, K, V, None, 1.0, dtype, N=N)
    gk = gates(B, T, H, K, n=n, seed=7) if "gk" in which else None
    gv = gates(B, T, H, V, n=n, seed=8) if "gv" in which else None
    return q, k, v, gk, gv, h0


def _poison_gv(B, T, H, K, V, dtype, N):
    kd, vd = _kernels.kernel_head_dim(K), _kernels.kernel_head_dim(V)
    poison_allocator(((vd // 32, B, T, H, kd), torch.float32), ((B, T, H, max(kd, vd)), dtype),
                     ((B, T, H, vd), torch.float32), ((N, H, kd, vd), torch.float32))


@pytest.mark.parametrize("T,K,V,which,dt,n", _gv_grad_cases())
def test_fused_recurrent_gla_value_gate_backward(T, K, V, which, dt, n):
    """Gradients through gv and / or gk of fused_recurrent_gla against the fp32 recurrence (gk
    alone takes the chunked backward; with gv the token-by-token one)."""
    dtype = DTYPES[dt]
    B, H = 2, 3
    inputs = _gv_inputs(B, T, H, K, V, which, n, dtype)
    w_o, w_s = rand(B, T, H, V, dtype=dtype, seed=9).float(), rand(B, H, K, V, dtype=torch.float32, seed=10)
    _poison_gv(B, T, H, K, V, dtype, B)
    got = _grads(lambda q, k, v, gk, gv, h0: la.fused_recurrent_gla(q, k, v, gk=gk, gv=gv, initial_state=h0,
                                                                    output_final_state=True), inputs, w_o, w_s)
    fp32 = [None if x is None else x.float() for x in inputs]
    ref = _grads(lambda q, k, v, gk, gv, h0: reference(q, k, v, T, g=gk, gv=gv, initial_state=h0,
                                                       output_final_state=True), fp32, w_o, w_s)
    for name, a, b in zip(("dq", "dk", "dv", "dgk", "dgv", "dh0"), got, ref):
        if b is None:
            assert a is None, name
            continue
        assert a is not None, f"{name}: no gradient"
        assert name not in ("dq", "dk", "dv") or a.dtype == dtype, f"{name}: dtype {a.dtype}"
        check(name, a, b, GRAD_TOL)


@pytest.mark.parametrize("dt", ["bf16", "fp16"])
@pytest.mark.parametrize("with_final", [True, False], ids=["final", "nofinal"])
@pytest.mark.parametrize("reverse", [False, True], ids=["fwd", "rev"])
@pytest.mark.parametrize("which", ["gv", "gk+gv"])
def test_fused_recurrent_gla_value_gate_varlen(which, reverse, with_final, dt):
    """One packed row of EMPTY_LENS (two empty sequences), reverse, with and without the final
    state in the loss; K, V = 100, 72 (both padded)."""
    dtype = DTYPES[dt]
    T, H, K, V = sum(EMPTY_LENS), 2, 100, 72
    N = len(EMPTY_LENS)
    inputs = _gv_inputs(1, T, H, K, V, which, 2.0, dtype, N=N)
    cu = offsets(EMPTY_LENS)
    w_o, w_s = rand(1, T, H, V, dtype=dtype, seed=11).float(), rand(N, H, K, V, dtype=torch.float32, seed=12)
    _poison_gv(1, T, H, K, V, dtype, N)

    def run(fn, xs):
        leaves = [None if x is None else x.clone().requires_grad_(True) for x in xs]
        o, ht = fn(*leaves[:3], gk=leaves[3], gv=leaves[4], initial_state=leaves[5], output_final_state=True,
                   reverse=reverse, cu_seqlens=cu)
        loss = (o.float() * w_o).sum() + ((ht * w_s).sum() if with_final else 0)
        loss.backward()
        return o, ht, [None if x is None else x.grad for x in leaves]

    o, ht, got = run(la.fused_recurrent_gla, inputs)
    o_r, ht_r, ref = run(lambda q, k, v, gk, **kw: linear_attn_recurrent_ref(q, k, v, g=gk, **kw),
                         [None if x is None else x.float() for x in inputs])
    check("o", o, o_r, OUT_TOL)
    check("final_state", ht, ht_r, OUT_TOL)
    h0 = inputs[5]
    assert torch.equal(ht[0], h0[0]) and torch.equal(ht[4], h0[4])  # empty: the state passes through
    for name, a, b in zip(("dq", "dk", "dv", "dgk", "dgv", "dh0"), got, ref):
        if b is not None:
            check(name, a, b, GRAD_TOL)
    if with_final:  # an empty sequence's dh0 is its dht
        assert torch.equal(got[5][0], w_s[0]) and torch.equal(got[5][4], w_s[4])


def test_fused_recurrent_gla_value_gate_very_negative():
    """Value gates of -1000 on some values and steps, logsigmoid(x) / 0.01 elsewhere: finite
    gradients that match the recurrence."""
    q, k, v, gk, gv, h0 = _gv_inputs(1, 300, 2, 64, 64, "gk+gv", 1.0, torch.bfloat16)
    gv = gates(1, 300, 2, 64, n=0.01, seed=8)
    gv[:, ::3, :, ::2] = -1000.0
    inputs = (q, k, v, gk, gv, h0)
    w = rand(1, 300, 2, 64, dtype=torch.bfloat16, seed=13).float()
    got = _grads(lambda q, k, v, gk, gv, h0: la.fused_recurrent_gla(q, k, v, gk=gk, gv=gv, initial_state=h0,
                                                                    output_final_state=True), inputs, w, 1.0)
    ref = _grads(lambda q, k, v, gk, gv, h0: reference(q, k, v, 300, g=gk, gv=gv, initial_state=h0,
                                                       output_final_state=True),
                 [x.float() for x in inputs], w, 1.0)
    for name, a, b in zip(("dq", "dk", "dv", "dgk", "dgv", "dh0"), got, ref):
        assert torch.isfinite(a).all(), name
        if name != "dh0":  # ~0: every path to h0 passes a gate of -1000 or a strong one
            check(name, a, b, GRAD_TOL)


def test_fused_recurrent_gla_value_gate_deterministic():
    inputs = _gv_inputs(2, 1000, 4, 128, 128, "gk+gv", 1.0, torch.bfloat16)
    w = rand(2, 1000, 4, 128, seed=14).float()
    runs = [_grads(lambda q, k, v, gk, gv, h0: la.fused_recurrent_gla(q, k, v, gk=gk, gv=gv, initial_state=h0,
                                                                      output_final_state=True), inputs, w, 1.0)
            for _ in range(2)]
    for a, b in zip(*runs):
        assert torch.equal(a, b)
