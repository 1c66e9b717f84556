"""GPU test: a decode step of flash_attn_with_kvcache captured in a CUDA graph and replayed.

The step appends one new token (k, v) per sequence into the caches at cache_seqlens and
attends to the cache up to the new length, or (step "read") only attends to the first
cache_seqlens keys: then cache_seqlens itself is the kernel's seqused_k and the step runs
the kernels alone. The graph is captured once and replayed with new q, k, v and
cache_seqlens written into the captured input tensors (the serving pattern: no host reads
inside the step, so capture works). After each replay the output is compared with the
reference on the updated caches (2x rule of shared/TESTING.md) and the caches must hold
the appended tokens. Paged (block_table) and contiguous caches, GQA, rotary off and on.

Marked `cuda`; skips without a GPU or the extension.
"""
import pytest
import torch

from flash_attn import build_info
from gpu_env import gpu_marks, max_abs, require_compiled, unavailable_reason

UNAVAILABLE = unavailable_reason()
pytestmark = gpu_marks(UNAVAILABLE)


def _dtype():
    return torch.bfloat16 if "bf16" in build_info.build_config().get("dtypes", []) else torch.float16


@pytest.mark.cuda
@pytest.mark.parametrize("paged", [False, True], ids=["contiguous", "paged16"])
@pytest.mark.parametrize("step", ["append", "append-rotary", "read"])
def test_decode_step_replays_in_a_cuda_graph(paged, step):
    from flash_attn import flash_attn_with_kvcache
    from flash_attn.reference import kvcache_ref

    rotary, append = step == "append-rotary", step != "read"
    dtype = _dtype()
    d = 128
    require_compiled(dtype, d, paged=paged)
    b, hq, hk, capacity, page = 3, 8, 2, 256, 16
    gen = torch.Generator(device="cuda").manual_seed(11 + 2 * paged + rotary)

    def randn(*shape):
        return torch.randn(*shape, device="cuda", generator=gen).to(dtype)

    if paged:
        # capacity / page pages per sequence, scattered over the pool by a fixed permutation
        per_seq = capacity // page
        block_table = torch.randperm(b * per_seq, device="cuda", generator=gen).view(b, per_seq).to(torch.int32)
        k_cache, v_cache = randn(b * per_seq, page, hk, d), randn(b * per_seq, page, hk, d)
    else:
        block_table = None
        k_cache, v_cache = randn(b, capacity, hk, d), randn(b, capacity, hk, d)
    if rotary:
        angles = torch.rand(capacity, d // 4, device="cuda", generator=gen) * 6.28
        cos, sin = angles.cos().to(dtype), angles.sin().to(dtype)
    else:
        cos = sin = None

    # The captured step's inputs (static buffers the replays refill) and its output.
    q, k, v = randn(b, 1, hq, d), randn(b, 1, hk, d), randn(b, 1, hk, d)
    cache_seqlens = torch.tensor([5, 100, 0], dtype=torch.int32, device="cuda")

    def step():
        new_k, new_v = (k, v) if append else (None, None)
        return flash_attn_with_kvcache(q, k_cache, v_cache, new_k, new_v, rotary_cos=cos, rotary_sin=sin,
                                       cache_seqlens=cache_seqlens, causal=True, block_table=block_table,
                                       rotary_interleaved=False)

    # Warm up on a side stream (as torch's graph docs ask), on a copy of the caches so the
    # captured run starts from the same state as the checks below.
    saved = (k_cache.clone(), v_cache.clone())
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step()
    torch.cuda.current_stream().wait_stream(side)
    k_cache.copy_(saved[0])
    v_cache.copy_(saved[1])

    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()

    for lens in ([5, 100, 0], [6, 101, 1], [200, 17, 254]):
        q.copy_(randn(*q.shape))
        k.copy_(randn(*k.shape))
        v.copy_(randn(*v.shape))
        cache_seqlens.copy_(torch.tensor(lens, dtype=torch.int32, device="cuda"))
        before = (k_cache.clone(), v_cache.clone())
        graph.replay()
        torch.cuda.synchronize()

        # The reference on the caches as they were before this replay, with the same append.
        kw = dict(rotary_cos=cos, rotary_sin=sin, cache_seqlens=cache_seqlens, causal=True,
                  block_table=block_table, rotary_interleaved=False)
        kc, vc = before[0].clone(), before[1].clone()
        new_k, new_v = (k.clone(), v.clone()) if append else (None, None)
        ref, _ = kvcache_ref(q, kc, vc, new_k, new_v, **kw)
        kc2, vc2 = before[0].clone(), before[1].clone()
        ref_pt, _ = kvcache_ref(q, kc2, vc2, new_k, new_v, upcast=False, **kw)
        assert torch.isfinite(out).all(), f"lens {lens}: non-finite output"
        err, bound = max_abs(out, ref), 2 * max_abs(ref_pt, ref) + 1e-5
        assert err <= bound, f"lens {lens}: max err {err:.3e} > allowed {bound:.3e}"
        # The caches now hold this replay's token (v exactly; k within the rotary's rounding).
        assert torch.equal(v_cache, vc), f"lens {lens}: v_cache differs from the reference's append"
        assert max_abs(k_cache, kc) <= (0.02 if rotary else 0.0), f"lens {lens}: k_cache append differs"
