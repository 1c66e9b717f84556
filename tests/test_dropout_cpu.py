"""Dropout without a GPU: the Philox mask (flash_attn.reference_dropout against Random123's
known answers and against csrc/flash_attn/dropout.h compiled for the host), the ops'
dropout contract on CPU (fake shapes, rng_state through autograd, reproducibility), and
the CUDA route's Python side with dropout against the stand-in extension of
test_cuda_route_cpu.py. The kernels themselves: tests/test_dropout_gpu.py."""
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from flash_attn import _cuda, _ops
from flash_attn.reference import attention_ref, attention_varlen_ref
from flash_attn.reference_dropout import dropout_bytes, dropout_keep_mask, keep_threshold, philox4x32_10
from test_cuda_route_cpu import fake, fake_bwd  # noqa: F401  (fixtures: the stand-in extension)

ROOT = Path(__file__).resolve().parents[1]


def rand(*shape, dtype=torch.float64, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64).to(dtype)


def cu(lengths):
    return torch.tensor([0] + lengths, dtype=torch.int64).cumsum(0).to(torch.int32)


# --- the mask ---

KAT = [  # Random123 kat_vectors for philox4x32-10: counter, key, output
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,want", KAT, ids=["zeros", "ones", "pi"])
def test_philox_known_answers(counter, key, want):
    got = philox4x32_10(tuple(torch.tensor([c]) for c in counter), key)
    assert [int(w) for w in got] == list(want)


@pytest.mark.parametrize("p,threshold", [(0.0, 255), (0.5, 128), (0.17, 212), (0.2, 204), (0.999, 0), (1e-9, 255)])
def test_keep_threshold(p, threshold):
    assert keep_threshold(p) == threshold


@pytest.mark.parametrize("p", [0.17, 0.5])
def test_mask_keep_rate(p):
    keep = dropout_keep_mask(123, 456, 2, 3, 200, 300, p)
    assert keep.shape == (2, 3, 200, 300) and keep.dtype == torch.bool
    assert abs(keep.float().mean().item() - keep_threshold(p) / 256) < 0.005
    assert abs((1 - keep.float().mean().item()) - p) < 0.01


def test_mask_is_a_pure_function_of_the_position():
    """A sub-grid is the corner of a larger grid (no dependence on the lengths), every (b, h)
    gets its own mask, and the next call's offset (advanced by b * h) gives a fresh one."""
    big = dropout_bytes(7, 1000, 2, 4, 70, 200)
    assert torch.equal(dropout_bytes(7, 1000, 1, 2, 33, 129), big[:1, :2, :33, :129])
    assert not torch.equal(big[0, 0], big[0, 1]) and not torch.equal(big[0, 0], big[1, 0])
    assert torch.equal(dropout_bytes(7, 1000 + 4, 1, 1, 70, 200)[0, 0], big[1, 0])  # subsequence b * h + h
    nxt = dropout_bytes(7, 1000 + 2 * 4, 2, 4, 70, 200)
    assert (nxt == big).float().mean() < 0.01  # disjoint counters: independent bytes
    assert 120 < big.float().mean() < 135  # uniform bytes average 127.5


def test_offset_carries_into_the_high_word():
    """The subsequence is a 64-bit offset + b * h + h (the low word wraps into the high one)."""
    wrapped = dropout_bytes(5, 2 ** 32 - 1, 1, 2, 3, 64)[0, 1]
    assert torch.equal(wrapped, dropout_bytes(5, 2 ** 32, 1, 1, 3, 64)[0, 0])


def _host_compiler():
    """g++, the CUDA headers and CUTLASS/CuTe, or the reason the host check cannot build."""
    gxx = shutil.which("g++")
    cuda_inc = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"
    import importlib.util
    spec = importlib.util.find_spec("cutlass_library")
    cutlass = Path(os.environ["CUTLASS_HOME"]) / "include" if os.environ.get("CUTLASS_HOME") else (
        Path(list(spec.submodule_search_locations)[0]) / "source" / "include" if spec else None)
    if gxx is None or not (cuda_inc / "vector_types.h").exists() or cutlass is None:
        return None, "needs g++, the CUDA headers and nvidia-cutlass"
    return [gxx, "-std=c++20", "-O1", "-w", "-fpermissive", f"-I{cuda_inc}", f"-I{cuda_inc / 'cccl'}",
            f"-I{cutlass}", f"-I{ROOT / 'csrc' / 'flash_attn'}", f"-I{ROOT / 'csrc' / 'linear_attn'}",
            f"-I{ROOT / 'csrc' / 'common'}"], None


def build_host_program(tmp_path_factory, name):
    """tests/cpp/<name>.cpp built with g++ (kernel headers run on the host); returns a runner,
    args -> CompletedProcess. Skips the test when g++, the CUDA headers or cutlass are missing."""
    cmd, reason = _host_compiler()
    if cmd is None:
        pytest.skip(reason)
    exe = tmp_path_factory.mktemp("host") / name
    subprocess.run(cmd + [str(ROOT / "tests" / "cpp" / f"{name}.cpp"), "-o", str(exe)], check=True,
                   capture_output=True, timeout=600)
    return lambda *args: subprocess.run([str(exe), *map(str, args)], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def host_check(tmp_path_factory):
    """tests/cpp/dropout_mask_host.cpp built with g++ (dropout.h's mask code, run on the host)."""
    return build_host_program(tmp_path_factory, "dropout_mask_host")


def test_host_philox_known_answers(host_check):
    run = host_check("kat")
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stdout + run.stderr


@pytest.mark.parametrize("seed,offset", [(0xFEDCBA9876543210, 0xFFFFFFFFFFFFFFFE), (1, 2 ** 32 - 3)])
def test_host_mask_bytes_equal_python(host_check, seed, offset):
    run = host_check("bytes", seed, offset, 2, 3, 5, 130)
    assert run.returncode == 0, run.stderr
    got = torch.tensor([[int(x) for x in line.split()] for line in run.stdout.splitlines()]).view(2, 3, 5, 130)
    assert torch.equal(got, dropout_bytes(seed, offset, 2, 3, 5, 130))


@pytest.mark.parametrize("threshold", [212, 128, 0, 255])
def test_host_forward_layout_applies_the_mask(host_check, threshold):
    """DropoutMask::apply on every thread's accumulator of a 128 x 128 tile keeps exactly the
    elements keep(i, j) keeps, and write_s_dmask stores each element once, in place."""
    run = host_check("layout", 0x1234567890ABCDEF, 77, threshold)
    assert run.returncode == 0 and run.stdout.startswith("ok"), run.stdout + run.stderr


# --- the ops on CPU ---

@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_fake_shapes_with_dropout(device):
    with FakeTensorMode():
        q = torch.empty(2, 130, 4, 64, device=device, dtype=torch.bfloat16)
        k = torch.empty(2, 7, 2, 64, device=device, dtype=torch.bfloat16)
        out, lse, s_dmask, rng = _ops.fwd(q, k, k, None, 0.3, -1, 0, 0.0, False, 0.1, True)
        assert s_dmask.shape == (2, 4, 256, 128) and s_dmask.dtype == q.dtype and s_dmask.device.type == device
        assert rng.shape == (2,) and rng.dtype == torch.int64 and rng.device.type == device
        assert _ops.fwd(q, k, k, None, 0.3, -1, 0, 0.0, False, 0.1, False)[2].shape == (0,)
        grads = _ops.bwd(out, q, k, k, out, lse, None, 0.3, -1, 0, 0.0, False, 0.1, rng)
        assert [g.shape for g in grads] == [q.shape, k.shape, k.shape]
        qv, kv = q.flatten(0, 1), k.flatten(0, 1)
        cu_q = torch.empty(3, dtype=torch.int32, device=device)
        out = _ops.varlen_fwd(qv, kv, kv, cu_q, cu_q, None, 200, 7, None, 0.3, -1, -1, 0.0, False, 0.5, True)
        assert out[2].shape == (2, 4, 256, 128) and out[3].shape == (2,)


def _dense(p=0.3, requires_grad=False):
    q = rand(2, 9, 4, 8).requires_grad_(requires_grad)
    k, v = (rand(2, 11, 2, 8, seed=s).requires_grad_(requires_grad) for s in (1, 2))
    return q, k, v


def test_cpu_op_uses_the_kernel_mask_and_autograd_passes_rng_state():
    q, k, v = _dense(requires_grad=True)
    p, slopes = 0.3, torch.rand(4)
    out, lse, s_dmask, rng = _ops.fwd(q, k, v, slopes, 0.4, -1, 0, 0.0, False, p, True)
    keep = dropout_keep_mask(*rng.tolist(), 2, 4, 9, 11, p)
    ref, ref_lse = attention_ref(q, k, v, 0.4, False, (-1, 0), 0.0, slopes, p, keep)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-12, atol=1e-12)
    assert s_dmask.shape == (2, 4, 128, 128) and torch.equal(~torch.signbit(s_dmask[:, :, :9, :11]), keep)
    dout = rand(*out.shape, seed=5)
    got = torch.autograd.grad(out, (q, k, v), dout)
    want = torch.autograd.grad(ref, (q, k, v), dout)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)


