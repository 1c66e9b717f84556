"""flash_attn.linear_attn on CPU tensors: fla-core 0.6.0's signatures, every op against
flash_attn.reference_linear, chunk vs recurrent agreement, states, varlen, gradients,
every argument error, and the CUDA route's NotImplementedError where no kernel runs."""
import inspect
import math

import pytest
import torch
import torch.nn.functional as F

import flash_attn.linear_attn as la
from flash_attn.linear_attn import (chunk_gla, chunk_lightning_attn, chunk_linear_attn, chunk_retention,
                                    chunk_simple_gla, fused_recurrent_gla, fused_recurrent_lightning_attn,
                                    fused_recurrent_retention, fused_recurrent_simple_gla, masked_linear_attention)
from flash_attn.reference_linear import (causal_decay_mask, lightning_log_decay, linear_attn_recurrent_ref,
                                         linear_attn_ref, masked_linear_attention_ref, retention_log_decay)

B, T, H, K, V = 2, 37, 3, 8, 6
EMPTY = inspect.Parameter.empty

# fla-core 0.6.0 (fla.ops.*), read from its signatures; its trailing **kwargs are left out
# on purpose (an unknown argument raises TypeError here instead of being swallowed).
FLA_SIGNATURES = {
    "chunk_simple_gla": [("q", EMPTY), ("k", EMPTY), ("v", EMPTY), ("g", None), ("g_gamma", None), ("scale", None),
                         ("initial_state", None), ("output_final_state", False), ("state_v_first", False),
                         ("cu_seqlens", None), ("cu_seqlens_cpu", None)],
    "fused_recurrent_simple_gla": [("q", EMPTY), ("k", EMPTY), ("v", EMPTY), ("g", None), ("g_gamma", None),
                                   ("scale", None), ("initial_state", None), ("output_final_state", False),
                                   ("reverse", False), ("state_v_first", False), ("cu_seqlens", None)],
    "chunk_retention": [("q", EMPTY), ("k", EMPTY), ("v", EMPTY), ("scale", None), ("initial_state", None),
                        ("output_final_state", False), ("cu_seqlens", None)],
    "fused_recurrent_retention": [("q", EMPTY), ("k", EMPTY), ("v", EMPTY), ("scale", None),
                                  ("initial_state", None), ("output_final_state", False), ("reverse", False),
                                  ("state_v_first", False), ("cu_seqlens", None)],
    "chunk_lightning_attn": [("q", EMPTY), ("k", EMPTY), ("v", EMPTY), ("layer_idx", EMPTY), ("num_layers", EMPTY),
                             ("scale", None), ("initial_state", None), ("output_final_state", False),
                             ("cu_seqlens", None)],
    "fused_recurrent_lightning_attn": [("q", EMPTY), ("k", EMPTY), ("v", EMPTY), ("layer_idx", EMPTY),
                                       ("num_layers", EMPTY), ("scale", None), ("initial_state", None),
                                       ("output_final_state", False), ("reverse", False), ("cu_seqlens", None)],
    "chunk_linear_attn": [("q", EMPTY), ("k", EMPTY), ("v", EMPTY), ("scale", None), ("initial_state", None),
                          ("output_final_state", False), ("normalize", True), ("cu_seqlens", None)],
    "chunk_gla": [("q", EMPTY), ("k", EMPTY), ("v", EMPTY), ("g", EMPTY), ("scale", None), ("initial_state", None),
                  ("output_final_state", False), ("state_v_first", False), ("cu_seqlens", None),
                  ("cu_seqlens_cpu", None)],
    "fused_recurrent_gla": [("q", EMPTY), ("k", EMPTY), ("v", EMPTY), ("gk", None), ("gv", None), ("scale", None),
                            ("initial_state", None), ("output_final_state", False), ("reverse", False),
                            ("state_v_first", False), ("cu_seqlens", None)],
}


