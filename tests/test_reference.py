"""flash_attn.reference against a naive float64 formula written out per element."""
import math

import pytest
import torch

from flash_attn.reference import (attention_ref, attention_ref_with_probs, attention_varlen_ref,
                                  attention_varlen_ref_with_probs)

INF = float("inf")


def naive_attention(q, k, v, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, keep=None, dropout_p=0.0):
    """One query row, one key at a time, in Python floats.

    q (b, sq, hq, d); k, v (b, sk, hk, d); keep bool (b, hq, sq, sk) or None.
    Returns out float64 (b, sq, hq, d) and lse float64 (b, hq, sq).
    """
    b, sq, hq, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    scale = 1.0 / math.sqrt(d) if softmax_scale is None else softmax_scale
    left, right = window_size[0], (0 if causal else window_size[1])
    qd, kd, vd = q.double(), k.double(), v.double()
    out = torch.zeros(b, sq, hq, v.shape[-1], dtype=torch.float64)
    lse = torch.full((b, hq, sq), INF, dtype=torch.float64)
    for bi in range(b):
        for h in range(hq):
            hkv = h // (hq // hk)
            slope = None
            if alibi_slopes is not None:
                slope = float(alibi_slopes[h] if alibi_slopes.dim() == 1 else alibi_slopes[bi, h])
            for i in range(sq):
                shifted = i + sk - sq  # the key on this row's diagonal
                keys, scores = [], []
                for j in range(sk):
                    if left >= 0 and j < shifted - left:
                        continue
                    if right >= 0 and j > shifted + right:
                        continue
                    s = scale * float(torch.dot(qd[bi, i, h], kd[bi, j, hkv]))
                    if softcap > 0:
                        s = softcap * math.tanh(s / softcap)
                    if slope is not None:
                        s -= slope * abs(shifted - j)
                    keys.append(j)
                    scores.append(s)
                if not keys:
                    continue
                m = max(scores)
                weights = [math.exp(s - m) for s in scores]
                total = sum(weights)
                lse[bi, h, i] = m + math.log(total)
                for j, w in zip(keys, weights):
                    p = w / total
                    if keep is not None:
                        p = p * float(keep[bi, h, i, j]) / (1.0 - dropout_p)
                    out[bi, i, h] += p * vd[bi, j, hkv]
    return out, lse


def rand_qkv(b, sq, sk, hq, hk, d, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, sq, hq, d, generator=g, dtype=torch.float64).to(dtype)
    k = torch.randn(b, sk, hk, d, generator=g, dtype=torch.float64).to(dtype)
    v = torch.randn(b, sk, hk, d, generator=g, dtype=torch.float64).to(dtype)
    return q, k, v


def slopes(shape, seed=1):
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) * 0.5 + 0.05


def assert_close_lse(lse, ref):
    """Equal where finite, +inf in the same places."""
    assert torch.equal(torch.isinf(lse), torch.isinf(ref))
    assert (lse[torch.isinf(lse)] > 0).all()
    torch.testing.assert_close(lse[torch.isfinite(lse)].double(), ref[torch.isfinite(ref)], rtol=1e-10, atol=1e-10)


FEATURES = {
    "plain": {},
    "causal": {"causal": True},
    "window_2_1": {"window_size": (2, 1)},
    "window_left_3": {"window_size": (3, -1)},
    "window_right_0": {"window_size": (-1, 0)},
    "causal_window_2": {"causal": True, "window_size": (2, -1)},
    "alibi_h": {"alibi": "h"},
    "alibi_bh": {"alibi": "bh"},
    "softcap_0.5": {"softcap": 0.5},
    "softcap_30": {"softcap": 30.0},
    "scale_0.3": {"softmax_scale": 0.3},
    "causal_alibi_softcap": {"causal": True, "alibi": "bh", "softcap": 2.0},
    "window_alibi_softcap": {"window_size": (3, 2), "alibi": "h", "softcap": 1.0, "softmax_scale": 0.7},
}
SEQLENS = [(6, 6), (4, 9), (9, 4), (1, 7), (7, 1), (1, 1)]
HEADS = [(4, 4), (4, 2), (4, 1)]


def _options(feature, b, hq):
    opts = dict(FEATURES[feature])
    alibi = opts.pop("alibi", None)
    if alibi is not None:
        opts["alibi_slopes"] = slopes((hq,) if alibi == "h" else (b, hq))
    return opts