def test_cpu_varlen_op_uses_the_kernel_mask():
    lens_q, lens_k = [3, 0, 6], [5, 2, 7]
    q, k, v = rand(9, 2, 8), rand(14, 1, 8, seed=1), rand(14, 1, 8, seed=2)
    out, _, s_dmask, rng = _ops.varlen_fwd(q, k, v, cu(lens_q), cu(lens_k), None, 6, 7, None, 0.5, -1, -1, 0.0,
                                           False, 0.5, True)
    keep = dropout_keep_mask(*rng.tolist(), 3, 2, 6, 7, 0.5)
    ref, _ = attention_varlen_ref(q, k, v, cu(lens_q), cu(lens_k), 6, 7, None, 0.5, False, (-1, -1), 0.0, None,
                                  0.5, keep)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert s_dmask.shape == (3, 2, 128, 128) and torch.equal(~torch.signbit(s_dmask[2, :, :6, :7]), keep[2])


def test_cpu_op_masks_are_fresh_and_reproducible():
    q, k, v = _dense()
    torch.manual_seed(3)
    first, second = (_ops.fwd(q, k, v, None, 0.4, -1, -1, 0.0, False, 0.5) for _ in range(2))
    assert not torch.equal(first[3], second[3]) and not torch.equal(first[0], second[0])
    torch.manual_seed(3)
    again = _ops.fwd(q, k, v, None, 0.4, -1, -1, 0.0, False, 0.5)
    assert torch.equal(again[3], first[3]) and torch.equal(again[0], first[0])


