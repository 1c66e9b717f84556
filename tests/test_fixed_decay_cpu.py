"""The cached fixed decays of retention / Lightning Attention (flash_attn/linear_attn/_fixed_decay.py)
equal the reference formulas, are built once per (parameters, device), and the ops use them."""
import torch

from flash_attn.linear_attn import _fixed_decay
from flash_attn.linear_attn import chunk_retention, fused_recurrent_retention
from flash_attn.reference_linear import lightning_log_decay, retention_log_decay


def test_cached_decays_equal_the_formulas_and_are_reused():
    a = _fixed_decay.retention_decay(6, "cpu")
    assert torch.equal(a, retention_log_decay(6))
    assert _fixed_decay.retention_decay(6, torch.device("cpu")) is a
    assert _fixed_decay.retention_decay(7, "cpu").shape == (7,)
    b = _fixed_decay.lightning_decay(4, 2, 12, "cpu")
    assert torch.equal(b, lightning_log_decay(4, 2, 12))
    assert _fixed_decay.lightning_decay(4, 2, 12, "cpu") is b
    assert not torch.equal(_fixed_decay.lightning_decay(4, 3, 12, "cpu"), b)


def test_retention_ops_match_after_the_cache_is_warm():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 9, 3, 8, generator=gen) for _ in range(3))
    first = fused_recurrent_retention(q, k, v)[0]
    again = fused_recurrent_retention(q, k, v)[0]
    chunk = chunk_retention(q, k, v)[0]
    assert torch.equal(first, again)
    torch.testing.assert_close(chunk, first, rtol=1e-4, atol=1e-4)
