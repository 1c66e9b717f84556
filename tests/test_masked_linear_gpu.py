"""GPU tests of masked linear attention's kernels (csrc/linear_attn/masked_attn.cuh and
mask_grad.cuh, extension flash_attn_linear_cuda).

Two layers:
  1. each launcher against tests/masked_ext_model.py (a float64 model of it) on the same inputs
     (head groups both ways, transposed and broadcast mask views, every mask dtype, N tiles),
     so a failure names the kernel that is wrong;
  2. masked_linear_attention against the fp32 reference
     (flash_attn.reference_linear.masked_linear_attention_ref), forward and the gradients of
     q, k, v and the mask through autograd: random and decay masks, masks [T, T], [B, H, T, T]
     and [1, H, T, T], T from 1 to 2048, MQA/GQA, padded head dims, mask dtypes.
Rule (shared/TESTING.md, linear attention): RMS(out - ref) / RMS(ref) < 0.005 for outputs, < 0.008
for gradients. Outputs are NaN-poisoned through the caching allocator.

Environment: FLASH_ATTN_TEST_QUICK=1 (subset), FLASH_ATTN_REQUIRE_CUDA=1 (fail, not skip).
"""
import pytest
import torch

import flash_attn.linear_attn as la
from flash_attn.linear_attn import _kernels
from flash_attn.reference_linear import masked_linear_attention_ref
from gpu_env import QUICK, gpu_marks, poison_allocator
from masked_ext_model import MaskedExtModel
from test_linear_attn_gpu import DTYPES, GRAD_TOL, OUT_TOL, check, rand


def _reason():
    reason = _kernels.unavailable_reason()
    if reason is None and not torch.cuda.is_available():
        reason = "no CUDA device is visible to torch"
    if reason is None and not hasattr(_kernels.extension(), "masked_attn"):
        reason = "flash_attn_linear_cuda was built without the masked kernels (rebuild it)"
    return reason


UNAVAILABLE = _reason()
pytestmark = gpu_marks(UNAVAILABLE)

MASK_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "bool": torch.bool}
MODEL = MaskedExtModel()


def ext():
    return _kernels.extension()