def qkv(dtype=torch.float32, b=B, t=T, h=H, hk=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    hk = h if hk is None else hk
    return (torch.randn(b, t, h, K, generator=gen).to(dtype), torch.randn(b, t, hk, K, generator=gen).to(dtype),
            torch.randn(b, t, hk, V, generator=gen).to(dtype))


def gate(*shape, n=1.0, seed=1, dtype=torch.float32):
    return (F.logsigmoid(torch.randn(*shape, generator=torch.Generator().manual_seed(seed))) / n).to(dtype)


def h0(n=B, seed=2):
    return torch.randn(n, H, K, V, generator=torch.Generator().manual_seed(seed))


def rms_ratio(actual, expected):
    return ((actual.double() - expected.double()).pow(2).mean().sqrt() / expected.double().pow(2).mean().sqrt()).item()


def cu(lens, dtype=torch.int32):
    return torch.tensor([0] + lens).cumsum(0).to(dtype)


# --------------------------------------------------------------------------- signatures

def test_public_names():
    assert set(la.__all__) == set(FLA_SIGNATURES) | {"masked_linear_attention"}


@pytest.mark.parametrize("name", list(FLA_SIGNATURES))
def test_signature_matches_fla(name):
    params = inspect.signature(getattr(la, name)).parameters.values()
    assert [(p.name, p.default) for p in params] == FLA_SIGNATURES[name]


# --------------------------------------------------------------------------- ops == references

def _op_cases():
    """(id, op, kwargs builder, reference gates builder): the op's decay, written as the
    reference's g / g_gamma arguments."""
    g3, g4 = gate(B, T, H), gate(B, T, H, K)
    gv = gate(B, T, H, V, seed=3)
    return [
        ("chunk_simple_gla_g", chunk_simple_gla, dict(g=g3), dict(g=g3)),
        ("chunk_simple_gla_gamma", chunk_simple_gla, dict(g_gamma=retention_log_decay(H)),
         dict(g_gamma=retention_log_decay(H))),
        ("chunk_simple_gla_none", chunk_simple_gla, dict(), dict()),
        ("fused_recurrent_simple_gla_g", fused_recurrent_simple_gla, dict(g=g3), dict(g=g3)),
        ("fused_recurrent_simple_gla_gamma", fused_recurrent_simple_gla, dict(g_gamma=-torch.rand(H)), None),
        ("chunk_retention", chunk_retention, dict(), dict(g_gamma=retention_log_decay(H))),
        ("fused_recurrent_retention", fused_recurrent_retention, dict(), dict(g_gamma=retention_log_decay(H))),
        ("chunk_lightning_attn", chunk_lightning_attn, dict(layer_idx=2, num_layers=6),
         dict(g_gamma=lightning_log_decay(H, 2, 6))),
        ("fused_recurrent_lightning_attn", fused_recurrent_lightning_attn, dict(layer_idx=0, num_layers=4),
         dict(g_gamma=lightning_log_decay(H, 0, 4))),
        ("chunk_gla", chunk_gla, dict(g=g4), dict(g=g4)),
        ("fused_recurrent_gla_gk", fused_recurrent_gla, dict(gk=g4), dict(g=g4)),
        ("fused_recurrent_gla_gk_gv", fused_recurrent_gla, dict(gk=g4, gv=gv), dict(g=g4, gv=gv)),
        ("fused_recurrent_gla_none", fused_recurrent_gla, dict(), dict()),
    ]


OP_CASES = _op_cases()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", OP_CASES, ids=[c[0] for c in OP_CASES])
def test_op_matches_reference(case, dtype):
    _, op, kwargs, ref_gates = case
    if ref_gates is None:
        ref_gates = dict(g_gamma=kwargs["g_gamma"])
    q, k, v = qkv(dtype)
    state = h0()
    o, final = op(q, k, v, **kwargs, scale=0.25, initial_state=state, output_final_state=True)
    assert o.dtype == dtype and o.shape == (B, T, H, V)
    assert final.dtype == torch.float32 and final.shape == (B, H, K, V)
    ref_gates = {n: x.double() for n, x in ref_gates.items()}
    o_ref, final_ref = linear_attn_recurrent_ref(q.double(), k.double(), v.double(), **ref_gates, scale=0.25,
                                                 initial_state=state.double(), output_final_state=True)
    tol = 1e-5 if dtype == torch.float32 else 1e-2  # output rounding only: the math runs in fp32
    assert rms_ratio(o, o_ref) < tol
    assert rms_ratio(final, final_ref) < 1e-5
    o2, none = op(q, k, v, **kwargs)
    assert none is None and o2.dtype == dtype


@pytest.mark.parametrize("chunk_op,recurrent_op,kwargs", [
    (chunk_simple_gla, fused_recurrent_simple_gla, dict(g=gate(B, T, H, n=0.1))),
    (chunk_retention, fused_recurrent_retention, dict()),
    (chunk_lightning_attn, fused_recurrent_lightning_attn, dict(layer_idx=1, num_layers=3)),
    (chunk_gla, None, dict(g=gate(B, T, H, K, n=0.1))),
], ids=["simple_gla", "retention", "lightning", "gla"])
def test_chunk_and_recurrent_agree(chunk_op, recurrent_op, kwargs):
    q, k, v = qkv()
    o_c, s_c = chunk_op(q, k, v, **kwargs, initial_state=h0(), output_final_state=True)
    if recurrent_op is None:
        o_r, s_r = fused_recurrent_gla(q, k, v, gk=kwargs["g"], initial_state=h0(), output_final_state=True)
    else:
        o_r, s_r = recurrent_op(q, k, v, **kwargs, initial_state=h0(), output_final_state=True)
    assert rms_ratio(o_c, o_r) < 1e-5 and rms_ratio(s_c, s_r) < 1e-5


def test_default_scale():
    q, k, v = qkv()
    torch.testing.assert_close(chunk_simple_gla(q, k, v)[0], chunk_simple_gla(q, k, v, scale=K ** -0.5)[0])


def test_fp64_cpu_inputs_and_state():
    q, k, v = qkv(torch.float64)
    o, final = chunk_gla(q, k, v, gate(B, T, H, K, dtype=torch.float64), initial_state=h0().double(),
                         output_final_state=True)
    assert o.dtype == torch.float64 and final.dtype == torch.float64


@pytest.mark.parametrize("op,kwargs", [(chunk_simple_gla, dict(g=gate(B, T, H))),
                                       (fused_recurrent_simple_gla, dict(g=gate(B, T, H))),
                                       (fused_recurrent_retention, dict()),
                                       (chunk_gla, dict(g=gate(B, T, H, K))),
                                       (fused_recurrent_gla, dict(gk=gate(B, T, H, K)))],
                         ids=["chunk_simple_gla", "fused_recurrent_simple_gla", "fused_recurrent_retention",
                              "chunk_gla", "fused_recurrent_gla"])
def test_state_v_first(op, kwargs):
    q, k, v = qkv()
    o, final = op(q, k, v, **kwargs, initial_state=h0(), output_final_state=True)
    o_t, final_t = op(q, k, v, **kwargs, initial_state=h0().transpose(-1, -2).contiguous(), output_final_state=True,
                      state_v_first=True)
    assert final_t.shape == (B, H, V, K)
    torch.testing.assert_close(o_t, o)
    torch.testing.assert_close(final_t, final.transpose(-1, -2))


@pytest.mark.parametrize("op,kwargs", [(fused_recurrent_simple_gla, dict(g=gate(B, T, H))),
                                       (fused_recurrent_retention, dict()),
                                       (fused_recurrent_lightning_attn, dict(layer_idx=0, num_layers=2)),
                                       (fused_recurrent_gla, dict(gk=gate(B, T, H, K)))],
                         ids=["simple_gla", "retention", "lightning", "gla"])
def test_reverse_is_the_flipped_sequence(op, kwargs):
    q, k, v = qkv()
    o, final = op(q, k, v, **kwargs, reverse=True, output_final_state=True)
    flipped = {n: (x.flip(1) if isinstance(x, torch.Tensor) else x) for n, x in kwargs.items()}
    o_f, final_f = op(q.flip(1), k.flip(1), v.flip(1), **flipped, output_final_state=True)
    torch.testing.assert_close(o, o_f.flip(1))
    torch.testing.assert_close(final, final_f)


@pytest.mark.parametrize("index_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("op,gate_kw", [(chunk_simple_gla, "g3"), (fused_recurrent_simple_gla, "g3"),
                                        (chunk_gla, "g4"), (fused_recurrent_gla, "gk4"), (chunk_retention, None),
                                        (chunk_linear_attn, None)],
                         ids=["chunk_simple_gla", "fused_recurrent_simple_gla", "chunk_gla", "fused_recurrent_gla",
                              "chunk_retention", "chunk_linear_attn"])
