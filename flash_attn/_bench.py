"""Timing helpers shared by `python -m flash_attn` and `benchmarks/benchmark_attn.py`.

Nothing here runs at import time and nothing needs a GPU until a function is
called, so importing it on a CPU-only machine is cheap and safe.
"""
import statistics


def attn_fwd_flops(batch, nheads, seqlen_q, seqlen_k, headdim, causal):
    """Forward FLOPs by flash-attn's convention: two matmuls of 2*sq*sk*d each per
    head, halved when causal (the convention ignores the diagonal and sq != sk)."""
    flops = 4 * batch * nheads * seqlen_q * seqlen_k * headdim
    return flops // 2 if causal else flops


# Work of each timed pass in units of the forward's FLOPs (flash-attn's convention, as in
# ../shared/ANCHORS.md): the backward does 5 matmuls to the forward's 2, so 2.5x; a forward
# plus a backward 3.5x.
PASS_FLOP_FACTORS = {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}


def attn_flops(batch, nheads, seqlen_q, seqlen_k, headdim, causal, mode="fwd"):
    """FLOPs of one pass: 'fwd', 'bwd' (2.5x fwd) or 'fwdbwd' (3.5x fwd), halved when causal."""
    if mode not in PASS_FLOP_FACTORS:
        raise ValueError(f"mode must be one of {sorted(PASS_FLOP_FACTORS)}, got {mode!r}")
    # an integer: the factors are halves and the forward count is even
    return attn_fwd_flops(batch, nheads, seqlen_q, seqlen_k, headdim, causal) * int(2 * PASS_FLOP_FACTORS[mode]) // 2


def time_ms(fn, warmup_ms=25, rep_ms=100):
    """Median time of `fn()` in milliseconds, measured with CUDA events.

    Uses `triton.testing.do_bench` (which also flushes L2 between runs) when
    Triton is installed, else a plain CUDA-event loop after a warm-up.
    """
    try:
        from triton.testing import do_bench
    except ImportError:
        do_bench = None
    if do_bench is not None:
        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    return _event_median_ms(fn, warmup_ms, rep_ms)


def _event_median_ms(fn, warmup_ms, rep_ms):
    import torch

    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    one = max(start.elapsed_time(end), 1e-3)
    for _ in range(max(1, int(warmup_ms / one))):
        fn()
    times = []
    for _ in range(max(5, int(rep_ms / one))):
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def sdpa_backends():
    """{method name: torch SDPBackend} for the peers we compare against."""
    from torch.nn.attention import SDPBackend

    return {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}


def sdpa_inputs(q, k, v):
    """SDPA's layout, (batch, nheads, seqlen, headdim), made contiguous beforehand so
    that no transpose or copy is inside the timed region."""
    return tuple(t.transpose(1, 2).contiguous() for t in (q, k, v))


def time_sdpa_ms(qt, kt, vt, causal, backend, **timing):
    """Median ms of F.scaled_dot_product_attention restricted to one backend.

    qt/kt/vt come from `sdpa_inputs`. Raises RuntimeError when the backend cannot
    run this shape (the caller records that instead of a time).
    """
    import torch.nn.functional as F
    from torch.nn.attention import sdpa_kernel

    enable_gqa = qt.shape[1] != kt.shape[1]
    kwargs = {"is_causal": causal}
    if enable_gqa:
        kwargs["enable_gqa"] = True

    def fn():
        return F.scaled_dot_product_attention(qt, kt, vt, **kwargs)

    with sdpa_kernel(backend):
        fn()  # fails here, outside timing, when the backend refuses the shape
        return time_ms(fn, **timing)


def time_ours_ms(q, k, v, causal, **timing):
    """Median ms of flash_attn_func on (batch, seqlen, nheads, headdim) inputs."""
    from flash_attn import flash_attn_func

    def fn():
        return flash_attn_func(q, k, v, causal=causal)

    fn()
    return time_ms(fn, **timing)


def _grad_pass(forward, inputs, dout, mode):
    """A zero-argument callable for the timed region of a gradient pass.

    mode 'bwd': `forward()` runs once here, outside the timed region, and the callable is
    `torch.autograd.grad(out, inputs, dout, retain_graph=True)` (the backward alone).
    mode 'fwdbwd': the callable runs `forward()` and its backward (a whole training step of
    the attention).
    """
    import torch

    if mode == "bwd":
        out = forward()
        return lambda: torch.autograd.grad(out, inputs, dout, retain_graph=True)
    if mode == "fwdbwd":
        return lambda: torch.autograd.grad(forward(), inputs, dout)
    raise ValueError(f"mode must be 'bwd' or 'fwdbwd', got {mode!r}")


