"""GPU forward tests: the CUDA kernels against the fp32 reference.

Rule (shared/TESTING.md): max |out - ref_fp32| <= 2 * max |out_pt - ref_fp32| + 1e-5,
where out_pt is the same reference run in the input precision (upcast=False)
and ref_fp32 the reference in fp32 on the same fp16/bf16 inputs, on the GPU.
The log-sum-exp is checked as well: rows that see no key must have lse = +inf
exactly where the reference has it, and an output of exactly 0.

Outputs are NaN-poisoned: `test_extension_writes_every_output_element` hands
the extension a NaN-filled `out`; the API tests fill freed blocks of torch's
caching allocator with NaN just before each call, so an output element the
kernel never writes reads as NaN.

Every test is marked `cuda` and skips without a GPU or without the compiled
extension, and skips cases this build did not compile (a trimmed build:
FLASH_ATTN_HEADDIMS / FLASH_ATTN_DTYPES / FLASH_ATTN_DISABLE_*).

Environment:
  FLASH_ATTN_TEST_QUICK=1    a representative subset (a few hundred cases
                             instead of ~11k) for a fast run
  FLASH_ATTN_REQUIRE_CUDA=1  a missing GPU or extension fails instead of
                             skipping (scripts/device_run.sh sets it, so a
                             broken install cannot pass as "all skipped")
"""
import itertools
import math
import zlib
from collections import namedtuple

import pytest
import torch

from flash_attn import build_info
from gpu_env import DTYPE_NAMES, QUICK, REQUIRE_CUDA, gpu_marks, max_abs, poison_allocator, require_compiled, unavailable_reason

UNAVAILABLE = unavailable_reason()
pytestmark = gpu_marks(UNAVAILABLE)


@pytest.mark.cuda
def test_kernels_present_when_required():
    """Fails (rather than skips) under FLASH_ATTN_REQUIRE_CUDA=1 when the kernels cannot run."""
    if not REQUIRE_CUDA:
        pytest.skip("FLASH_ATTN_REQUIRE_CUDA is not set")
    assert UNAVAILABLE is None, UNAVAILABLE


# ----------------------------------------------------------------------------
# helpers

DTYPES = [torch.float16, torch.bfloat16]


def _pid(value):
    """Readable parametrize ids: fp16/bf16 for dtypes, 113x203 for seqlen pairs."""
    if isinstance(value, torch.dtype):
        return DTYPE_NAMES.get(value, str(value))
    if isinstance(value, tuple) and all(isinstance(x, int) for x in value):
        return "x".join(str(x) for x in value)
    if isinstance(value, bool):
        return "causal" if value else "noncausal"
    return None


def _generator(key):
    """A CUDA generator seeded from a string, so each case has its own fixed inputs."""
    return torch.Generator(device="cuda").manual_seed(zlib.crc32(key.encode()))


def _randn(gen, *shape, dtype, scale=1.0):
    x = torch.randn(*shape, device="cuda", dtype=torch.float32, generator=gen)
    return (x * scale).to(dtype)


def _slopes(gen, *shape):
    """ALiBi slopes, fp32, positive, in the range real models use (2^-8 .. 1)."""
    return torch.rand(*shape, device="cuda", generator=gen) * 0.75 + 2.0 ** -8


def _ref(q, k, v, upcast, **kw):
    from flash_attn.reference import attention_ref

    return attention_ref(q, k, v, upcast=upcast, **kw)


