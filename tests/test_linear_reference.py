"""flash_attn.reference_linear: the recurrence against a float64 loop written out here,
the chunked form against the recurrence, varlen against per-sequence slices, gradients
(gradcheck), the fixed decays against their formulas, masked linear attention."""
import math

import pytest
import torch
import torch.nn.functional as F

from flash_attn.reference_linear import (causal_decay_mask, lightning_log_decay, linear_attn_chunk_ref,
                                         linear_attn_normalizer_ref, linear_attn_recurrent_ref, linear_attn_ref,
                                         masked_linear_attention_ref, retention_log_decay)

F64 = torch.float64


def loop_recurrence(q, k, v, g=None, gv=None, scale=None, h0=None):
    """S = diag(exp(g_t)) S diag(exp(gv_t)) + outer(k_t, v_t); o_t = scale * q_t S, per
    batch row and head, one token at a time, in float64. g: None, [B, T, H] or [B, T, H, K]."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    o = torch.zeros(B, T, H, V, dtype=F64)
    final = torch.zeros(B, H, K, V, dtype=F64)
    for b in range(B):
        for h in range(H):
            S = torch.zeros(K, V, dtype=F64) if h0 is None else h0[b, h].double().clone()
            for t in range(T):
                if g is not None:
                    S = S * g[b, t, h].double().exp().reshape(-1, 1)  # a scalar, or one factor per key row
                if gv is not None:
                    S = S * gv[b, t, h].double().exp().reshape(1, -1)
                S = S + torch.outer(k[b, t, h].double(), v[b, t, h].double())
                o[b, t, h] = scale * (q[b, t, h].double() @ S)
            final[b, h] = S
    return o, final


def make(B, T, H, K, V, gate=None, n=1.0, dtype=F64, seed=0):
    """q, k, v, g with g = logsigmoid(x) / n: gate None, "scalar" [B, T, H] or "key" [B, T, H, K]."""
    gen = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, T, H, K, generator=gen, dtype=F64).to(dtype) for _ in range(2))
    v = torch.randn(B, T, H, V, generator=gen, dtype=F64).to(dtype)
    shape = {None: None, "scalar": (B, T, H), "key": (B, T, H, K)}[gate]
    g = None if shape is None else (F.logsigmoid(torch.randn(*shape, generator=gen, dtype=F64)) / n).to(dtype)
    return q, k, v, g


def state(N, H, K, V, seed=1, dtype=F64):
    return torch.randn(N, H, K, V, generator=torch.Generator().manual_seed(seed), dtype=F64).to(dtype)


def close64(actual, expected):
    peak = expected.abs().max().item() if expected.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=1e-9, atol=1e-9 * max(1.0, peak))


def rms_ratio(actual, expected):
    return ((actual.double() - expected.double()).pow(2).mean().sqrt() / expected.double().pow(2).mean().sqrt()).item()


# --------------------------------------------------------------------------- the recurrence itself

@pytest.mark.parametrize("gate", [None, "scalar", "key", "gamma", "key+gv"])
def test_recurrent_ref_matches_loop(gate):
    B, T, H, K, V = 2, 9, 2, 5, 3
    q, k, v, g = make(B, T, H, K, V, None if gate in (None, "gamma") else gate.split("+")[0], seed=3)
    g_gamma = torch.tensor([-0.1, -0.7], dtype=F64) if gate == "gamma" else None
    gv = F.logsigmoid(torch.randn(B, T, H, V, dtype=F64)) if gate == "key+gv" else None
    h0 = state(B, H, K, V)
    o, final = linear_attn_recurrent_ref(q, k, v, g, g_gamma, gv, scale=0.3, initial_state=h0,
                                         output_final_state=True)
    g_loop = g_gamma.expand(B, T, H) if g_gamma is not None else g
    o_loop, final_loop = loop_recurrence(q, k, v, g_loop, gv, 0.3, h0)
    close64(o, o_loop)
    close64(final, final_loop)


@pytest.mark.parametrize("gate", ["scalar", "key"])
def test_recurrent_reverse_is_the_flipped_recurrence(gate):
    B, T, H, K, V = 1, 7, 2, 4, 3
    q, k, v, g = make(B, T, H, K, V, gate, seed=4)
    gv = F.logsigmoid(torch.randn(B, T, H, V, dtype=F64)) if gate == "key" else None
    o, final = linear_attn_recurrent_ref(q, k, v, g, gv=gv, reverse=True, output_final_state=True)
    flip = lambda x: None if x is None else x.flip(1)  # noqa: E731
    o_loop, final_loop = loop_recurrence(flip(q), flip(k), flip(v), flip(g), flip(gv))
    close64(o, o_loop.flip(1))
    close64(final, final_loop)


def test_scale_default_and_no_state_output():
    q, k, v, g = make(1, 4, 1, 9, 2, "scalar")
    o, final = linear_attn_recurrent_ref(q, k, v, g)
    assert final is None
    close64(o, loop_recurrence(q, k, v, g, scale=1 / 3)[0])


# --------------------------------------------------------------------------- chunked == recurrent

@pytest.mark.parametrize("n", [0.1, 1, 10], ids=lambda n: f"g_over_{n}")
@pytest.mark.parametrize("T", [1, 63, 64, 65, 200], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("gate", ["scalar", "key"])
def test_chunk_matches_recurrent_fp64(gate, T, n):
    B, H, K, V = 2, 2, 16, 33
    q, k, v, g = make(B, T, H, K, V, gate, n, seed=T)
    h0 = state(B, H, K, V)
    o, final = linear_attn_chunk_ref(q, k, v, g, initial_state=h0, output_final_state=True)
    o_rec, final_rec = linear_attn_recurrent_ref(q, k, v, g, initial_state=h0, output_final_state=True)
    close64(o, o_rec)
    close64(final, final_rec)


@pytest.mark.parametrize("K,V", [(16, 16), (33, 64), (64, 33), (64, 64)], ids=lambda x: str(x))
@pytest.mark.parametrize("gate", [None, "scalar", "key", "gamma"])
def test_chunk_matches_recurrent_head_dims(gate, K, V):
    B, T, H = 1, 70, 2
    q, k, v, g = make(B, T, H, K, V, None if gate == "gamma" else gate, seed=K + V)
    g_gamma = retention_log_decay(H).double() if gate == "gamma" else None
    o, final = linear_attn_chunk_ref(q, k, v, g, g_gamma, output_final_state=True)
    o_rec, final_rec = linear_attn_recurrent_ref(q, k, v, g, g_gamma, output_final_state=True)
    close64(o, o_rec)
    close64(final, final_rec)


@pytest.mark.parametrize("chunk_size,sub_chunk_size", [(16, 16), (16, 4), (32, 8), (64, 64), (64, 1)])
def test_chunk_sizes(chunk_size, sub_chunk_size):
    q, k, v, g = make(1, 50, 2, 8, 4, "key", seed=5)
    o, final = linear_attn_chunk_ref(q, k, v, g, output_final_state=True, chunk_size=chunk_size,
                                     sub_chunk_size=sub_chunk_size)
    o_rec, final_rec = linear_attn_recurrent_ref(q, k, v, g, output_final_state=True)
    close64(o, o_rec)
    close64(final, final_rec)


def test_chunk_size_not_a_multiple_of_sub_chunk():
    q, k, v, g = make(1, 5, 1, 4, 4, "key")
    with pytest.raises(ValueError, match="chunk_size"):
        linear_attn_chunk_ref(q, k, v, g, chunk_size=16, sub_chunk_size=5)


@pytest.mark.parametrize("gate", ["scalar", "key"])
@pytest.mark.parametrize("T", [63, 200], ids=lambda t: f"T{t}")
def test_chunk_fp32_close_to_fp64(gate, T):
    q, k, v, g = make(1, T, 2, 64, 64, gate, n=0.1, seed=7)
    h0 = state(1, 2, 64, 64)
    o, final = linear_attn_chunk_ref(q.float(), k.float(), v.float(), g.float(), initial_state=h0.float(),
                                     output_final_state=True)
    o_rec, final_rec = linear_attn_recurrent_ref(q, k, v, g, initial_state=h0, output_final_state=True)
    assert o.dtype == torch.float32 and final.dtype == torch.float32
    assert rms_ratio(o, o_rec) < 1e-5
    assert rms_ratio(final, final_rec) < 1e-5


GATES_VERY_NEGATIVE = {
    "minus_1e4": lambda shape: torch.full(shape, -1e4),
    "logsigmoid_over_0.001": lambda shape: F.logsigmoid(torch.randn(shape)) / 1e-3,
    "zero_or_minus_1e4": lambda shape: torch.where(torch.rand(shape) < 0.2, -1e4, 0.0),
    "minus_30_to_0": lambda shape: -30 * torch.rand(shape),
}


@pytest.mark.parametrize("gate", ["scalar", "key"])
@pytest.mark.parametrize("kind", list(GATES_VERY_NEGATIVE))
def test_chunk_very_negative_gates_fp32(gate, kind):
    torch.manual_seed(8)
    B, T, H, K, V = 1, 130, 2, 16, 16
    q, k, v, _ = make(B, T, H, K, V, seed=8)
    g = GATES_VERY_NEGATIVE[kind]((B, T, H) if gate == "scalar" else (B, T, H, K)).double()
    h0 = state(B, H, K, V)
    o, final = linear_attn_chunk_ref(q.float(), k.float(), v.float(), g.float(), initial_state=h0.float(),
                                     output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(final).all()
    o_rec, final_rec = linear_attn_recurrent_ref(q, k, v, g, initial_state=h0, output_final_state=True)
    assert rms_ratio(o, o_rec) < 1e-5
    assert rms_ratio(final, final_rec) < 1e-5
    # fp64 chunked: tight
    o64, final64 = linear_attn_chunk_ref(q, k, v, g, initial_state=h0, output_final_state=True)
    close64(o64, o_rec)
    close64(final64, final_rec)


def test_very_negative_gate_gradients_are_finite():
    q, k, v, _ = make(1, 40, 1, 8, 8, seed=9)
    g = torch.full((1, 40, 1, 8), -1e4, dtype=torch.float32, requires_grad=True)
    qkv = [x.float().requires_grad_() for x in (q, k, v)]
    o, final = linear_attn_chunk_ref(*qkv, g, output_final_state=True, chunk_size=16, sub_chunk_size=4)
    (o.sum() + final.sum()).backward()
    for x in qkv + [g]:
        assert torch.isfinite(x.grad).all()


# --------------------------------------------------------------------------- states and varlen

@pytest.mark.parametrize("form", ["chunk", "recurrent"])
@pytest.mark.parametrize("gate", [None, "scalar", "key"])
def test_final_state_chains(form, gate):
    """Two halves, the second starting from the first's final state, equal one call."""
    ref = linear_attn_chunk_ref if form == "chunk" else linear_attn_recurrent_ref
    q, k, v, g = make(2, 100, 2, 8, 6, gate, seed=10)
    h0 = state(2, 2, 8, 6)
    o, final = ref(q, k, v, g, initial_state=h0, output_final_state=True)
    cut = 37
    part = lambda x, s: None if x is None else x[:, s]  # noqa: E731
    o1, s1 = ref(q[:, :cut], k[:, :cut], v[:, :cut], part(g, slice(None, cut)), initial_state=h0,
                 output_final_state=True)
    o2, s2 = ref(q[:, cut:], k[:, cut:], v[:, cut:], part(g, slice(cut, None)), initial_state=s1,
                 output_final_state=True)
    close64(torch.cat([o1, o2], 1), o)
    close64(s2, final)


