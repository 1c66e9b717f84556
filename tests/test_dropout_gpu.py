"""GPU dropout tests: the forward kernels' mask and output.

The mask is a pure function of (seed, offset, b, h, i, j) (csrc/flash_attn/dropout.h);
flash_attn.reference_dropout computes it in PyTorch. Each call's (seed, offset) is read
from torch's default CUDA generator just before the call (the kernel takes the
generator's current offset) or from the op's rng_state. The checks:
- the kept fraction, read from S_dmask's sign, is within 0.01 of 1 - p;
- S_dmask's sign equals the PyTorch mask on every visible (i, j), its padding is zero;
- the output equals the fp32 reference with that mask, by the 2x rule of TESTING.md
  (max |out - ref32| <= 2 * max |out_pt - ref32| + 1e-5, out_pt: the reference in the
  input precision with the same mask); the lse is the undropped one;
- masks are fresh on consecutive calls, reproducible under torch.manual_seed, the same
  for the same (i, j) whatever the lengths and tile shapes, and fresh on each replay of
  a captured CUDA graph;
- the backward with dropout, on the atomic and the deterministic path.

Environment: FLASH_ATTN_TEST_QUICK=1 (subset), FLASH_ATTN_REQUIRE_CUDA=1 (fail, not skip).
"""
import zlib

import pytest
import torch

from flash_attn import _ops, build_info, flash_attn_func, flash_attn_varlen_func
from flash_attn.reference import attention_ref, attention_varlen_ref
from flash_attn.reference_dropout import dropout_keep_mask, keep_threshold
from gpu_env import DTYPE_NAMES, QUICK, gpu_marks, max_abs, poison_allocator, require_compiled, unavailable_reason

UNAVAILABLE = unavailable_reason()
pytestmark = gpu_marks(UNAVAILABLE)

DTYPES = [torch.float16, torch.bfloat16]


def _randn(key, *shape, dtype):
    gen = torch.Generator(device="cuda").manual_seed(zlib.crc32(key.encode()))
    return torch.randn(*shape, device="cuda", generator=gen).to(dtype)


def _slopes(key, *shape):
    gen = torch.Generator(device="cuda").manual_seed(zlib.crc32(key.encode()))
    return torch.rand(*shape, device="cuda", generator=gen) * 0.75 + 2.0 ** -8


def _rng_now():
    """(seed, offset) the next dropout call draws: the default generator's current state."""
    gen = torch.cuda.default_generators[torch.cuda.current_device()]
    return gen.initial_seed(), gen.get_offset()


def _window(mask):
    return {"full": (False, (-1, -1)), "causal": (True, (-1, -1)), "window": (False, (37, 19))}[mask]


def _visible(sq, sk, causal, window):
    """bool (sq, sk): keys query i sees (bottom-right aligned), as the reference masks."""
    i = torch.arange(sq, device="cuda").view(-1, 1)
    j = torch.arange(sk, device="cuda").view(1, -1)
    diag = i + sk - sq - j
    left, right = window[0], 0 if causal else window[1]
    vis = torch.ones(sq, sk, dtype=torch.bool, device="cuda")
    if left >= 0:
        vis &= diag <= left
    if right >= 0:
        vis &= diag >= -right
    return vis


def _check_s_dmask(s_dmask, keep, sq, sk, visible, what):
    """S_dmask (h, sq_128, sk_128) of one sequence: sign = mask where visible, zero padding."""
    h = keep.shape[0]
    assert s_dmask.shape[0] == h and s_dmask.shape[1] % 128 == 0 and s_dmask.shape[2] % 128 == 0, what
    dropped = torch.signbit(s_dmask[:, :sq, :sk])
    vis = visible.expand(h, sq, sk)
    assert torch.equal(dropped[vis], ~keep[vis]), (
        f"{what}: S_dmask's sign differs from the mask at {int((dropped[vis] == keep[vis]).sum())} positions")
    assert (s_dmask[:, sq:, :] == 0).all() and (s_dmask[:, :, sk:] == 0).all(), f"{what}: padding written"
    assert torch.isfinite(s_dmask).all(), f"{what}: non-finite S_dmask"