@pytest.mark.parametrize("hq,hk", HEADS, ids=[f"h{a}_hk{b}" for a, b in HEADS])
@pytest.mark.parametrize("sq,sk", SEQLENS, ids=[f"sq{a}_sk{b}" for a, b in SEQLENS])
@pytest.mark.parametrize("feature", list(FEATURES))
def test_matches_naive(feature, sq, sk, hq, hk):
    b, d = 2, 5
    q, k, v = rand_qkv(b, sq, sk, hq, hk, d)
    opts = _options(feature, b, hq)
    out, lse = attention_ref(q, k, v, **opts)
    out_naive, lse_naive = naive_attention(q, k, v, **opts)
    assert out.dtype == torch.float64 and out.shape == (b, sq, hq, d)
    assert lse.shape == (b, hq, sq)
    torch.testing.assert_close(out, out_naive, rtol=1e-10, atol=1e-10)
    assert_close_lse(lse, lse_naive)


@pytest.mark.parametrize("opts", [
    pytest.param({"causal": True}, id="causal_sq_gt_sk"),
    pytest.param({"window_size": (0, 0)}, id="window_0_0"),
    pytest.param({"window_size": (1, -1), "causal": True, "alibi": True}, id="causal_window_alibi"),
])
def test_rows_without_keys_are_zero_with_inf_lse(opts):
    b, sq, sk, h, d = 1, 8, 3, 2, 4
    q, k, v = rand_qkv(b, sq, sk, h, h, d)
    if opts.pop("alibi", False):
        opts["alibi_slopes"] = slopes((h,))
    q.requires_grad_(True)
    out, lse = attention_ref(q, k, v, **opts)
    empty = torch.isinf(lse)  # (b, h, sq)
    assert empty[..., : sq - sk].all()  # rows above the first diagonal see no key
    assert (lse[empty] == INF).all()
    assert (out.permute(0, 2, 1, 3)[empty] == 0).all()
    (out.sum() + lse[torch.isfinite(lse)].sum()).backward()
    assert torch.isfinite(q.grad).all()
    assert (q.grad.permute(0, 2, 1, 3)[empty] == 0).all()


def test_no_keys_at_all():
    q, k, v = rand_qkv(2, 3, 0, 2, 1, 4)
    out, lse = attention_ref(q, k, v)
    assert out.shape == q.shape and (out == 0).all()
    assert lse.shape == (2, 2, 3) and (lse == INF).all()


def test_no_queries():
    q, k, v = rand_qkv(2, 0, 5, 2, 2, 4)
    out, lse = attention_ref(q, k, v, causal=True)
    assert out.shape == (2, 0, 2, 4) and lse.shape == (2, 2, 0)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_dropout_mask_given(causal):
    b, sq, sk, hq, hk, d, p = 2, 5, 7, 4, 2, 6, 0.3
    q, k, v = rand_qkv(b, sq, sk, hq, hk, d)
    keep = torch.rand(b, hq, sq, sk, generator=torch.Generator().manual_seed(3)) >= p
    out, lse = attention_ref(q, k, v, causal=causal, dropout_p=p, dropout_mask=keep)
    out_naive, lse_naive = naive_attention(q, k, v, causal=causal, keep=keep, dropout_p=p)
    torch.testing.assert_close(out, out_naive, rtol=1e-10, atol=1e-10)
    assert_close_lse(lse, lse_naive)  # lse is taken before dropout