def test_zero_length_returns_initial_state():
    q, k, v, g = make(2, 0, 2, 4, 3, "key")
    h0 = state(2, 2, 4, 3)
    for ref in (linear_attn_chunk_ref, linear_attn_recurrent_ref):
        o, final = ref(q, k, v, g, initial_state=h0, output_final_state=True)
        assert o.shape == (2, 0, 2, 3)
        close64(final, h0)


@pytest.mark.parametrize("form", ["chunk", "recurrent"])
@pytest.mark.parametrize("gate", [None, "scalar", "key", "gamma"])
def test_varlen_matches_per_sequence(form, gate):
    ref = linear_attn_chunk_ref if form == "chunk" else linear_attn_recurrent_ref
    lens = [5, 0, 70, 1, 64]
    T, H, K, V = sum(lens), 2, 8, 5
    q, k, v, g = make(1, T, H, K, V, None if gate == "gamma" else gate, seed=11)
    g_gamma = torch.tensor([-0.05, -0.5], dtype=F64) if gate == "gamma" else None
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    h0 = state(len(lens), H, K, V)
    o, final = ref(q, k, v, g, g_gamma, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    assert o.shape == (1, T, H, V) and final.shape == (len(lens), H, K, V)
    for n in range(len(lens)):
        s = slice(int(cu[n]), int(cu[n + 1]))
        o_n, final_n = ref(q[:, s], k[:, s], v[:, s], None if g is None else g[:, s], g_gamma,
                           initial_state=h0[n:n + 1], output_final_state=True)
        close64(o[:, s], o_n)
        close64(final[n:n + 1], final_n)
    if lens[1] == 0:
        close64(final[1], h0[1])  # the empty sequence hands its initial state through


# --------------------------------------------------------------------------- gradients

def _gradcheck(fn, *inputs):
    inputs = [x.detach().requires_grad_() for x in inputs]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)