def _check_out(out, lse, ref, ref_lse, pt, what):
    assert not torch.isnan(out).any(), f"{what}: NaN in the output"
    err, pt_err = max_abs(out, ref), max_abs(pt, ref)
    assert err <= 2 * pt_err + 1e-5, f"{what}: max |out - ref| = {err:.3e} > 2 * {pt_err:.3e} + 1e-5"
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isposinf(lse), torch.isposinf(ref_lse)), f"{what}: +inf lse rows differ"
    if fin.any():
        lse_err = (lse[fin] - ref_lse[fin]).abs().max().item()
        assert lse_err <= 5e-3, f"{what}: max |lse - ref| = {lse_err:.3e} (the lse is taken before dropout)"


# ----------------------------------------------------------------------------
# kept fraction

@pytest.mark.parametrize("p", [0.17, 0.5])
def test_dropped_fraction(p):
    require_compiled(torch.bfloat16, 64, dropout=True)
    q, k, v = (_randn(f"frac{i}", 2, 1024, 4, 64, dtype=torch.bfloat16) for i in range(3))
    _, _, s_dmask = flash_attn_func(q, k, v, dropout_p=p, return_attn_probs=True)
    dropped = torch.signbit(s_dmask[:, :, :1024, :1024]).float().mean().item()
    assert abs(dropped - p) < 0.01, f"dropped fraction {dropped:.4f} for p = {p}"
    assert abs((1 - dropped) - keep_threshold(p) / 256) < 0.002  # the 8-bit threshold's rate


# ----------------------------------------------------------------------------
# output against the reference with the kernel's mask

# (id, seqlen_q, seqlen_k, nheads, nheads_k, head dim, mask, alibi)
DENSE_CASES = [
    ("1x1", 1, 1, 2, 2, 128, "full", False),
    ("1x17", 1, 17, 4, 4, 64, "full", False),
    ("17x113-causal", 17, 113, 4, 4, 128, "causal", False),
    ("113x17-causal-gqa", 113, 17, 8, 2, 64, "causal", False),
    ("113x203-window-alibi-mqa", 113, 203, 4, 1, 128, "window", True),
    ("128x128-d59", 128, 128, 2, 2, 59, "full", False),
    ("239x1025-d59-causal-alibi-gqa", 239, 1025, 8, 2, 59, "causal", True),
    ("1025x239-window", 1025, 239, 4, 4, 64, "window", False),
    ("113x203-d96-alibi", 113, 203, 4, 2, 96, "full", True),
    ("17x300-d256-causal", 17, 300, 2, 2, 256, "causal", False),
]
QUICK_DENSE = {"1x17", "113x203-window-alibi-mqa", "239x1025-d59-causal-alibi-gqa"}


def _dense_params():
    return [pytest.param(dtype, c, id=f"{DTYPE_NAMES[dtype]}-{c[0]}") for c in DENSE_CASES for dtype in DTYPES
            if not QUICK or c[0] in QUICK_DENSE]


