"""Shared pytest setup: the `cuda` marker for GPU tests, skipped without a GPU; fixtures."""
import pytest
import torch


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped when none is visible)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA GPU visible")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def ieee_fp32_matmul():
    """fp32 references must really be fp32: no TF32 in their matmuls (GPU test modules use it)."""
    matmul = torch.backends.cuda.matmul
    # torch >= 2.9 has fp32_precision; mixing it with the legacy allow_tf32 flag can raise
    name, value = ("fp32_precision", "ieee") if hasattr(matmul, "fp32_precision") else ("allow_tf32", False)
    old = getattr(matmul, name)
    setattr(matmul, name, value)
    yield
    setattr(matmul, name, old)


@pytest.fixture
def route_to_model(monkeypatch):
    """route_to_model(m) sends CPU tensors (float64 too) down flash_attn.linear_attn's CUDA route
    with m, a model of flash_attn_linear_cuda, as the extension; returns m. The chunked forward
    takes the two-pass route (FLASH_ATTN_LINEAR_FUSED_FWD=0) unless a test turns the one-pass
    route back on, with a stand-in SM count m.sms (default 1)."""
    from flash_attn.linear_attn import _kernels

    def route(m):
        monkeypatch.setenv(_kernels.FUSED_FWD_ENV, "0")
        m.sms = 1
        monkeypatch.setattr(_kernels, "num_sms", lambda device: m.sms)
        monkeypatch.setattr(_kernels, "extension", lambda: m)
        monkeypatch.setattr(_kernels, "on_kernel_device", lambda x: True)
        monkeypatch.setattr(_kernels, "KERNEL_DTYPES", (torch.float16, torch.bfloat16, torch.float32, torch.float64))
        return m

    return route