@pytest.mark.parametrize("gate", ["scalar", "key", "gamma"])
def test_gradcheck_chunk(gate):
    """q, k, v, g (or g_gamma), initial_state; 2 chunks of 4 with a partial one, sub-chunks of 2."""
    B, T, H, K, V = 1, 7, 2, 3, 2
    q, k, v, g = make(B, T, H, K, V, None if gate == "gamma" else gate, seed=12)
    g = torch.tensor([-0.2, -0.9], dtype=F64) if gate == "gamma" else g
    h0 = state(B, H, K, V)

    def fn(q, k, v, g, h0):
        gates = dict(g_gamma=g) if gate == "gamma" else dict(g=g)
        return linear_attn_chunk_ref(q, k, v, **gates, scale=0.7, initial_state=h0, output_final_state=True,
                                     chunk_size=4, sub_chunk_size=2)
    _gradcheck(fn, q, k, v, g, h0)


def test_gradcheck_recurrent_with_value_gate_and_reverse():
    B, T, H, K, V = 1, 5, 1, 3, 2
    q, k, v, g = make(B, T, H, K, V, "key", seed=13)
    gv = F.logsigmoid(torch.randn(B, T, H, V, dtype=F64))
    h0 = state(B, H, K, V)

    def fn(q, k, v, g, gv, h0):
        return linear_attn_recurrent_ref(q, k, v, g, gv=gv, initial_state=h0, output_final_state=True, reverse=True)
    _gradcheck(fn, q, k, v, g, gv, h0)