@pytest.mark.parametrize("dtype,case", _dense_params())
def test_dense_matches_reference_with_kernel_mask(dtype, case):
    name, sq, sk, h, hk, d, mask, alibi = case
    require_compiled(dtype, d, dropout=True)
    b, p = 2, 0.17
    q = _randn(name + "q", b, sq, h, d, dtype=dtype)
    k, v = (_randn(name + x, b, sk, hk, d, dtype=dtype) for x in "kv")
    slopes = _slopes(name, b, h) if alibi else None
    causal, window = _window(mask)
    kw = dict(causal=causal, window_size=window, alibi_slopes=slopes)
    poison_allocator(((b, sq, h, d), dtype), ((b, h, sq), torch.float32))
    seed, offset = _rng_now()
    out, lse, s_dmask = flash_attn_func(q, k, v, dropout_p=p, return_attn_probs=True, **kw)
    keep = dropout_keep_mask(seed, offset, b, h, sq, sk, p, device="cuda")
    visible = _visible(sq, sk, causal, window)
    assert s_dmask.shape == (b, h, (sq + 127) // 128 * 128, (sk + 127) // 128 * 128) and s_dmask.dtype == dtype
    for i in range(b):
        _check_s_dmask(s_dmask[i], keep[i], sq, sk, visible, f"{name} batch {i}")
    ref, ref_lse = attention_ref(q, k, v, dropout_p=p, dropout_mask=keep, upcast=True, **kw)
    pt, _ = attention_ref(q, k, v, dropout_p=p, dropout_mask=keep, upcast=False, **kw)
    _check_out(out, lse, ref, ref_lse, pt, name)


VARLEN_BATCHES = {
    "uneven": ([1, 17, 0, 113], [17, 113, 5, 1]),
    "long-short": ([300, 3, 64], [129, 400, 64]),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: DTYPE_NAMES[t])
@pytest.mark.parametrize("batch", list(VARLEN_BATCHES))
@pytest.mark.parametrize("mask,alibi,d", [("full", False, 64), ("causal", True, 128), ("window", False, 59)])
def test_varlen_matches_reference_with_kernel_mask(dtype, batch, mask, alibi, d):
    require_compiled(dtype, d, dropout=True)
    lens_q, lens_k = VARLEN_BATCHES[batch]
    h, hk, p = 4, 2, 0.3
    key = f"{batch}{mask}{d}"
    q = _randn(key + "q", sum(lens_q), h, d, dtype=dtype)
    k, v = (_randn(key + x, sum(lens_k), hk, d, dtype=dtype) for x in "kv")
    cu = [torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32) for lens in (lens_q, lens_k)]
    slopes = _slopes(key, len(lens_q), h) if alibi else None
    causal, window = _window(mask)
    kw = dict(causal=causal, window_size=window, alibi_slopes=slopes)
    mq, mk = max(lens_q), max(lens_k)
    poison_allocator(((sum(lens_q), h, d), dtype), ((h, sum(lens_q)), torch.float32))
    seed, offset = _rng_now()
    out, lse, s_dmask = flash_attn_varlen_func(q, k, v, cu[0], cu[1], mq, mk, dropout_p=p, return_attn_probs=True,
                                               **kw)
    keep = dropout_keep_mask(seed, offset, len(lens_q), h, mq, mk, p, device="cuda")
    for i, (sq, sk) in enumerate(zip(lens_q, lens_k)):
        _check_s_dmask(s_dmask[i], keep[i, :, :sq, :sk], sq, sk, _visible(sq, sk, causal, window), f"seq {i}")
    ref, ref_lse = attention_varlen_ref(q, k, v, cu[0], cu[1], mq, mk, dropout_p=p, dropout_mask=keep, upcast=True,
                                        **kw)
    pt, _ = attention_varlen_ref(q, k, v, cu[0], cu[1], mq, mk, dropout_p=p, dropout_mask=keep, upcast=False, **kw)
    _check_out(out, lse, ref, ref_lse, pt, f"varlen {batch}")


def test_op_rng_state_is_the_generator_state():
    """The op's rng_state holds the (seed, offset) the kernel used, and the next call's offset
    is past the b * h subsequences of this one."""
    require_compiled(torch.float16, 64, dropout=True)
    q, k, v = (_randn(f"rng{i}", 3, 70, 5, 64, dtype=torch.float16) for i in range(3))
    torch.manual_seed(1234)
    seed, offset = _rng_now()
    out, lse, s_dmask, rng = _ops.fwd(q, k, v, None, 0.125, -1, -1, 0.0, False, 0.5, True)
    assert rng.tolist() == [seed, offset]
    assert _rng_now()[1] >= offset + 3 * 5
    keep = dropout_keep_mask(*rng.tolist(), 3, 5, 70, 70, 0.5, device="cuda")
    assert torch.equal(~torch.signbit(s_dmask[:, :, :70, :70]), keep)