def test_opcheck_with_dropout():
    """Schema, fake and autograd registration with dropout (the CPU kernel draws its mask, so
    the checks that compare two runs are left out)."""
    q, k, v = _dense(requires_grad=True)
    torch.library.opcheck(_ops.fwd, (q, k, v, None, 0.4, -1, 0, 0.0, False, 0.2, True),
                          test_utils=("test_schema", "test_autograd_registration", "test_faketensor"))
    out, lse, _, rng = _ops.fwd(q.detach(), k.detach(), v.detach(), None, 0.4, -1, 0, 0.0, False, 0.2)
    torch.library.opcheck(_ops.bwd, (rand(*out.shape, seed=3), q.detach(), k.detach(), v.detach(), out, lse, None,
                                     0.4, -1, 0, 0.0, False, 0.2, rng))


def test_bwd_op_needs_rng_state_with_dropout():
    q, k, v = _dense()
    out, lse, _, _ = _ops.fwd(q, k, v, None, 0.4, -1, 0, 0.0, False, 0.2)
    with pytest.raises(ValueError, match="rng_state"):
        _ops.bwd(out, q, k, v, out, lse, None, 0.4, -1, 0, 0.0, False, 0.2, None)


# --- the CUDA route's Python side (stand-in extension) ---

@pytest.mark.parametrize("d,kernel_d", [(20, 32), (64, 64)])
def test_cuda_route_dense_dropout(fake_bwd, d, kernel_d):
    """p and return_softmax reach the extension; the output, S_dmask and the gradients are those
    of the mask of the rng_state the extension returned, which autograd hands back to bwd."""
    q, k, v = (rand(2, s, h, d, seed=i).float().requires_grad_(True) for i, (s, h) in enumerate(
        [(5, 4), (7, 2), (7, 2)]))
    p, slopes = 0.25, torch.rand(2, 4)
    out, lse, s_dmask = _cuda.dense_forward(q, k, v, p, d ** -0.5, (2, 0), 0.0, slopes, False, True)
    rng = fake_bwd.rng_state
    keep = dropout_keep_mask(*rng.tolist(), 2, 4, 5, 7, p)
    ref, ref_lse = attention_ref(q, k, v, d ** -0.5, False, (2, 0), 0.0, slopes, p, keep)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    assert s_dmask.shape == (2, 4, 128, 128) and torch.equal(~torch.signbit(s_dmask[:, :, :5, :7]), keep)
    dout = rand(*out.shape, seed=9).float()
    got = torch.autograd.grad(out, (q, k, v), dout)
    assert torch.equal(fake_bwd.bwd_rng_state, rng)
    for g, w in zip(got, torch.autograd.grad(ref, (q, k, v), dout)):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    assert [c[0] for c in fake_bwd.calls] == ["fwd", "bwd"] and fake_bwd.calls[0][1] == kernel_d