def test_gradcheck_varlen():
    lens = [3, 0, 4]
    q, k, v, g = make(1, sum(lens), 1, 2, 2, "scalar", seed=14)
    cu = torch.tensor([0] + lens).cumsum(0)
    h0 = state(len(lens), 1, 2, 2)

    def fn(q, k, v, g, h0):
        return linear_attn_chunk_ref(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu,
                                     chunk_size=2, sub_chunk_size=1)
    _gradcheck(fn, q, k, v, g, h0)


def test_gradcheck_masked():
    B, T, H, HK, K, V = 1, 4, 2, 1, 3, 2
    gen = torch.Generator().manual_seed(15)
    q = torch.randn(B, T, H, K, generator=gen, dtype=F64)
    k = torch.randn(B, T, HK, K, generator=gen, dtype=F64)
    v = torch.randn(B, T, HK, V, generator=gen, dtype=F64)
    mask = torch.rand(1, H, T, T, generator=gen, dtype=F64)
    _gradcheck(lambda q, k, v, m: masked_linear_attention_ref(q, k, v, m), q, k, v, mask)


def test_gradcheck_normalized_linear_attn():
    q, k, v, _ = make(1, 6, 1, 3, 2, seed=16)
    q, k = q.sigmoid(), k.sigmoid()  # positive features: the denominator stays away from 0
    kv0 = state(1, 1, 3, 2)
    z0 = torch.rand(1, 1, 1, 3, dtype=F64)

    def fn(q, k, v, kv0, z0):
        o, (kv, z) = linear_attn_ref(q, k, v, initial_state=(kv0, z0), output_final_state=True, normalize=True)
        return o, kv, z
    _gradcheck(fn, q, k, v, kv0, z0)


