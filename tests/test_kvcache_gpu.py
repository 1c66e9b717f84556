"""GPU tests of flash_attn_with_kvcache: the CUDA route against the reference.

The reference is flash_attn.reference.kvcache_ref (what CPU tensors run), here
computed on the GPU from clones of the same inputs: in fp32 (upcast) and in the
input precision (for the 2x rule of shared/TESTING.md):
    max |out - ref_fp32| <= 2 * max |out_pt - ref_fp32| + 1e-5
The caches are compared after the in-place update (v exactly, k to within
rounding of the rotary), and the lse like test_flash_attn_gpu.py does.

Poisoning: every cache slot outside the keys a row may read ([cache_leftpad,
cache_seqlens + seqlen_new) of its cache row) holds NaN, so a key read past
its sequence shows; freed blocks of the caching allocator are NaN-filled
before each call, so an output element never written shows.

Marked `cuda`; skips without a GPU or the extension, and skips what this build
did not compile. FLASH_ATTN_TEST_QUICK=1 runs a subset; FLASH_ATTN_REQUIRE_CUDA=1
turns a missing GPU or extension into a failure (see test_flash_attn_gpu.py).
"""
import itertools
import math
import re
import zlib
from collections import namedtuple

import pytest
import torch

from flash_attn import build_info
from gpu_env import DTYPE_NAMES, QUICK, gpu_marks, max_abs, poison_allocator, require_compiled, unavailable_reason

UNAVAILABLE = unavailable_reason()
pytestmark = gpu_marks(UNAVAILABLE)


# ----------------------------------------------------------------------------
# helpers

DTYPES = [torch.float16, torch.bfloat16]


def _any_dtype():
    return torch.bfloat16 if "bf16" in build_info.build_config().get("dtypes", []) else torch.float16


def _generator(key):
    return torch.Generator(device="cuda").manual_seed(zlib.crc32(key.encode()))


def _randn(gen, *shape, dtype):
    return torch.randn(*shape, device="cuda", dtype=torch.float32, generator=gen).to(dtype)


def _randint(gen, low, high, n):
    """n ints uniform in [low, high] (inclusive), as a python list."""
    return torch.randint(low, high + 1, (n,), device="cuda", generator=gen).tolist()


def _i32(values):
    return torch.tensor(values, dtype=torch.int32, device="cuda")


def _clone(kw):
    return {key: (val.clone() if isinstance(val, torch.Tensor) else val) for key, val in kw.items()}


def _check(out, lse, ref, ref_lse, pt, pt_lse, what):
    """The 2x rule on out; lse: +inf exactly where the reference has it (and out 0 there), else close."""
    assert out.shape == ref.shape and out.dtype == ref.dtype, f"{what}: out {tuple(out.shape)} {out.dtype}"
    assert not torch.isnan(out).any(), f"{what}: NaN in the output ({int(torch.isnan(out).sum())} elements)"
    err, pt_err = max_abs(out, ref), max_abs(pt, ref)
    assert err <= 2 * pt_err + 1e-5, f"{what}: max |out - ref| = {err:.3e} > 2 * {pt_err:.3e} + 1e-5"
    assert lse.dtype == torch.float32 and lse.shape == ref_lse.shape, f"{what}: lse {tuple(lse.shape)} {lse.dtype}"
    assert lse.is_contiguous(), f"{what}: lse must be contiguous (batch, nheads, seqlen_q)"
    assert not torch.isnan(lse).any(), f"{what}: NaN in the lse"
    empty = torch.isposinf(ref_lse)
    assert torch.equal(torch.isposinf(lse), empty), f"{what}: rows with lse = +inf differ from the reference"
    if empty.any():
        assert (out[empty.transpose(1, 2)] == 0).all(), f"{what}: rows that see no key must output exactly 0"
    finite = ~empty
    if finite.any():
        lse_err = (lse[finite] - ref_lse[finite]).abs().max().item()
        tol = 2 * (pt_lse[finite].float() - ref_lse[finite]).abs().max().item() + 5e-3
        assert lse_err <= tol, f"{what}: max |lse - ref| = {lse_err:.3e} > {tol:.3e}"


