"""GPU tests of paged KV (block_table): flash_attn_with_kvcache and flash_attn_varlen_func on
paged caches (physical blocks in a random permutation, unused blocks NaN) against the same data
in contiguous form, through the reference (2x rule of shared/TESTING.md), the pages checked
after the in-place update. The CUDA route is the paged-KV kernel, which reads each key row from
its page (csrc/flash_attn/paged_kv.h): tiles of kBlockN keys across several pages and pages
holding several tiles, page sizes that are not powers of two, head dims below the kernel's,
split and unsplit. Marked `cuda`; FLASH_ATTN_TEST_QUICK=1 runs a subset.
"""
import pytest
import torch

from gpu_env import DTYPE_NAMES, QUICK, gpu_marks, max_abs, require_compiled, unavailable_reason

pytestmark = gpu_marks(unavailable_reason())

PAGES = [16, 256] if QUICK else [16, 64, 256]
DTYPE = torch.float16


def _gen(seed):
    return torch.Generator(device="cuda").manual_seed(seed)


def _randn(*shape, seed, dtype=DTYPE):
    return torch.randn(*shape, device="cuda", generator=_gen(seed)).to(dtype)


def _i32(values):
    return torch.tensor(values, dtype=torch.int32, device="cuda")


def _cu(lens):
    return torch.tensor([0] + lens, dtype=torch.int64, device="cuda").cumsum(0).to(torch.int32)


def _to_paged(contig, page, seed, extra=3):
    b, cap, hk, d = contig.shape
    nblk = cap // page
    perm = torch.randperm(b * nblk + extra, generator=torch.Generator().manual_seed(seed))[:b * nblk]
    perm = perm.view(b, nblk).cuda()
    paged = torch.full((b * nblk + extra, page, hk, d), float("nan"), dtype=contig.dtype, device="cuda")
    paged[perm] = contig.view(b, nblk, page, hk, d)
    return paged, perm.to(torch.int32)


def _from_paged(paged, bt):
    b, nblk = bt.shape
    return paged[bt.long()].reshape(b, nblk * paged.shape[1], *paged.shape[2:])


def _check(out, ref, pt, what):
    assert not torch.isnan(out).any(), f"{what}: NaN in the output"
    err, pt_err = max_abs(out, ref), max_abs(pt, ref)
    assert err <= 2 * pt_err + 1e-5, f"{what}: max |out - ref| = {err:.3e} > 2 * {pt_err:.3e} + 1e-5"


KV_CASES = [  # (batch, sq, s_new, heads (hq, hk), causal, window, rotary)
    (1, 1, 1, (32, 8), False, (-1, -1), False),
    (3, 3, 3, (8, 8), True, (-1, -1), True),
    (3, 128, 128, (8, 1), True, (-1, -1), False),
    (2, 5, 2, (8, 2), False, (40, 3), True),
]
if QUICK:
    KV_CASES = KV_CASES[:2]


