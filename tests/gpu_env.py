"""What the GPU test files share: environment switches, why the kernels cannot run here
(if they cannot), and the module marks that skip or, under FLASH_ATTN_REQUIRE_CUDA=1,
fail instead.

  FLASH_ATTN_TEST_QUICK=1    each file runs a representative subset
  FLASH_ATTN_REQUIRE_CUDA=1  a missing GPU or extension fails the tests instead of
                             skipping them (scripts/device_run.sh sets it)
"""
import os

import pytest
import torch

from flash_attn import build_info
from flash_attn._bench import ours_unavailable_reason

QUICK = os.environ.get("FLASH_ATTN_TEST_QUICK", "").strip() not in ("", "0")
REQUIRE_CUDA = os.environ.get("FLASH_ATTN_REQUIRE_CUDA", "").strip() not in ("", "0")


def unavailable_reason(need_backward=False):
    """Why the CUDA kernels cannot run here, or None when they can."""
    reason = ours_unavailable_reason()
    if reason is None and need_backward and not hasattr(build_info.cuda_extension(), "bwd"):
        return "the extension has no backward (FLASH_ATTN_DISABLE_BACKWARD or an older build)"
    return reason


def gpu_marks(reason):
    """Module marks: `cuda`, IEEE fp32 matmuls for the reference (the `ieee_fp32_matmul`
    fixture of conftest.py), and a skip for `reason` unless FLASH_ATTN_REQUIRE_CUDA is set."""
    marks = [pytest.mark.cuda, pytest.mark.usefixtures("ieee_fp32_matmul")]
    if not REQUIRE_CUDA:
        marks.append(pytest.mark.skipif(reason is not None, reason=str(reason)))
    return marks


def poison_allocator(*tensors_like):
    """Fills freed blocks of torch's caching allocator with NaN, sized like the outputs to
    come ((shape, dtype) pairs), so an output element a kernel never writes reads as NaN."""
    blocks = []
    for shape, dtype in tensors_like:
        for _ in range(3):
            blocks.append(torch.full(shape, float("nan"), device="cuda", dtype=dtype))
    del blocks


def max_abs(a, b):
    """max |a - b| in fp32 (0 for empty tensors)."""
    return 0.0 if a.numel() == 0 else (a.float() - b.float()).abs().max().item()


DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16"}
_VARIANTS = {(False, False): "plain", (True, False): "alibi", (False, True): "softcap", (True, True): "alibi_softcap"}


def require_compiled(dtype, head_dim=None, alibi=False, softcap=False, dropout=False, paged=False):
    """Skips a case that this build cannot run (trimmed dtypes, head dims or variants).
    dropout: the `dropout` variant (which also serves ALiBi with dropout). paged: the paged-KV
    kernels (block_table), which exist for head dims 64, 128 and 256 (others run on the next)."""
    cfg = build_info.build_config()
    name = DTYPE_NAMES[dtype]
    if name not in cfg.get("dtypes", []):
        pytest.skip(f"{name} not compiled in this build")
    if head_dim is not None and not any(h >= head_dim for h in build_info.compiled_head_dims()):
        pytest.skip(f"no compiled head dim >= {head_dim}")
    if paged:
        if "paged" not in cfg.get("variants", []):
            pytest.skip("paged-KV kernels not compiled in this build")
        if head_dim is not None and not any(h >= head_dim and h in (64, 128, 256)
                                            for h in build_info.compiled_head_dims()):
            pytest.skip(f"no paged-KV kernel for head dim {head_dim} in this build")
    variant = "dropout" if dropout else _VARIANTS[(bool(alibi), bool(softcap))]
    if variant not in cfg.get("variants", []):
        pytest.skip(f"variant {variant} not compiled in this build")