def test_cuda_route_varlen_dropout(fake_bwd):
    lens_q, lens_k = [3, 5], [4, 6]
    q = rand(8, 2, 16).float().requires_grad_(True)
    k, v = (rand(10, 2, 16, seed=s).float().requires_grad_(True) for s in (1, 2))
    out, _, s_dmask = _cuda.varlen_forward(q, k, v, cu(lens_q), cu(lens_k), 5, 6, 0.5, 0.25, (-1, -1), 0.0, None)
    assert s_dmask is None  # not requested
    keep = dropout_keep_mask(*fake_bwd.rng_state.tolist(), 2, 2, 5, 6, 0.5)
    ref, _ = attention_varlen_ref(q, k, v, cu(lens_q), cu(lens_k), 5, 6, None, 0.25, False, (-1, -1), 0.0, None,
                                  0.5, keep)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert torch.equal(fake_bwd.bwd_rng_state, fake_bwd.rng_state)


def test_cuda_route_without_dropout_returns_no_s_dmask(fake):
    q, k, v = (rand(1, 4, 2, 32, seed=s).half() for s in range(3))
    out, lse, s_dmask = _cuda.dense_forward(q, k, v, 0.0, 1.0, (-1, -1), 0.0, None, False, True)
    assert s_dmask is None and out.shape == q.shape


def test_cuda_route_empty_inputs_with_dropout(fake):
    """No kernel runs, yet the outputs keep the fake's shapes (zero S_dmask, rng_state)."""
    q, k = rand(2, 5, 4, 32).half(), rand(2, 0, 2, 32).half()
    out, lse, s_dmask, rng = _ops.fwd(q, k, k, None, 1.0, -1, -1, 0.0, False, 0.3, True)
    assert fake.calls == [] and s_dmask.shape == (2, 4, 128, 0) and rng.shape == (2,)
    assert (out == 0).all() and (lse == float("inf")).all()


def test_cuda_route_compiles_with_dropout(fake_bwd):
    """fullgraph torch.compile of the route with dropout (rng_state flows through the graph)."""
    torch._dynamo.reset()
    q, k, v = (rand(2, 6, 2, 32, seed=s).float().requires_grad_(True) for s in range(3))

    def attention(q, k, v):
        return _cuda.dense_forward(q, k, v, 0.2, 0.3, (-1, -1), 0.0, None)[0]
    out = torch.compile(attention, fullgraph=True, backend="aot_eager")(q, k, v)
    out.sum().backward()
    assert [c[0] for c in fake_bwd.calls] == ["fwd", "bwd"]
    assert torch.equal(fake_bwd.bwd_rng_state, fake_bwd.rng_state)
