#!/usr/bin/env python3
"""Forward speed of flash_attn_func against PyTorch SDPA (flash and cuDNN backends).

The grid of ../shared/ANCHORS.md (flash-attn's own convention): 16k tokens per
batch (batch = 16384 // seqlen), model dim 2048 (nheads = 2048 // headdim),
self-attention, head dims 64/128/256, causal off and on, seqlen 512 to 16k,
bf16. Each time is the median of `triton.testing.do_bench`; SDPA gets its own
layout (batch, nheads, seqlen, headdim), made contiguous before timing.

Writes <out-dir>/attn_fwd_<device>_<commit>.json and a .png beside it, then
prints a compact table (last, so a log's tail shows it).

    python benchmarks/benchmark_attn.py                  # the full grid
    python benchmarks/benchmark_attn.py --quick          # hd 128, two seqlens
    python benchmarks/benchmark_attn.py --headdims 128 --seqlens 2048,16384

The commit is taken from $FLASH_ATTN_GIT_COMMIT, else from `git` when the
script runs inside a checkout, else recorded as 'unknown'.
"""
import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOKENS = 16384
MODEL_DIM = 2048
DEFAULT_HEADDIMS = (64, 128, 256)
DEFAULT_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
METHODS = ("ours", "sdpa_flash", "sdpa_cudnn")
PEERS = ("sdpa_flash", "sdpa_cudnn")
# issue 2's target: at least 1.0x SDPA's flash backend from this seqlen up.
TARGET_PEER, TARGET_MIN_SEQLEN, TARGET_RATIO = "sdpa_flash", 2048, 1.0


def _int_list(text):
    return [int(x) for x in re.split(r"[,\s]+", text.strip()) if x]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results",
                   help="where the JSON and PNG go (default: benchmarks/results)")
    p.add_argument("--headdims", type=_int_list, default=None, help="e.g. 64,128,256")
    p.add_argument("--seqlens", type=_int_list, default=None, help="e.g. 512,2048,16384")
    p.add_argument("--causal", choices=("both", "on", "off"), default="both")
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--quick", action="store_true",
                   help="head dim 128, seqlens 2048 and 8192, shorter timing (a smoke run)")
    p.add_argument("--peers-only", action="store_true",
                   help="time only the SDPA backends (for a machine without our kernels)")
    p.add_argument("--rep-ms", type=int, default=None, help="do_bench rep in ms (default 100, quick 30)")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    if args.headdims is None:
        args.headdims = [128] if args.quick else list(DEFAULT_HEADDIMS)
    if args.seqlens is None:
        args.seqlens = [2048, 8192] if args.quick else list(DEFAULT_SEQLENS)
    if args.rep_ms is None:
        args.rep_ms = 30 if args.quick else 100
    for d in args.headdims:
        if MODEL_DIM % d:
            p.error(f"--headdims: {d} does not divide the model dim {MODEL_DIM}")
    for s in args.seqlens:
        if s > TOKENS:
            p.error(f"--seqlens: {s} is above the {TOKENS}-token budget")
    return args