def _check(out, lse, ref, ref_lse, pt, pt_lse, lse_layout="bhs", what=""):
    """The 2x rule on out, plus the lse checks.

    out/ref/pt: (..., seqlen, nheads, headdim) or (total, nheads, headdim);
    lse/ref_lse/pt_lse: (b, nheads, seqlen) with lse_layout "bhs", or
    (nheads, total) with "ht".
    """
    assert out.shape == ref.shape, f"{what}: out shape {tuple(out.shape)} != {tuple(ref.shape)}"
    assert out.dtype == ref.dtype, f"{what}: out dtype {out.dtype} != {ref.dtype}"
    assert not torch.isnan(out).any(), f"{what}: NaN in the output ({int(torch.isnan(out).sum())} elements)"
    assert torch.isfinite(out).all(), f"{what}: inf in the output"
    err, pt_err = max_abs(out, ref), max_abs(pt, ref)
    assert err <= 2 * pt_err + 1e-5, (
        f"{what}: max |out - ref| = {err:.3e} > 2 * {pt_err:.3e} + 1e-5 (max |out_pt - ref|)")
    if lse is None:
        return
    assert lse.dtype == torch.float32, f"{what}: lse dtype {lse.dtype}"
    assert lse.shape == ref_lse.shape, f"{what}: lse shape {tuple(lse.shape)} != {tuple(ref_lse.shape)}"
    assert not torch.isnan(lse).any(), f"{what}: NaN in the lse"
    empty_ref = torch.isposinf(ref_lse)
    empty = torch.isposinf(lse)
    assert torch.equal(empty, empty_ref), (
        f"{what}: rows with lse = +inf differ from the reference "
        f"({int(empty.sum())} vs {int(empty_ref.sum())})")
    if empty_ref.any():
        # lse (b, h, s) -> rows (b, s, h) of out; (h, total) -> (total, h)
        rows = empty_ref.transpose(-1, -2) if lse_layout == "bhs" else empty_ref.t()
        assert (out[rows] == 0).all(), f"{what}: rows that see no key must output exactly 0"
    finite = ~empty_ref
    if finite.any():
        lse_err = (lse[finite] - ref_lse[finite]).abs().max().item()
        lse_pt_err = (pt_lse[finite].float() - ref_lse[finite]).abs().max().item()
        # the kernel computes the lse in fp32 from the same inputs; the slack covers
        # approximate exp2/tanh on the device
        tol = 2 * lse_pt_err + 5e-3
        assert lse_err <= tol, f"{what}: max |lse - ref| = {lse_err:.3e} > {tol:.3e}"


def _dense_case_check(q, k, v, what, **kw):
    """Runs flash_attn_func (return_attn_probs=True) on poisoned memory and checks it."""
    from flash_attn import flash_attn_func

    b, sq, hq, d = q.shape
    poison_allocator(((b, sq, hq, d), q.dtype), ((b, hq, sq), torch.float32))
    res = flash_attn_func(q, k, v, return_attn_probs=True, **kw)
    assert isinstance(res, tuple) and len(res) == 3, f"{what}: return_attn_probs=True must give 3 values"
    out, lse = res[0], res[1]
    ref_kw = {key: kw[key] for key in ("softmax_scale", "causal", "window_size", "softcap", "alibi_slopes")
              if key in kw}
    ref, ref_lse = _ref(q, k, v, True, **ref_kw)
    pt, pt_lse = _ref(q, k, v, False, **ref_kw)
    _check(out, lse, ref, ref_lse, pt, pt_lse, "bhs", what)
    return out, lse


# ----------------------------------------------------------------------------
# the main grid: dtypes x head dims x mask x score modifier x head layout x seqlens

HEADDIMS = [32, 40, 59, 64, 80, 96, 111, 128, 160, 192, 224, 256]
MASKS = {  # name: (causal, window_size)
    "full": (False, (-1, -1)),
    "causal": (True, (-1, -1)),
    "window": (False, (37, 19)),
    "causal-window": (True, (37, 19)),  # causal forces the right side to 0, as flash-attn does
}
MODS = {  # name: (alibi, softcap)
    "plain": (False, 0.0),
    "alibi": (True, 0.0),
    "softcap": (False, 2.5),
    "alibi-softcap": (True, 2.5),
}
HEADS = {"mha": (8, 8), "gqa": (8, 2), "mqa": (8, 1)}  # (nheads_q, nheads_kv): ratios 1, 4, 8
SEQLENS = [(1, 1), (1, 239), (113, 203), (128, 217), (256, 512), (512, 256),
           (1023, 1024), (1024, 1023), (2048, 2048)]
BATCH = 2

QUICK_HEADDIMS = {59, 64, 128, 256}
QUICK_SEQLENS = {(1, 239), (113, 203), (512, 256), (1023, 1024)}

Case = namedtuple("Case", "dtype headdim mask mod heads seqlens")