def test_varlen_matches_per_sequence(op, gate_kw, index_dtype):
    lens = [9, 0, 70, 1]
    total = sum(lens)
    q, k, v = qkv(b=1, t=total)
    kwargs = {"g3": dict(g=gate(1, total, H)), "g4": dict(g=gate(1, total, H, K)),
              "gk4": dict(gk=gate(1, total, H, K)), None: {}}[gate_kw]
    if op is chunk_linear_attn:
        kwargs = dict(normalize=False)
    offsets = cu(lens, index_dtype)
    states = h0(len(lens))
    o, final = op(q, k, v, **kwargs, initial_state=states, output_final_state=True, cu_seqlens=offsets)
    assert final.shape == (len(lens), H, K, V)
    for n in range(len(lens)):
        s = slice(int(offsets[n]), int(offsets[n + 1]))
        piece = {name: x[:, s] if isinstance(x, torch.Tensor) else x for name, x in kwargs.items()}
        o_n, final_n = op(q[:, s], k[:, s], v[:, s], **piece, initial_state=states[n:n + 1], output_final_state=True)
        torch.testing.assert_close(o[:, s], o_n)
        torch.testing.assert_close(final[n:n + 1], final_n)


def test_cu_seqlens_cpu_is_accepted():
    lens = [5, 12]
    q, k, v = qkv(b=1, t=17)
    g = gate(1, 17, H)
    a = chunk_simple_gla(q, k, v, g, cu_seqlens=cu(lens), cu_seqlens_cpu=cu(lens, torch.int64))[0]
    torch.testing.assert_close(a, chunk_simple_gla(q, k, v, g, cu_seqlens=cu(lens))[0])


