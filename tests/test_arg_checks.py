"""Every malformed call raises before any computation, with a message naming the argument."""
import pytest
import torch

from flash_attn import (flash_attn_func, flash_attn_kvpacked_func, flash_attn_qkvpacked_func,
                        flash_attn_varlen_func, flash_attn_varlen_kvpacked_func,
                        flash_attn_varlen_qkvpacked_func)

B, SQ, SK, H, HK, D = 2, 5, 7, 4, 2, 16


def q_(**kw):
    return torch.randn(B, SQ, H, D, dtype=torch.float16, **kw)


def kv_(**kw):
    return torch.randn(B, SK, HK, D, dtype=torch.float16, **kw)


def dense(**overrides):
    """flash_attn_func on good inputs, with some arguments replaced."""
    args = dict(q=q_(), k=kv_(), v=kv_())
    args.update(overrides)
    return lambda: flash_attn_func(**args)


def cu(lens):
    return torch.tensor([0] + lens).cumsum(0).to(torch.int32)


def varlen(**overrides):
    """flash_attn_varlen_func on good inputs (2 sequences), with some arguments replaced."""
    args = dict(q=torch.randn(9, H, D, dtype=torch.float16), k=torch.randn(11, HK, D, dtype=torch.float16),
                v=torch.randn(11, HK, D, dtype=torch.float16), cu_seqlens_q=cu([4, 5]),
                cu_seqlens_k=cu([6, 5]), max_seqlen_q=5, max_seqlen_k=6)
    args.update(overrides)
    return lambda: flash_attn_varlen_func(**args)


def strided_last_dim():
    return torch.randn(B, SQ, H, 2 * D, dtype=torch.float16)[..., ::2]