def uniform(*shape, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    return torch.rand(*shape, generator=gen, device="cuda", dtype=torch.float32)


SHAPES = {"TT": lambda B, H, T: (T, T), "BHTT": lambda B, H, T: (B, H, T, T), "1HTT": lambda B, H, T: (1, H, T, T),
          "B1TT": lambda B, H, T: (B, 1, T, T), "BH1T": lambda B, H, T: (B, H, 1, T),
          "BHT1": lambda B, H, T: (B, H, T, 1), "1111": lambda B, H, T: (1, 1, 1, 1)}


def make_mask(kind, shape, B, H, T, dtype, seed=5):
    """kind: rand (uniform in [0, 1)), randn, decay (M[i, j] = gamma^(i - j) for i >= j, else 0,
    gamma per head in [0.9, 0.999], one for a mask without heads), bool (random lower triangle)."""
    size = SHAPES[shape](B, H, T)
    if kind == "rand":
        m = uniform(*size, seed=seed)
    elif kind == "randn":
        m = rand(*size, dtype=torch.float32, seed=seed)
    elif kind == "decay":
        heads = size[-3] if len(size) >= 3 else 1
        gamma = 0.9 + 0.099 * uniform(heads, seed=seed)  # [heads]
        i = torch.arange(T, device="cuda")
        dist = (i[:, None] - i[None, :]).float()  # i - j
        m = torch.where(dist >= 0, gamma[:, None, None] ** dist.clamp_min(0), 0.0)  # [heads, T, T]
        m = m.expand(*size[:-2], T, T) if len(size) >= 3 else m[0]
        m = m.contiguous()
    else:
        m = (uniform(*size, seed=seed) < 0.7) & torch.ones(T, T, dtype=torch.bool, device="cuda").tril()
    return m.to(dtype)


def mask_view(base, B, Hq, T, transposed):
    m = base[(None,) * (4 - base.dim())].expand(B, Hq, T, T)
    return m.transpose(2, 3) if transposed else m


# --------------------------------------------------------------------------- 1. launchers vs the model

ATTN_CASES = [
    # (dtype, R, N, Hx, Hy, T, mask dtype, mask shape, transposed)
    ("bf16", 128, 128, 4, 4, 113, "fp32", "BHTT", False),
    ("fp16", 64, 256, 4, 1, 200, "bf16", "TT", False),       # MQA as in the forward; two 128-column N tiles
    ("bf16", 256, 64, 1, 4, 129, "fp16", "1HTT", True),      # dk / dv: a kv head sums over its 4 query heads
    ("bf16", 256, 128, 2, 4, 64, "fp32", "BHTT", True),
    ("fp16", 128, 192, 2, 2, 17, "fp32", "B1TT", False),     # N 192: three 64-column tiles
    ("bf16", 64, 64, 2, 2, 1, "fp32", "TT", False),
    ("fp16", 64, 128, 3, 3, 300, "fp16", "BH1T", True),
    ("bf16", 128, 64, 2, 1, 70, "bf16", "1111", False),
]


@pytest.mark.parametrize("dt,R,N,Hx,Hy,T,mdt,shape,transposed", ATTN_CASES,
                         ids=[f"{c[0]}-R{c[1]}-N{c[2]}-Hx{c[3]}-Hy{c[4]}-T{c[5]}-mask{c[6]}-{c[7]}"
                              f"{'-T' if c[8] else ''}" for c in ATTN_CASES])
def test_masked_attn_kernel(dt, R, N, Hx, Hy, T, mdt, shape, transposed):
    dtype = DTYPES[dt]
    B, Hq = 2, max(Hx, Hy)
    x, y = rand(B, T, Hx, R, dtype=dtype, seed=1), rand(B, T, Hy, R, dtype=dtype, seed=2)
    z = rand(B, T, Hy, N, dtype=dtype, seed=3)
    m = mask_view(make_mask("randn", shape, B, Hq, T, MASK_DTYPES[mdt]), B, Hq, T, transposed)
    poison_allocator(((B, T, Hx, N), dtype))
    out = torch.empty(B, T, Hx, N, device="cuda", dtype=dtype)
    ext().masked_attn(x, y, z, m, out, 0.3)
    out_ref = torch.zeros(B, T, Hx, N, dtype=torch.float64)
    MODEL.masked_attn(x, y, z, m, out_ref, 0.3)
    check("out", out, out_ref, OUT_TOL)


GRAD_CASES = [
    # (dtype, K, V, H, HK, T, mask shape)
    ("bf16", 128, 128, 4, 2, 113, "BHTT"),
    ("bf16", 64, 256, 4, 1, 200, "TT"),
    ("fp16", 256, 64, 2, 2, 65, "1HTT"),
    ("bf16", 128, 64, 2, 1, 130, "BH1T"),
    ("bf16", 64, 64, 2, 2, 70, "BHT1"),
    ("fp16", 64, 128, 3, 3, 17, "1111"),
    ("bf16", 64, 64, 2, 1, 1, "1111"),
    ("bf16", 64, 64, 2, 1, 1, "BHTT"),
]


@pytest.mark.parametrize("dt,K,V,H,HK,T,shape", GRAD_CASES,
                         ids=[f"{c[0]}-K{c[1]}-V{c[2]}-H{c[3]}-HK{c[4]}-T{c[5]}-{c[6]}" for c in GRAD_CASES])
def test_mask_grad_kernel(dt, K, V, H, HK, T, shape):
    dtype = DTYPES[dt]
    B = 2
    q, k = rand(B, T, H, K, dtype=dtype, seed=1), rand(B, T, HK, K, dtype=dtype, seed=2)
    v, do = rand(B, T, HK, V, dtype=dtype, seed=3), rand(B, T, H, V, dtype=dtype, seed=4)
    size = SHAPES[shape](B, H, T)
    size = (1,) * (4 - len(size)) + size
    dmask = torch.full(size, float("nan"), device="cuda")
    ext().masked_mask_grad(q, k, v, do, dmask, 0.3)
    ref = torch.zeros(size, dtype=torch.float32)
    MODEL.masked_mask_grad(q, k, v, do, ref, 0.3)
    check("dmask", dmask, ref, 1e-4)


def test_mask_grad_is_reproducible():
    q, k = rand(2, 300, 4, 128, seed=1), rand(2, 300, 1, 128, seed=2)
    v, do = rand(2, 300, 1, 128, seed=3), rand(2, 300, 4, 128, seed=4)
    runs = []
    for _ in range(2):
        dmask = torch.empty(1, 1, 300, 300, device="cuda")
        ext().masked_mask_grad(q, k, v, do, dmask, 0.1)
        runs.append(dmask)
    assert torch.equal(*runs)


# --------------------------------------------------------------------------- 2. the op vs the reference

def _cases():
    c = [(t, 128, 128, 4, 4, "rand", "BHTT", "bf16", "fp32") for t in (1, 17, 64, 113, 500, 2048)]
    c += [(113, 128, 128, 4, hk, kind, shape, "bf16", "fp32") for hk in (4, 2, 1) for kind in ("rand", "decay")
          for shape in ("TT", "BHTT", "1HTT")]
    c += [(500, 64, 64, 4, 1, "decay", "1HTT", dt, mdt) for dt in DTYPES for mdt in ("fp32", "fp16", "bf16")]
    c += [(200, k, v, 2, 1, "rand", "TT", "bf16", "bf16")
          for k, v in ((64, 64), (100, 100), (256, 256), (64, 256), (256, 100), (32, 16))]
    c += [(2048, 128, 128, 2, 1, "decay", "TT", "bf16", "fp32"), (2048, 64, 128, 4, 2, "rand", "1HTT", "fp16", "bf16"),
          (129, 128, 128, 4, 2, "randn", "BHTT", "bf16", "fp32"), (300, 128, 128, 4, 4, "bool", "TT", "bf16", "bool"),
          (17, 64, 64, 4, 2, "rand", "TT", "fp16", "fp16")]
    if QUICK:
        c = [x for x in c if x[0] in (17, 113, 2048)]
    return [pytest.param(*x, id=f"T{x[0]}-K{x[1]}-V{x[2]}-H{x[3]}-HK{x[4]}-{x[5]}-{x[6]}-{x[7]}-mask{x[8]}")
            for x in c]


def _run(fn, leaves, w):
    o = fn(*leaves)
    (o.float() * w).sum().backward()
    return o, [x.grad if x.requires_grad else None for x in leaves]


@pytest.mark.parametrize("T,K,V,H,HK,kind,shape,dt,mdt", _cases())
def test_forward_and_gradients(T, K, V, H, HK, kind, shape, dt, mdt):
    dtype = DTYPES[dt]
    B = 1 if T >= 2048 else 2
    q, k = rand(B, T, H, K, dtype=dtype, seed=1), rand(B, T, HK, K, dtype=dtype, seed=2)
    v = rand(B, T, HK, V, dtype=dtype, seed=3)
    mask = make_mask(kind, shape, B, H, T, MASK_DTYPES[mdt])
    # w is representable in the input dtype, so do = w exactly on both sides
    w = rand(B, T, H, V, dtype=dtype, seed=9).float()
    grad_mask = mask.is_floating_point()
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v)] + [mask.clone().requires_grad_(grad_mask)]
    Kp, Vp = _kernels.kernel_head_dim(K), _kernels.kernel_head_dim(V)
    poison_allocator(((B, T, H, max(Kp, Vp)), dtype), ((B, T, HK, max(Kp, Vp)), dtype),
                     ((max(mask.numel(), 1),), torch.float32))
    o, got = _run(lambda *x: la.masked_linear_attention(*x), leaves, w)
    refs = [x.float().clone().requires_grad_(True) for x in (q, k, v)] + \
        [mask.float().clone().requires_grad_(grad_mask)]
    o_ref, ref = _run(lambda *x: masked_linear_attention_ref(*x), refs, w)
    assert o.dtype == dtype
    check("o", o, o_ref, OUT_TOL)
    for name, a, b in zip(("dq", "dk", "dv", "dmask"), got, ref):
        if b is None:
            assert a is None, f"{name}: unexpected gradient"
            continue
        assert a is not None, f"{name}: no gradient"
        assert a.dtype == leaves[("dq", "dk", "dv", "dmask").index(name)].dtype, f"{name}: dtype {a.dtype}"
        check(name, a, b, GRAD_TOL)