# ----------------------------------------------------------------------------
# reproducibility and the pure-function property

def test_fresh_masks_and_manual_seed_reproduces():
    require_compiled(torch.bfloat16, 128, dropout=True)
    q, k, v = (_randn(f"seed{i}", 2, 200, 4, 128, dtype=torch.bfloat16) for i in range(3))

    def call():
        out, _, s_dmask = flash_attn_func(q, k, v, dropout_p=0.5, causal=True, return_attn_probs=True)
        return out, torch.signbit(s_dmask)
    torch.manual_seed(0)
    first, second = call(), call()
    assert not torch.equal(first[1], second[1]) and not torch.equal(first[0], second[0])
    torch.manual_seed(0)
    again = call()
    assert torch.equal(again[0], first[0]) and torch.equal(again[1], first[1])
    # Without S_dmask, the next call draws what `second` drew (same seed, same offset): the
    # S_dmask output does not change the mask.
    out = flash_attn_func(q, k, v, dropout_p=0.5, causal=True)
    assert torch.equal(out, second[0])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: DTYPE_NAMES[t])
def test_mask_is_independent_of_lengths_and_tiles(dtype):
    """Same seed and offset (same batch and heads), different seqlen_q/k and head dims (tiles
    128x128, 128x64 and 64x64): the masks agree on the (i, j) they share."""
    runs = []
    for sq, sk, d in [(50, 100, 64), (200, 300, 128), (77, 129, 256), (50, 100, 32)]:
        require_compiled(dtype, d, dropout=True)
        q = _randn(f"pure{sq}", 2, sq, 3, d, dtype=dtype)
        k, v = (_randn(f"pure{sk}{x}", 2, sk, 3, d, dtype=dtype) for x in "kv")
        torch.manual_seed(77)
        _, _, s_dmask = flash_attn_func(q, k, v, dropout_p=0.3, return_attn_probs=True)
        runs.append(torch.signbit(s_dmask[:, :, :sq, :sk]))
    sq, sk = min(r.shape[2] for r in runs), min(r.shape[3] for r in runs)
    for r in runs[1:]:
        assert torch.equal(r[:, :, :sq, :sk], runs[0][:, :, :sq, :sk])


# ----------------------------------------------------------------------------
# CUDA graphs

