"""Paged KV (block_table) on CPU: flash_attn_with_kvcache and flash_attn_varlen_func with a
paged cache against the same data in a contiguous cache (physical blocks in a random
permutation, unused blocks NaN), the in-place update of the pages, the CUDA route's Python
side (the caches handed to the paged kernel as they are) against a fake extension, and every
argument error.
"""
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from flash_attn import _cpu, _cuda, flash_attn_varlen_func, flash_attn_with_kvcache
from flash_attn.reference import attention_varlen_paged_ref, kvcache_ref
from test_kvcache_cpu import fake, route_args  # noqa: F401  (fake: the fixture with the stand-in extension)

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64
PAGES = [16, 64, 256]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed):
    return torch.randn(*shape, generator=gen(seed), dtype=F64)


def i32(values):
    return torch.tensor(values, dtype=torch.int32)


def to_paged(contig, page, seed, extra_blocks=3):
    """contig (b, nblk * page, hk, d) -> (paged (num_blocks, page, hk, d), block_table int32 (b, nblk)):
    the logical blocks land on a random permutation of the physical ones; unused blocks hold NaN."""
    b, cap, hk, d = contig.shape
    nblk = cap // page
    num_blocks = b * nblk + extra_blocks
    perm = torch.randperm(num_blocks, generator=gen(seed))[:b * nblk].view(b, nblk)
    paged = torch.full((num_blocks, page, hk, d), float("nan"), dtype=contig.dtype)
    paged[perm] = contig.view(b, nblk, page, hk, d)
    return paged, perm.to(torch.int32)


def from_paged(paged, block_table):
    """The logical (b, nblk * page, hk, d) view of a paged cache (a copy)."""
    b, nblk = block_table.shape
    return paged[block_table.long()].reshape(b, nblk * paged.shape[1], *paged.shape[2:])


# ----------------------------------------------------------------------------
# flash_attn_with_kvcache

@dataclass
class Case:
    b: int = 2
    sq: int = 1
    s_new: int = 1
    nblk: int = 3
    hq: int = 4
    hk: int = 2
    d: int = 8
    seqlens: object = "boundary"  # list of offsets from page multiples, "boundary", or an int
    leftpad: list = None
    rotary: bool = False
    causal: bool = False
    window: tuple = (-1, -1)
    alibi: bool = False
    extra: dict = field(default_factory=dict)


CASES = {
    "decode-gqa": Case(),
    "append-crosses-pages": Case(sq=3, s_new=3, causal=True),
    "prefill-mqa-window": Case(sq=4, s_new=4, hq=6, hk=1, window=(5, 0)),
    "rotary-causal": Case(sq=2, s_new=2, rotary=True, causal=True),
    "leftpad-alibi": Case(sq=2, s_new=2, leftpad=[3, 0], alibi=True, causal=True),
    "no-new-kv": Case(s_new=0, sq=2, causal=True),
    "int-seqlens": Case(sq=2, s_new=2, seqlens=17, causal=True),
    "full-capacity": Case(s_new=0, seqlens=None),
}


def seqlens_for(c, page):
    """Lengths before the append; "boundary" puts the appends across page boundaries."""
    if c.seqlens == "boundary":
        return [page - 1, 2 * page - max(c.s_new, 1) + 1][:c.b] if c.b == 2 else [page - 1] * c.b
    return c.seqlens