def _leaves(*tensors):
    return tuple(t.detach().requires_grad_(True) for t in tensors)


def _ours_forward(q, k, v, causal, deterministic):
    from flash_attn import flash_attn_func

    return lambda: flash_attn_func(q, k, v, causal=causal, deterministic=deterministic)


def _sdpa_forward(qt, kt, vt, causal):
    import torch.nn.functional as F

    kwargs = {"is_causal": causal}
    if qt.shape[1] != kt.shape[1]:
        kwargs["enable_gqa"] = True
    return lambda: F.scaled_dot_product_attention(qt, kt, vt, **kwargs)


def time_ours_grad_ms(q, k, v, dout, causal, mode, deterministic=False, **timing):
    """Median ms of flash_attn_func's backward ('bwd') or forward + backward ('fwdbwd').

    q/k/v/dout (batch, seqlen, nheads, headdim); the public API with requires_grad inputs,
    so the autograd formula of the flash_attn::fwd custom op is what runs. Raises (before
    any timing) when the backward cannot run this shape.
    """
    q, k, v = _leaves(q, k, v)
    fn = _grad_pass(_ours_forward(q, k, v, causal, deterministic), (q, k, v), dout, mode)
    fn()
    return time_ms(fn, **timing)


def time_sdpa_grad_ms(qt, kt, vt, dout_t, causal, backend, mode, **timing):
    """As time_ours_grad_ms for F.scaled_dot_product_attention restricted to one backend;
    qt/kt/vt/dout_t in SDPA's layout (`sdpa_inputs`)."""
    from torch.nn.attention import sdpa_kernel

    qt, kt, vt = _leaves(qt, kt, vt)
    with sdpa_kernel(backend):
        fn = _grad_pass(_sdpa_forward(qt, kt, vt, causal), (qt, kt, vt), dout_t, mode)
        fn()
        return time_ms(fn, **timing)


def _peak_bytes(forward, inputs, dout):
    """Peak allocated bytes of one forward + backward above what was allocated before it."""
    import torch

    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    grads = torch.autograd.grad(forward(), inputs, dout)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del grads
    return peak - base


def peak_ours_fwdbwd_bytes(q, k, v, dout, causal, deterministic=False):
    """Bytes that one flash_attn_func forward + backward allocates on top of its inputs
    (q, k, v, dout): output, saved state, gradients and workspaces at their peak.
    Call it after a warm-up (timing) so one-time allocations are not counted."""
    q, k, v = _leaves(q, k, v)
    return _peak_bytes(_ours_forward(q, k, v, causal, deterministic), (q, k, v), dout)


def peak_sdpa_fwdbwd_bytes(qt, kt, vt, dout_t, causal, backend):
    """peak_ours_fwdbwd_bytes for SDPA restricted to one backend (SDPA's layout)."""
    from torch.nn.attention import sdpa_kernel

    qt, kt, vt = _leaves(qt, kt, vt)
    with sdpa_kernel(backend):
        return _peak_bytes(_sdpa_forward(qt, kt, vt, causal), (qt, kt, vt), dout_t)


def ours_unavailable_reason():
    """None when our CUDA kernels can run here, else a one-line reason."""
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    from flash_attn import build_info

    cfg = build_info.build_config()
    if not cfg.get("cuda"):
        return f"the flash_attn CUDA extension was not built ({cfg.get('skip_reason') or 'unknown reason'})"
    try:
        ext = build_info.cuda_extension()
    except Exception as exc:  # a broken build: say what failed to load
        return f"the flash_attn CUDA extension failed to load: {type(exc).__name__}: {exc}"
    if ext is None:
        return "the flash_attn CUDA extension is not available"
    if not torch.cuda.is_available():
        return "no CUDA device is visible to torch"
    return None


def environment():
    """Device and software versions, for result files and the demo's header."""
    import datetime
    import platform

    import torch

    import flash_attn

    env = {
        "flash_attn": getattr(flash_attn, "__version__", "unknown"),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device=props.name, sm=f"{props.major}{props.minor}",
                   multiprocessors=props.multi_processor_count,
                   cudnn=torch.backends.cudnn.version())
    else:
        env.update(device="cpu", sm=None, multiprocessors=None, cudnn=None)
    return env
