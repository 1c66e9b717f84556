"""What this installation was built with (written by setup.py, read at run time)."""
import functools
import json
from pathlib import Path

_CONFIG_PATH = Path(__file__).with_name("_build_config.json")


@functools.lru_cache(maxsize=None)
def build_config() -> dict:
    """The configuration recorded at build time.

    Keys: version, cuda (bool: kernels were compiled), skip_reason (str or None),
    archs (["80", "90"]), head_dims ([32, 64, ...]), dtypes (["fp16", "bf16"]),
    variants (["plain", "alibi", "softcap", "alibi_softcap", "dropout"]).
    """
    try:
        return json.loads(_CONFIG_PATH.read_text())
    except FileNotFoundError:
        return {"cuda": False, "skip_reason": "package was not built by setup.py",
                "archs": [], "head_dims": [], "dtypes": [], "variants": []}


@functools.lru_cache(maxsize=None)
def cuda_extension():
    """The compiled extension module, or None when it was not built or fails to load."""
    if not build_config().get("cuda"):
        return None
    import torch  # noqa: F401  (the extension links against torch's libraries)
    import flash_attn_2_cuda
    return flash_attn_2_cuda


def compiled_head_dims() -> list:
    return list(build_config().get("head_dims", []))


def has_feature(variant: str) -> bool:
    """variant in {"alibi", "softcap", "dropout"}: whether kernels with that feature were built."""
    return any(variant in v for v in build_config().get("variants", []))