def _run_and_check(kw, what, readable):
    """Runs flash_attn_with_kvcache on kw (caches updated in place) and the reference on clones.

    readable: per batch row (cache row, first readable slot, end) - every other cache slot is
    NaN-poisoned here, before the call.
    """
    from flash_attn import flash_attn_with_kvcache
    from flash_attn.reference import kvcache_ref

    k_cache, v_cache = kw["k_cache"], kw["v_cache"]
    keep = torch.zeros(k_cache.shape[:2], dtype=torch.bool, device="cuda")
    for row, start, end in readable:
        keep[row, start:end] = True
    k_cache[~keep] = float("nan")
    v_cache[~keep] = float("nan")
    ref_kw, pt_kw = _clone(kw), _clone(kw)
    b, sq, hq, d = kw["q"].shape
    poison_allocator(((b, sq, hq, d), kw["q"].dtype), ((b, hq, sq), torch.float32))
    out, lse = flash_attn_with_kvcache(**kw, return_softmax_lse=True)
    ref, ref_lse = kvcache_ref(**ref_kw, upcast=True)
    pt, pt_lse = kvcache_ref(**pt_kw, upcast=False)
    _check(out, lse, ref, ref_lse, pt, pt_lse, what)
    torch.testing.assert_close(v_cache, ref_kw["v_cache"], rtol=0, atol=0, equal_nan=True,
                               msg=lambda m: f"{what}: v_cache after the update: {m}")
    torch.testing.assert_close(k_cache, ref_kw["k_cache"], equal_nan=True,
                               msg=lambda m: f"{what}: k_cache after the update: {m}")
    return out, lse


# ----------------------------------------------------------------------------
# the main grid

MASKS = {  # name: (causal, window_size)
    "full": (False, (-1, -1)),
    "causal": (True, (-1, -1)),
    "window": (False, (97, 13)),
    "causal-window": (True, (200, -1)),
}
ROTARY = {  # name: (fraction of the head dim rotated, interleaved)
    "none": (0.0, True),
    "half-interleaved": (0.5, True),
    "half-neox": (0.5, False),
    "full-interleaved": (1.0, True),
    "full-neox": (1.0, False),
}
HEADS = [(8, 8), (8, 2), (8, 1)]  # GQA ratios 1, 4, 8
HEADDIMS = [64, 128, 59]  # 59: padded to a compiled head dim (the gathered path)
S_CACHES = [301, 1024, 3000]
SEQLEN_Q = [1, 3, 128]
BATCHES = [1, 3, 17]

Case = namedtuple("Case", "dtype d batch sq s_new s_cache heads mask rotary batch_idx leftpad")