def test_decay_mask_matches_retention_kernel():
    """A per-head decay mask is the recurrence with a fixed decay: the two kernels agree."""
    B, T, H, K = 2, 777, 4, 128
    q, k, v = (rand(B, T, H, K, seed=s) for s in (1, 2, 3))
    mask = make_mask("decay", "1HTT", B, H, T, torch.float32)
    gamma = torch.log(mask[0, :, 1, 0])  # mask[h, 1, 0] = gamma_h
    o = la.masked_linear_attention(q, k, v, mask)
    o_chunk, _ = la.chunk_simple_gla(q, k, v, g_gamma=gamma)
    check("o", o, o_chunk.float(), 2 * OUT_TOL)


def test_strided_masks():
    """A transposed and an expanded mask (views, read through their strides) and their gradients."""
    B, T, H, K = 2, 200, 4, 64
    q, k, v = (rand(B, T, H, K, seed=s) for s in (1, 2, 3))
    base = uniform(T, T, seed=4)
    w = rand(B, T, H, K, seed=9).float()
    for view in (lambda m: m.t(), lambda m: m.expand(B, H, T, T), lambda m: m[None, None].expand(B, 1, T, T)):
        got = base.clone().requires_grad_(True)
        ref = base.clone().requires_grad_(True)
        o = la.masked_linear_attention(q, k, v, view(got))
        o_ref = masked_linear_attention_ref(q.float(), k.float(), v.float(), view(ref))
        check("o", o, o_ref, OUT_TOL)
        (o.float() * w).sum().backward()
        (o_ref * w).sum().backward()
        check("dmask", got.grad, ref.grad, GRAD_TOL)


def test_blockwise_memory():
    """No [B, H, T, T] tensor: with a [T, T] mask, the peak memory of forward + backward stays far
    below one fp32 score matrix per head (B * H * T * T * 4 bytes = 512 MiB here)."""
    B, T, H, K = 2, 4096, 8, 64
    q, k, v = (rand(B, T, H, K, seed=s).requires_grad_(True) for s in (1, 2, 3))
    mask = uniform(T, T, seed=4).requires_grad_(True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    la.masked_linear_attention(q, k, v, mask).float().sum().backward()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    assert peak < 200 * 2**20, f"peak {peak / 2**20:.0f} MiB"


def test_deterministic():
    B, T, H, HK, K = 2, 1000, 4, 2, 128
    q, k, v = rand(B, T, H, K, seed=1), rand(B, T, HK, K, seed=2), rand(B, T, HK, K, seed=3)
    mask = make_mask("rand", "1HTT", B, H, T, torch.float32)
    w = rand(B, T, H, K, seed=9).float()
    runs = []
    for _ in range(2):
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v, mask)]
        o, grads = _run(la.masked_linear_attention, leaves, w)
        runs.append([o] + grads)
    for a, b in zip(*runs):
        assert torch.equal(a, b)