def _main_cases():
    cases = []
    for dtype, d, (mi, mask), (oi, mod), heads, sl in itertools.product(
            DTYPES, HEADDIMS, enumerate(MASKS), enumerate(MODS), HEADS, SEQLENS):
        if QUICK:
            # all masks x modifiers, one head layout each (rotating), on a few sizes
            if d not in QUICK_HEADDIMS or sl not in QUICK_SEQLENS:
                continue
            if heads != list(HEADS)[(mi + oi) % len(HEADS)]:
                continue
        cases.append(Case(dtype, d, mask, mod, heads, sl))
    return cases


def _case_id(c):
    return f"{DTYPE_NAMES[c.dtype]}-d{c.headdim}-{c.mask}-{c.mod}-{c.heads}-{c.seqlens[0]}x{c.seqlens[1]}"


@pytest.mark.cuda
@pytest.mark.parametrize("case", _main_cases(), ids=_case_id)
def test_fwd_matches_reference(case):
    causal, window = MASKS[case.mask]
    alibi, softcap = MODS[case.mod]
    hq, hk = HEADS[case.heads]
    sq, sk = case.seqlens
    d, dtype = case.headdim, case.dtype
    require_compiled(dtype, d, alibi, softcap)
    gen = _generator(_case_id(case))
    q = _randn(gen, BATCH, sq, hq, d, dtype=dtype)
    k = _randn(gen, BATCH, sk, hk, d, dtype=dtype)
    v = _randn(gen, BATCH, sk, hk, d, dtype=dtype)
    slopes = _slopes(gen, hq) if alibi else None
    _dense_case_check(q, k, v, _case_id(case), causal=causal, window_size=window, softcap=softcap,
                      alibi_slopes=slopes)


# ----------------------------------------------------------------------------
# varlen: uneven and empty sequences, against per-sequence references

VARLEN_BATCHES = {  # name: (query lengths, key lengths)
    "uneven": ([1, 17, 113, 127, 129, 300], [239, 17, 203, 1, 129, 600]),
    "empty-q": ([0, 64, 0, 33, 0], [50, 64, 7, 200, 1]),
    "empty-k": ([40, 1, 64, 5], [0, 0, 100, 0]),
    "empty-both": ([0, 20, 0], [0, 31, 0]),
    "long": ([1025, 2048, 3], [1024, 1023, 4096]),
}
VARLEN_HEADDIMS = [32, 59, 64, 128, 256]
VARLEN_MODS = ["plain", "alibi", "softcap"]


def _varlen_cases():
    cases = []
    for dtype, d, batch, mask, mod in itertools.product(
            DTYPES, VARLEN_HEADDIMS, VARLEN_BATCHES, MASKS, VARLEN_MODS):
        if QUICK and (d not in (59, 128) or mask == "full" and mod != "plain"):
            continue
        cases.append((dtype, d, batch, mask, mod))
    return cases


def _cu(lens):
    return torch.tensor([0] + list(itertools.accumulate(lens)), device="cuda", dtype=torch.int32)


def _varlen_reference(q, k, v, lens_q, lens_k, upcast, alibi_slopes=None, **kw):
    """Per-sequence attention_ref, concatenated: out (total_q, hq, d), lse (hq, total_q)."""
    hq, d = q.shape[1], v.shape[2]
    outs, lses = [], []
    oq = ok = 0
    for i, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        if lq and lk:
            slopes = None if alibi_slopes is None else alibi_slopes[i]
            o, l = _ref(q[None, oq:oq + lq], k[None, ok:ok + lk], v[None, ok:ok + lk], upcast,
                        alibi_slopes=slopes, **kw)
            outs.append(o[0])
            lses.append(l[0].float())
        elif lq:  # no keys: zeros and lse = +inf
            outs.append(torch.zeros(lq, hq, d, device="cuda", dtype=q.dtype))
            lses.append(torch.full((hq, lq), math.inf, device="cuda"))
        oq, ok = oq + lq, ok + lk
    if not outs:
        return q.new_zeros(0, hq, d), torch.zeros(hq, 0, device="cuda")
    return torch.cat(outs), torch.cat(lses, dim=1)


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,d,batch,mask,mod", _varlen_cases(),
                         ids=_pid)