def kvcache_inputs(c, page):
    cap = c.nblk * page
    q = randn(c.b, c.sq, c.hq, c.d, seed=1)
    k_cache, v_cache = randn(c.b, cap, c.hk, c.d, seed=2), randn(c.b, cap, c.hk, c.d, seed=3)
    k = randn(c.b, c.s_new, c.hk, c.d, seed=4) if c.s_new else None
    v = randn(c.b, c.s_new, c.hk, c.d, seed=5) if c.s_new else None
    seqlens = seqlens_for(c, page)
    kw = dict(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v,
              cache_seqlens=i32(seqlens) if isinstance(seqlens, list) else seqlens,
              cache_leftpad=None if c.leftpad is None else i32(c.leftpad), causal=c.causal,
              window_size=c.window, return_softmax_lse=True)
    if c.rotary:
        angle = torch.rand(cap, c.d // 4, generator=gen(6), dtype=F64) * 6.3
        kw.update(rotary_cos=torch.cos(angle), rotary_sin=torch.sin(angle), rotary_interleaved=False)
    if c.alibi:
        kw["alibi_slopes"] = torch.rand(c.b, c.hq, generator=gen(7)) * 0.5 + 0.1
    return kw


def paged_twin(kw, page, seed=11):
    """kw with the caches paged (same logical data) and block_table given."""
    kc, bt = to_paged(kw["k_cache"], page, seed)
    vc, _ = to_paged(kw["v_cache"], page, seed)
    return {**kw, "k_cache": kc, "v_cache": vc, "block_table": bt}


def clone(kw):
    return {key: (val.clone() if isinstance(val, torch.Tensor) else val) for key, val in kw.items()}


def assert_lse_equal(lse, ref):
    assert torch.equal(torch.isposinf(lse), torch.isposinf(ref))
    finite = ~torch.isposinf(ref)
    torch.testing.assert_close(lse[finite], ref[finite], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("page", PAGES)
@pytest.mark.parametrize("name", list(CASES))
def test_kvcache_paged_equals_contiguous(name, page):
    kw = kvcache_inputs(CASES[name], page)
    paged = paged_twin(clone(kw), page)
    out, lse = flash_attn_with_kvcache(**kw)
    pout, plse = flash_attn_with_kvcache(**paged)
    torch.testing.assert_close(pout, out, rtol=1e-12, atol=1e-12)
    assert_lse_equal(plse, lse)
    # the new keys landed in the right pages; nothing else changed (unused blocks still NaN)
    torch.testing.assert_close(from_paged(paged["k_cache"], paged["block_table"]), kw["k_cache"],
                               rtol=0, atol=0)
    torch.testing.assert_close(from_paged(paged["v_cache"], paged["block_table"]), kw["v_cache"],
                               rtol=0, atol=0)
    used = torch.zeros(paged["k_cache"].shape[0], dtype=torch.bool)
    used[paged["block_table"].long().flatten()] = True
    assert torch.isnan(paged["k_cache"][~used]).all() and torch.isnan(paged["v_cache"][~used]).all()


def test_kvcache_paged_decode_token_by_token():
    """Decoding step by step into pages of 16 equals one causal pass over the contiguous keys."""
    page, b, hk, d, steps = 16, 2, 2, 8, 40
    kc = torch.zeros(b, 3 * page, hk, d, dtype=F64)
    paged = paged_twin(dict(k_cache=kc, v_cache=kc.clone()), page)
    paged["k_cache"].nan_to_num_(0.0)
    paged["v_cache"].nan_to_num_(0.0)
    q, k, v = randn(b, steps, 4, d, seed=1), randn(b, steps, hk, d, seed=2), randn(b, steps, hk, d, seed=3)
    outs = []
    for t in range(steps):
        outs.append(flash_attn_with_kvcache(q[:, t:t + 1], paged["k_cache"], paged["v_cache"], k[:, t:t + 1],
                                            v[:, t:t + 1], cache_seqlens=t, block_table=paged["block_table"]))
    full = flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu([steps] * b),
                                  cu([steps] * b), steps, steps, causal=True).view(b, steps, 4, d)
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_kvcache_paged_low_precision(dtype):
    kw = kvcache_inputs(CASES["append-crosses-pages"], 16)
    kw = {key: (val.to(dtype) if isinstance(val, torch.Tensor) and val.is_floating_point() else val)
          for key, val in kw.items()}
    paged = paged_twin(clone(kw), 16)
    out, _ = flash_attn_with_kvcache(**kw)
    pout, _ = flash_attn_with_kvcache(**paged)
    assert torch.equal(pout, out)


# ----------------------------------------------------------------------------
# flash_attn_varlen_func with block_table (paged prefill)

def cu(lens):
    return torch.tensor([0] + lens, dtype=torch.int64).cumsum(0).to(torch.int32)


VARLEN = {  # name: (q lens, k lens, hq, hk, causal, window)
    "gqa-causal": ([5, 3, 1], [40, 3, 17], 4, 2, True, (-1, -1)),
    "mha-full": ([2, 6, 4], [1, 33, 20], 2, 2, False, (-1, -1)),
    "mqa-window": ([4, 0, 7], [30, 0, 7], 6, 1, False, (6, 2)),
}


def varlen_inputs(name, page, nblk=3, d=8):
    lens_q, lens_k, hq, hk, causal, window = VARLEN[name]
    b = len(lens_q)
    lens_k = [min(n, nblk * page) for n in lens_k]
    logical_k, logical_v = randn(b, nblk * page, hk, d, seed=2), randn(b, nblk * page, hk, d, seed=3)
    q = randn(sum(lens_q), hq, d, seed=1)
    k = torch.cat([logical_k[i, :n] for i, n in enumerate(lens_k)])
    v = torch.cat([logical_v[i, :n] for i, n in enumerate(lens_k)])
    kc, bt = to_paged(logical_k, page, seed=5)
    vc, _ = to_paged(logical_v, page, seed=5)
    common = dict(cu_seqlens_q=cu(lens_q), cu_seqlens_k=cu(lens_k), max_seqlen_q=max(lens_q),
                  max_seqlen_k=max(lens_k), causal=causal, window_size=window)
    return q, (k, v), (kc, vc, bt), common


@pytest.mark.parametrize("page", PAGES)
@pytest.mark.parametrize("name", list(VARLEN))
def test_varlen_paged_equals_contiguous(name, page):
    q, (k, v), (kc, vc, bt), common = varlen_inputs(name, page)
    out, lse, _ = flash_attn_varlen_func(q, k, v, **common, return_attn_probs=True)
    pout, plse, _ = flash_attn_varlen_func(q, kc, vc, **common, block_table=bt, return_attn_probs=True)
    torch.testing.assert_close(pout, out, rtol=1e-12, atol=1e-12)
    assert_lse_equal(plse, lse)
    ref, _ = attention_varlen_paged_ref(q, kc, vc, common["cu_seqlens_q"], common["cu_seqlens_k"], bt,
                                        causal=common["causal"], window_size=common["window_size"])
    torch.testing.assert_close(pout, ref, rtol=1e-12, atol=1e-12)


def test_varlen_paged_gradients_reach_the_pages():
    q, (k, v), (kc, vc, bt), common = varlen_inputs("gqa-causal", 16)
    kc, vc = kc.nan_to_num(0.0).requires_grad_(True), vc.nan_to_num(0.0).requires_grad_(True)
    q = q.requires_grad_(True)
    flash_attn_varlen_func(q, kc, vc, **common, block_table=bt).sum().backward()
    assert kc.grad is not None and torch.isfinite(kc.grad).all() and kc.grad.abs().sum() > 0
    assert q.grad is not None and torch.isfinite(q.grad).all()


# ----------------------------------------------------------------------------
# the CUDA route's Python side, on CPU, against a fake extension that does what the paged
# kernel does (test_kvcache_cpu.paged_keys): the caches reach it as they are, never gathered

def route_kw(kw):
    """kw of flash_attn_with_kvcache -> the positional arguments of a route (block_table last)."""
    full = dict(rotary_cos=None, rotary_sin=None, cache_batch_idx=None, cache_leftpad=None, softmax_scale=None,
                softcap=0.0, rotary_interleaved=True, alibi_slopes=None)
    full.update({key: val for key, val in kw.items() if key not in ("block_table", "return_softmax_lse")})
    return route_args(full) + (kw.get("block_table"),)


def same_tensor(a, b):
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


def _cuda_route_equals_cpu_route(kw):
    """Runs kw through the CUDA route (the stand-in extension) and a clone through the CPU
    route; outputs, lse and the appended k_cache agree. Returns the CPU route's arguments."""
    kw_cpu = clone(kw)
    out, lse = _cuda.kvcache_forward(*route_kw(kw))
    ref, ref_lse = _cpu.kvcache_forward(*route_kw(kw_cpu))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert_lse_equal(lse, ref_lse)
    torch.testing.assert_close(kw["k_cache"], kw_cpu["k_cache"], rtol=1e-12, atol=1e-12, equal_nan=True)
    return kw_cpu


@pytest.mark.parametrize("page", [16, 64])
@pytest.mark.parametrize("name", ["decode-gqa", "append-crosses-pages", "rotary-causal", "leftpad-alibi",
                                  "no-new-kv"])
def test_cuda_route_paged_matches_cpu_route(fake, name, page):
    kw = paged_twin(kvcache_inputs(CASES[name], page), page)
    kw_cpu = _cuda_route_equals_cpu_route(kw)
    torch.testing.assert_close(kw["v_cache"], kw_cpu["v_cache"], rtol=0, atol=0, equal_nan=True)
    assert len(fake.calls) == 1
    call = fake.calls[0]
    # the kernel reads the pages in place: it gets the caches themselves and the block table
    assert same_tensor(call["k"], kw["k_cache"]) and same_tensor(call["v"], kw["v_cache"])
    assert torch.equal(call["block_table"], kw["block_table"])
    assert call["head_dim"] == 64  # the smallest paged kernel head dim for d = 8 (q padded, not the caches)
    assert (call["leftpad_k"] is None) == (CASES[name].leftpad is None)


@pytest.mark.parametrize("d", [12, 40, 64])
def test_cuda_route_paged_narrow_head_dims(fake, d):
    """Head dims without a paged kernel: q is padded to the kernel's; the caches are passed as they
    are when their rows are 16-byte multiples (d % 8 == 0), else padded to the next multiple of 8."""
    kw = paged_twin(kvcache_inputs(Case(sq=2, s_new=2, causal=True, d=d), 16), 16)
    _cuda_route_equals_cpu_route(kw)
    call = fake.calls[0]
    assert call["head_dim"] == 64 and call["k"].shape[-1] == -(-d // 8) * 8
    assert same_tensor(call["k"], kw["k_cache"]) == (d % 8 == 0)


def test_cuda_route_paged_clamps_bad_block_table(fake):
    """Without FLASH_ATTN_DEBUG, CUDA values are not checked: the append clamps the block indices and
    the key counts; the kernel (here its stand-in) clamps what it reads itself."""
    kw = paged_twin(kvcache_inputs(CASES["append-crosses-pages"], 16), 16)
    num_blocks = kw["k_cache"].shape[0]
    kw["block_table"] = i32([[-5, num_blocks, 10 ** 6], [0, -1, num_blocks + 3]])
    kw["cache_seqlens"] = i32([-3, 10 ** 5])
    out, lse = _cuda.kvcache_forward(*route_kw(kw))
    assert out.shape == kw["q"].shape
    seqused = fake.calls[0]["seqused_k"]
    assert (seqused >= 0).all() and (seqused <= 3 * 16).all()


@pytest.mark.parametrize("name", list(VARLEN))
def test_cuda_route_varlen_paged(fake, name):
    """varlen_paged_forward hands the caches and block_table to the paged kernel (no gather)."""
    q, (k, v), (kc, vc, bt), common = varlen_inputs(name, 16)
    window = (-1, 0) if common["causal"] else common["window_size"]
    out, lse, s_dmask = _cuda.varlen_paged_forward(q, kc, vc, common["cu_seqlens_q"], common["cu_seqlens_k"], bt,
                                                   common["max_seqlen_q"], 0.0, 8 ** -0.5, window, 0.0, None)
    ref, ref_lse = flash_attn_varlen_func(q, k, v, **common, return_attn_probs=True)[:2]
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert_lse_equal(lse, ref_lse)
    assert s_dmask is None
    call = fake.calls[0]
    assert same_tensor(call["k"], kc) and same_tensor(call["v"], vc) and torch.equal(call["block_table"], bt)
    assert call["seqused_k"] is None and call["leftpad_k"] is None
    bad = bt.clone()
    bad[0, 0], bad[1, -1] = -7, 10 ** 6
    out = _cuda.varlen_paged_forward(q, kc, vc, common["cu_seqlens_q"], common["cu_seqlens_k"], bad,
                                     common["max_seqlen_q"], 0.0, 1.0, (-1, -1), 0.0, None)[0]
    assert out.shape == q.shape


def test_cuda_route_varlen_paged_refuses_dropout_and_backward(fake):
    q, _, (kc, vc, bt), common = varlen_inputs("gqa-causal", 16)
    args = (q, kc, vc, common["cu_seqlens_q"], common["cu_seqlens_k"], bt, common["max_seqlen_q"])
    with pytest.raises(NotImplementedError, match="dropout"):
        _cuda.varlen_paged_forward(*args, 0.1, 1.0, (-1, -1), 0.0, None)
    assert fake.calls == []
    out = _cuda.varlen_paged_forward(q.clone().requires_grad_(True), *args[1:], 0.0, 1.0, (-1, -1), 0.0, None)[0]
    with pytest.raises(NotImplementedError, match="flash_attn_varlen_func with block_table"):
        out.sum().backward()


def test_paged_kernel_head_dim(monkeypatch):
    """The paged kernels exist for head dims 64, 128 and 256 of the build; other head dims use the
    next of them, and a build without one (or without paged kernels) says so."""
    from flash_attn import build_info

    monkeypatch.setattr(build_info, "has_feature", lambda name: True)
    monkeypatch.setattr(build_info, "compiled_head_dims", lambda: [32, 64, 96, 128, 192, 256])
    assert [_cuda.paged_kernel_head_dim(d) for d in (8, 64, 72, 96, 128, 160, 256)] == [64, 64, 128, 128, 128,
                                                                                        256, 256]
    monkeypatch.setattr(build_info, "compiled_head_dims", lambda: [32, 128])
    assert _cuda.paged_kernel_head_dim(64) == 128
    with pytest.raises(RuntimeError, match="no paged-KV kernel"):
        _cuda.paged_kernel_head_dim(160)
    monkeypatch.setattr(build_info, "compiled_head_dims", lambda: [32])
    with pytest.raises(RuntimeError, match="FLASH_ATTN_HEADDIMS"):
        _cuda.paged_kernel_head_dim(16)
    monkeypatch.setattr(build_info, "has_feature", lambda name: name != "paged")
    with pytest.raises(RuntimeError, match="FLASH_ATTN_DISABLE_PAGEDKV"):
        _cuda.paged_kernel_head_dim(64)


# ----------------------------------------------------------------------------
# the kernel's row addressing (csrc/flash_attn/paged_kv.h), compiled for the host

@pytest.fixture(scope="module")
def paged_host(tmp_path_factory):
    """tests/cpp/paged_kv_host.cpp built with g++ (paged_kv.h's PagedKV and paged_seq_info)."""
    from test_dropout_cpu import build_host_program

    return build_host_program(tmp_path_factory, "paged_kv_host")


LOCATE_CASES = [  # (head dim, page, num pages, max blocks per sequence, leftpad)
    (64, 16, 40, 9, 0),     # key tiles of 128 (both tiles at d = 64) span 8 pages
    (64, 48, 40, 9, 5),     # pages that are not a power of two, tiles starting mid-page
    (128, 16, 30, 12, 0),
    (128, 128, 7, 3, 17),   # a page holds two 64-key tiles
    (256, 32, 20, 10, 1),
    (256, 256, 3, 2, 0),
    (128, 48, 1, 4, 0),     # one page: every other table entry is out of range
    (64, 16, 5, 1, 3),      # one table column: positions past it read its last entry
]


# fwd: the prefill tile (4 warps, a thread's rows 16 apart); split: the split-KV tile of one
# warp (rows 4 apart, up to 32 per thread), which decoding uses
@pytest.mark.parametrize("tile", ["fwd", "split"])
@pytest.mark.parametrize("case", LOCATE_CASES, ids=lambda c: "d{}-page{}-pages{}-blocks{}-pad{}".format(*c))
def test_host_paged_rows_land_on_their_pages(paged_host, case, tile):
    """Every row each thread copies sits on the page and slot block_table gives for its key
    (out-of-range entries read page 0), the threads cover each (row, chunk) of a tile once, and
    the row layout borrowed from the contiguous copy addresses the right columns."""
    run = paged_host("locate", tile, *case)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr


@pytest.mark.parametrize("seqused,cu_len,leftpad,want", [
    ("none", 100, 0, 64),   # prefill: the cu_seqlens_k length, capped at 4 pages of 16
    ("none", 30, 0, 30),
    (10, 100, 0, 10),       # decode: seqused_k itself (cu_seqlens_k unused)
    (100, 3, 0, 64),
    ("none", 100, 10, 54),  # leftpad: the pages end 10 keys sooner
    (5, 3, 70, 0),          # a leftpad past the pages
    (-5, 3, 0, 0),
    (70, 3, -4, 64),        # a negative leftpad counts as 0
])
def test_host_paged_key_counts(paged_host, seqused, cu_len, leftpad, want):
    run = paged_host("seqinfo", seqused, cu_len, 16, 4, leftpad)
    assert run.returncode == 0 and int(run.stdout) == want, run.stdout + run.stderr


# ----------------------------------------------------------------------------
# argument errors

PAGE, NBLK, B, H, HK, D = 16, 2, 2, 4, 2, 8


def kv_good():
    kc = randn(6, PAGE, HK, D, seed=2)
    return dict(q=randn(B, 1, H, D, seed=1), k_cache=kc, v_cache=kc.clone(), k=randn(B, 1, HK, D, seed=3),
                v=randn(B, 1, HK, D, seed=4), cache_seqlens=i32([3, 20]), block_table=i32([[5, 0], [2, 3]]))


KV_ERRORS = [
    ("dtype", dict(block_table=torch.tensor([[5, 0], [2, 3]])), TypeError, "block_table.dtype"),
    ("rank", dict(block_table=i32([5, 0])), ValueError, "block_table.dim()"),
    ("batch_rows", dict(block_table=i32([[5, 0]])), ValueError, "block_table.shape[0]"),
    ("not_a_tensor", dict(block_table=[[5, 0], [2, 3]]), TypeError, "block_table"),
    ("page_size", dict(k_cache=randn(6, 8, HK, D, seed=2), v_cache=randn(6, 8, HK, D, seed=2)), ValueError,
     "page_block_size"),
    ("capacity", dict(cache_seqlens=i32([3, 2 * PAGE])), ValueError, "cache_seqlens"),
    ("capacity_int", dict(cache_seqlens=2 * PAGE), ValueError, "cache_seqlens"),
    ("capacity_new_keys", dict(k=randn(B, 2 * PAGE + 1, HK, D, seed=3), v=randn(B, 2 * PAGE + 1, HK, D, seed=4),
                               cache_seqlens=i32([0, 0])), ValueError, "seqlen_new"),
    ("index_negative", dict(block_table=i32([[5, 0], [-1, 3]])), ValueError, "block_table[1, 0]"),
    ("index_past_end", dict(block_table=i32([[5, 0], [2, 6]])), ValueError, "block_table[1, 1]"),
    ("batch_idx", dict(cache_batch_idx=i32([0, 1])), ValueError, "cache_batch_idx"),
    ("no_blocks", dict(k_cache=randn(0, PAGE, HK, D, seed=2), v_cache=randn(0, PAGE, HK, D, seed=2)), ValueError,
     "num_blocks"),
    ("rotary_short", dict(rotary_cos=torch.ones(PAGE, 2, dtype=F64), rotary_sin=torch.ones(PAGE, 2, dtype=F64)),
     ValueError, "seqlen_ro"),
]


@pytest.mark.parametrize("overrides,exc,text", [e[1:] for e in KV_ERRORS], ids=[e[0] for e in KV_ERRORS])
def test_kvcache_paged_argument_errors(overrides, exc, text):
    args = {**kv_good(), **overrides}
    before = args["k_cache"].clone()
    with pytest.raises(exc, match="flash_attn: ") as info:
        flash_attn_with_kvcache(**args)
    assert text in str(info.value) and "must be" in str(info.value)
    assert torch.equal(before, args["k_cache"]), "a failing call must not touch the caches"


def test_kvcache_paged_good_args_and_unused_entries():
    """Entries past a row's used blocks are not read, so they may hold anything."""
    flash_attn_with_kvcache(**kv_good())
    flash_attn_with_kvcache(**{**kv_good(), "block_table": i32([[5, -1], [2, 3]])})  # row 0 uses 1 block


def varlen_good():
    kc = randn(6, PAGE, HK, D, seed=2)
    return dict(q=randn(5, H, D, seed=1), k=kc, v=kc.clone(), cu_seqlens_q=cu([2, 3]), cu_seqlens_k=cu([10, 32]),
                max_seqlen_q=3, max_seqlen_k=32, block_table=i32([[5, 0], [2, 3]]))


VARLEN_ERRORS = [
    ("dtype", dict(block_table=torch.tensor([[5, 0], [2, 3]])), TypeError, "block_table.dtype"),
    ("rank", dict(block_table=i32([5, 0, 2])), ValueError, "block_table.dim()"),
    ("batch_rows", dict(block_table=i32([[5, 0], [2, 3], [1, 1]])), ValueError, "block_table.shape[0]"),
    ("page_size", dict(k=randn(6, 24, HK, D, seed=2), v=randn(6, 24, HK, D, seed=2)), ValueError,
     "page_block_size"),
    ("k_rank", dict(k=randn(96, HK, D, seed=2), v=randn(96, HK, D, seed=2)), ValueError, "k.dim()"),
    ("q_rank", dict(q=randn(1, 5, H, D, seed=1)), ValueError, "q.dim()"),
    ("capacity", dict(cu_seqlens_k=cu([10, 33])), ValueError, "cu_seqlens_k"),
    ("index", dict(block_table=i32([[6, 0], [2, 3]])), ValueError, "block_table[0, 0]"),
    ("cu_k_decreasing", dict(cu_seqlens_k=i32([0, 10, 5])), ValueError, "cu_seqlens_k"),
]


@pytest.mark.parametrize("overrides,exc,text", [e[1:] for e in VARLEN_ERRORS], ids=[e[0] for e in VARLEN_ERRORS])
def test_varlen_paged_argument_errors(overrides, exc, text):
    with pytest.raises(exc, match="flash_attn: ") as info:
        flash_attn_varlen_func(**{**varlen_good(), **overrides})
    assert text in str(info.value) and "must be" in str(info.value)


def test_varlen_paged_good_args():
    flash_attn_varlen_func(**varlen_good())


def test_reference_rejects_batch_idx_with_block_table():
    kw = kv_good()
    with pytest.raises(ValueError, match="cache_batch_idx"):
        kvcache_ref(kw["q"], kw["k_cache"], kw["v_cache"], cache_seqlens=kw["cache_seqlens"],
                    cache_batch_idx=i32([0, 1]), block_table=kw["block_table"])