def git_commit():
    env = os.environ.get("FLASH_ATTN_GIT_COMMIT", "").strip()
    if env:
        return env
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def _slug(text):
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def shapes(args):
    causals = {"both": (False, True), "on": (True,), "off": (False,)}[args.causal]
    for d in args.headdims:
        for causal in causals:
            for s in args.seqlens:
                yield {"headdim": d, "causal": causal, "seqlen": s,
                       "batch": max(1, TOKENS // s), "nheads": MODEL_DIM // d}


def measure(shape, args, ours_ok):
    import torch

    from flash_attn._bench import (attn_fwd_flops, sdpa_backends, sdpa_inputs, time_ours_ms,
                                   time_sdpa_ms)

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    b, s, h, d, causal = shape["batch"], shape["seqlen"], shape["nheads"], shape["headdim"], shape["causal"]
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=dtype, generator=gen) for _ in range(3))
    flops = attn_fwd_flops(b, h, s, s, d, causal)
    timing = {"rep_ms": args.rep_ms}
    row = dict(shape, flops=flops, results={})

    def record(name, fn):
        try:
            ms = fn()
            row["results"][name] = {"ms": ms, "tflops": flops / ms / 1e9}
        except Exception as exc:  # a backend that refuses a shape is a data point, not a crash
            msg = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
            row["results"][name] = {"ms": None, "tflops": None, "error": msg[:300]}
        torch.cuda.synchronize()

    if ours_ok and not args.peers_only:
        record("ours", lambda: time_ours_ms(q, k, v, causal, **timing))
    qt, kt, vt = sdpa_inputs(q, k, v)
    for name, backend in sdpa_backends().items():
        record(name, lambda backend=backend: time_sdpa_ms(qt, kt, vt, causal, backend, **timing))
    del q, k, v, qt, kt, vt
    torch.cuda.empty_cache()

    ours = row["results"].get("ours", {}).get("tflops")
    row["ratios"] = {}
    for peer in PEERS:
        theirs = row["results"].get(peer, {}).get("tflops")
        row["ratios"][f"ours/{peer}"] = (ours / theirs) if (ours and theirs) else None
    return row


def target_summary(rows):
    """How issue 2's target fares: ours >= TARGET_RATIO x SDPA flash at seqlen >= 2048."""
    key = f"ours/{TARGET_PEER}"
    judged = [r for r in rows if r["seqlen"] >= TARGET_MIN_SEQLEN and r["ratios"].get(key) is not None]
    if not judged:
        return None
    missed = [r for r in judged if r["ratios"][key] < TARGET_RATIO]
    worst = min(judged, key=lambda r: r["ratios"][key])
    return {"rule": f"ours >= {TARGET_RATIO}x {TARGET_PEER} at seqlen >= {TARGET_MIN_SEQLEN}",
            "shapes": len(judged), "met": len(judged) - len(missed),
            "worst": {"headdim": worst["headdim"], "causal": worst["causal"], "seqlen": worst["seqlen"],
                      "ratio": worst["ratios"][key]}}


def plot(rows, meta, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written", file=sys.stderr)
        return None
    headdims = sorted({r["headdim"] for r in rows})
    fig, axes = plt.subplots(1, len(headdims), figsize=(5.2 * len(headdims), 4.2), squeeze=False)
    colors = {"ours": "tab:red", "sdpa_flash": "tab:blue", "sdpa_cudnn": "tab:green"}
    labels = {"ours": "flash_attn (ours)", "sdpa_flash": "SDPA flash", "sdpa_cudnn": "SDPA cuDNN"}
    for ax, d in zip(axes[0], headdims):
        for causal, style in ((False, "-"), (True, "--")):
            sub = sorted((r for r in rows if r["headdim"] == d and r["causal"] == causal), key=lambda r: r["seqlen"])
            if not sub:
                continue
            for m in METHODS:
                pts = [(r["seqlen"], r["results"][m]["tflops"]) for r in sub
                       if m in r["results"] and r["results"][m].get("tflops")]
                if pts:
                    xs, ys = zip(*pts)
                    ax.plot(xs, ys, style, marker="o", ms=3, color=colors[m],
                            label=f"{labels[m]}, {'causal' if causal else 'non-causal'}")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({r["seqlen"] for r in rows}))
        ax.set_xticklabels([f"{s // 1024}k" if s >= 1024 else str(s) for s in sorted({r["seqlen"] for r in rows})])
        ax.set_title(f"head dim {d}")
        ax.set_xlabel("sequence length (16k tokens per batch)")
        ax.set_ylabel(f"forward TFLOP/s ({meta['dtype']})")
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"{meta['env'].get('device')}, torch {meta['env'].get('torch')}, commit {meta['commit']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def print_table(rows, meta):
    def fmt(x, spec):
        return format(x, spec) if x is not None else "-"

    print()
    print(f"forward, {meta['dtype']}, {meta['env'].get('device')}, commit {meta['commit']} "
          f"(TFLOP/s; ratio = ours / peer)")
    head = f"{'hdim':>4} {'causal':>6} {'seqlen':>6} {'b':>3} {'h':>3} | {'ours':>6} {'flash':>6} {'cudnn':>6} | " \
           f"{'/flash':>6} {'/cudnn':>6}"
    print(head)
    print("-" * len(head))
    for r in rows:
        t = {m: r["results"].get(m, {}).get("tflops") for m in METHODS}
        print(f"{r['headdim']:>4} {str(r['causal']):>6} {r['seqlen']:>6} {r['batch']:>3} {r['nheads']:>3} | "
              f"{fmt(t['ours'], '6.1f'):>6} {fmt(t['sdpa_flash'], '6.1f'):>6} {fmt(t['sdpa_cudnn'], '6.1f'):>6} | "
              f"{fmt(r['ratios'].get('ours/sdpa_flash'), '6.2f'):>6} {fmt(r['ratios'].get('ours/sdpa_cudnn'), '6.2f'):>6}")
    errors = [(r, m, res["error"]) for r in rows for m, res in r["results"].items() if res.get("error")]
    for r, m, err in errors:
        print(f"  {m} failed at hd{r['headdim']} causal={r['causal']} s={r['seqlen']}: {err}")
    tgt = meta.get("target")
    if tgt:
        w = tgt["worst"]
        print(f"target ({tgt['rule']}): met on {tgt['met']}/{tgt['shapes']} shapes; worst "
              f"{w['ratio']:.2f}x at hd{w['headdim']} {'causal' if w['causal'] else 'non-causal'} s={w['seqlen']}")


def main(argv=None):
    args = parse_args(argv)
    try:
        import torch
    except ImportError:
        print("benchmark_attn: torch is not installed", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("benchmark_attn: no CUDA device is visible to torch "
              f"(torch {torch.__version__}, CUDA {torch.version.cuda}); nothing to measure", file=sys.stderr)
        return 2
    try:
        from flash_attn._bench import environment, ours_unavailable_reason
    except ImportError as exc:
        print(f"benchmark_attn: the flash_attn package is not importable ({exc}); "
              "install it with pip install --no-build-isolation .", file=sys.stderr)
        return 2

    reason = ours_unavailable_reason()
    if reason is not None and not args.peers_only:
        print(f"benchmark_attn: cannot time flash_attn here: {reason}.\n"
              "  Build it on this machine (pip install --no-build-isolation .), "
              "or pass --peers-only to time the SDPA backends alone.", file=sys.stderr)
        return 2

    from flash_attn import build_info

    commit = git_commit()
    env = environment()
    meta = {"benchmark": "attn_fwd", "dtype": args.dtype, "commit": commit, "env": env,
            "build": build_info.build_config(), "tokens_per_batch": TOKENS, "model_dim": MODEL_DIM,
            "timing": f"triton.testing.do_bench median, rep={args.rep_ms} ms" if env.get("triton")
                      else f"CUDA events median, rep={args.rep_ms} ms",
            "flops": "4*b*h*s^2*d, halved when causal",
            "sdpa_layout": "(batch, nheads, seqlen, headdim), contiguous, prepared before timing"}
    rows = []
    grid = list(shapes(args))
    for i, shape in enumerate(grid, 1):
        row = measure(shape, args, ours_ok=reason is None)
        rows.append(row)
        t = {m: row["results"].get(m, {}).get("tflops") for m in METHODS}
        print(f"[{i}/{len(grid)}] hd{shape['headdim']} causal={shape['causal']} s={shape['seqlen']}: " +
              ", ".join(f"{m} {t[m]:.1f}" if t[m] else f"{m} -" for m in METHODS), flush=True)
    meta["target"] = target_summary(rows)

    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"attn_fwd_{_slug(env.get('device', 'gpu'))}_{_slug(commit)}"
    json_path = args.out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(dict(meta, results=rows), indent=1) + "\n")
    print(f"wrote {json_path}")
    if not args.no_plot:
        png = plot(rows, meta, args.out_dir / f"{stem}.png")
        if png:
            print(f"wrote {png}")
    print_table(rows, meta)
    return 0


if __name__ == "__main__":
    sys.exit(main())