# --------------------------------------------------------------------------- chunk_linear_attn

def test_linear_attn_normalize_default_and_tuple_state():
    q, k, v = qkv()
    q, k = q.sigmoid(), k.sigmoid()
    z0 = torch.rand(B, 1, H, K)
    o, (kv, z) = chunk_linear_attn(q, k, v, initial_state=(h0(), z0), output_final_state=True)
    assert kv.shape == (B, H, K, V) and z.shape == (B, 1, H, K) and z.dtype == torch.float32
    o_ref, (kv_ref, z_ref) = linear_attn_ref(q.double(), k.double(), v.double(), initial_state=(h0().double(),
                                             z0.double()), output_final_state=True, normalize=True, chunked=False)
    assert rms_ratio(o, o_ref) < 1e-5 and rms_ratio(kv, kv_ref) < 1e-5
    torch.testing.assert_close(z.double(), z0.double() + k.double().sum(1, keepdim=True))
    o_default, none = chunk_linear_attn(q, k, v)
    assert none is None
    torch.testing.assert_close(o_default, chunk_linear_attn(q, k, v, normalize=True)[0])


def test_linear_attn_unnormalized_is_simple_gla_without_gate():
    q, k, v = qkv()
    o, s = chunk_linear_attn(q, k, v, initial_state=h0(), output_final_state=True, normalize=False)
    o2, s2 = chunk_simple_gla(q, k, v, initial_state=h0(), output_final_state=True)
    torch.testing.assert_close(o, o2)
    torch.testing.assert_close(s, s2)


# --------------------------------------------------------------------------- masked linear attention

