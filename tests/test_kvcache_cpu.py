"""flash_attn_with_kvcache on CPU: the reference (kvcache_ref, what CPU tensors run)
against a naive computation written out query by query, the in-place cache
update, argument errors, the signature, and the CUDA route's Python side run
on CPU against a stand-in for flash_attn_2_cuda (fwd, varlen_fwd).
"""
import inspect
import math
from dataclasses import dataclass, field, replace

import pytest
import torch

import flash_attn
from flash_attn import _cpu, _cuda, build_info, flash_attn_func, flash_attn_with_kvcache
from flash_attn._normalize import kernel_window, softmax_scale_or_default
from flash_attn.layers.rotary import apply_rotary_emb
from flash_attn.reference import attention_varlen_ref, kvcache_ref

F64 = torch.float64


def gen(seed):
    return torch.Generator().manual_seed(seed)


def randn(*shape, seed, dtype=F64):
    return torch.randn(*shape, generator=gen(seed), dtype=F64).to(dtype)


def i32(values):
    return torch.tensor(values, dtype=torch.int32)


# ----------------------------------------------------------------------------
# the naive computation: every write, rotation and query row spelled out

def naive_rotate(x, pos, cos, sin, interleaved):
    """x (..., d) at position pos, as complex numbers: pair (x1, x2) times (cos + i sin)."""
    if cos is None or pos >= cos.shape[0]:
        return x
    rd = 2 * cos.shape[1]
    head, tail = x[..., :rd], x[..., rd:]
    if interleaved:
        z = torch.complex(head[..., 0::2], head[..., 1::2])
    else:
        z = torch.complex(head[..., :rd // 2], head[..., rd // 2:])
    z = z * torch.complex(cos[pos].to(F64), sin[pos].to(F64))
    if interleaved:
        head = torch.stack([z.real, z.imag], dim=-1).flatten(-2)
    else:
        head = torch.cat([z.real, z.imag], dim=-1)
    return torch.cat([head, tail], dim=-1)


def naive_kvcache(q, k_cache, v_cache, k, v, cos, sin, seqlens, batch_idx, leftpad, scale, causal, window,
                  softcap, interleaved, alibi):
    """fp64. seqlens, batch_idx, leftpad: python lists (or None). alibi: (hq,) or (b, hq) or None.
    Returns (k_cache, v_cache after the call, out (b, sq, hq, d), lse (b, hq, sq))."""
    q, kc, vc = q.to(F64), k_cache.to(F64).clone(), v_cache.to(F64).clone()
    b, sq, hq, d = q.shape
    hk = kc.shape[2]
    s_new = 0 if k is None else k.shape[1]
    per_row = causal or tuple(window) != (-1, -1)
    left, right = window[0], 0 if causal else window[1]
    out = torch.zeros(b, sq, hq, d, dtype=F64)
    lse = torch.full((b, hq, sq), math.inf, dtype=F64)
    for i in range(b):
        row = i if batch_idx is None else batch_idx[i]
        n = seqlens[i]
        start = 0 if leftpad is None else leftpad[i]
        for t in range(s_new):
            kc[row, n + t] = naive_rotate(k[i, t].to(F64), n + t, cos, sin, interleaved)
            vc[row, n + t] = v[i, t].to(F64)
        keys, values = kc[row, start:n + s_new], vc[row, start:n + s_new]
        length = keys.shape[0]
        for r in range(sq):
            qr = naive_rotate(q[i, r], n + r if per_row else n, cos, sin, interleaved)
            for h in range(hq):
                kh = h // (hq // hk)
                scores = keys[:, kh] @ qr[h] * scale
                if softcap > 0:
                    scores = softcap * torch.tanh(scores / softcap)
                diag = r + length - sq - torch.arange(length)
                if alibi is not None:
                    slope = alibi[h] if alibi.dim() == 1 else alibi[i, h]
                    scores = scores - slope.to(F64) * diag.abs()
                visible = torch.ones(length, dtype=torch.bool)
                if left >= 0:
                    visible &= diag <= left
                if right >= 0:
                    visible &= diag >= -right
                if visible.any():
                    s = scores[visible]
                    out[i, r, h] = torch.softmax(s, 0) @ values[visible, kh]
                    lse[i, h, r] = torch.logsumexp(s, 0)
    return kc, vc, out, lse


# ----------------------------------------------------------------------------
# curated cases

@dataclass
class Case:
    b: int = 2
    sq: int = 1
    s_new: int = 1
    s_cache: int = 12
    hq: int = 4
    hk: int = 2
    d: int = 8
    seqlens: object = field(default_factory=lambda: [3, 11])  # list, int, or None
    b_cache: int = None
    batch_idx: list = None
    leftpad: list = None
    rotary_dim: int = 0
    interleaved: bool = True
    causal: bool = False
    window: tuple = (-1, -1)
    alibi: str = None  # None, "h" or "bh"
    softcap: float = 0.0
    scale: float = None


CASES = {
    "decode": Case(),
    "decode-mha-b3": Case(b=3, hq=4, hk=4, seqlens=[0, 5, 11]),
    "prefill-gqa-causal": Case(sq=4, s_new=4, hq=8, hk=2, seqlens=[3, 0], causal=True),
    "chunk-mqa-window": Case(sq=3, s_new=2, hq=6, hk=1, seqlens=[4, 9], window=(2, 1)),
    "causal-window": Case(sq=3, s_new=3, seqlens=[5, 2], causal=True, window=(3, 5)),
    "queries-past-keys": Case(sq=4, s_new=1, seqlens=[0, 2], causal=True),
    "no-new-kv": Case(s_new=0, seqlens=[7, 12]),
    "no-new-kv-full-cache": Case(s_new=0, seqlens=None, sq=2, causal=True),
    "int-seqlens": Case(sq=2, s_new=2, seqlens=5, causal=True),
    "empty-rows": Case(s_new=0, seqlens=[0, 4]),
    "batch-idx": Case(b=3, b_cache=5, s_new=2, seqlens=[1, 10, 4], batch_idx=[4, 0, 2]),
    "bigger-cache-batch": Case(b=2, b_cache=4, s_new=2, seqlens=[6, 1]),
    "leftpad": Case(b=3, s_new=1, seqlens=[6, 3, 5], leftpad=[2, 0, 5], causal=True),
    "batch-idx-leftpad": Case(b=2, b_cache=3, sq=2, s_new=2, seqlens=[6, 3], leftpad=[4, 1], batch_idx=[2, 1],
                              causal=True),
    "rotary-interleaved-causal": Case(sq=3, s_new=3, seqlens=[2, 6], rotary_dim=8, causal=True),
    "rotary-neox-noncausal": Case(sq=3, s_new=2, seqlens=[2, 6], rotary_dim=8, interleaved=False),
    "rotary-partial-local": Case(sq=2, s_new=2, seqlens=[2, 6], d=12, rotary_dim=4, window=(3, 0)),
    "rotary-q-past-new-k": Case(sq=3, s_new=1, seqlens=[2, 5], rotary_dim=8, interleaved=False, causal=True),
    "rotary-leftpad-batch-idx": Case(b=2, b_cache=3, sq=2, s_new=2, seqlens=[6, 3], leftpad=[4, 1],
                                     batch_idx=[1, 2], rotary_dim=8, causal=True),
    "alibi-h": Case(sq=2, s_new=2, seqlens=[4, 7], alibi="h"),
    "alibi-bh-causal": Case(sq=3, s_new=1, seqlens=[4, 7], alibi="bh", causal=True),
    "alibi-decode-causal": Case(seqlens=[4, 7], alibi="h", causal=True),
    "softcap-scale": Case(sq=2, s_new=2, seqlens=[4, 7], softcap=1.5, scale=0.7),
    "everything": Case(b=3, b_cache=4, sq=3, s_new=2, hq=6, hk=2, d=12, seqlens=[3, 8, 5], batch_idx=[3, 1, 0],
                       leftpad=[1, 0, 5], rotary_dim=8, interleaved=False, causal=True, window=(4, 0), alibi="bh",
                       softcap=2.0),
}


def make_inputs(c, dtype=F64):
    """(args for flash_attn_with_kvcache as keywords, the list form of cache_seqlens)."""
    b_cache = c.b if c.b_cache is None else c.b_cache
    q = randn(c.b, c.sq, c.hq, c.d, seed=1, dtype=dtype)
    k_cache = randn(b_cache, c.s_cache, c.hk, c.d, seed=2, dtype=dtype)
    v_cache = randn(b_cache, c.s_cache, c.hk, c.d, seed=3, dtype=dtype)
    k = randn(c.b, c.s_new, c.hk, c.d, seed=4, dtype=dtype) if c.s_new else None
    v = randn(c.b, c.s_new, c.hk, c.d, seed=5, dtype=dtype) if c.s_new else None
    cos = sin = None
    if c.rotary_dim:
        angle = torch.rand(c.s_cache, c.rotary_dim // 2, generator=gen(6), dtype=F64) * 2 * math.pi
        cos, sin = torch.cos(angle).to(dtype), torch.sin(angle).to(dtype)
    alibi = None
    if c.alibi:
        alibi = torch.rand(*((c.hq,) if c.alibi == "h" else (c.b, c.hq)), generator=gen(7)) * 0.5 + 0.1
    if isinstance(c.seqlens, list):
        seqlens, seqlens_list = i32(c.seqlens), list(c.seqlens)
    else:
        seqlens = c.seqlens
        seqlens_list = [c.s_cache if c.seqlens is None else c.seqlens] * c.b
    kw = dict(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v, rotary_cos=cos, rotary_sin=sin,
              cache_seqlens=seqlens, cache_batch_idx=None if c.batch_idx is None else i32(c.batch_idx),
              cache_leftpad=None if c.leftpad is None else i32(c.leftpad), softmax_scale=c.scale,
              causal=c.causal, window_size=c.window, softcap=c.softcap, rotary_interleaved=c.interleaved,
              alibi_slopes=alibi)
    return kw, seqlens_list


def naive_for(c, kw, seqlens_list):
    return naive_kvcache(kw["q"], kw["k_cache"], kw["v_cache"], kw["k"], kw["v"], kw["rotary_cos"],
                         kw["rotary_sin"], seqlens_list, c.batch_idx, c.leftpad,
                         c.scale if c.scale is not None else c.d ** -0.5, c.causal, c.window, c.softcap,
                         c.interleaved, kw["alibi_slopes"])


def assert_lse_close(lse, ref, tol):
    assert torch.equal(torch.isposinf(lse), torch.isposinf(ref))
    finite = ~torch.isposinf(ref)
    torch.testing.assert_close(lse[finite].to(F64), ref[finite], rtol=tol, atol=tol)


@pytest.mark.parametrize("name", list(CASES))
def test_matches_naive(name):
    c = CASES[name]
    kw, seqlens_list = make_inputs(c)
    exp_kc, exp_vc, exp_out, exp_lse = naive_for(c, kw, seqlens_list)
    out, lse = flash_attn_with_kvcache(**kw, return_softmax_lse=True)
    assert out.shape == kw["q"].shape and out.dtype == kw["q"].dtype
    assert lse.shape == (c.b, c.hq, c.sq)
    torch.testing.assert_close(out, exp_out, rtol=1e-10, atol=1e-10)
    assert_lse_close(lse, exp_lse, 1e-10)
    # the caches were updated in place: written rows at the right positions, nothing else touched
    torch.testing.assert_close(kw["k_cache"], exp_kc, rtol=1e-12, atol=1e-12)
    assert torch.equal(kw["v_cache"], exp_vc)


@pytest.mark.parametrize("name", ["decode", "prefill-gqa-causal", "rotary-leftpad-batch-idx", "everything"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
def test_low_precision(name, dtype):
    """fp16/bf16 run the same reference (math in fp32); close to the fp64 naive result."""
    c = CASES[name]
    kw, seqlens_list = make_inputs(c, dtype)
    exp_kc, _, exp_out, exp_lse = naive_for(c, kw, seqlens_list)
    out, lse = flash_attn_with_kvcache(**kw, return_softmax_lse=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    tol = {torch.float16: 2e-3, torch.bfloat16: 2e-2, torch.float32: 1e-5}[dtype]
    torch.testing.assert_close(out.to(F64), exp_out, rtol=tol, atol=tol)
    assert_lse_close(lse, exp_lse, tol)
    torch.testing.assert_close(kw["k_cache"].to(F64), exp_kc, rtol=tol, atol=tol)


def test_reference_is_what_cpu_runs():
    c = CASES["everything"]
    kw, _ = make_inputs(c)
    kw2 = {key: (val.clone() if isinstance(val, torch.Tensor) else val) for key, val in kw.items()}
    out, lse = flash_attn_with_kvcache(**kw, return_softmax_lse=True)
    ref, ref_lse = kvcache_ref(**kw2)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=0)
    assert torch.equal(kw["k_cache"], kw2["k_cache"]) and torch.equal(kw["v_cache"], kw2["v_cache"])


def test_returns():
    kw, _ = make_inputs(CASES["decode"])
    out = flash_attn_with_kvcache(**kw)
    assert isinstance(out, torch.Tensor)
    res = flash_attn_with_kvcache(**kw, return_softmax_lse=True)
    assert isinstance(res, tuple) and len(res) == 2


@pytest.mark.parametrize("num_splits", [0, 1, 4])
def test_num_splits_is_accepted_and_ignored(num_splits):
    kw, _ = make_inputs(CASES["decode"])
    base = {key: (val.clone() if isinstance(val, torch.Tensor) else val) for key, val in kw.items()}
    torch.testing.assert_close(flash_attn_with_kvcache(**kw, num_splits=num_splits),
                               flash_attn_with_kvcache(**base), rtol=0, atol=0)


@pytest.mark.parametrize("rotary", [False, True])
def test_token_by_token_decoding_equals_causal_attention(rotary):
    """Prefill then decode one token at a time: the same as causal attention on the whole sequence."""
    b, total, prompt, hq, hk, d, s_cache = 2, 9, 4, 4, 2, 16, 16
    q, k, v = randn(b, total, hq, d, seed=1), randn(b, total, hk, d, seed=2), randn(b, total, hk, d, seed=3)
    cos = sin = None
    if rotary:
        angle = torch.outer(torch.arange(s_cache, dtype=F64), 10000.0 ** -(torch.arange(0, d, 2, dtype=F64) / d))
        cos, sin = torch.cos(angle), torch.sin(angle)
    k_cache = torch.full((b, s_cache, hk, d), float("nan"), dtype=F64)  # unwritten slots must never be read
    v_cache = torch.full((b, s_cache, hk, d), float("nan"), dtype=F64)
    outs = [flash_attn_with_kvcache(q[:, :prompt], k_cache, v_cache, k[:, :prompt], v[:, :prompt], cos, sin,
                                    cache_seqlens=0, causal=True, rotary_interleaved=False)]
    for t in range(prompt, total):
        seqlens = torch.full((b,), t, dtype=torch.int32)
        outs.append(flash_attn_with_kvcache(q[:, t:t + 1], k_cache, v_cache, k[:, t:t + 1], v[:, t:t + 1], cos,
                                            sin, cache_seqlens=seqlens, causal=True, rotary_interleaved=False))
    if rotary:
        q, k = (apply_rotary_emb(x, cos, sin, interleaved=False) for x in (q, k))
    expected = flash_attn_func(q, k, v, causal=True)
    torch.testing.assert_close(torch.cat(outs, dim=1), expected, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(k_cache[:, :total], k, rtol=1e-12, atol=1e-12)
    assert torch.isnan(k_cache[:, total:]).all()


# ----------------------------------------------------------------------------
# empty inputs

def test_empty_batch():
    q, kc, vc = randn(0, 1, 4, 8, seed=1), randn(0, 5, 2, 8, seed=2), randn(0, 5, 2, 8, seed=3)
    out, lse = flash_attn_with_kvcache(q, kc, vc, randn(0, 1, 2, 8, seed=4), randn(0, 1, 2, 8, seed=5),
                                       cache_seqlens=i32([]), return_softmax_lse=True)
    assert out.shape == (0, 1, 4, 8) and lse.shape == (0, 4, 1)


def test_empty_queries_still_update_the_cache():
    kc, vc = torch.zeros(2, 5, 2, 8, dtype=F64), torch.zeros(2, 5, 2, 8, dtype=F64)
    k, v = randn(2, 2, 2, 8, seed=4), randn(2, 2, 2, 8, seed=5)
    out, lse = flash_attn_with_kvcache(randn(2, 0, 4, 8, seed=1), kc, vc, k, v, cache_seqlens=i32([0, 3]),
                                       return_softmax_lse=True)
    assert out.shape == (2, 0, 4, 8) and lse.shape == (2, 4, 0)
    assert torch.equal(kc[0, :2], k[0]) and torch.equal(kc[1, 3:5], k[1]) and torch.equal(vc[1, 3:5], v[1])


def test_no_keys_anywhere():
    """An empty cache (seqlen_cache 0), or cache_seqlens 0 with no new keys: zeros and lse +inf."""
    q = randn(2, 3, 4, 8, seed=1)
    for s_cache, seqlens in ((0, None), (0, 0), (6, 0)):
        kc, vc = randn(2, s_cache, 2, 8, seed=2), randn(2, s_cache, 2, 8, seed=3)
        out, lse = flash_attn_with_kvcache(q, kc, vc, cache_seqlens=seqlens, causal=True, return_softmax_lse=True)
        assert (out == 0).all() and torch.isposinf(lse).all()


def test_zero_new_tokens():
    c = CASES["decode"]
    kw, _ = make_inputs(c)
    kc = kw["k_cache"].clone()
    empty = randn(c.b, 0, c.hk, c.d, seed=9)
    out = flash_attn_with_kvcache(**{**kw, "k": empty, "v": empty})
    expected = flash_attn_with_kvcache(**{**kw, "k": None, "v": None})
    assert torch.equal(kw["k_cache"], kc)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


# ----------------------------------------------------------------------------
# layouts

def test_strided_inputs():
    """q with a strided last dim is made contiguous (as flash-attn does); caches may have any
    strides except the last."""
    c = CASES["batch-idx-leftpad"]
    kw, seqlens_list = make_inputs(c)
    exp = naive_for(c, kw, seqlens_list)
    kc_t = kw["k_cache"].transpose(0, 1).contiguous().transpose(0, 1)  # (b, s) dims swapped in memory
    vc_t = kw["v_cache"].transpose(0, 1).contiguous().transpose(0, 1)
    q_strided = torch.stack([kw["q"], kw["q"]], dim=-1)[..., 0]
    assert q_strided.stride(-1) == 2
    out = flash_attn_with_kvcache(**{**kw, "q": q_strided, "k_cache": kc_t, "v_cache": vc_t})
    torch.testing.assert_close(out, exp[2], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(kc_t, exp[0], rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------
# argument errors

B, SQ, H, HK, D, S_CACHE = 2, 3, 4, 2, 16, 10


def good_args():
    return dict(q=torch.randn(B, SQ, H, D, dtype=torch.float16),
                k_cache=torch.randn(B, S_CACHE, HK, D, dtype=torch.float16),
                v_cache=torch.randn(B, S_CACHE, HK, D, dtype=torch.float16),
                k=torch.randn(B, 2, HK, D, dtype=torch.float16), v=torch.randn(B, 2, HK, D, dtype=torch.float16),
                cache_seqlens=i32([1, 8]))


def rotary_tables(n=S_CACHE, half=D // 2, dtype=torch.float16):
    return torch.ones(n, half, dtype=dtype), torch.zeros(n, half, dtype=dtype)


fp16 = torch.float16
ERRORS = [
    # (id, overrides, exception, text the message must contain)
    ("q_rank3", dict(q=torch.randn(B, H, D, dtype=fp16)), ValueError, "q.dim()"),
    ("k_cache_rank3", dict(k_cache=torch.randn(B, S_CACHE, D, dtype=fp16)), ValueError, "k_cache.dim()"),
    ("k_cache_not_tensor", dict(k_cache=[1.0]), TypeError, "k_cache must be a torch.Tensor"),
    ("q_int", dict(q=torch.ones(B, SQ, H, D, dtype=torch.int32)), TypeError, "q.dtype"),
    ("k_cache_bf16", dict(k_cache=torch.randn(B, S_CACHE, HK, D, dtype=torch.bfloat16)), TypeError,
     "k_cache.dtype"),
    ("v_cache_shape", dict(v_cache=torch.randn(B, S_CACHE + 1, HK, D, dtype=fp16)), ValueError, "v_cache.shape"),
    ("k_cache_strided_last", dict(k_cache=torch.randn(B, S_CACHE, HK, 2 * D, dtype=fp16)[..., ::2]),
     ValueError, "k_cache.stride(-1)"),
    ("k_cache_head_dim", dict(k_cache=torch.randn(B, S_CACHE, HK, 8, dtype=fp16),
                              v_cache=torch.randn(B, S_CACHE, HK, 8, dtype=fp16)), ValueError, "k_cache.shape[-1]"),
    ("nheads_not_divisible", dict(k_cache=torch.randn(B, S_CACHE, 3, D, dtype=fp16),
                                  v_cache=torch.randn(B, S_CACHE, 3, D, dtype=fp16)), ValueError,
     "k_cache.shape[-2]"),
    ("cache_batch_too_small", dict(k_cache=torch.randn(1, S_CACHE, HK, D, dtype=fp16),
                                   v_cache=torch.randn(1, S_CACHE, HK, D, dtype=fp16)), ValueError,
     "k_cache.shape[0]"),
    ("k_without_v", dict(v=None), ValueError, "k and v"),
    ("k_batch", dict(k=torch.randn(B + 1, 2, HK, D, dtype=fp16)), ValueError, "k.shape"),
    ("k_heads", dict(k=torch.randn(B, 2, H, D, dtype=fp16)), ValueError, "k.shape"),
    ("k_rank3", dict(k=torch.randn(B, 2, D, dtype=fp16)), ValueError, "k.dim()"),
    ("k_dtype", dict(k=torch.randn(B, 2, HK, D, dtype=torch.float32)), TypeError, "k.dtype"),
    ("v_shape", dict(v=torch.randn(B, 3, HK, D, dtype=fp16)), ValueError, "v.shape"),
    ("seqlens_int64", dict(cache_seqlens=torch.tensor([1, 8])), TypeError, "cache_seqlens.dtype"),
    ("seqlens_length", dict(cache_seqlens=i32([1, 2, 3])), ValueError, "cache_seqlens.shape"),
    ("seqlens_float", dict(cache_seqlens=1.0), TypeError, "cache_seqlens"),
    ("seqlens_past_capacity", dict(cache_seqlens=i32([1, 9])), ValueError, "cache_seqlens"),
    ("seqlens_negative", dict(cache_seqlens=i32([-1, 0])), ValueError, "cache_seqlens"),
    ("seqlens_int_past_capacity", dict(cache_seqlens=9), ValueError, "cache_seqlens"),
    ("seqlens_none_with_k", dict(cache_seqlens=None), ValueError, "cache_seqlens"),
    ("seqlens_none_past_capacity_without_k", dict(k=None, v=None, cache_seqlens=S_CACHE + 1), ValueError,
     "cache_seqlens"),
    ("new_longer_than_cache", dict(k=torch.randn(B, S_CACHE + 1, HK, D, dtype=fp16),
                                   v=torch.randn(B, S_CACHE + 1, HK, D, dtype=fp16)), ValueError, "seqlen_new"),
    ("batch_idx_int64", dict(cache_batch_idx=torch.tensor([0, 1])), TypeError, "cache_batch_idx.dtype"),
    ("batch_idx_shape", dict(cache_batch_idx=i32([0])), ValueError, "cache_batch_idx.shape"),
    ("batch_idx_out_of_range", dict(cache_batch_idx=i32([0, 2])), ValueError, "cache_batch_idx"),
    ("batch_idx_negative", dict(cache_batch_idx=i32([-1, 0])), ValueError, "cache_batch_idx"),
    ("leftpad_int64", dict(cache_leftpad=torch.tensor([0, 1])), TypeError, "cache_leftpad.dtype"),
    ("leftpad_past_seqlens", dict(cache_leftpad=i32([2, 0])), ValueError, "cache_leftpad"),
    ("leftpad_negative", dict(cache_leftpad=i32([0, -1])), ValueError, "cache_leftpad"),
    ("cos_without_sin", dict(rotary_cos=rotary_tables()[0]), ValueError, "rotary_cos and rotary_sin"),
    ("rotary_without_k", dict(k=None, v=None, rotary_cos=rotary_tables()[0], rotary_sin=rotary_tables()[1]),
     ValueError, "k and v"),
    ("rotary_dtype", dict(rotary_cos=rotary_tables(dtype=torch.float32)[0],
                          rotary_sin=rotary_tables(dtype=torch.float32)[1]), TypeError, "rotary_cos.dtype"),
    ("rotary_rank", dict(rotary_cos=torch.ones(S_CACHE, dtype=fp16), rotary_sin=torch.ones(S_CACHE, dtype=fp16)),
     ValueError, "rotary_cos.dim()"),
    ("rotary_sin_shape", dict(rotary_cos=rotary_tables()[0], rotary_sin=rotary_tables(half=2)[1]), ValueError,
     "rotary_sin.shape"),
    ("rotary_dim_past_head_dim", dict(rotary_cos=rotary_tables(half=D)[0], rotary_sin=rotary_tables(half=D)[1]),
     ValueError, "rotary_dim"),
    ("rotary_table_short", dict(rotary_cos=rotary_tables(n=S_CACHE - 1)[0],
                                rotary_sin=rotary_tables(n=S_CACHE - 1)[1]), ValueError, "seqlen_ro"),
    ("block_table_page_size", dict(block_table=i32([[0], [1]])), ValueError, "page_block_size"),
    ("num_splits_negative", dict(num_splits=-1), ValueError, "num_splits"),
    ("num_splits_float", dict(num_splits=1.5), ValueError, "num_splits"),
    ("window", dict(window_size=(-2, 0)), ValueError, "window_size"),
    ("softcap", dict(softcap=-1.0), ValueError, "softcap"),
    ("alibi_shape", dict(alibi_slopes=torch.ones(H + 1)), ValueError, "alibi_slopes.shape"),
    ("alibi_dtype", dict(alibi_slopes=torch.ones(H, dtype=F64)), TypeError, "alibi_slopes.dtype"),
]


@pytest.mark.parametrize("overrides,exc,text", [e[1:] for e in ERRORS], ids=[e[0] for e in ERRORS])
def test_argument_errors(overrides, exc, text):
    args = good_args()
    args.update(overrides)
    caches = {name: args[name].clone() for name in ("k_cache", "v_cache") if isinstance(args[name], torch.Tensor)}
    with pytest.raises(exc, match="flash_attn: ") as info:
        flash_attn_with_kvcache(**args)
    assert text in str(info.value)
    for name, before in caches.items():
        assert torch.equal(before, args[name]), "a failing call must not touch the caches"


def test_good_args_pass():
    flash_attn_with_kvcache(**good_args())
    cos, sin = rotary_tables()
    flash_attn_with_kvcache(**good_args(), rotary_cos=cos, rotary_sin=sin, cache_batch_idx=i32([1, 0]),
                            cache_leftpad=i32([1, 0]))


# ----------------------------------------------------------------------------
# API shape

def test_signature_matches_flash_attn_28():
    expected = ("(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None, "
                "cache_batch_idx=None, cache_leftpad=None, block_table=None, softmax_scale=None, causal=False, "
                "window_size=(-1, -1), softcap=0.0, rotary_interleaved=True, alibi_slopes=None, num_splits=0, "
                "return_softmax_lse=False)")
    assert str(inspect.signature(flash_attn_with_kvcache)) == expected
    assert flash_attn.flash_attn_with_kvcache is flash_attn_with_kvcache
    assert "flash_attn_with_kvcache" in flash_attn.__all__


# ----------------------------------------------------------------------------
# the CUDA route's Python side, on CPU, against a stand-in extension

PAGED_HEAD_DIMS = (64, 128, 256)


class FakeExtension:
    """Stands in for flash_attn_2_cuda's fwd (batched, with the KV-cache arguments) and varlen_fwd:
    checks their contracts, computes with the varlen reference (keys per sequence =
    min(seqlen_k or cu_seqlens_k length, seqused_k), as the kernel does), and records what it was
    given. With block_table it does what the paged kernel does (paged_keys); seqused_k is
    required there in fwd, optional in varlen_fwd (prefill)."""

    def __init__(self, head_dims):
        self.head_dims = head_dims
        self.calls = []

    def fwd(self, q, k, v, out, alibi_slopes, softmax_scale, window_size_left, window_size_right, softcap,
            p_dropout=0.0, return_softmax=False, gen=None, seqused_k=None, num_splits=1, block_table=None,
            leftpad_k=None):
        """q (b, sq, h, d) with any strides but a unit last one (the kernel takes strided views);
        out None or a tensor of q's shape that receives the output (and is returned)."""
        paged = block_table is not None
        b, sq, h, d = q.shape
        assert p_dropout == 0.0 and return_softmax is False and gen is None
        assert k.dim() == v.dim() == 4 and k.shape == v.shape and type(num_splits) is int and num_splits >= 0
        assert d in self.head_dims and q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
        if out is not None:
            assert out.shape == q.shape and out.dtype == q.dtype and out.stride(-1) == 1
        if seqused_k is not None:
            assert seqused_k.dtype == torch.int32 and seqused_k.shape == (b,) and seqused_k.is_contiguous()
        if alibi_slopes is not None:
            assert alibi_slopes.dtype == torch.float32 and alibi_slopes.is_contiguous()
        self.calls.append(dict(entry="fwd", q=q, k=k, v=v, out=out,
                               seqused_k=None if seqused_k is None else seqused_k.clone(), head_dim=d,
                               window=(window_size_left, window_size_right), q_shape=tuple(q.shape[:3]),
                               num_splits=num_splits, block_table=block_table, leftpad_k=leftpad_k))
        if paged:
            assert d in PAGED_HEAD_DIMS and k.shape[-1] % 8 == 0 and k.shape[-1] <= d and seqused_k is not None
            assert block_table.dtype == torch.int32 and block_table.shape[0] == b and block_table.stride(-1) == 1
            keys, values, cu_k = paged_keys(k, v, None, seqused_k, block_table, leftpad_k, d)
            lens = None
        else:
            assert leftpad_k is None and k.shape[0] == b and k.shape[-1] == d
            sk = k.shape[1]
            keys, values = k.reshape(b * sk, *k.shape[2:]), v.reshape(b * sk, *v.shape[2:])
            cu_k = (torch.arange(b + 1) * sk).to(torch.int32)
            lens = None if seqused_k is None else seqused_k.clamp(0, sk)  # the kernel's clamp (block_info.h)
        cu_q = (torch.arange(b + 1) * sq).to(torch.int32)
        res, lse = attention_varlen_ref(q.reshape(b * sq, h, d), keys, values, cu_q, cu_k, sq, None, lens,
                                        softmax_scale, False, (window_size_left, window_size_right), softcap,
                                        alibi_slopes)
        res, lse = res.view(b, sq, h, d), lse.view(h, b, sq).permute(1, 0, 2).contiguous()
        if out is not None:
            out.copy_(res)
            res = out
        return [res, lse, None, torch.zeros(0, dtype=torch.int64)]

    def varlen_fwd(self, q, k, v, out, cu_seqlens_q, cu_seqlens_k, seqused_k, max_seqlen_q, max_seqlen_k,
                   alibi_slopes, softmax_scale, window_size_left, window_size_right, softcap, num_splits=1,
                   block_table=None, leftpad_k=None):
        paged = block_table is not None
        assert out is None and q.dim() == 3 and k.dim() == v.dim() == (4 if paged else 3)
        assert type(num_splits) is int and num_splits >= 0
        assert q.shape[-1] in self.head_dims and k.shape == v.shape
        assert q.stride(-1) == k.stride(-1) == v.stride(-1) == 1
        b = cu_seqlens_q.shape[0] - 1
        for cu in (cu_seqlens_q, cu_seqlens_k):
            assert cu.dtype == torch.int32 and cu.is_contiguous() and cu.shape == (b + 1,)
        assert type(max_seqlen_q) is int and type(max_seqlen_k) is int
        assert cu_seqlens_q[-1] == q.shape[0]
        if alibi_slopes is not None:
            assert alibi_slopes.dtype == torch.float32 and alibi_slopes.is_contiguous()
        self.calls.append(dict(entry="varlen_fwd", k=k, v=v,
                               seqused_k=None if seqused_k is None else seqused_k.clone(),
                               head_dim=q.shape[-1], window=(window_size_left, window_size_right),
                               q_shape=tuple(q.shape[:2]), num_splits=num_splits, block_table=block_table,
                               leftpad_k=leftpad_k))
        if paged:
            assert q.shape[-1] in PAGED_HEAD_DIMS and k.shape[-1] % 8 == 0 and k.shape[-1] <= q.shape[-1]
            assert block_table.dtype == torch.int32 and block_table.shape[0] == b and block_table.stride(-1) == 1
            k, v, cu_seqlens_k = paged_keys(k, v, cu_seqlens_k, seqused_k, block_table, leftpad_k, q.shape[-1])
            lens = None
        else:
            assert leftpad_k is None and k.shape[-1] == q.shape[-1] and cu_seqlens_k[-1] == k.shape[0]
            assert seqused_k.dtype == torch.int32 and seqused_k.shape == (b,) and seqused_k.is_contiguous()
            lens = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).minimum(seqused_k).clamp(min=0)
        return list(attention_varlen_ref(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, lens,
                                         softmax_scale, False, (window_size_left, window_size_right), softcap,
                                         alibi_slopes))


def paged_keys(k_cache, v_cache, cu_seqlens_k, seqused_k, block_table, leftpad_k, head_dim):
    """What the paged kernel reads (paged_kv.h), packed: sequence i has seqused_k[i] keys (else its
    cu_seqlens_k length) from logical position leftpad_k[i], clamped to its pages; a block index
    outside 0..num_blocks - 1 reads page 0; columns past the caches' head dim read 0.
    Returns (keys, values, cu_seqlens_k) of the packed (total, hk, head_dim) keys."""
    num_blocks, page = k_cache.shape[:2]
    b, max_blocks = block_table.shape
    if seqused_k is not None:
        counts = seqused_k.tolist()
    else:
        counts = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()
    starts = [0] * b if leftpad_k is None else [max(x, 0) for x in leftpad_k.tolist()]
    index = []
    for i in range(b):
        n = max(0, min(counts[i], max_blocks * page - starts[i]))
        pos = torch.arange(starts[i], starts[i] + n)
        pages = block_table[i].long()[(pos // page).clamp(max=max_blocks - 1)]
        pages = torch.where((pages >= 0) & (pages < num_blocks), pages, 0)
        index.append(pages * page + pos % page)
        counts[i] = n
    index = torch.cat(index) if index else torch.zeros(0, dtype=torch.long)
    pad = head_dim - k_cache.shape[-1]
    keys, values = (torch.nn.functional.pad(c.flatten(0, 1)[index], (0, pad)) for c in (k_cache, v_cache))
    cu = torch.tensor([0] + counts, dtype=torch.int64).cumsum(0).to(torch.int32)
    return keys, values, cu


@pytest.fixture
def fake(monkeypatch):
    ext = FakeExtension([8, 16, 32, 64])
    monkeypatch.setattr(build_info, "cuda_extension", lambda: ext)
    monkeypatch.setattr(build_info, "compiled_head_dims", lambda: list(ext.head_dims))
    monkeypatch.setattr(build_info, "has_feature", lambda name: True)
    return ext


def route_args(kw):
    """The normalized positional arguments flash_attn_with_kvcache hands to a route."""
    q, k_cache = kw["q"], kw["k_cache"]
    seqlens = kw["cache_seqlens"]
    if seqlens is not None and not isinstance(seqlens, torch.Tensor):
        seqlens = torch.full((q.shape[0],), seqlens, dtype=torch.int32)
    window = kernel_window(kw["causal"], kw["window_size"], q.shape[1], k_cache.shape[1],
                           kw["alibi_slopes"] is not None)
    return (q, k_cache, kw["v_cache"], kw["k"], kw["v"], kw["rotary_cos"], kw["rotary_sin"], seqlens,
            kw["cache_batch_idx"], kw["cache_leftpad"], softmax_scale_or_default(kw["softmax_scale"], q.shape[-1]),
            window, kw["softcap"], kw["rotary_interleaved"], kw["alibi_slopes"])


def shares_memory(a, b):
    return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()


def same_tensor(a, b):
    return a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()


@pytest.mark.parametrize("name", list(CASES))
def test_cuda_route_matches_cpu_route(fake, name):
    c = CASES[name]
    kw, _ = make_inputs(c)
    kw_cpu = {key: (val.clone() if isinstance(val, torch.Tensor) else val) for key, val in kw.items()}
    out, lse = _cuda.kvcache_forward(*route_args(kw))
    ref, ref_lse = _cpu.kvcache_forward(*route_args(kw_cpu))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert lse.shape == ref_lse.shape and lse.is_contiguous()
    assert_lse_close(lse, ref_lse, 1e-10)
    torch.testing.assert_close(kw["k_cache"], kw_cpu["k_cache"], rtol=1e-12, atol=1e-12)
    assert torch.equal(kw["v_cache"], kw_cpu["v_cache"])
    if c.s_cache and c.sq:
        assert len(fake.calls) == 1
        fast = c.batch_idx is None and c.leftpad is None and c.d in fake.head_dims
        call = fake.calls[0]
        assert shares_memory(call["k"], kw["k_cache"]) == fast
        assert shares_memory(call["v"], kw["v_cache"]) == fast
        assert call["head_dim"] == min(h for h in fake.head_dims if h >= c.d)
        # GQA packing: without mask and ALiBi the query heads of a kv head become its rows
        packed = c.hq > c.hk and call["window"] == (-1, -1) and c.alibi is None
        g = c.hq // c.hk if packed else 1
        assert call["entry"] == "fwd" and call["q_shape"] == (c.b, c.sq * g, c.hq // g)
        # a decode step (sq == 1) and MQA: the kernel writes the result through a view of it
        direct = packed and (c.sq == 1 or c.hk == 1)
        assert (call["out"] is not None) == direct
        if direct and c.d == call["head_dim"]:
            assert shares_memory(call["out"], out)
        if direct and c.sq == 1 and c.d == call["head_dim"] and not c.rotary_dim:
            assert shares_memory(call["q"], kw["q"])  # q itself, as (b, g, hk, d) rows


def test_cuda_route_fast_path_passes_the_cache_itself(fake):
    kw, _ = make_inputs(replace(CASES["decode"], b_cache=3))  # extra cache rows are allowed
    _cuda.kvcache_forward(*route_args(kw))
    call = fake.calls[0]
    assert call["k"].data_ptr() == kw["k_cache"].data_ptr() and call["k"].shape == (2, 12, 2, 8)
    assert call["seqused_k"].tolist() == [4, 12]


def test_cuda_route_decode_passes_cache_seqlens_as_is(fake):
    """Without new keys, rotary or cache_leftpad the int32 cache_seqlens is the kernel's seqused_k
    itself, unclamped: the kernel clamps it into 0..seqlen_cache (the stand-in does the same)."""
    c = replace(CASES["no-new-kv"], seqlens=[-3, 50])
    kw, _ = make_inputs(c)
    out, lse = _cuda.kvcache_forward(*route_args(kw))
    call = fake.calls[0]
    assert call["seqused_k"].tolist() == [-3, 50]
    ref, ref_lse = _cpu.kvcache_forward(*route_args({**kw, "cache_seqlens": i32([0, c.s_cache])}))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert_lse_close(lse, ref_lse, 1e-10)


def test_cuda_route_strided_cache_is_read_in_place(fake):
    """The batched kernel takes any cache strides (multiples of 8 elements): no gather."""
    c = CASES["decode"]
    kw, seqlens_list = make_inputs(c)
    exp = naive_for(c, kw, seqlens_list)
    kc = kw["k_cache"].transpose(0, 1).contiguous().transpose(0, 1)
    out, _ = _cuda.kvcache_forward(*route_args({**kw, "k_cache": kc}))
    assert same_tensor(fake.calls[0]["k"], kc)
    torch.testing.assert_close(out, exp[2], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(kc, exp[0], rtol=1e-12, atol=1e-12)


def test_cuda_route_empty_inputs_skip_the_kernel(fake):
    kc, vc = torch.zeros(2, 5, 2, 8, dtype=F64), torch.zeros(2, 5, 2, 8, dtype=F64)
    k = randn(2, 1, 2, 8, seed=4)
    kw = dict(q=randn(2, 0, 4, 8, seed=1), k_cache=kc, v_cache=vc, k=k, v=k, rotary_cos=None, rotary_sin=None,
              cache_seqlens=i32([0, 4]), cache_batch_idx=None, cache_leftpad=None, softmax_scale=None,
              causal=True, window_size=(-1, -1), softcap=0.0, rotary_interleaved=True, alibi_slopes=None)
    out, lse = _cuda.kvcache_forward(*route_args(kw))
    assert fake.calls == [] and out.shape == (2, 0, 4, 8) and lse.shape == (2, 4, 0)
    assert torch.equal(kc[0, 0], k[0, 0]) and torch.equal(kc[1, 4], k[1, 0])
    empty = torch.zeros(2, 0, 2, 8, dtype=F64)
    out, lse = _cuda.kvcache_forward(*route_args({**kw, "q": randn(2, 3, 4, 8, seed=1), "k_cache": empty,
                                                  "v_cache": empty, "k": None, "v": None, "cache_seqlens": None}))
    assert fake.calls == [] and (out == 0).all() and torch.isposinf(lse).all()


def test_cuda_route_clamps_unchecked_values(fake):
    """Without FLASH_ATTN_DEBUG, CUDA values are not checked: bad ones must stay inside the caches."""
    c = CASES["batch-idx-leftpad"]
    kw, _ = make_inputs(c)
    bad = {**kw, "cache_seqlens": i32([-3, 50]), "cache_batch_idx": i32([7, -2]), "cache_leftpad": i32([9, -4])}
    out, lse = _cuda.kvcache_forward(*route_args(bad))
    assert out.shape == kw["q"].shape and not torch.isnan(out).any()
    seqused = fake.calls[0]["seqused_k"]
    assert (seqused >= 0).all() and (seqused <= c.s_cache).all()


@pytest.mark.parametrize("num_splits", [0, 1, 3, 16])
def test_cuda_route_passes_num_splits(fake, num_splits):
    """num_splits reaches the extension as given (it picks or caps it), on both the fast
    and the gathered path; the default of the route is 0 (heuristic), as flash_attn_with_kvcache's."""
    for name in ("decode", "batch-idx-leftpad"):
        kw, _ = make_inputs(CASES[name])
        _cuda.kvcache_forward(*route_args(kw), None, num_splits)
        _cuda.kvcache_forward(*route_args(kw))
    assert [c["num_splits"] for c in fake.calls] == [num_splits, 0, num_splits, 0]


def test_with_kvcache_hands_num_splits_to_the_route(monkeypatch):
    seen, original = [], _cpu.kvcache_forward

    def route(*args):
        seen.append(args[-1])
        return original(*args)

    monkeypatch.setattr(_cpu, "kvcache_forward", route)
    kw, _ = make_inputs(CASES["decode"])
    flash_attn_with_kvcache(**kw, num_splits=7)
    flash_attn_with_kvcache(**kw)
    assert seen == [7, 0]


def test_cuda_route_backward_raises(fake):
    kw, _ = make_inputs(CASES["decode"])
    kw["q"].requires_grad_(True)
    out, lse = _cuda.kvcache_forward(*route_args(kw))
    assert out.requires_grad and not lse.requires_grad
    with pytest.raises(NotImplementedError, match="backward"):
        out.sum().backward()


def test_cuda_route_checks_the_build_before_writing(monkeypatch):
    monkeypatch.setattr(build_info, "cuda_extension", lambda: None)
    kw, _ = make_inputs(CASES["decode"])
    kc = kw["k_cache"].clone()
    with pytest.raises(RuntimeError, match="built without CUDA kernels"):
        _cuda.kvcache_forward(*route_args(kw))
    assert torch.equal(kw["k_cache"], kc)


def test_split_share_host(tmp_path_factory):
    """split_kv.h's split_share on the host (tests/cpp/split_share_host.cpp, g++): the shares of
    every visible range up to 300 key blocks and every split count tile it in order, the first
    min(num_splits, blocks / kMinShareBlocks) non-empty and balanced, the rest empty, so a
    cache filled to a fraction of its capacity runs as many shares as its length calls for."""
    from test_dropout_cpu import build_host_program

    run = build_host_program(tmp_path_factory, "split_share_host")(300)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr
