"""`python -m flash_attn`: what was built, a self-check, and (on a GPU) a short speed table.

    python -m flash_attn              # info + self-check (+ speed table on a GPU)
    python -m flash_attn --no-bench   # info + self-check only

Exits 1 when a self-check case fails, 0 otherwise. Without a GPU the
self-check runs the API on CPU tensors (the reference path); with the kernels
it runs them against the fp32 reference using the rule of shared/TESTING.md:
max |out - ref_fp32| <= 2 * max |out_lowprec_ref - ref_fp32| + 1e-5.
"""
import argparse
import sys
import time


def _print_header():
    import torch

    import flash_attn
    from flash_attn import build_info
    from flash_attn._bench import environment

    env = environment()
    cfg = build_info.build_config()
    print(f"flash_attn {flash_attn.__version__} (flash-attn 2.x API level), from {flash_attn.__file__}")
    print(f"python {env['python']}, torch {env['torch']}, CUDA {env['cuda'] or 'none (CPU build)'}")
    if torch.cuda.is_available():
        print(f"device: {env['device']} (sm{env['sm']}, {env['multiprocessors']} SMs), cuDNN {env['cudnn']}")
    else:
        print("device: no CUDA device visible; CPU tensors run the reference implementation")
    if cfg.get("cuda"):
        print(f"kernels: built for sm{','.join(cfg.get('archs', []))}; head dims {cfg.get('head_dims')}; "
              f"dtypes {cfg.get('dtypes')}; variants {cfg.get('variants')}")
        bwd_dims = cfg.get("backward_head_dims") or []
        print(f"         backward: {f'kernels for head dims {bwd_dims} (others padded up to the next)' if bwd_dims else 'not built'}")
        if cfg.get("torch_version"):
            print(f"         built with torch {cfg['torch_version']}, CUDA {cfg.get('cuda_version')}")
    else:
        print(f"kernels: not built ({cfg.get('skip_reason') or 'unknown reason'})")


def _on_gpu():
    """True when the self-check should run the CUDA kernels."""
    from flash_attn._bench import ours_unavailable_reason

    return ours_unavailable_reason() is None


def _cases():
    """(name, kwargs) of the self-check; each kwargs names what `_run_case` needs."""
    return [
        ("causal, GQA 4:2, sq 113 != sk 203, d 64",
         dict(kind="func", b=2, sq=113, sk=203, hq=4, hk=2, d=64, causal=True)),
        ("sliding window (37, 19), MQA 8:1, sq 1, sk 239, d 128",
         dict(kind="func", b=1, sq=1, sk=239, hq=8, hk=1, d=128, window=(37, 19))),
        ("ALiBi + softcap, d 59 (padded), sq = sk = 128",
         dict(kind="func", b=2, sq=128, sk=128, hq=4, hk=4, d=59, alibi=True, softcap=2.5)),
        ("varlen causal with empty sequences, d 96",
         dict(kind="varlen", lens_q=(17, 0, 64, 9), lens_k=(40, 5, 0, 130), hq=4, hk=2, d=96, causal=True)),
        ("qkvpacked, s 65, d 32",
         dict(kind="qkvpacked", b=2, sq=65, sk=65, hq=4, hk=4, d=32)),
    ]


def _missing_feature(case, dtype_name):
    """Why a GPU case cannot run with this build (a trimmed build), else None."""
    from flash_attn import build_info

    cfg = build_info.build_config()
    if dtype_name not in cfg.get("dtypes", []):
        return f"{dtype_name} not compiled"
    if not any(h >= case["d"] for h in build_info.compiled_head_dims()):
        return f"no compiled head dim >= {case['d']}"
    if case.get("alibi") and not build_info.has_feature("alibi"):
        return "ALiBi not compiled"
    if case.get("softcap") and not build_info.has_feature("softcap"):
        return "softcap not compiled"
    return None


def _max_err(a, b):
    import torch

    diff = (a.float() - b.float()).abs()
    return float(diff.max()) if diff.numel() else 0.0


def _run_case(case, device, dtype):
    """Runs one case; returns (ok, message)."""
    import torch

    from flash_attn import flash_attn_func, flash_attn_qkvpacked_func, flash_attn_varlen_func
    from flash_attn.reference import attention_ref

    gen = torch.Generator(device=device).manual_seed(1234)
    hq, hk, d = case["hq"], case["hk"], case["d"]
    causal, window, softcap = case.get("causal", False), case.get("window", (-1, -1)), case.get("softcap", 0.0)

    def randn(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, generator=gen)

    def ref_pair(q, k, v, slopes):
        kw = dict(causal=causal, window_size=window, softcap=softcap, alibi_slopes=slopes)
        # fp32 on the GPU; fp64 on the CPU, where the API itself runs the fp32 reference
        wide = (lambda t: t.double()) if q.device.type == "cpu" else (lambda t: t)
        ref, _ = attention_ref(wide(q), wide(k), wide(v), upcast=True, **kw)
        low, _ = attention_ref(q, k, v, upcast=False, **kw)
        return ref, low

    if case["kind"] == "varlen":
        lens_q, lens_k = case["lens_q"], case["lens_k"]
        q, k, v = randn(sum(lens_q), hq, d), randn(sum(lens_k), hk, d), randn(sum(lens_k), hk, d)
        cu_q = torch.tensor([0, *torch.tensor(lens_q).cumsum(0).tolist()], device=device, dtype=torch.int32)
        cu_k = torch.tensor([0, *torch.tensor(lens_k).cumsum(0).tolist()], device=device, dtype=torch.int32)
        out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal)
        refs, lows = [], []
        for i, (lq, lk) in enumerate(zip(lens_q, lens_k)):
            if lq == 0:
                continue
            sq_, sk_ = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
            if lk == 0:  # a query that sees no key outputs 0
                zero = torch.zeros(lq, hq, d, device=device, dtype=dtype)
                refs.append(zero.float())
                lows.append(zero)
                continue
            r, lo = ref_pair(q[None, sq_], k[None, sk_], v[None, sk_], None)
            refs.append(r[0])
            lows.append(lo[0])
        ref, low = torch.cat(refs), torch.cat(lows)
    else:
        b, sq, sk = case["b"], case["sq"], case["sk"]
        slopes = (torch.rand(hq, device=device, generator=gen, dtype=torch.float32) * 0.5
                  if case.get("alibi") else None)
        if case["kind"] == "qkvpacked":
            qkv = randn(b, sq, 3, hq, d)
            out = flash_attn_qkvpacked_func(qkv, causal=causal, window_size=window, softcap=softcap,
                                            alibi_slopes=slopes)
            q, k, v = qkv.unbind(2)
        else:
            q, k, v = randn(b, sq, hq, d), randn(b, sk, hk, d), randn(b, sk, hk, d)
            out = flash_attn_func(q, k, v, causal=causal, window_size=window, softcap=softcap,
                                  alibi_slopes=slopes)
        ref, low = ref_pair(q, k, v, slopes)

    if not isinstance(out, torch.Tensor):
        return False, f"expected a Tensor (return_attn_probs=False), got {type(out).__name__}"
    if out.shape != ref.shape or out.dtype != dtype:
        return False, f"output {tuple(out.shape)} {out.dtype}, expected {tuple(ref.shape)} {dtype}"
    if torch.isnan(out).any():
        return False, "NaN in the output"
    err, base = _max_err(out, ref), _max_err(low, ref)
    tol = 2 * base + 1e-5
    return err <= tol, f"max err {err:.2e} (allowed {tol:.2e})"


def self_check():
    import torch

    gpu = _on_gpu()
    device = "cuda" if gpu else "cpu"
    if gpu:
        from flash_attn import build_info

        dtypes = build_info.build_config().get("dtypes", [])
        dtype_name = "bf16" if "bf16" in dtypes else "fp16"
    else:
        dtype_name = "bf16"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[dtype_name]
    print(f"\nself-check on {device} ({'CUDA kernels' if gpu else 'reference path'}), {dtype_name}, "
          f"against the {'fp32' if gpu else 'fp64'} reference:")
    failures = 0
    for name, case in _cases():
        missing = _missing_feature(case, dtype_name) if gpu else None
        if missing:
            print(f"  SKIP  {name}: {missing}")
            continue
        try:
            ok, msg = _run_case(case, device, dtype)
        except Exception as exc:  # report and go on: the exit code says it failed
            ok, msg = False, f"{type(exc).__name__}: {exc}"
        failures += not ok
        print(f"  {'PASS' if ok else 'FAIL'}  {name}: {msg}")
    print(f"self-check: {'all passed' if not failures else f'{failures} FAILED'}")
    return failures == 0


def speed_table():
    """Our forward vs SDPA flash and cuDNN on a few ANCHORS.md shapes (bf16, 16k tokens)."""
    import torch

    from flash_attn import build_info
    from flash_attn._bench import (attn_fwd_flops, sdpa_backends, sdpa_inputs, time_ours_ms,
                                   time_sdpa_ms)

    if "bf16" not in build_info.build_config().get("dtypes", []):
        print("\nspeed: bf16 kernels not compiled; no table")
        return
    hdims = build_info.compiled_head_dims()
    shapes = [(d, c, 4096) for d in (64, 128, 256) if d in hdims for c in (False, True)]
    print("\nforward speed, bf16, 16k tokens, model dim 2048 (TFLOP/s; ratio = ours / peer):")
    print(f"  {'hdim':>4} {'causal':>6} {'seqlen':>6} | {'ours':>6} {'flash':>6} {'cudnn':>6} | "
          f"{'/flash':>6} {'/cudnn':>6}")
    for d, causal, s in shapes:
        b, h = 16384 // s, 2048 // d
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        flops = attn_fwd_flops(b, h, s, s, d, causal)
        tf = {}
        try:
            tf["ours"] = flops / time_ours_ms(q, k, v, causal, rep_ms=30) / 1e9
        except Exception as exc:
            print(f"  ours failed at hd{d} causal={causal}: {type(exc).__name__}: {exc}")
        qt, kt, vt = sdpa_inputs(q, k, v)
        for name, backend in sdpa_backends().items():
            try:
                tf[name] = flops / time_sdpa_ms(qt, kt, vt, causal, backend, rep_ms=30) / 1e9
            except Exception:
                tf[name] = None

        def f(x, spec="6.1f"):
            return format(x, spec) if x else "-"

        ours = tf.get("ours")
        r = {p: (ours / tf[p]) if ours and tf.get(p) else None for p in ("sdpa_flash", "sdpa_cudnn")}
        print(f"  {d:>4} {str(causal):>6} {s:>6} | {f(ours):>6} {f(tf.get('sdpa_flash')):>6} "
              f"{f(tf.get('sdpa_cudnn')):>6} | {f(r['sdpa_flash'], '6.2f'):>6} {f(r['sdpa_cudnn'], '6.2f'):>6}")
        del q, k, v, qt, kt, vt
        torch.cuda.empty_cache()
    print("  (full grid: python benchmarks/benchmark_attn.py)")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m flash_attn", description=__doc__.split("\n\n")[0])
    parser.add_argument("--no-bench", action="store_true", help="skip the speed table")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    _print_header()
    ok = self_check()
    if _on_gpu() and not args.no_bench:
        try:
            speed_table()
        except Exception as exc:  # the table is informative; a failure there is not a failed check
            print(f"speed table failed: {type(exc).__name__}: {exc}")
    print(f"\ndone in {time.perf_counter() - t0:.2f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