def test_varlen_matches_per_sequence_reference(dtype, d, batch, mask, mod):
    from flash_attn import flash_attn_varlen_func

    causal, window = MASKS[mask]
    alibi, softcap = MODS[mod]
    require_compiled(dtype, d, alibi, softcap)
    lens_q, lens_k = VARLEN_BATCHES[batch]
    hq, hk = 8, 2
    what = f"varlen-{DTYPE_NAMES[dtype]}-d{d}-{batch}-{mask}-{mod}"
    gen = _generator(what)
    q = _randn(gen, sum(lens_q), hq, d, dtype=dtype)
    k = _randn(gen, sum(lens_k), hk, d, dtype=dtype)
    v = _randn(gen, sum(lens_k), hk, d, dtype=dtype)
    slopes = _slopes(gen, len(lens_q), hq) if alibi else None  # (batch, nheads)
    kw = dict(causal=causal, window_size=window, softcap=softcap)
    poison_allocator(((q.shape[0], hq, d), dtype), ((hq, q.shape[0]), torch.float32))
    out, lse, _ = flash_attn_varlen_func(q, k, v, _cu(lens_q), _cu(lens_k), max(lens_q), max(lens_k),
                                         alibi_slopes=slopes, return_attn_probs=True, **kw)
    ref, ref_lse = _varlen_reference(q, k, v, lens_q, lens_k, True, slopes, **kw)
    pt, pt_lse = _varlen_reference(q, k, v, lens_q, lens_k, False, slopes, **kw)
    _check(out, lse, ref, ref_lse, pt, pt_lse, "ht", what)


# ----------------------------------------------------------------------------
# the six API variants, on the GPU

def _api_variant_cases():
    return [(dtype, d, causal) for dtype in DTYPES for d in (64, 111, 128) for causal in (False, True)
            if not QUICK or d == 111]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,d,causal", _api_variant_cases(),
                         ids=_pid)
def test_api_variants(dtype, d, causal):
    import flash_attn as fa

    require_compiled(dtype, d)
    what = f"api-{DTYPE_NAMES[dtype]}-d{d}-causal{causal}"
    gen = _generator(what)
    b, sq, sk, hq, hk = 2, 113, 203, 8, 2
    scale = 0.37
    kw = dict(causal=causal, softmax_scale=scale)

    def checked(out, q, k, v, label):
        ref, _ = _ref(q, k, v, True, **kw)
        pt, _ = _ref(q, k, v, False, **kw)
        assert isinstance(out, torch.Tensor), f"{what} {label}: return_attn_probs=False must give a Tensor"
        _check(out, None, ref, None, pt, None, what=f"{what} {label}")

    # flash_attn_func / kvpacked (GQA), qkvpacked (self-attention, MHA)
    q = _randn(gen, b, sq, hq, d, dtype=dtype)
    kv = _randn(gen, b, sk, 2, hk, d, dtype=dtype)
    k, v = kv.unbind(2)
    checked(fa.flash_attn_func(q, k, v, **kw), q, k, v, "flash_attn_func")
    checked(fa.flash_attn_kvpacked_func(q, kv, **kw), q, k, v, "flash_attn_kvpacked_func")
    qkv = _randn(gen, b, sq, 3, hq, d, dtype=dtype)
    checked(fa.flash_attn_qkvpacked_func(qkv, **kw), *qkv.unbind(2), "flash_attn_qkvpacked_func")

    # varlen forms: compare each sequence's slice with the dense call on it
    lens_q, lens_k = [17, 0, 113, 64], [203, 9, 1, 64]
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    qv = _randn(gen, sum(lens_q), hq, d, dtype=dtype)
    kvv = _randn(gen, sum(lens_k), 2, hk, d, dtype=dtype)
    kv_k, kv_v = kvv.unbind(1)
    ref, _ = _varlen_reference(qv, kv_k, kv_v, lens_q, lens_k, True, **kw)
    pt, _ = _varlen_reference(qv, kv_k, kv_v, lens_q, lens_k, False, **kw)
    out = fa.flash_attn_varlen_func(qv, kv_k, kv_v, cu_q, cu_k, max(lens_q), max(lens_k), **kw)
    assert isinstance(out, torch.Tensor)
    _check(out, None, ref, None, pt, None, what=f"{what} flash_attn_varlen_func")
    out = fa.flash_attn_varlen_kvpacked_func(qv, kvv, cu_q, cu_k, max(lens_q), max(lens_k), **kw)
    assert isinstance(out, torch.Tensor)
    _check(out, None, ref, None, pt, None, what=f"{what} flash_attn_varlen_kvpacked_func")

    lens = [33, 1, 0, 129]
    qkvv = _randn(gen, sum(lens), 3, hq, d, dtype=dtype)
    qq, kk, vv = qkvv.unbind(1)
    ref, _ = _varlen_reference(qq, kk, vv, lens, lens, True, **kw)
    pt, _ = _varlen_reference(qq, kk, vv, lens, lens, False, **kw)
    out = fa.flash_attn_varlen_qkvpacked_func(qkvv, _cu(lens), max(lens), **kw)
    assert isinstance(out, torch.Tensor)
    _check(out, None, ref, None, pt, None, what=f"{what} flash_attn_varlen_qkvpacked_func")

    # return_attn_probs=True gives (out, softmax_lse, S_dmask) on every variant
    res = fa.flash_attn_qkvpacked_func(qkv, return_attn_probs=True, **kw)
    assert isinstance(res, tuple) and len(res) == 3
    assert res[1].shape == (b, hq, sq) and res[1].dtype == torch.float32
    res = fa.flash_attn_varlen_qkvpacked_func(qkvv, _cu(lens), max(lens), return_attn_probs=True, **kw)
    assert isinstance(res, tuple) and len(res) == 3
    assert res[1].shape == (hq, sum(lens)) and res[1].dtype == torch.float32