@pytest.mark.parametrize("hk", [3, 1], ids=lambda h: f"HK{h}")
@pytest.mark.parametrize("mask_shape", [(T, T), (B, 1, T, T), (1, H, T, T), (B, H, 1, T)], ids=str)
def test_masked_matches_reference(mask_shape, hk):
    q, k, v = qkv(hk=hk)
    mask = torch.rand(*mask_shape)
    o = masked_linear_attention(q, k, v, mask)
    assert o.shape == (B, T, H, V) and o.dtype == torch.float32
    torch.testing.assert_close(o, masked_linear_attention_ref(q, k, v, mask))


def test_masked_decay_mask_equals_simple_gla():
    q, k, v = qkv()
    g = gate(B, T, H, n=0.5)
    o = masked_linear_attention(q, k, v, causal_decay_mask(g).float())
    assert rms_ratio(o, chunk_simple_gla(q, k, v, g)[0]) < 1e-5


def test_masked_gradients_including_mask():
    q, k, v = (x.double().requires_grad_() for x in qkv(b=1, t=5, hk=1))
    mask = torch.rand(1, H, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(masked_linear_attention, (q, k, v, mask), fast_mode=True)


def test_masked_bf16():
    q, k, v = qkv(torch.bfloat16)
    mask = torch.ones(T, T, dtype=torch.bfloat16).tril()
    o = masked_linear_attention(q, k, v, mask)
    assert o.dtype == torch.bfloat16
    assert rms_ratio(o, chunk_simple_gla(q.float(), k.float(), v.float())[0]) < 1e-2


# --------------------------------------------------------------------------- gradients through the API

@pytest.mark.parametrize("op,kwargs", [
    (chunk_simple_gla, dict(g=gate(1, 9, H, dtype=torch.float64))),
    (fused_recurrent_simple_gla, dict(g=gate(1, 9, H, dtype=torch.float64))),
    (chunk_gla, dict(g=gate(1, 9, H, K, dtype=torch.float64))),
    (fused_recurrent_gla, dict(gk=gate(1, 9, H, K, dtype=torch.float64))),
    (chunk_retention, dict()),
], ids=["chunk_simple_gla", "fused_recurrent_simple_gla", "chunk_gla", "fused_recurrent_gla", "chunk_retention"])
def test_gradcheck_api(op, kwargs):
    q, k, v = (x.double().requires_grad_() for x in qkv(b=1, t=9))
    state = h0(1).double().requires_grad_()
    gates = {n: x.clone().requires_grad_() for n, x in kwargs.items()}
    names = list(gates)

    def fn(q, k, v, state, *gate_values):
        return op(q, k, v, **dict(zip(names, gate_values)), initial_state=state, output_final_state=True)
    assert torch.autograd.gradcheck(fn, (q, k, v, state, *gates.values()), fast_mode=True)


def test_bf16_backward_gives_grads_in_input_dtype():
    q, k, v = (x.requires_grad_() for x in qkv(torch.bfloat16))
    g = gate(B, T, H, K, dtype=torch.bfloat16).requires_grad_()
    state = h0().requires_grad_()
    o, final = chunk_gla(q, k, v, g, initial_state=state, output_final_state=True)
    (o.float().sum() + final.sum()).backward()
    for x in (q, k, v, g):
        assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()
    assert state.grad.dtype == torch.float32


# --------------------------------------------------------------------------- argument errors

def call(op, **overrides):
    """op on good inputs (B, T, H, K, V above; fp16), with some arguments replaced."""
    q, k, v = qkv(torch.float16)
    args = dict(q=q, k=k, v=v)
    if op in (chunk_lightning_attn, fused_recurrent_lightning_attn):
        args.update(layer_idx=0, num_layers=2)
    if op is chunk_gla:
        args.update(g=gate(B, T, H, K))
    args.update(overrides)
    return lambda: op(**args)


def varlen(op=chunk_simple_gla, lens=(4, 6), **overrides):
    q, k, v = qkv(torch.float16, b=1, t=sum(lens))
    args = dict(q=q, k=k, v=v, cu_seqlens=cu(list(lens)))
    args.update(overrides)
    return lambda: op(**args)


def masked(**overrides):
    q, k, v = qkv(torch.float16, hk=1)
    args = dict(q=q, k=k, v=v, mask=torch.ones(T, T))
    args.update(overrides)
    return lambda: masked_linear_attention(**args)


def fp16(*shape):
    return torch.randn(*shape).half()


CSG, FRSG, FRG = chunk_simple_gla, fused_recurrent_simple_gla, fused_recurrent_gla
ERROR_CASES = [
    # (id, call, exception, text the message must contain)
    ("q_not_tensor", call(CSG, q=[[1.0]]), TypeError, "q must be a torch.Tensor"),
    ("q_int32", call(CSG, q=torch.ones(B, T, H, K, dtype=torch.int32)), TypeError, "q.dtype"),
    ("k_fp32_q_fp16", call(CSG, k=torch.randn(B, T, H, K)), TypeError, "k.dtype"),
    ("v_bf16", call(CSG, v=torch.randn(B, T, H, V).bfloat16()), TypeError, "v.dtype"),
    ("q_rank3", call(CSG, q=fp16(B, T, H * K)), ValueError, "q.dim()"),
    ("v_rank5", call(CSG, v=fp16(B, T, H, V, 1)), ValueError, "v.dim()"),
    ("k_batch", call(CSG, k=fp16(B + 1, T, H, K)), ValueError, "k.shape[:2]"),
    ("k_seqlen", call(CSG, k=fp16(B, T - 1, H, K)), ValueError, "k.shape[:2]"),
    ("k_heads", call(CSG, k=fp16(B, T, 1, K)), ValueError, "k.shape[2]"),
    ("k_head_dim", call(CSG, k=fp16(B, T, H, K + 1)), ValueError, "k.shape[3]"),
    ("v_heads", call(CSG, v=fp16(B, T, H + 1, V)), ValueError, "v.shape[:3]"),
    ("q_meta", call(CSG, q=torch.empty(B, T, H, K, dtype=torch.float16, device="meta")), ValueError, "q.device"),
    ("k_meta", call(CSG, k=torch.empty(B, T, H, K, dtype=torch.float16, device="meta")), ValueError, "k.device"),
    ("g_per_key_in_simple_gla", call(CSG, g=gate(B, T, H, K)), ValueError, "chunk_gla"),
    ("g_wrong_T", call(FRSG, g=gate(B, T + 1, H)), ValueError, "g.shape"),
    ("g_int", call(CSG, g=torch.zeros(B, T, H, dtype=torch.int64)), TypeError, "g.dtype"),
    ("g_list", call(CSG, g=[0.0]), TypeError, "g must be a torch.Tensor"),
    ("g_and_g_gamma", call(CSG, g=gate(B, T, H), g_gamma=torch.zeros(H)), ValueError, "g and g_gamma"),
    ("g_gamma_shape", call(FRSG, g_gamma=torch.zeros(H + 1)), ValueError, "g_gamma.shape"),
    ("g_gamma_2d", call(CSG, g_gamma=torch.zeros(1, H)), ValueError, "g_gamma.shape"),
    ("g_gamma_meta", call(CSG, g_gamma=torch.zeros(H, device="meta")), ValueError, "g_gamma.device"),
    ("g_scalar_in_gla", call(chunk_gla, g=gate(B, T, H)), ValueError, "chunk_simple_gla"),
    ("g_missing_in_gla", lambda: chunk_gla(*qkv(torch.float16)), TypeError, "g"),
    ("gk_shape", call(FRG, gk=gate(B, T, H, K + 1)), ValueError, "gk.shape"),
    ("gv_shape", call(FRG, gv=gate(B, T, H, K)), ValueError, "gv.shape"),
    ("scale_string", call(CSG, scale="0.1"), TypeError, "scale"),
    ("scale_bool", call(CSG, scale=True), TypeError, "scale"),
    ("scale_nan", call(CSG, scale=math.nan), ValueError, "scale"),
    ("state_fp16", call(CSG, initial_state=h0().half()), TypeError, "initial_state.dtype"),
    ("state_batch", call(CSG, initial_state=h0(B + 1)), ValueError, "initial_state.shape"),
    ("state_v_k_swapped", call(CSG, initial_state=h0().transpose(-1, -2)), ValueError, "[N, H, K, V]"),
    ("state_v_first_wrong_layout", call(FRSG, initial_state=h0(), state_v_first=True), ValueError, "[N, H, V, K]"),
    ("state_not_tensor", call(chunk_retention, initial_state=1.0), TypeError, "initial_state must be"),
    ("state_meta", call(CSG, initial_state=torch.empty(B, H, K, V, device="meta")), ValueError,
     "initial_state.device"),
    ("output_final_state_int", call(CSG, output_final_state=1), TypeError, "output_final_state"),
    ("reverse_none", call(FRSG, reverse=None), TypeError, "reverse"),
    ("state_v_first_str", call(chunk_gla, state_v_first="no"), TypeError, "state_v_first"),
    ("unknown_argument", call(CSG, head_first=False), TypeError, "head_first"),
    ("cu_seqlens_float", varlen(cu_seqlens=torch.tensor([0.0, 10.0])), TypeError, "cu_seqlens.dtype"),
    ("cu_seqlens_2d", varlen(cu_seqlens=cu([4, 6])[None]), ValueError, "cu_seqlens.shape"),
    ("cu_seqlens_len1", varlen(cu_seqlens=torch.zeros(1, dtype=torch.int32)), ValueError, "cu_seqlens.shape"),
    ("cu_seqlens_list", varlen(cu_seqlens=[0, 4, 10]), TypeError, "cu_seqlens must be a torch.Tensor"),
    ("cu_seqlens_batch_2", lambda: chunk_simple_gla(*qkv(torch.float16, b=2, t=10), cu_seqlens=cu([4, 6])),
     ValueError, "1 with cu_seqlens"),
    ("cu_seqlens_not_from_0", varlen(cu_seqlens=torch.tensor([1, 4, 10], dtype=torch.int32)), ValueError,
     "non-decreasing offsets from 0"),
    ("cu_seqlens_decreasing", varlen(cu_seqlens=torch.tensor([0, 6, 4, 10], dtype=torch.int32)), ValueError,
     "cu_seqlens"),
    ("cu_seqlens_short_of_T", varlen(cu_seqlens=cu([4, 5])), ValueError, "to q.shape[1] = 10"),
    ("cu_seqlens_past_T", varlen(op=FRG, cu_seqlens=cu([4, 7])), ValueError, "cu_seqlens"),
    ("cu_seqlens_meta", varlen(cu_seqlens=torch.zeros(3, dtype=torch.int32, device="meta")), ValueError,
     "cu_seqlens.device"),
    ("cu_seqlens_cpu_alone", call(CSG, cu_seqlens_cpu=cu([4, 6])), ValueError, "cu_seqlens_cpu"),
    ("cu_seqlens_cpu_differs", varlen(cu_seqlens_cpu=cu([5, 5])), ValueError, "cu_seqlens_cpu"),
    ("cu_seqlens_cpu_shape", varlen(cu_seqlens_cpu=cu([4, 6, 0])), ValueError, "cu_seqlens_cpu.shape"),
    ("state_count_varlen", varlen(initial_state=h0(3)), ValueError, "initial_state.shape"),
    ("layer_idx_negative", call(chunk_lightning_attn, layer_idx=-1), ValueError, "layer_idx"),
    ("layer_idx_past_last", call(fused_recurrent_lightning_attn, layer_idx=2, num_layers=2), ValueError,
     "layer_idx"),
    ("num_layers_0", call(chunk_lightning_attn, num_layers=0), ValueError, "num_layers"),
    ("layer_idx_float", call(chunk_lightning_attn, layer_idx=1.0), TypeError, "layer_idx"),
    ("normalize_int", call(chunk_linear_attn, normalize=1), TypeError, "normalize"),
    ("normalize_tensor_state", call(chunk_linear_attn, initial_state=h0()), TypeError, "a tuple (kv_state"),
    ("unnormalized_tuple_state", call(chunk_linear_attn, normalize=False, initial_state=(h0(), h0())), TypeError,
     "normalize=False"),
    ("z_state_shape", call(chunk_linear_attn, initial_state=(h0(), torch.zeros(B, H, K))), ValueError,
     "initial_state[1] (z_state).shape"),
    ("z_state_fp16", call(chunk_linear_attn, initial_state=(h0(), torch.zeros(B, 1, H, K).half())), TypeError,
     "z_state"),
    ("mask_not_broadcastable", masked(mask=torch.ones(T, T + 1)), ValueError, "mask.shape"),
    ("mask_wrong_heads", masked(mask=torch.ones(1, 2, T, T)), ValueError, "broadcastable to [B, H, T, T]"),
    ("mask_rank5", masked(mask=torch.ones(1, 1, 1, T, T)), ValueError, "mask.shape"),
    ("mask_int", masked(mask=torch.ones(T, T, dtype=torch.int64)), TypeError, "mask.dtype"),
    ("mask_not_tensor", masked(mask=1.0), TypeError, "mask must be a torch.Tensor"),
    ("mask_meta", masked(mask=torch.ones(T, T, device="meta")), ValueError, "mask.device"),
    ("masked_kv_heads_not_divisor", masked(k=fp16(B, T, 2, K), v=fp16(B, T, 2, V)), ValueError, "kv heads"),
    ("masked_k_seqlen", masked(k=fp16(B, T + 1, 1, K), v=fp16(B, T + 1, 1, V)), ValueError, "k.shape[:2]"),
]


@pytest.mark.parametrize("make_call,exc,text", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_argument_errors(make_call, exc, text):
    with pytest.raises(exc) as info:
        make_call()
    assert text in str(info.value)


def test_messages_name_expected_and_actual():
    with pytest.raises(ValueError) as info:
        call(CSG, g=gate(B, T, H, K))()
    assert str(info.value) == (f"flash_attn: g.shape must be [B, T, H] = {(B, T, H)} (one log-gate per head and "
                               f"step; per-key gates [B, T, H, K] are chunk_gla's), got {(B, T, H, K)}")


# --------------------------------------------------------------------------- the CUDA route

ALL_OPS = [
    ("chunk_simple_gla", lambda x: chunk_simple_gla(*x)),
    ("fused_recurrent_simple_gla", lambda x: fused_recurrent_simple_gla(*x)),
    ("chunk_retention", lambda x: chunk_retention(*x)),
    ("fused_recurrent_retention", lambda x: fused_recurrent_retention(*x)),
    ("chunk_lightning_attn", lambda x: chunk_lightning_attn(*x, 0, 2)),
    ("fused_recurrent_lightning_attn", lambda x: fused_recurrent_lightning_attn(*x, 0, 2)),
    ("chunk_linear_attn", lambda x: chunk_linear_attn(*x)),
    ("chunk_gla", lambda x: chunk_gla(*x, torch.zeros(*x[0].shape, device=x[0].device))),
    ("fused_recurrent_gla", lambda x: fused_recurrent_gla(*x)),
    ("masked_linear_attention", lambda x: masked_linear_attention(*x, torch.ones(T, T, device=x[0].device))),
]


@pytest.mark.parametrize("name,run", ALL_OPS, ids=[n for n, _ in ALL_OPS])
def test_every_op_routes_cuda_to_not_implemented(name, run, monkeypatch):
    """CPU tensors, with the route told they are on CUDA and that the linear-attention
    extension is missing: each op checks its arguments and then stops at the CUDA route,
    whose message names it (tests/test_linear_kernel_route_cpu.py runs the route itself)."""
    monkeypatch.setattr(la._kernels, "on_kernel_device", lambda x: True)
    monkeypatch.setattr(la._kernels, "KERNEL_DTYPES", (torch.float32,))
    monkeypatch.setattr(la._kernels, "extension", lambda: None)
    with pytest.raises(NotImplementedError, match=f"flash_attn.linear_attn.{name}: the CUDA"):
        run(qkv())