# --------------------------------------------------------------------------- fixed decays

@pytest.mark.parametrize("H", [1, 4, 16])
def test_retention_decay_formula(H):
    expected = torch.tensor([math.log(1 - 2 ** (-5 - h)) for h in range(H)], dtype=torch.float32)
    got = retention_log_decay(H)
    assert got.dtype == torch.float32 and got.shape == (H,)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("H,layer_idx,num_layers", [(1, 0, 1), (8, 0, 24), (8, 12, 24), (16, 23, 24), (4, 3, 4)])
def test_lightning_decay_formula(H, layer_idx, num_layers):
    expected = torch.tensor([-(8 * h / H) * (1 - layer_idx / num_layers) for h in range(H)], dtype=torch.float32)
    got = lightning_log_decay(H, layer_idx, num_layers)
    assert got.dtype == torch.float32 and got.shape == (H,)
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=0)
    assert got[0] == 0  # head 0 keeps everything


def test_decays_are_log_gates():
    assert (retention_log_decay(32) < 0).all()
    assert (lightning_log_decay(32, 5, 12) <= 0).all()


# --------------------------------------------------------------------------- normalized linear attention

def test_normalized_linear_attn_matches_formula():
    """o_t = sum_{s<=t} (q_t.k_s) v_s / sum_{s<=t} q_t.k_s (zero initial state; scale cancels)."""
    q, k, v, _ = make(2, 20, 2, 4, 3, seed=17)
    q, k = F.elu(q) + 1, F.elu(k) + 1
    o, _ = linear_attn_ref(q, k, v, normalize=True)
    scores = torch.einsum("bihk,bjhk->bhij", q, k).tril()
    expected = torch.einsum("bhij,bjhv->bihv", scores, v) / scores.sum(-1).transpose(1, 2).unsqueeze(-1)
    torch.testing.assert_close(o, expected, rtol=1e-8, atol=1e-8)