def _main_cases():
    """Every (seqlen_q, rotary, mask); the other dimensions rotate through the list with
    coprime periods, so each value meets many others without a full product."""
    cases = []
    for n, (sq, rot, mask) in enumerate(itertools.product(SEQLEN_Q, ROTARY, MASKS)):
        if QUICK and n % 3:
            continue
        s_new = [sq, 0, 1][n % 3] if sq > 1 else [1, 0][n % 2]
        if rot != "none" and s_new == 0:
            s_new = sq  # rotary needs new keys
        cases.append(Case(DTYPES[n % 2], HEADDIMS[n % 3], BATCHES[(n // 2) % 3], sq, s_new, S_CACHES[n % 5 % 3],
                          HEADS[n % 7 % 3], mask, rot, bool((n // 3) % 2), bool((n // 5) % 2)))
    return cases


def _case_id(c):
    h, hk = c.heads
    extra = "".join(["-bidx" if c.batch_idx else "", "-leftpad" if c.leftpad else ""])
    return (f"{DTYPE_NAMES[c.dtype]}-d{c.d}-b{c.batch}-q{c.sq}-new{c.s_new}-cache{c.s_cache}-h{h}k{hk}-{c.mask}"
            f"-rot_{c.rotary}{extra}")


def _make_case(gen, dtype, d, batch, sq, s_new, s_cache, heads, rotary=("none", 0.0, True), batch_idx=False,
               leftpad=False, b_cache_extra=2):
    """Keyword arguments for flash_attn_with_kvcache, and the readable slots of each row."""
    hq, hk = heads
    _, fraction, interleaved = rotary
    b_cache = batch + b_cache_extra if batch_idx else batch
    seqlens = _randint(gen, 0, s_cache - s_new, batch)
    seqlens[0] = s_cache - s_new  # one row right at capacity
    pads = [_randint(gen, 0, n, 1)[0] if leftpad else 0 for n in seqlens]
    rows = torch.randperm(b_cache, device="cuda", generator=gen)[:batch].tolist() if batch_idx else list(range(batch))
    kw = dict(q=_randn(gen, batch, sq, hq, d, dtype=dtype),
              k_cache=_randn(gen, b_cache, s_cache, hk, d, dtype=dtype),
              v_cache=_randn(gen, b_cache, s_cache, hk, d, dtype=dtype),
              k=_randn(gen, batch, s_new, hk, d, dtype=dtype) if s_new else None,
              v=_randn(gen, batch, s_new, hk, d, dtype=dtype) if s_new else None,
              cache_seqlens=_i32(seqlens), cache_batch_idx=_i32(rows) if batch_idx else None,
              cache_leftpad=_i32(pads) if leftpad else None, rotary_interleaved=interleaved)
    rotary_dim = 2 * int(d * fraction / 2)
    if rotary_dim:
        angle = torch.rand(s_cache, rotary_dim // 2, device="cuda", generator=gen) * 2 * math.pi
        kw["rotary_cos"], kw["rotary_sin"] = torch.cos(angle).to(dtype), torch.sin(angle).to(dtype)
    readable = [(r, p, n + s_new) for r, p, n in zip(rows, pads, seqlens)]
    return kw, readable


@pytest.mark.cuda
@pytest.mark.parametrize("case", _main_cases(), ids=_case_id)
def test_kvcache_matches_reference(case):
    require_compiled(case.dtype, case.d)
    what = _case_id(case)
    gen = _generator(what)
    causal, window = MASKS[case.mask]
    kw, readable = _make_case(gen, case.dtype, case.d, case.batch, case.sq, case.s_new, case.s_cache, case.heads,
                              (case.rotary, *ROTARY[case.rotary]), case.batch_idx, case.leftpad)
    _run_and_check({**kw, "causal": causal, "window_size": window}, what, readable)


# ----------------------------------------------------------------------------
# score modifiers, cache forms, edge lengths

@pytest.mark.cuda
@pytest.mark.parametrize("mod", ["alibi", "softcap", "alibi-softcap"])
@pytest.mark.parametrize("sq,causal", [(1, False), (1, True), (5, True), (64, False)])
def test_score_modifiers(mod, sq, causal):
    dtype = _any_dtype()
    alibi, softcap = "alibi" in mod, "softcap" in mod
    require_compiled(dtype, 128, alibi=alibi, softcap=softcap)
    what = f"mod-{mod}-q{sq}-causal{causal}"
    gen = _generator(what)
    kw, readable = _make_case(gen, dtype, 128, 3, sq, sq, 777, (8, 2), leftpad=(sq == 5))
    if alibi:  # (batch, nheads) slopes for the decode shape, (nheads,) otherwise
        shape = (3, 8) if sq == 1 else (8,)
        kw["alibi_slopes"] = torch.rand(*shape, device="cuda", generator=gen) * 0.75 + 2.0 ** -8
    _run_and_check({**kw, "causal": causal, "softcap": 3.0 if softcap else 0.0, "softmax_scale": 0.11},
                   what, readable)


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["seq-major", "sliced-heads", "extra-rows"])
def test_cache_layouts(layout):
    """Caches whose (batch, seqlen) dims do not flatten into one (the batched kernel reads them in
    place through their strides), and a cache with more rows than q."""
    dtype = _any_dtype()
    require_compiled(dtype, 64)
    what = f"layout-{layout}"
    gen = _generator(what)
    kw, readable = _make_case(gen, dtype, 64, 3, 2, 2, 500, (8, 2), rotary=("r", 0.5, False))
    for name in ("k_cache", "v_cache"):
        c = kw[name]
        if layout == "seq-major":
            kw[name] = c.transpose(0, 1).contiguous().transpose(0, 1)
        elif layout == "sliced-heads":
            kw[name] = torch.cat([c, torch.zeros_like(c)], dim=2)[:, :, :2]
        else:
            kw[name] = torch.cat([c, torch.zeros_like(c[:2])], dim=0)
        assert kw[name].stride(-1) == 1
    _run_and_check({**kw, "causal": True}, what, readable)


@pytest.mark.cuda
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged"])
@pytest.mark.parametrize("heads", [(32, 8), (8, 1), (8, 8)], ids=["gqa4", "mqa", "mha"])
def test_decode_q_sliced_from_qkv(heads, paged):
    """The plain decode step (no new keys: cache_seqlens is the kernel's seqused_k as it is) with q
    a slice of a fused qkv projection (b, 1, hq + 2 hk, d): the GQA-packed kernel reads q and writes
    out through strided views (row stride d, head stride g * d), no copy."""
    from flash_attn import flash_attn_with_kvcache
    from flash_attn.reference import kvcache_ref

    dtype = _any_dtype()
    require_compiled(dtype, 128, paged=paged)
    hq, hk = heads
    what = f"decode-qkv-slice-h{hq}k{hk}-{'paged' if paged else 'contiguous'}"
    gen = _generator(what)
    b, d, cap, page = 3, 128, 1024, 64
    qkv = _randn(gen, b, 1, hq + 2 * hk, d, dtype=dtype)
    q = qkv[:, :, :hq]
    seqlens = _i32([cap, 1, 517])
    k_ref, v_ref = _randn(gen, b, cap, hk, d, dtype=dtype), _randn(gen, b, cap, hk, d, dtype=dtype)
    kw = dict(cache_seqlens=seqlens)
    if paged:  # pages in a random order, one spare NaN page
        nblk = cap // page
        perm = torch.randperm(b * nblk + 1, device="cuda", generator=gen)[:b * nblk].view(b, nblk)
        caches = []
        for c in (k_ref, v_ref):
            pool = torch.full((b * nblk + 1, page, hk, d), float("nan"), dtype=dtype, device="cuda")
            pool[perm] = c.view(b, nblk, page, hk, d)
            caches.append(pool)
        kw.update(k_cache=caches[0], v_cache=caches[1], block_table=perm.to(torch.int32))
    else:
        kw.update(k_cache=k_ref, v_cache=v_ref)
    poison_allocator(((b, 1, hq, d), dtype), ((b, hq, 1), torch.float32))
    out, lse = flash_attn_with_kvcache(q, **kw, return_softmax_lse=True)
    ref, ref_lse = kvcache_ref(q, k_ref.clone(), v_ref.clone(), cache_seqlens=seqlens, upcast=True)
    pt, pt_lse = kvcache_ref(q, k_ref.clone(), v_ref.clone(), cache_seqlens=seqlens, upcast=False)
    _check(out, lse, ref, ref_lse, pt, pt_lse, what)
    assert out.is_contiguous()


@pytest.mark.cuda
def test_fwd_kvcache_argument_errors():
    """flash_attn_2_cuda.fwd's KV-cache arguments (seqused_k, block_table, leftpad_k) are checked
    before anything runs, with a ValueError naming the argument."""
    from flash_attn import build_info

    dtype = _any_dtype()
    require_compiled(dtype, 128, paged=True)
    ext = build_info.cuda_extension()
    q = torch.randn(2, 1, 8, 128, device="cuda", dtype=dtype)
    cache = torch.randn(2, 64, 2, 128, device="cuda", dtype=dtype)
    seqused = _i32([3, 64])
    table = _i32([[0, 1], [1, 0]])

    def call(**kw):
        return ext.fwd(q, kw.pop("k", cache), kw.pop("v", cache), None, None, 0.1, -1, -1, 0.0, **kw)

    pages = cache.view(4, 32, 2, 128)  # 4 pages of 32 rows
    assert call(seqused_k=seqused)[0].shape == q.shape  # the good calls
    assert call(seqused_k=seqused, block_table=table, k=pages, v=pages)[0].shape == q.shape
    cases = [
        (dict(seqused_k=seqused.long()), "seqused_k must be int32"),
        (dict(seqused_k=_i32([3, 64, 1])), "seqused_k must be a contiguous (batch,)"),
        (dict(seqused_k=_i32([3, 0, 64, 0])[::2]), "seqused_k must be a contiguous (batch,)"),
        (dict(seqused_k=seqused.cpu()), "seqused_k must be on q's device"),
        (dict(seqused_k=seqused, leftpad_k=_i32([0, 0])), "leftpad_k needs block_table"),
        (dict(block_table=table, k=pages, v=pages), "seqused_k (the keys of each sequence) is required"),
        (dict(seqused_k=seqused, block_table=_i32([[0, 1]]), k=pages, v=pages), "block_table must be (batch"),
        (dict(seqused_k=seqused, num_splits=-1), "num_splits must be >= 0"),
        (dict(seqused_k=seqused, k=cache[:1], v=cache[:1]), "k and v must have batch size 2"),
    ]
    for kw, text in cases:
        with pytest.raises(ValueError, match=re.escape(text)):
            call(**kw)


@pytest.mark.cuda
@pytest.mark.parametrize("batch", [1, 3])
def test_long_cache_decode(batch):
    """One new token against a few thousand cached ones, MQA, as a decoding step."""
    dtype = _any_dtype()
    require_compiled(dtype, 128)
    what = f"long-decode-b{batch}"
    gen = _generator(what)
    kw, readable = _make_case(gen, dtype, 128, batch, 1, 1, 4096, (8, 1), rotary=("r", 1.0, False))
    _run_and_check({**kw, "causal": True}, what, readable)


@pytest.mark.cuda
def test_int_and_missing_cache_seqlens():
    from flash_attn import flash_attn_with_kvcache
    from flash_attn.reference import kvcache_ref

    dtype = _any_dtype()
    require_compiled(dtype, 64)
    gen = _generator("int-seqlens")
    kw, readable = _make_case(gen, dtype, 64, 3, 4, 4, 300, (8, 2))
    kw["cache_seqlens"] = 100
    _run_and_check({**kw, "causal": True}, "int cache_seqlens", [(r, 0, 104) for r, _, _ in readable])
    q, k_cache, v_cache = kw["q"], kw["k_cache"], kw["v_cache"]
    k_cache.normal_(generator=gen)
    v_cache.normal_(generator=gen)
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, causal=True, return_softmax_lse=True)
    ref, ref_lse = kvcache_ref(q, k_cache, v_cache, causal=True)
    pt, pt_lse = kvcache_ref(q, k_cache, v_cache, causal=True, upcast=False)
    _check(out, lse, ref, ref_lse, pt, pt_lse, "cache_seqlens=None")


@pytest.mark.cuda
def test_rows_without_keys():
    """cache_seqlens 0 without new keys, and more queries than keys under causal: zeros, lse +inf."""
    dtype = _any_dtype()
    require_compiled(dtype, 64)
    gen = _generator("rows-without-keys")
    kw, _ = _make_case(gen, dtype, 64, 3, 5, 0, 64, (8, 8))
    kw["cache_seqlens"] = _i32([0, 3, 64])
    out, lse = _run_and_check({**kw, "causal": True}, "rows-without-keys", [(0, 0, 0), (1, 0, 3), (2, 0, 64)])
    assert torch.isposinf(lse[0]).all() and torch.isposinf(lse[1, :, :2]).all()


@pytest.mark.cuda
def test_empty_inputs():
    from flash_attn import flash_attn_with_kvcache

    dtype = _any_dtype()
    require_compiled(dtype, 64)
    gen = _generator("empty")
    k_cache = torch.zeros(2, 16, 2, 64, device="cuda", dtype=dtype)
    v_cache = torch.zeros_like(k_cache)
    k, v = _randn(gen, 2, 3, 2, 64, dtype=dtype), _randn(gen, 2, 3, 2, 64, dtype=dtype)
    out, lse = flash_attn_with_kvcache(_randn(gen, 2, 0, 8, 64, dtype=dtype), k_cache, v_cache, k, v,
                                       cache_seqlens=_i32([0, 13]), return_softmax_lse=True)
    assert out.shape == (2, 0, 8, 64) and lse.shape == (2, 8, 0)
    assert torch.equal(k_cache[0, :3], k[0]) and torch.equal(v_cache[1, 13:], v[1])
    out = flash_attn_with_kvcache(_randn(gen, 0, 1, 8, 64, dtype=dtype), k_cache[:0], v_cache[:0],
                                  cache_seqlens=0)
    assert out.shape == (0, 1, 8, 64)
    q = _randn(gen, 2, 3, 8, 64, dtype=dtype)
    out, lse = flash_attn_with_kvcache(q, k_cache[:, :0], v_cache[:, :0], return_softmax_lse=True)
    assert (out == 0).all() and torch.isposinf(lse).all()


@pytest.mark.cuda
def test_capacity_check_is_opt_in(monkeypatch):
    """Past-capacity cache_seqlens, out-of-range cache_batch_idx / cache_leftpad: FLASH_ATTN_DEBUG=1
    raises; without it the values are clamped (wrong numbers, but no write outside the caches: the
    caches are the middle rows of larger buffers whose outer rows must stay zero)."""
    from flash_attn import flash_attn_with_kvcache

    dtype = _any_dtype()
    require_compiled(dtype, 64)
    gen = _generator("capacity")
    k_big = torch.zeros(4, 32, 2, 64, device="cuda", dtype=dtype)
    v_big = torch.zeros_like(k_big)
    k_cache, v_cache = k_big[1:3], v_big[1:3]
    k, v = _randn(gen, 2, 4, 2, 64, dtype=dtype), _randn(gen, 2, 4, 2, 64, dtype=dtype)
    q = _randn(gen, 2, 1, 8, 64, dtype=dtype)
    for bad in (dict(cache_seqlens=_i32([30, -5])),
                dict(cache_seqlens=_i32([30, -5]), cache_batch_idx=_i32([5, -1]), cache_leftpad=_i32([40, -2]))):
        monkeypatch.setenv("FLASH_ATTN_DEBUG", "1")
        with pytest.raises(ValueError, match="cache_seqlens"):
            flash_attn_with_kvcache(q, k_cache, v_cache, k, v, **bad)
        monkeypatch.delenv("FLASH_ATTN_DEBUG")
        out = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, **bad)
        torch.cuda.synchronize()
        assert out.shape == (2, 1, 8, 64) and not torch.isnan(out).any()
        for big in (k_big, v_big):
            assert (big[0] == 0).all() and (big[3] == 0).all(), f"{bad}: a write landed outside the cache"


@pytest.mark.cuda
def test_backward_raises():
    from flash_attn import flash_attn_with_kvcache

    dtype = _any_dtype()
    require_compiled(dtype, 64)
    gen = _generator("backward")
    kw, _ = _make_case(gen, dtype, 64, 2, 1, 1, 64, (8, 2))
    kw["q"].requires_grad_(True)
    out = flash_attn_with_kvcache(**kw)
    with pytest.raises(NotImplementedError, match="backward"):
        out.float().sum().backward()


# ----------------------------------------------------------------------------
# split-KV (num_splits): the split kernel + combine against the reference, and against num_splits=1

SPLITS = [1, 0, 3, 16]  # 1 = off, 0 = heuristic (splits these small grids), 3 and 16 explicit
SPLIT_SEQLENS_K = [17, 4097] if QUICK else [1, 17, 1000, 4097]  # keys per row 0 (others fewer)
SPLIT_MASKS = {  # name: (causal, window_size, alibi, seqlen_q)
    "full": (False, (-1, -1), False, 1),  # the GQA-packed decode path
    "causal": (True, (-1, -1), False, 2),  # 2 query rows: with 1 key, row 0 sees none (lse +inf)
    "window": (False, (97, 13), False, 2),  # most shares of a long cache see no key
    "alibi": (False, (-1, -1), True, 1),
}
SPLIT_HEADDIMS = [64, 128, 256]  # the head dims with split kernels
SPLIT_PAGE = 16


def _split_case(gen, dtype, d, batch, seqlen_k, hk, mask, paged):
    """kw for flash_attn_with_kvcache (one new token per row, row 0 ending at seqlen_k keys, the
    others at random lengths; slots past each row's keys NaN), and the contiguous caches that
    the reference reads (the same data when unpaged)."""
    causal, window, alibi, sq = SPLIT_MASKS[mask]
    hq = 8
    cap = -(-seqlen_k // SPLIT_PAGE) * SPLIT_PAGE if paged else seqlen_k
    seqlens = [seqlen_k - 1] + _randint(gen, 0, seqlen_k - 1, batch - 1)
    k_cache = _randn(gen, batch, cap, hk, d, dtype=dtype)
    v_cache = _randn(gen, batch, cap, hk, d, dtype=dtype)
    for i, n in enumerate(seqlens):
        k_cache[i, n + 1:] = float("nan")
        v_cache[i, n + 1:] = float("nan")
    kw = dict(q=_randn(gen, batch, sq, hq, d, dtype=dtype), k=_randn(gen, batch, 1, hk, d, dtype=dtype),
              v=_randn(gen, batch, 1, hk, d, dtype=dtype), cache_seqlens=_i32(seqlens), causal=causal,
              window_size=window)
    if alibi:
        kw["alibi_slopes"] = torch.rand(batch, hq, device="cuda", generator=gen) * 0.75 + 2.0 ** -8
    contiguous = (k_cache.clone(), v_cache.clone())
    if paged:  # physical pages in a random order, 3 spare NaN pages
        nblk = cap // SPLIT_PAGE
        perm = torch.randperm(batch * nblk + 3, device="cuda", generator=gen)[:batch * nblk].view(batch, nblk)
        for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
            pages = torch.full((batch * nblk + 3, SPLIT_PAGE, hk, d), float("nan"), dtype=dtype, device="cuda")
            pages[perm] = c.view(batch, nblk, SPLIT_PAGE, hk, d)
            kw[name] = pages
        kw["block_table"] = perm.to(torch.int32)
    else:
        kw["k_cache"], kw["v_cache"] = k_cache, v_cache
    return kw, contiguous


def _poison_split_buffers(batch, sq, d, dtype):
    """NaN in the allocator's free blocks at the sizes of the outputs and of the fp32 partials
    (oaccum [splits, heads, rows, d], lseaccum), so a partial that no split wrote shows."""
    rows = batch * sq * 4  # GQA packing turns up to 4 query heads into rows
    poison_allocator(((batch, sq, 8, d), dtype), ((batch, 8, sq), torch.float32),
                     ((16, 8, rows, d), torch.float32), ((16, 8, rows), torch.float32))


@pytest.mark.cuda
@pytest.mark.parametrize("paged", [False, True], ids=["unpaged", "paged"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("mask", list(SPLIT_MASKS))
@pytest.mark.parametrize("hk", [8, 2], ids=["mha", "gqa4"])
@pytest.mark.parametrize("seqlen_k", SPLIT_SEQLENS_K)
@pytest.mark.parametrize("num_splits", SPLITS)
def test_split_kv_matches_reference(num_splits, seqlen_k, hk, mask, batch, paged):
    from flash_attn import flash_attn_with_kvcache
    from flash_attn.reference import kvcache_ref

    dtype = _any_dtype()
    d = SPLIT_HEADDIMS[(SPLIT_SEQLENS_K.index(seqlen_k) + batch + (hk == 2)) % 3]
    require_compiled(dtype, d, alibi=SPLIT_MASKS[mask][2], paged=paged)
    what = f"split{num_splits}-k{seqlen_k}-hk{hk}-{mask}-b{batch}-{'paged' if paged else 'unpaged'}-d{d}"
    gen = _generator(what)
    kw, (k_ref, v_ref) = _split_case(gen, dtype, d, batch, seqlen_k, hk, mask, paged)
    ref_kw = {key: val for key, val in _clone(kw).items() if key not in ("k_cache", "v_cache", "block_table")}
    _poison_split_buffers(batch, kw["q"].shape[1], d, dtype)
    out, lse = flash_attn_with_kvcache(**kw, num_splits=num_splits, return_softmax_lse=True)
    ref, ref_lse = kvcache_ref(k_cache=k_ref.clone(), v_cache=v_ref.clone(), upcast=True, **ref_kw)
    pt, pt_lse = kvcache_ref(k_cache=k_ref.clone(), v_cache=v_ref.clone(), upcast=False, **ref_kw)
    _check(out, lse, ref, ref_lse, pt, pt_lse, what)


@pytest.mark.cuda
@pytest.mark.parametrize("d", SPLIT_HEADDIMS)
@pytest.mark.parametrize("mask", list(SPLIT_MASKS))
def test_split_kv_equals_unsplit(mask, d):
    """num_splits=16 against num_splits=1 on the same inputs: equal to within rounding (the
    partials are fp32; the merge changes the summation order only), lse +inf in the same rows."""
    from flash_attn import flash_attn_with_kvcache

    dtype = _any_dtype()
    require_compiled(dtype, d, alibi=SPLIT_MASKS[mask][2])
    gen = _generator(f"split-vs-unsplit-{mask}-d{d}")
    kw, _ = _split_case(gen, dtype, d, 3, 4097, 2, mask, paged=False)
    kw.pop("k"), kw.pop("v")  # no append: both calls see the same caches
    out1, lse1 = flash_attn_with_kvcache(**kw, num_splits=1, return_softmax_lse=True)
    out16, lse16 = flash_attn_with_kvcache(**kw, num_splits=16, return_softmax_lse=True)
    assert not torch.isnan(out16).any() and not torch.isnan(lse16).any()
    assert torch.equal(torch.isposinf(lse16), torch.isposinf(lse1))
    finite = torch.isfinite(lse1)
    assert (lse16[finite] - lse1[finite]).abs().max().item() <= 1e-4
    # one rounding step of the output dtype at the outputs' scale (|out| <= max |v| ~ 5)
    tol = 8 * torch.finfo(dtype).eps
    assert max_abs(out16, out1) <= tol, f"max |split16 - split1| = {max_abs(out16, out1):.3e} > {tol:.3e}"