# ----------------------------------------------------------------------------
# the extension called directly with a NaN-filled `out`

def _ext_fwd(ext, q, k, v, out, alibi, scale, window, softcap):
    """flash_attn_2_cuda.fwd as flash_attn/_cuda.py calls it -> (out, lse)."""
    return ext.fwd(q, k, v, out, alibi, scale, window[0], window[1], softcap)[:2]


def _ext_varlen_fwd(ext, q, k, v, out, cu_q, cu_k, max_q, max_k, alibi, scale, window, softcap):
    """flash_attn_2_cuda.varlen_fwd as flash_attn/_cuda.py calls it -> (out, lse)."""
    return ext.varlen_fwd(q, k, v, out, cu_q, cu_k, None, max_q, max_k, alibi, scale, window[0],
                          window[1], softcap)[:2]


def _direct_cases():
    return [(dtype, d, mask) for dtype in DTYPES for d in (32, 64, 96, 128, 192, 256)
            for mask in ("full", "causal", "window") if not QUICK or d in (64, 256)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,d,mask", _direct_cases(), ids=_pid)
def test_extension_writes_every_output_element(dtype, d, mask):
    if d not in build_info.compiled_head_dims():
        pytest.skip(f"head dim {d} not compiled")
    require_compiled(dtype, d)
    ext = build_info.cuda_extension()
    causal, window = MASKS[mask]
    kernel_window = (window[0], 0) if causal else window
    what = f"ext-{DTYPE_NAMES[dtype]}-d{d}-{mask}"
    gen = _generator(what)
    b, sq, sk, hq, hk = 2, 113, 203, 8, 2
    q = _randn(gen, b, sq, hq, d, dtype=dtype)
    k = _randn(gen, b, sk, hk, d, dtype=dtype)
    v = _randn(gen, b, sk, hk, d, dtype=dtype)
    scale = d ** -0.5
    out = torch.full_like(q, float("nan"))
    res_out, lse = _ext_fwd(ext, q, k, v, out, None, scale, kernel_window, 0.0)
    assert res_out.data_ptr() == out.data_ptr(), f"{what}: fwd must write into the given `out`"
    kw = dict(causal=causal, window_size=window)
    ref, ref_lse = _ref(q, k, v, True, **kw)
    pt, pt_lse = _ref(q, k, v, False, **kw)
    _check(out, lse, ref, ref_lse, pt, pt_lse, "bhs", what)

    # varlen, with an empty query sequence and an empty key sequence
    lens_q, lens_k = [0, 65, 17, 130], [31, 0, 200, 129]
    qv = _randn(gen, sum(lens_q), hq, d, dtype=dtype)
    kv = _randn(gen, sum(lens_k), hk, d, dtype=dtype)
    vv = _randn(gen, sum(lens_k), hk, d, dtype=dtype)
    outv = torch.full_like(qv, float("nan"))
    res_out, lse = _ext_varlen_fwd(ext, qv, kv, vv, outv, _cu(lens_q), _cu(lens_k), max(lens_q),
                                   max(lens_k), None, scale, kernel_window, 0.0)
    assert res_out.data_ptr() == outv.data_ptr(), f"{what}: varlen_fwd must write into the given `out`"
    ref, ref_lse = _varlen_reference(qv, kv, vv, lens_q, lens_k, True, **kw)
    pt, pt_lse = _varlen_reference(qv, kv, vv, lens_q, lens_k, False, **kw)
    _check(outv, lse, ref, ref_lse, pt, pt_lse, "ht", what + " varlen")


# ----------------------------------------------------------------------------
# layouts, slopes, numeric stress, awkward lengths

def _strided(gen, layout, b, s, h, d, dtype):
    """A (b, s, h, d) tensor with stride(-1) == 1 and other strides not the contiguous ones."""
    if layout == "bhsd-transposed":
        return _randn(gen, b, h, s, d, dtype=dtype).transpose(1, 2)
    if layout == "sliced-last":
        return _randn(gen, b, s, h, d + 24, dtype=dtype)[..., 8:8 + d]
    if layout == "interleaved":
        return _randn(gen, b, s, h, 3, d, dtype=dtype)[:, :, :, 1]
    if layout == "sbhd-transposed":
        return _randn(gen, s, b, h, d, dtype=dtype).transpose(0, 1)
    raise ValueError(layout)


LAYOUTS = ["bhsd-transposed", "sliced-last", "interleaved", "sbhd-transposed"]


@pytest.mark.cuda
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("d", [64, 111, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=_pid)
def test_non_contiguous_inputs(dtype, d, layout):
    require_compiled(dtype, d)
    what = f"strided-{DTYPE_NAMES[dtype]}-d{d}-{layout}"
    gen = _generator(what)
    b, sq, sk, hq, hk = 2, 129, 255, 8, 2
    q = _strided(gen, layout, b, sq, hq, d, dtype)
    k = _strided(gen, layout, b, sk, hk, d, dtype)
    v = _strided(gen, LAYOUTS[(LAYOUTS.index(layout) + 1) % len(LAYOUTS)], b, sk, hk, d, dtype)
    assert not q.is_contiguous() and q.stride(-1) == 1
    before = [t.clone() for t in (q, k, v)]
    _dense_case_check(q, k, v, what, causal=True)
    for t, t0 in zip((q, k, v), before):
        assert torch.equal(t, t0), f"{what}: an input was modified"


@pytest.mark.cuda
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=_pid)
def test_alibi_per_batch_slopes(dtype, d, causal):
    """(batch, nheads) slopes: batch element i must use row i (checked one element at a time)."""
    from flash_attn import flash_attn_func

    require_compiled(dtype, d, alibi=True)
    what = f"alibi-bh-{DTYPE_NAMES[dtype]}-d{d}-causal{causal}"
    gen = _generator(what)
    b, sq, sk, hq, hk = 3, 200, 317, 8, 4
    q = _randn(gen, b, sq, hq, d, dtype=dtype)
    k = _randn(gen, b, sk, hk, d, dtype=dtype)
    v = _randn(gen, b, sk, hk, d, dtype=dtype)
    slopes = _slopes(gen, b, hq)
    slopes[1] *= 0.1  # make the rows clearly different
    poison_allocator(((b, sq, hq, d), dtype))
    out = flash_attn_func(q, k, v, causal=causal, alibi_slopes=slopes)
    for i in range(b):
        kw = dict(causal=causal, alibi_slopes=slopes[i])
        ref, _ = _ref(q[i:i + 1], k[i:i + 1], v[i:i + 1], True, **kw)
        pt, _ = _ref(q[i:i + 1], k[i:i + 1], v[i:i + 1], False, **kw)
        _check(out[i:i + 1], None, ref, None, pt, None, what=f"{what} batch {i}")


def _large_logit_cases():
    return [(dtype, d, causal, sl) for dtype in DTYPES for d in (64, 128, 256) for causal in (False, True)
            for sl in ((128, 217), (1024, 1023), (4096, 4096)) if not QUICK or sl == (1024, 1023)]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype,d,causal,seqlens", _large_logit_cases(), ids=_pid)
def test_large_logits(dtype, d, causal, seqlens):
    """q and k times 4: logits with a spread of tens, where a sloppy online softmax overflows."""
    require_compiled(dtype, d, softcap=False)
    sq, sk = seqlens
    what = f"large-{DTYPE_NAMES[dtype]}-d{d}-causal{causal}-{sq}x{sk}"
    gen = _generator(what)
    b = 1 if sq >= 4096 else 2
    q = _randn(gen, b, sq, 8, d, dtype=dtype, scale=4.0)
    k = _randn(gen, b, sk, 8, d, dtype=dtype, scale=4.0)
    v = _randn(gen, b, sk, 8, d, dtype=dtype)
    out, lse = _dense_case_check(q, k, v, what, causal=causal)
    assert torch.isfinite(lse[~torch.isposinf(lse)]).all()


SELF_SEQLENS = [1, 17, 113, 127, 129, 1025]


@pytest.mark.cuda
@pytest.mark.parametrize("seqlen", SELF_SEQLENS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("d", [40, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES, ids=_pid)
def test_tile_breaking_seqlens(dtype, d, causal, seqlen):
    require_compiled(dtype, d)
    what = f"self-{DTYPE_NAMES[dtype]}-d{d}-causal{causal}-s{seqlen}"
    gen = _generator(what)
    q = _randn(gen, 3, seqlen, 4, d, dtype=dtype)
    k = _randn(gen, 3, seqlen, 4, d, dtype=dtype)
    v = _randn(gen, 3, seqlen, 4, d, dtype=dtype)
    _dense_case_check(q, k, v, what, causal=causal)


@pytest.mark.cuda
@pytest.mark.parametrize("shape", [(64, 17, 1), (1, 1025, 40), (7, 300, 3)],
                         ids=["b64-h1", "b1-h40", "b7-h3"])
def test_grid_shapes(shape):
    """Many batches with one head, one batch with many heads: the launch grid's edges."""
    b, s, h = shape
    dtype = torch.bfloat16 if "bf16" in build_info.build_config().get("dtypes", []) else torch.float16
    require_compiled(dtype, 64)
    what = f"grid-b{b}-s{s}-h{h}"
    gen = _generator(what)
    q = _randn(gen, b, s, h, 64, dtype=dtype)
    k = _randn(gen, b, s + 5, h, 64, dtype=dtype)
    v = _randn(gen, b, s + 5, h, 64, dtype=dtype)
    _dense_case_check(q, k, v, what, causal=True)


@pytest.mark.cuda
@pytest.mark.parametrize("mask", ["full", "causal-window"])
@pytest.mark.parametrize("d", [64, 128, 256])
def test_repeat_runs_are_bitwise_identical(d, mask):
    """A result that moves between identical runs is a race."""
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    dtype = torch.bfloat16 if "bf16" in build_info.build_config().get("dtypes", []) else torch.float16
    require_compiled(dtype, d, alibi=True, softcap=True)
    causal, window = MASKS[mask]
    gen = _generator(f"repeat-{d}-{mask}")
    q = _randn(gen, 2, 1023, 8, d, dtype=dtype)
    k = _randn(gen, 2, 1024, 2, d, dtype=dtype)
    v = _randn(gen, 2, 1024, 2, d, dtype=dtype)
    slopes = _slopes(gen, 8)
    kw = dict(causal=causal, window_size=window, alibi_slopes=slopes, softcap=2.5)
    first = flash_attn_func(q, k, v, **kw)
    for _ in range(3):
        assert torch.equal(flash_attn_func(q, k, v, **kw), first)
    lens_q, lens_k = [5, 700, 0, 318], [800, 3, 17, 228]
    qv, kv, vv = q.reshape(-1, 8, d)[:sum(lens_q)], k.reshape(-1, 2, d)[:sum(lens_k)], v.reshape(-1, 2, d)[:sum(lens_k)]
    args = (qv, kv, vv, _cu(lens_q), _cu(lens_k), max(lens_q), max(lens_k))
    first = flash_attn_varlen_func(*args, **kw)
    for _ in range(3):
        assert torch.equal(flash_attn_varlen_func(*args, **kw), first)