@pytest.mark.parametrize("normalize", [False, True])
def test_linear_attn_chunk_recurrent_and_states(normalize):
    lens = [30, 0, 70]
    q, k, v, _ = make(1, sum(lens), 2, 8, 4, seed=18)
    q, k = q.sigmoid(), k.sigmoid()
    cu = torch.tensor([0] + lens).cumsum(0)
    kv0 = state(3, 2, 8, 4)
    h0 = (kv0, torch.rand(3, 1, 2, 8, dtype=F64)) if normalize else kv0
    a = linear_attn_ref(q, k, v, initial_state=h0, output_final_state=True, normalize=normalize, cu_seqlens=cu)
    b = linear_attn_ref(q, k, v, initial_state=h0, output_final_state=True, normalize=normalize, cu_seqlens=cu,
                        chunked=False)
    close64(a[0], b[0])
    if normalize:
        close64(a[1][0], b[1][0])
        close64(a[1][1], b[1][1])
        z_expected = h0[1][2, 0] + k[0, 30:].sum(0)
        close64(a[1][1][2, 0], z_expected)
        close64(a[1][1][1], h0[1][1])  # empty sequence
        den, _ = linear_attn_normalizer_ref(q, k, None, h0[1], cu)
        assert den.shape == (1, sum(lens), 2)
    else:
        close64(a[1], b[1])
        o_plain, _ = linear_attn_recurrent_ref(q, k, v, initial_state=kv0, cu_seqlens=cu)
        close64(a[0], o_plain)


# --------------------------------------------------------------------------- masked linear attention

def loop_masked(q, k, v, mask, scale):
    """o[b, i, h] = scale * sum_j (q_i . k_j) M[b, h, i, j] v_j, kv head h // (H // HK), float64 loops."""
    B, T, H, K = q.shape
    groups = H // k.shape[2]
    M = mask.double().expand(B, H, T, T)
    o = torch.zeros(B, T, H, v.shape[-1], dtype=F64)
    for b in range(B):
        for h in range(H):
            for i in range(T):
                for j in range(T):
                    o[b, i, h] += scale * (q[b, i, h].double() @ k[b, j, h // groups].double()) * M[b, h, i, j] \
                        * v[b, j, h // groups].double()
    return o


@pytest.mark.parametrize("mask_shape", [(6, 6), (2, 1, 6, 6), (1, 4, 1, 6), (2, 4, 6, 6)], ids=str)
@pytest.mark.parametrize("HK", [4, 2, 1])
def test_masked_random_mask_matches_loop(mask_shape, HK):
    gen = torch.Generator().manual_seed(19)
    B, T, H, K, V = 2, 6, 4, 3, 5
    q = torch.randn(B, T, H, K, generator=gen, dtype=F64)
    k = torch.randn(B, T, HK, K, generator=gen, dtype=F64)
    v = torch.randn(B, T, HK, V, generator=gen, dtype=F64)
    mask = torch.randn(*mask_shape, generator=gen, dtype=F64)
    torch.testing.assert_close(masked_linear_attention_ref(q, k, v, mask, 0.5), loop_masked(q, k, v, mask, 0.5),
                               rtol=1e-10, atol=1e-10)


def test_masked_bool_mask():
    q, k, v, _ = make(1, 9, 2, 4, 3, seed=20)
    causal = torch.ones(9, 9, dtype=torch.bool).tril()
    close64(masked_linear_attention_ref(q, k, v, causal), linear_attn_recurrent_ref(q, k, v)[0])


@pytest.mark.parametrize("n", [0.1, 1, 10], ids=lambda n: f"g_over_{n}")
def test_masked_decay_mask_is_the_recurrence(n):
    q, k, v, g = make(2, 70, 2, 8, 4, "scalar", n, seed=21)
    M = causal_decay_mask(g)
    assert M.shape == (2, 2, 70, 70)
    close64(masked_linear_attention_ref(q, k, v, M), linear_attn_recurrent_ref(q, k, v, g)[0])


def test_masked_mqa_equals_repeated_heads():
    gen = torch.Generator().manual_seed(22)
    q = torch.randn(1, 8, 6, 4, generator=gen)
    k, v = torch.randn(1, 8, 2, 4, generator=gen), torch.randn(1, 8, 2, 5, generator=gen)
    mask = torch.rand(1, 6, 8, 8, generator=gen)
    expected = masked_linear_attention_ref(q, k.repeat_interleave(3, 2), v.repeat_interleave(3, 2), mask)
    torch.testing.assert_close(masked_linear_attention_ref(q, k, v, mask), expected)
