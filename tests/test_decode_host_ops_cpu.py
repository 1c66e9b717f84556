"""Host work of a decode step on the CUDA route: the ATen ops that flash_attn_with_kvcache
dispatches around the extension call, counted on CPU.

The decode benchmark is launch bound (a step's GPU work is a few hundred microseconds, and each
small torch op costs the host several microseconds and the GPU one more kernel), so the common
decode call must run nothing but the extension: its kernels (attention, and the split-KV combine)
and its own allocations. The CUDA route's Python side (flash_attn._cuda) runs here on CPU tensors
against the stand-in extension of test_kvcache_cpu, under a TorchDispatchMode that records every
op outside the stand-in (whose computation is what the kernels do on a GPU). Ops are sorted into
views (no kernel), allocations (no kernel) and the rest, each of which launches at least one CUDA
kernel; the bounds below are today's counts, so a change that adds work fails here.

Counts before this budget existed (varlen_fwd with cu_seqlens built per call, q / out / lse
copied for GQA packing): 13 kernel ops for the plain decode step, 18 with an appended token,
16 and 25 for the paged cache.
"""
from collections import Counter

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from flash_attn import _checks, _cpu, _cuda, build_info, flash_attn_with_kvcache
from test_kvcache_cpu import FakeExtension

B, HQ, HK, D, CAPACITY, PAGE = 2, 32, 8, 128, 256, 64
ALLOCATIONS = {"empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided"}


def name(op):
    return op.__name__.split(".")[0]  # aten.add.Tensor -> add


def kind(op):
    """'view', 'alloc' or 'kernel' (an op that launches at least one kernel on a GPU). A view
    returns an alias of an input that it does not write (in-place ops return one they write)."""
    if name(op) in ALLOCATIONS:
        return "alloc"
    if name(op) == "_unsafe_view" or any(r.alias_info is not None and not r.alias_info.is_write
                                         for r in op._schema.returns):
        return "view"
    return "kernel"


class OpLog(TorchDispatchMode):
    """Records the ATen ops dispatched while active, except while paused (inside the extension)."""

    def __init__(self):
        super().__init__()
        self.ops, self.paused, self.ext_calls = [], False, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not self.paused:
            self.ops.append(func)
        return func(*args, **(kwargs or {}))

    def of(self, what):
        return Counter(name(op) for op in self.ops if kind(op) == what)


class CountedExtension(FakeExtension):
    """The stand-in extension; its own ops are not the route's and are left out of the log."""

    log = None

    def _call(self, entry, *args, **kwargs):
        if self.log is None:
            return getattr(super(), entry)(*args, **kwargs)
        self.log.paused = True
        self.log.ext_calls += 1
        try:
            return getattr(super(), entry)(*args, **kwargs)
        finally:
            self.log.paused = False

    def fwd(self, *args, **kwargs):
        return self._call("fwd", *args, **kwargs)

    def varlen_fwd(self, *args, **kwargs):
        return self._call("varlen_fwd", *args, **kwargs)


@pytest.fixture
def cuda_route(monkeypatch):
    """flash_attn_with_kvcache on CPU tensors takes the CUDA route, with the CUDA value policy (no
    value read: FLASH_ATTN_DEBUG unset), against the counted stand-in extension."""
    ext = CountedExtension([64, 128, 256])
    monkeypatch.setattr(build_info, "cuda_extension", lambda: ext)
    monkeypatch.setattr(build_info, "compiled_head_dims", lambda: list(ext.head_dims))
    monkeypatch.setattr(build_info, "has_feature", lambda name: True)
    monkeypatch.setattr(_checks, "_reads_values", lambda device: False)
    monkeypatch.setattr(_cpu, "kvcache_forward", _cuda.kvcache_forward)
    return ext


def decode_args(paged, new_kv, hk=HK, seqlens="tensor"):
    """A decode step at the benchmark's layout (q (b, 1, 32, 128) bf16, 8 kv heads), small caches."""
    gen = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=gen).to(torch.bfloat16)

    kw = dict(q=randn(B, 1, HQ, D), cache_seqlens=torch.tensor([5, 200], dtype=torch.int32))
    if seqlens == "int":
        kw["cache_seqlens"] = 100
    if paged:
        pages = B * CAPACITY // PAGE
        kw.update(k_cache=randn(pages, PAGE, hk, D), v_cache=randn(pages, PAGE, hk, D),
                  block_table=torch.randperm(pages, generator=gen).view(B, -1).to(torch.int32))
    else:
        kw.update(k_cache=randn(B, CAPACITY, hk, D), v_cache=randn(B, CAPACITY, hk, D))
    if new_kv:
        kw.update(k=randn(B, 1, hk, D), v=randn(B, 1, hk, D))
    return kw


def count(ext, kw):
    """The ops of one flash_attn_with_kvcache(**kw) call, after a warm-up call."""
    flash_attn_with_kvcache(**kw)
    log = ext.log = OpLog()
    try:
        with log:
            out = flash_attn_with_kvcache(**kw)
    finally:
        ext.log = None
    assert out.shape == kw["q"].shape
    return log


# name: (decode_args keywords, kernel ops allowed, what they are)
BUDGET = {
    "contiguous": (dict(paged=False, new_kv=False), 0, ""),
    "contiguous-mha": (dict(paged=False, new_kv=False, hk=HQ), 0, ""),
    "paged": (dict(paged=True, new_kv=False), 0, ""),
    # the int becomes an int32 (b,) tensor, as in flash-attn
    "contiguous-int-seqlens": (dict(paged=False, new_kv=False, seqlens="int"), 1, "full"),
    # clamp cache_seqlens, its int64 positions, 2 scatters, seqused_k = cache_seqlens + 1
    "contiguous-append": (dict(paged=False, new_kv=True), 5, "clamp _to_copy scatter_ scatter_ add"),
    # clamp, int64 positions, logical page (floor_divide), its block (gather, clamped, int64), slot
    # (remainder), 2 index_puts, seqused_k
    "paged-append": (dict(paged=True, new_kv=True), 10,
                     "clamp _to_copy floor_divide gather clamp _to_copy remainder index_put_ index_put_ add"),
}


@pytest.mark.parametrize("case", list(BUDGET))
def test_decode_step_host_ops(cuda_route, case):
    args, budget, expected = BUDGET[case]
    log = count(cuda_route, decode_args(**args))
    kernels = log.of("kernel")
    assert log.ext_calls == 1, "one extension call per decode step"
    assert sum(kernels.values()) <= budget, f"{case}: {sum(kernels.values())} ops launch kernels: {dict(kernels)}"
    assert set(kernels) <= set(expected.split()), f"{case}: {dict(kernels)}"
    # the output buffer, when the kernel writes the GQA-packed result through a view of it
    assert sum(log.of("alloc").values()) <= 1, dict(log.of("alloc"))
    # views launch nothing but cost host time too: q and out as GQA rows (2 each), lse (1), positions
    assert sum(log.of("view").values()) <= 8, dict(log.of("view"))


def test_op_kinds():
    """The sorting the budget relies on."""
    aten = torch.ops.aten
    assert [kind(op) for op in (aten.view.default, aten.transpose.int, aten._unsafe_view.default,
                                aten.slice.Tensor)] == ["view"] * 4
    assert [kind(op) for op in (aten.empty.memory_format, aten.new_empty.default)] == ["alloc"] * 2
    assert [kind(op) for op in (aten.clone.default, aten._to_copy.default, aten.add.Tensor,
                                aten.index_put_.default, aten.scatter_.src)] == ["kernel"] * 5