@pytest.mark.parametrize("page", PAGES)
@pytest.mark.parametrize("case", KV_CASES, ids=lambda c: f"b{c[0]}-sq{c[1]}-new{c[2]}-h{c[3][0]}x{c[3][1]}")
def test_kvcache_paged(case, page):
    from flash_attn import flash_attn_with_kvcache
    from flash_attn.reference import kvcache_ref

    require_compiled(DTYPE, 128, paged=True)
    b, sq, s_new, (hq, hk), causal, window, rotary = case
    d, nblk = 128, max(2, -(-(s_new + 300) // page))
    cap = nblk * page
    gen = torch.Generator().manual_seed(page * 7 + b)
    seqlens = torch.randint(0, cap - s_new + 1, (b,), generator=gen).tolist()
    kc, vc = _randn(b, cap, hk, d, seed=1), _randn(b, cap, hk, d, seed=2)
    for i, n in enumerate(seqlens):  # poison what no row may read
        kc[i, n + s_new:] = float("nan")
        vc[i, n + s_new:] = float("nan")
    kw = dict(q=_randn(b, sq, hq, d, seed=3), k=_randn(b, s_new, hk, d, seed=4), v=_randn(b, s_new, hk, d, seed=5),
              cache_seqlens=_i32(seqlens), causal=causal, window_size=window)
    if rotary:
        angle = torch.rand(cap, d // 4, device="cuda", generator=_gen(6)) * 6.3
        kw.update(rotary_cos=torch.cos(angle).to(DTYPE), rotary_sin=torch.sin(angle).to(DTYPE))
    pk, bt = _to_paged(kc, page, seed=page + b)
    pv, _ = _to_paged(vc, page, seed=page + b)
    out, lse = flash_attn_with_kvcache(k_cache=pk, v_cache=pv, block_table=bt, return_softmax_lse=True, **kw)
    rk, rv = kc.clone(), vc.clone()
    ref, _ = kvcache_ref(k_cache=rk, v_cache=rv, upcast=True, **kw)
    pt, _ = kvcache_ref(k_cache=kc.clone(), v_cache=vc.clone(), upcast=False, **kw)
    _check(out, ref, pt, f"kvcache page {page}")
    assert lse.shape == (b, hq, sq) and not torch.isnan(lse).any()
    torch.testing.assert_close(_from_paged(pv, bt), rv, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(_from_paged(pk, bt), rk, equal_nan=True)


# How key tiles meet pages in the paged kernels, which locate each row of a tile on its own
# page. num_splits 1 runs the unsplit kernel (tiles of 128 keys at d = 64, else 64; d = 256 with
# its one-stage pipeline), 0 and 3 the split kernel (one warp; 128, 64 and 32 keys at d = 64, 128,
# 256). Tiles across several pages, pages holding several tiles, page sizes that are not powers
# of two (tile and page boundaries drift apart), and head dims with no paged kernel (read by
# the next one).
TILE_CASES = [  # (head dim, page, dtype)
    (64, 16, torch.float16),     # a tile spans 8 pages
    (64, 48, torch.bfloat16),
    (128, 128, torch.float16),   # a page holds two or more tiles
    (128, 16, torch.bfloat16),
    (256, 32, torch.float16),
    (256, 256, torch.bfloat16),
    (80, 16, torch.float16),     # the d = 128 kernel reads 80-wide rows
    (40, 48, torch.bfloat16),    # the d = 64 kernel reads 40-wide rows
]
if QUICK:
    TILE_CASES = TILE_CASES[::2]


@pytest.mark.parametrize("num_splits", [1, 0, 3])
@pytest.mark.parametrize("leftpad", [False, True], ids=["gqa-packed", "leftpad-causal"])
@pytest.mark.parametrize("case", TILE_CASES, ids=lambda c: f"d{c[0]}-page{c[1]}-{DTYPE_NAMES[c[2]]}")
def test_kvcache_paged_tiles_across_pages(case, leftpad, num_splits):
    from flash_attn import flash_attn_with_kvcache
    from flash_attn.reference import kvcache_ref

    d, page, dtype = case
    require_compiled(dtype, d, paged=True)
    b, sq, s_new, hq, hk = 4, 2, 2, 8, 2
    cap = -(-(777 + s_new) // page) * page
    # empty, full, and lengths that are not multiples of the page (or of any tile)
    seqlens = [0, cap - s_new, 37, 3 * page + 5]
    kc, vc = _randn(b, cap, hk, d, seed=11, dtype=dtype), _randn(b, cap, hk, d, seed=12, dtype=dtype)
    for i, n in enumerate(seqlens):  # poison what no row may read
        kc[i, n + s_new:] = float("nan")
        vc[i, n + s_new:] = float("nan")
    kw = dict(q=_randn(b, sq, hq, d, seed=13, dtype=dtype), k=_randn(b, s_new, hk, d, seed=14, dtype=dtype),
              v=_randn(b, s_new, hk, d, seed=15, dtype=dtype), cache_seqlens=_i32(seqlens), causal=leftpad)
    if leftpad:
        kw["cache_leftpad"] = _i32([0, 5, 37, page + 1])
        for i, start in enumerate(kw["cache_leftpad"].tolist()):
            kc[i, :start] = float("nan")
            vc[i, :start] = float("nan")
    pk, bt = _to_paged(kc, page, seed=page + d)
    pv, _ = _to_paged(vc, page, seed=page + d)
    out, lse = flash_attn_with_kvcache(k_cache=pk, v_cache=pv, block_table=bt, num_splits=num_splits,
                                       return_softmax_lse=True, **kw)
    rk, rv = kc.clone(), vc.clone()
    ref, ref_lse = kvcache_ref(k_cache=rk, v_cache=rv, upcast=True, **kw)
    pt, _ = kvcache_ref(k_cache=kc.clone(), v_cache=vc.clone(), upcast=False, **kw)
    _check(out, ref, pt, f"kvcache d {d} page {page} splits {num_splits}")
    assert torch.equal(torch.isposinf(lse), torch.isposinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert (lse[finite] - ref_lse[finite]).abs().max().item() <= 1e-3
    torch.testing.assert_close(_from_paged(pv, bt), rv, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(_from_paged(pk, bt), rk, equal_nan=True)


# One decode token against a cache of up to 128k keys (the benchmark's longest shape): split
# by the heuristic (the most shares: two kv heads leave the grid small) and explicitly,
# contiguous and paged, GQA 4 packed; the rows' lengths are ragged and one row is at capacity.
@pytest.mark.parametrize("page", [None, 16, 256], ids=["contiguous", "page16", "page256"])
@pytest.mark.parametrize("num_splits", [0, 3])
@pytest.mark.parametrize("batch", [1, 3])
def test_kvcache_decode_128k(batch, num_splits, page):
    from flash_attn import flash_attn_with_kvcache
    from flash_attn.reference import kvcache_ref

    dtype = torch.bfloat16
    require_compiled(dtype, 128, paged=page is not None)
    cap, hq, hk, d = 131072, 8, 2, 128  # 2 kv heads keep the caches at 64 MB per sequence (tests run in parallel)
    seqlens = [cap - 1, 100_003, 65_537][:batch]
    kc, vc = _randn(batch, cap, hk, d, seed=21, dtype=dtype), _randn(batch, cap, hk, d, seed=22, dtype=dtype)
    for i, n in enumerate(seqlens):  # poison what no row may read (each row appends one key at n)
        kc[i, n + 1:] = float("nan")
        vc[i, n + 1:] = float("nan")
    kw = dict(q=_randn(batch, 1, hq, d, seed=23, dtype=dtype), k=_randn(batch, 1, hk, d, seed=24, dtype=dtype),
              v=_randn(batch, 1, hk, d, seed=25, dtype=dtype), cache_seqlens=_i32(seqlens), causal=True)
    rk, rv = kc.clone(), vc.clone()
    ref, ref_lse = kvcache_ref(k_cache=rk, v_cache=rv, upcast=True, **kw)
    pt, _ = kvcache_ref(k_cache=kc.clone(), v_cache=vc.clone(), upcast=False, **kw)
    if page is None:
        out, lse = flash_attn_with_kvcache(k_cache=kc, v_cache=vc, num_splits=num_splits, return_softmax_lse=True,
                                           **kw)
        k_after, v_after = kc, vc
    else:
        pk, bt = _to_paged(kc, page, seed=page + 1)
        pv, _ = _to_paged(vc, page, seed=page + 1)
        del kc, vc
        out, lse = flash_attn_with_kvcache(k_cache=pk, v_cache=pv, block_table=bt, num_splits=num_splits,
                                           return_softmax_lse=True, **kw)
        k_after, v_after = _from_paged(pk, bt), _from_paged(pv, bt)
    _check(out, ref, pt, f"decode 128k batch {batch} splits {num_splits} page {page}")
    assert (lse - ref_lse).abs().max().item() <= 1e-3
    torch.testing.assert_close(v_after, rv, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(k_after, rk, equal_nan=True)


VARLEN_CASES = [  # (q lens, k lens, heads, causal)
    ([1, 17, 128], [300, 17, 1000], (8, 2), True),
    ([64, 1], [64, 513], (8, 8), False),
]


@pytest.mark.parametrize("d", [64, 128, 256])
@pytest.mark.parametrize("page", PAGES)
@pytest.mark.parametrize("case", VARLEN_CASES, ids=["gqa-causal", "mha-full"])
def test_varlen_paged(case, page, d):
    from flash_attn import flash_attn_varlen_func
    from flash_attn.reference import attention_varlen_paged_ref

    require_compiled(DTYPE, d, paged=True)
    lens_q, lens_k, (hq, hk), causal = case
    b = len(lens_q)
    nblk = -(-max(lens_k) // page)
    logical_k, logical_v = _randn(b, nblk * page, hk, d, seed=1), _randn(b, nblk * page, hk, d, seed=2)
    kc, bt = _to_paged(logical_k, page, seed=page)
    vc, _ = _to_paged(logical_v, page, seed=page)
    q = _randn(sum(lens_q), hq, d, seed=3)
    cu_q, cu_k = _cu(lens_q), _cu(lens_k)
    out = flash_attn_varlen_func(q, kc, vc, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal, block_table=bt)
    ref, _ = attention_varlen_paged_ref(q, kc, vc, cu_q, cu_k, bt, causal=causal, upcast=True)
    pt, _ = attention_varlen_paged_ref(q, kc, vc, cu_q, cu_k, bt, causal=causal, upcast=False)
    _check(out, ref, pt, f"varlen page {page}")


def test_paged_capacity_and_index_checks_are_opt_in(monkeypatch):
    from flash_attn import flash_attn_with_kvcache

    require_compiled(DTYPE, 64, paged=True)
    kc = torch.zeros(4, 16, 2, 64, dtype=DTYPE, device="cuda")
    args = dict(q=_randn(2, 1, 4, 64, seed=1), k_cache=kc, v_cache=kc.clone(), k=_randn(2, 1, 2, 64, seed=2),
                v=_randn(2, 1, 2, 64, seed=3), cache_seqlens=_i32([3, 40]), block_table=_i32([[0, 9], [2, 3]]))
    out = flash_attn_with_kvcache(**args)  # unchecked: clamped, no access outside the caches
    torch.cuda.synchronize()
    assert out.shape == (2, 1, 4, 64)
    monkeypatch.setenv("FLASH_ATTN_DEBUG", "1")
    with pytest.raises(ValueError, match="cache_seqlens"):
        flash_attn_with_kvcache(**args)
    with pytest.raises(ValueError, match=r"block_table\[0, 1\]"):
        flash_attn_with_kvcache(**{**args, "cache_seqlens": _i32([20, 3])})