CASES = [
    # (id, call, exception, text the message must contain)
    ("q_not_tensor", dense(q=[[1.0]]), TypeError, "q must be a torch.Tensor"),
    ("q_int32", dense(q=q_().int()), TypeError, "q.dtype"),
    ("q_fp32_k_fp16", dense(q=q_().float()), TypeError, "k.dtype"),
    ("v_bf16", dense(v=kv_().bfloat16()), TypeError, "v.dtype"),
    ("q_rank3", dense(q=q_()[0]), ValueError, "q.dim()"),
    ("v_rank5", dense(v=kv_()[None]), ValueError, "v.dim()"),
    ("k_batch", dense(k=kv_()[:1], v=kv_()[:1]), ValueError, "k.shape[0]"),
    ("v_seqlen", dense(v=kv_()[:, :3]), ValueError, "v.shape"),
    ("head_dim_300", dense(q=torch.randn(B, SQ, H, 300).half(), k=torch.randn(B, SK, HK, 300).half(),
                           v=torch.randn(B, SK, HK, 300).half()), ValueError, "head dim"),
    ("head_dim_mismatch", dense(k=kv_()[..., :8], v=kv_()[..., :8]), ValueError, "k.shape[-1]"),
    ("nheads_not_divisible", dense(k=torch.randn(B, SK, 3, D).half(), v=torch.randn(B, SK, 3, D).half()),
     ValueError, "nheads_k"),
    ("q_last_stride", dense(q=strided_last_dim()), ValueError, "q.stride(-1)"),
    ("k_meta_device", dense(k=kv_(device="meta")), ValueError, "k.device"),
    ("q_meta_device", dense(q=q_(device="meta")), ValueError, "q.device"),
    ("window_below_minus_1", dense(window_size=(-2, 0)), ValueError, "window_size"),
    ("window_int", dense(window_size=4), TypeError, "window_size"),
    ("window_float", dense(window_size=(1.5, 0)), TypeError, "window_size"),
    ("window_three", dense(window_size=(1, 2, 3)), TypeError, "window_size"),
    ("softcap_negative", dense(softcap=-1.0), ValueError, "softcap"),
    ("dropout_1", dense(dropout_p=1.0), ValueError, "dropout_p"),
    ("dropout_negative", dense(dropout_p=-0.1), ValueError, "dropout_p"),
    ("dropout_string", dense(dropout_p="0.1"), ValueError, "dropout_p"),
    ("alibi_list", dense(alibi_slopes=[0.1] * H), TypeError, "alibi_slopes"),
    ("alibi_fp16", dense(alibi_slopes=torch.ones(H).half()), TypeError, "alibi_slopes.dtype"),
    ("alibi_wrong_heads", dense(alibi_slopes=torch.ones(H + 1)), ValueError, "alibi_slopes.shape"),
    ("alibi_wrong_batch", dense(alibi_slopes=torch.ones(B + 1, H)), ValueError, "alibi_slopes.shape"),
    ("alibi_rank3", dense(alibi_slopes=torch.ones(B, H, 1)), ValueError, "alibi_slopes.shape"),
    ("alibi_meta", dense(alibi_slopes=torch.ones(H, device="meta")), ValueError, "alibi_slopes.device"),
    ("qkv_rank4", lambda: flash_attn_qkvpacked_func(torch.randn(B, SQ, 3, H).half()), ValueError, "qkv.dim()"),
    ("qkv_not_3", lambda: flash_attn_qkvpacked_func(torch.randn(B, SQ, 2, H, D).half()), ValueError,
     "qkv.shape[2]"),
    ("kv_not_2", lambda: flash_attn_kvpacked_func(q_(), torch.randn(B, SK, 3, HK, D).half()), ValueError,
     "kv.shape[2]"),
    ("kv_not_tensor", lambda: flash_attn_kvpacked_func(q_(), None), TypeError, "kv must be a torch.Tensor"),
    ("varlen_qkv_not_3", lambda: flash_attn_varlen_qkvpacked_func(torch.randn(9, 2, H, D).half(), cu([4, 5]), 5),
     ValueError, "qkv.shape[1]"),
    ("varlen_kv_rank5", lambda: flash_attn_varlen_kvpacked_func(torch.randn(9, H, D).half(),
                                                                torch.randn(1, 11, 2, HK, D).half(),
                                                                cu([4, 5]), cu([6, 5]), 5, 6),
     ValueError, "kv.dim()"),
    ("varlen_q_rank4", varlen(q=torch.randn(1, 9, H, D).half()), ValueError, "q.dim()"),
    ("varlen_v_total", varlen(v=torch.randn(10, HK, D).half()), ValueError, "v.shape"),
    ("cu_q_int64", varlen(cu_seqlens_q=cu([4, 5]).long()), TypeError, "cu_seqlens_q.dtype"),
    ("cu_q_not_tensor", varlen(cu_seqlens_q=[0, 4, 9]), TypeError, "cu_seqlens_q"),
    ("cu_k_2d", varlen(cu_seqlens_k=cu([6, 5])[None]), ValueError, "cu_seqlens_k.shape"),
    ("cu_q_empty", varlen(cu_seqlens_q=torch.zeros(0, dtype=torch.int32)), ValueError, "cu_seqlens_q.shape"),
    ("cu_lengths_differ", varlen(cu_seqlens_k=cu([6, 3, 2])), ValueError, "cu_seqlens_k.shape"),
    ("cu_k_non_contiguous", varlen(cu_seqlens_k=cu([3, 3, 2, 3])[::2]), ValueError, "cu_seqlens_k"),
    ("cu_q_meta", varlen(cu_seqlens_q=cu([4, 5]).to("meta")), ValueError, "cu_seqlens_q.device"),
    ("cu_q_not_from_0", varlen(cu_seqlens_q=torch.tensor([1, 4, 9], dtype=torch.int32)), ValueError,
     "cu_seqlens_q"),
    ("cu_q_decreasing", varlen(cu_seqlens_q=torch.tensor([0, 6, 5], dtype=torch.int32)), ValueError,
     "cu_seqlens_q"),
    ("cu_k_past_total", varlen(cu_seqlens_k=cu([6, 6])), ValueError, "cu_seqlens_k"),
    ("max_seqlen_q_float", varlen(max_seqlen_q=5.0), TypeError, "max_seqlen_q"),
    ("max_seqlen_k_none", varlen(max_seqlen_k=None), TypeError, "max_seqlen_k"),
    ("max_seqlen_k_bool", varlen(max_seqlen_k=True), TypeError, "max_seqlen_k"),
    ("max_seqlen_q_negative", varlen(max_seqlen_q=-1), ValueError, "max_seqlen_q"),
    ("varlen_alibi_batch", varlen(alibi_slopes=torch.ones(B + 1, H)), ValueError, "alibi_slopes.shape"),
    ("varlen_window", varlen(window_size=(0, -3)), ValueError, "window_size"),
    ("block_table_unpaged_k", varlen(block_table=torch.zeros(2, 1, dtype=torch.int32)), ValueError,
     "k.dim()"),
]


@pytest.mark.parametrize("call,exc,text", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_malformed_call_raises(call, exc, text):
    with pytest.raises(exc) as info:
        call()
    message = str(info.value)
    assert text in message
    if exc is not NotImplementedError:
        assert "must be" in message and "got" in message  # expected and actual value