def test_dropout_drawn_from_torch_generator():
    b, sq, sk, h, d, p = 2, 16, 24, 2, 4, 0.25
    q, k, v = rand_qkv(b, sq, sk, h, h, d)
    torch.manual_seed(7)
    out, _, probs, keep = attention_ref_with_probs(q, k, v, dropout_p=p)
    torch.manual_seed(7)
    out_again, _ = attention_ref(q, k, v, dropout_p=p)
    assert torch.equal(out, out_again)
    assert keep.dtype == torch.bool and keep.shape == (b, h, sq, sk)
    assert abs(keep.float().mean().item() - (1 - p)) < 0.06
    out_naive, _ = naive_attention(q, k, v, keep=keep, dropout_p=p)
    torch.testing.assert_close(out, out_naive, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(probs.sum(-1), torch.ones(b, h, sq, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("upcast", [True, False], ids=["upcast", "native"])
def test_low_precision_dtypes(dtype, upcast):
    q, k, v = rand_qkv(2, 9, 11, 4, 2, 16, dtype=dtype)
    out, lse = attention_ref(q, k, v, causal=True, upcast=upcast)
    out64, lse64 = attention_ref(q.double(), k.double(), v.double(), causal=True)
    assert out.dtype == dtype and lse.dtype == torch.float32
    tol = {torch.float16: 5e-3, torch.bfloat16: 3e-2, torch.float32: 1e-5}[dtype] * (1 if upcast else 4)
    torch.testing.assert_close(out.double(), out64, rtol=0, atol=tol)
    torch.testing.assert_close(lse.double(), lse64, rtol=0, atol=tol)


def test_default_scale_uses_true_head_dim():
    q, k, v = rand_qkv(1, 4, 4, 2, 2, 7)
    out, _ = attention_ref(q, k, v)
    out_explicit, _ = attention_ref(q, k, v, softmax_scale=7 ** -0.5)
    torch.testing.assert_close(out, out_explicit, rtol=0, atol=0)


@pytest.mark.parametrize("opts", [
    pytest.param({}, id="plain"),
    pytest.param({"causal": True}, id="causal_masked_rows"),
    pytest.param({"window_size": (1, 1), "softcap": 1.5, "alibi": True}, id="window_softcap_alibi"),
])
def test_gradcheck(opts):
    q, k, v = rand_qkv(1, 4, 3, 2, 1, 3)
    if opts.pop("alibi", False):
        opts["alibi_slopes"] = slopes((2,))

    def fn(q, k, v):
        out, lse = attention_ref(q, k, v, **opts)
        return out, torch.where(torch.isinf(lse), 0.0, lse)

    inputs = [t.requires_grad_(True) for t in (q, k, v)]
    assert torch.autograd.gradcheck(fn, inputs)


# --- padding masks: a padded batch equals its sequences run one at a time ---

PADDED = {
    "plain": {},
    "causal": {"causal": True},
    "window_2_0": {"window_size": (2, 0)},
    "alibi_bh_softcap": {"alibi": "bh", "softcap": 3.0},
    "causal_alibi_h": {"causal": True, "alibi": "h"},
}


def _random_mask(lengths, seqlen, left_padded):
    pos = torch.arange(seqlen)[None, :]
    lengths = torch.tensor(lengths)[:, None]
    return pos >= seqlen - lengths if left_padded else pos < lengths


@pytest.mark.parametrize("left_padded", [False, True], ids=["right_pad", "left_pad"])
@pytest.mark.parametrize("feature", list(PADDED))
def test_padding_masks_equal_per_sequence(feature, left_padded):
    lens_q, lens_k = [5, 1, 0, 3], [6, 2, 4, 0]
    b, sq, sk, hq, hk, d = 4, 6, 7, 4, 2, 5
    q, k, v = rand_qkv(b, sq, sk, hq, hk, d)
    qmask, kmask = _random_mask(lens_q, sq, left_padded), _random_mask(lens_k, sk, left_padded)
    opts = dict(PADDED[feature])
    alibi = opts.pop("alibi", None)
    if alibi is not None:
        opts["alibi_slopes"] = slopes((hq,) if alibi == "h" else (b, hq))
    out, lse = attention_ref(q, k, v, key_padding_mask=kmask, query_padding_mask=qmask, **opts)
    for i in range(b):
        seq_opts = dict(opts)
        if alibi == "bh":
            seq_opts["alibi_slopes"] = opts["alibi_slopes"][i:i + 1]
        qi, ki, vi = q[i:i + 1, qmask[i]], k[i:i + 1, kmask[i]], v[i:i + 1, kmask[i]]
        out_i, lse_i = naive_attention(qi, ki, vi, **seq_opts)
        torch.testing.assert_close(out[i:i + 1, qmask[i]], out_i, rtol=1e-10, atol=1e-10)
        assert_close_lse(lse[i:i + 1, :, qmask[i]], lse_i)
        assert (out[i, ~qmask[i]] == 0).all()
        assert (lse[i, :, ~qmask[i]] == INF).all()


# --- varlen ---

def _packed(lens_q, lens_k, hq, hk, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(lens_q), hq, d, generator=g, dtype=torch.float64)
    k = torch.randn(sum(lens_k), hk, d, generator=g, dtype=torch.float64)
    v = torch.randn(sum(lens_k), hk, d, generator=g, dtype=torch.float64)
    cu = lambda lens: torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)  # noqa: E731
    return q, k, v, cu(lens_q), cu(lens_k)


VARLEN = {
    "plain": {},
    "causal": {"causal": True},
    "window_1_2": {"window_size": (1, 2)},
    "alibi_bh": {"alibi": "bh"},
    "causal_softcap_alibi_h": {"causal": True, "softcap": 2.0, "alibi": "h"},
}
LENGTHS = {
    "mixed": ([3, 5, 1, 4], [3, 2, 6, 4]),
    "empty_q": ([3, 0, 2], [4, 5, 2]),
    "empty_k": ([3, 2, 2], [4, 0, 2]),
    "empty_both": ([0, 4, 0], [0, 3, 5]),
    "single": ([6], [6]),
}


@pytest.mark.parametrize("lengths", list(LENGTHS))
@pytest.mark.parametrize("feature", list(VARLEN))
def test_varlen_matches_per_sequence_and_padded(feature, lengths):
    lens_q, lens_k = LENGTHS[lengths]
    b, hq, hk, d = len(lens_q), 4, 2, 5
    q, k, v, cu_q, cu_k = _packed(lens_q, lens_k, hq, hk, d)
    opts = dict(VARLEN[feature])
    alibi = opts.pop("alibi", None)
    if alibi is not None:
        opts["alibi_slopes"] = slopes((hq,) if alibi == "h" else (b, hq))
    out, lse = attention_varlen_ref(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), **opts)
    assert out.shape == q.shape and lse.shape == (hq, q.shape[0])

    for i in range(b):
        rows, keys = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        seq_opts = dict(opts)
        if alibi == "bh":
            seq_opts["alibi_slopes"] = opts["alibi_slopes"][i:i + 1]
        out_i, lse_i = naive_attention(q[rows][None], k[keys][None], v[keys][None], **seq_opts)
        torch.testing.assert_close(out[rows], out_i[0], rtol=1e-10, atol=1e-10)
        assert_close_lse(lse[:, rows], lse_i[0])

    # The same batch padded, through attention_ref with padding masks.
    mq, mk = max(lens_q), max(lens_k)
    qmask, kmask = _random_mask(lens_q, mq, False), _random_mask(lens_k, mk, False)
    qp = q.new_zeros(b, mq, hq, d)
    kp, vp = k.new_zeros(b, mk, hk, d), v.new_zeros(b, mk, hk, d)
    qp[qmask], kp[kmask], vp[kmask] = q, k, v
    out_p, lse_p = attention_ref(qp, kp, vp, key_padding_mask=kmask, query_padding_mask=qmask, **opts)
    torch.testing.assert_close(out, out_p[qmask], rtol=1e-10, atol=1e-10)
    assert_close_lse(lse, lse_p.permute(1, 0, 2)[:, qmask].double())


def test_varlen_seqused_k_and_tail_rows():
    lens_q, lens_k = [3, 4], [5, 6]
    q, k, v, cu_q, cu_k = _packed(lens_q, lens_k, 2, 2, 4)
    q = torch.cat([q, torch.randn(2, 2, 4, dtype=torch.float64)])  # 2 rows past cu_seqlens_q[-1]
    used = torch.tensor([2, 6], dtype=torch.int32)
    out, lse = attention_varlen_ref(q, k, v, cu_q, cu_k, seqused_k=used, causal=True)
    out0, lse0 = naive_attention(q[None, 0:3], k[None, 0:2], v[None, 0:2], causal=True)
    torch.testing.assert_close(out[0:3], out0[0])
    assert_close_lse(lse[:, 0:3], lse0[0])
    assert (out[7:] == 0).all() and (lse[:, 7:] == INF).all()


def test_varlen_dropout_mask_layout():
    lens_q, lens_k, p = [2, 4], [3, 5], 0.4
    q, k, v, cu_q, cu_k = _packed(lens_q, lens_k, 2, 1, 4)
    keep = torch.rand(2, 2, 6, 7, generator=torch.Generator().manual_seed(5)) >= p
    out, _, probs, keep_used = attention_varlen_ref_with_probs(q, k, v, cu_q, cu_k, 6, 7, dropout_p=p,
                                                               dropout_mask=keep)
    assert probs.shape == keep_used.shape == (2, 2, 6, 7)
    for i in range(2):
        sq, sk = lens_q[i], lens_k[i]
        rows, keys = slice(cu_q[i], cu_q[i + 1]), slice(cu_k[i], cu_k[i + 1])
        out_i, _ = naive_attention(q[rows][None], k[keys][None], v[keys][None],
                                   keep=keep[i:i + 1, :, :sq, :sk], dropout_p=p)
        torch.testing.assert_close(out[rows], out_i[0])
        assert torch.equal(keep_used[i, :, :sq, :sk], keep[i, :, :sq, :sk])
        assert (probs[i, :, sq:] == 0).all() and (probs[i, :, :, sk:] == 0).all()


def test_varlen_empty_batch():
    q, k, v = torch.zeros(0, 2, 4), torch.zeros(0, 1, 4), torch.zeros(0, 1, 4)
    cu = torch.zeros(1, dtype=torch.int32)
    out, lse = attention_varlen_ref(q, k, v, cu, cu)
    assert out.shape == (0, 2, 4) and lse.shape == (2, 0)