def test_cuda_graph_replays_draw_fresh_masks():
    require_compiled(torch.float16, 64, dropout=True)
    q, k, v = (_randn(f"graph{i}", 2, 150, 4, 64, dtype=torch.float16) for i in range(3))

    def call():
        return _ops.fwd(q, k, v, None, 0.125, -1, 0, 0.0, False, 0.4, True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse, s_dmask, rng = call()
    replays = []
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        replays.append((out.clone(), torch.signbit(s_dmask[:, :, :150, :150]).clone(), rng.clone()))
    assert len({tuple(r[2].tolist()) for r in replays}) == 3, "each replay must use a new offset"
    assert not torch.equal(replays[0][1], replays[1][1]) and not torch.equal(replays[1][1], replays[2][1])
    visible = _visible(150, 150, True, (-1, -1))
    for o, dropped, r in replays:
        keep = dropout_keep_mask(*r.tolist(), 2, 4, 150, 150, 0.4, device="cuda")
        assert torch.equal(dropped[:, :, visible], ~keep[:, :, visible])
        ref, _ = attention_ref(q, k, v, 0.125, True, dropout_p=0.4, dropout_mask=keep)
        pt, _ = attention_ref(q, k, v, 0.125, True, dropout_p=0.4, dropout_mask=keep, upcast=False)
        assert max_abs(o, ref) <= 2 * max_abs(pt, ref) + 1e-5


# ----------------------------------------------------------------------------
# errors

def test_softcap_with_dropout_is_refused():
    require_compiled(torch.float16, 64, dropout=True)
    q = _randn("softcap", 1, 8, 2, 64, dtype=torch.float16)
    with pytest.raises(NotImplementedError, match="softcap with dropout is not supported"):
        flash_attn_func(q, q, q, dropout_p=0.1, softcap=5.0)
    ext = build_info.cuda_extension()
    with pytest.raises(NotImplementedError, match="softcap with dropout is not supported"):
        ext.fwd(q, q, q, None, None, 0.125, -1, -1, 5.0, 0.1, False, None)


def test_extension_checks_dropout_arguments():
    require_compiled(torch.float16, 64, dropout=True)
    q = _randn("args", 1, 8, 2, 64, dtype=torch.float16)
    ext = build_info.cuda_extension()
    with pytest.raises(ValueError, match="dropout_p must be in"):
        ext.fwd(q, q, q, None, None, 0.125, -1, -1, 0.0, 1.0, False, None)
    with pytest.raises(ValueError, match="return_softmax needs dropout_p > 0"):
        ext.fwd(q, q, q, None, None, 0.125, -1, -1, 0.0, 0.0, True, None)
    out, lse, s_dmask, rng = ext.fwd(q, q, q, None, None, 0.125, -1, -1, 0.0)
    assert s_dmask is None and rng.shape == (0,)


# ----------------------------------------------------------------------------
# backward with dropout: both backward paths recompute the forward's mask

@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda t: DTYPE_NAMES[t])
@pytest.mark.parametrize("d,mask,alibi,seqlens", [(64, "causal", False, (113, 203)), (128, "full", True, (17, 113)),
                                                  (59, "window", False, (239, 239))])
def test_backward_with_dropout(dtype, d, mask, alibi, seqlens, deterministic):
    """Gradients vs autograd through the fp32 reference with the kernel's mask (3x rule)."""
    require_compiled(dtype, d, dropout=True)
    if not hasattr(build_info.cuda_extension(), "bwd"):
        pytest.skip("no backward in this build")
    sq, sk = seqlens
    b, h, hk, p = 2, 4, 2, 0.2
    key = f"bwd{d}{mask}"
    q = _randn(key + "q", b, sq, h, d, dtype=dtype).requires_grad_(True)
    k, v = (_randn(key + x, b, sk, hk, d, dtype=dtype).requires_grad_(True) for x in "kv")
    slopes = _slopes(key, h) if alibi else None
    causal, window = _window(mask)
    kw = dict(causal=causal, window_size=window, alibi_slopes=slopes)
    seed, offset = _rng_now()
    out = flash_attn_func(q, k, v, dropout_p=p, deterministic=deterministic, **kw)
    keep = dropout_keep_mask(seed, offset, b, h, sq, sk, p, device="cuda")
    dout = _randn(key + "do", b, sq, h, d, dtype=dtype)
    grads = torch.autograd.grad(out, (q, k, v), dout)

    def ref_grads(upcast):
        xs = [x.detach().clone().requires_grad_(True) for x in (q, k, v)]
        ref, _ = attention_ref(*xs, dropout_p=p, dropout_mask=keep, upcast=upcast, **kw)
        return torch.autograd.grad(ref, xs, dout)
    ref32, ref_pt = ref_grads(True), ref_grads(False)
    for name, g, r, rp in zip(("dq", "dk", "dv"), grads, ref32, ref_pt):
        assert torch.isfinite(g).all(), f"{name}: non-finite gradient"
        err, bound = max_abs(g, r), 3 * max_abs(rp, r) + 1e-4
        assert err <= bound, f"{name}: max err {err:.3e} > allowed {bound:.3e}"
