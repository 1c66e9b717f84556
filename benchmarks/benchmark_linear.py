#!/usr/bin/env python3
"""Linear-attention speed: flash_attn.linear_attn (csrc/linear_attn) against fla-core (Triton).

The grid of the linear-attention issue: H = 16 heads, K = V = 128, bf16, B x T in
{8x2048, 4x4096, 2x8192, 1x16384, 1x65536}; ops chunk_simple_gla (per-step scalar gates
g = logsigmoid(randn) [B, T, H]), chunk_retention (fixed per-head decay) and chunk_gla
(per-key gates g = logsigmoid(randn) [B, T, H, K]), optionally chunk_linear_attn
(normalize=False). Both sides are called
through their public APIs with the same tensors (fla's ops take the same arguments).

Modes (--mode, default fwd,fwdbwd; "all" adds decode):
  fwd     one forward, inputs without requires_grad;
  fwdbwd  one forward and torch.autograd.grad(o, inputs, do) per iteration;
  decode  one recurrent decoding step (T = 1) of fused_recurrent_simple_gla (g [B, 1, H]),
          fused_recurrent_retention and fused_recurrent_gla (gk [B, 1, H, K]) against a
          carried fp32 state [B, H, K, V] (initial_state, output_final_state=True), at the
          batches of --batches (default 1,8,32,128). Besides ms, each side's GB/s of the state
          read + written (2 * B*H*K*V*4 bytes). Short, but not in the default run.
With fwd / fwdbwd, every shape also gets a row "softmax_attn": our exact attention
(flash_attn_func, causal, the same q, k, v) timed the same way, for the crossover between
softmax and linear attention (doc["crossover"]: per op and mode, softmax_ms / ours_ms at each
shape; above 1 the linear op is faster); --no-softmax leaves it out. A PNG of the times sits
beside the JSON (matplotlib; skipped without it).
Times are medians of triton.testing.do_bench (flash_attn._bench.time_ms). The ratio of a
row is fla_ms / ours_ms (above 1: ours is faster); the target is >= 1.5 at every shape.
A side that raises (fla refuses chunk_simple_gla's gated backward on Hopper with some Triton
versions) is recorded as null with the exception's text.
Each forward row also records how far ours and fla are apart (RMS ratio of the outputs).

fla comes from the fla-core 0.6.0 wheel (`import fla`, e.g. through PYTHONPATH); without it
only ours is timed. Writes <out-dir>/linear_<modes>_<device>_<commit>.json and .png (default out-dir
benchmarks/results) and prints a table; --dry-run runs the same path on made-up timings
without a GPU (for CPU tests). The commit comes from $FLASH_ATTN_GIT_COMMIT, else git.

    PYTHONPATH=/path/to/fla-core python benchmarks/benchmark_linear.py
    python benchmarks/benchmark_linear.py --mode fwd --ops chunk_simple_gla --shapes 8x2048,1x65536
    python benchmarks/benchmark_linear.py --mode decode --batches 1,8,32,128
    python benchmarks/benchmark_linear.py --grid fla-gla        (fla-core's own grid; also fla-retention)
    python benchmarks/benchmark_linear.py --dry-run
"""
import argparse
import importlib
import json
import platform
import re
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SHAPES = ((8, 2048), (4, 4096), (2, 8192), (1, 16384), (1, 65536))
DEFAULT_OPS = ("chunk_simple_gla", "chunk_retention", "chunk_gla")
ALL_OPS = ("chunk_simple_gla", "chunk_retention", "chunk_gla", "chunk_linear_attn")
DECODE_OPS = ("fused_recurrent_simple_gla", "fused_recurrent_retention", "fused_recurrent_gla")
DEFAULT_BATCHES = (1, 8, 32, 128)
# --grid: the issue's shapes (ANCHORS.md, the default) or the grids of fla-core's own op
# benchmarks (flash-linear-attention benchmarks/ops/): benchmark_gla.py times chunk_gla and
# chunk_retention at B 16, H 8, D 128, T = 128 * 2^i up to 16384; benchmark_retention.py
# times chunk_retention at B 4, H 8, D 256 over the same T. A grid sets --shapes, --heads
# and --head-dim (and --ops where the op list was left at its default); the JSON's "grid"
# says which one ran.
FLA_T = tuple(128 * 2 ** i for i in range(8))
GRIDS = {
    "anchors": {"shapes": DEFAULT_SHAPES, "heads": 16, "head_dim": 128, "ops": DEFAULT_OPS},
    "fla-gla": {"shapes": tuple((16, t) for t in FLA_T), "heads": 8, "head_dim": 128,
                "ops": ("chunk_gla", "chunk_simple_gla", "chunk_retention")},
    "fla-retention": {"shapes": tuple((4, t) for t in FLA_T), "heads": 8, "head_dim": 256, "ops": ("chunk_retention",)},
}
FLA_MODULES = {"chunk_simple_gla": "fla.ops.simple_gla", "chunk_retention": "fla.ops.retention",
               "chunk_gla": "fla.ops.gla", "chunk_linear_attn": "fla.ops.linear_attn",
               "fused_recurrent_simple_gla": "fla.ops.simple_gla",
               "fused_recurrent_retention": "fla.ops.retention", "fused_recurrent_gla": "fla.ops.gla"}
SOFTMAX_OP = "softmax_attn"  # flash_attn_func(q, k, v, causal=True): the crossover rows
MODES = ("fwd", "fwdbwd", "decode")
CHUNK_MODES = ("fwd", "fwdbwd")
TARGET_RATIO = 1.5
TIMED_REGION = {"fwd": "one forward call; inputs without requires_grad",
                "fwdbwd": "one forward and torch.autograd.grad(o, (q, k, v[, g]), do) per iteration",
                "decode": "one fused_recurrent_* call, T = 1, initial_state fp32 [B, H, K, V], "
                          "output_final_state=True"}
# ../shared/ANCHORS.md: fla-core 0.6.0 decoding steps on one H100 80GB HBM3 (T = 1, D = 128,
# fp32 state in and out), for reference only; compare ratios taken in one run.
DECODE_ANCHORS = {"source": "ANCHORS.md, fla-core 0.6.0 on H100 80GB HBM3 (do_bench median)", "rows": [
    {"B": 1, "H": 16, "fused_recurrent_simple_gla_us": 222, "fused_recurrent_gla_us": 60},
    {"B": 32, "H": 16, "fused_recurrent_simple_gla_us": 73, "fused_recurrent_gla_us": 63},
    {"B": 128, "H": 32, "fused_recurrent_simple_gla_us": 237, "fused_recurrent_gla_us": 216}]}


# The sibling scripts import each other by name, also when this one is run from another
# directory or loaded by path (tests/script_loader.py).
sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark_attn as _attn  # noqa: E402  git_commit / _slug / error_text: one definition of each
git_commit, error_text, _slug = _attn.git_commit, _attn.error_text, _attn._slug


def _shape_list(text):
    out = []
    for part in re.split(r"[,\s]+", text.strip()):
        m = re.fullmatch(r"(\d+)x(\d+)", part)
        if not m:
            raise argparse.ArgumentTypeError(f"expected BxT pairs like 8x2048,1x65536, got {part!r}")
        out.append((int(m.group(1)), int(m.group(2))))
    return out


def _int_list(text):
    parts = [x for x in re.split(r"[,\s]+", text.strip()) if x]
    if not parts or not all(x.isdigit() and int(x) > 0 for x in parts):
        raise argparse.ArgumentTypeError(f"expected positive integers like 1,8,32,128, got {text!r}")
    return [int(x) for x in parts]


def _choice_list(choices):
    def parse(text):
        parts = [x for x in re.split(r"[,\s]+", text.strip()) if x]
        if "all" in parts:
            return list(choices)
        bad = [x for x in parts if x not in choices]
        if bad or not parts:
            raise argparse.ArgumentTypeError(f"expected some of {', '.join(choices)} or all, got {text!r}")
        return [c for c in choices if c in parts]
    return parse


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, default=None,
                   help="where the JSON goes (default benchmarks/results; a temporary folder with --dry-run)")
    p.add_argument("--mode", type=_choice_list(MODES), default=list(CHUNK_MODES),
                   help="some of fwd, fwdbwd, decode, or all (default fwd,fwdbwd: decode is left out of the "
                        "default run; all includes it)")
    p.add_argument("--ops", type=_choice_list(ALL_OPS), default=list(DEFAULT_OPS),
                   help=f"some of {', '.join(ALL_OPS)} (default: {', '.join(DEFAULT_OPS)})")
    p.add_argument("--shapes", type=_shape_list, default=list(DEFAULT_SHAPES), help="BxT list, e.g. 8x2048,1x65536")
    p.add_argument("--decode-ops", type=_choice_list(DECODE_OPS), default=list(DECODE_OPS),
                   help=f"--mode decode: some of {', '.join(DECODE_OPS)} (default all)")
    p.add_argument("--batches", type=_int_list, default=list(DEFAULT_BATCHES),
                   help="--mode decode: batch sizes, e.g. 1,8,32,128 (T = 1)")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128, help="K = V")
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--rep-ms", type=int, default=100, help="do_bench rep in ms")
    p.add_argument("--no-fla", action="store_true", help="time ours only")
    p.add_argument("--no-softmax", action="store_true",
                   help="leave out the softmax-attention rows (flash_attn_func, causal) of the crossover")
    p.add_argument("--grid", choices=tuple(GRIDS), default=None,
                   help="a preset of shapes, heads and head dim: anchors (the issue's, the default values), "
                        "fla-gla or fla-retention (fla-core's own op benchmarks); overrides --shapes, --heads, "
                        "--head-dim, and --ops unless given")
    p.add_argument("--dry-run", action="store_true", help="no GPU: made-up timings through the same path")
    args = p.parse_args(argv)
    if args.grid is not None:
        grid = GRIDS[args.grid]
        args.shapes, args.heads, args.head_dim = list(grid["shapes"]), grid["heads"], grid["head_dim"]
        if args.ops == list(DEFAULT_OPS):
            args.ops = list(grid["ops"])
    return args


# --------------------------------------------------------------------------- rows

def new_row(op, mode, B, T, H, D):
    return {"op": op, "mode": mode, "B": B, "T": T, "H": H, "K": D, "V": D, "results": {}}


def record(row, side, fn):
    """fn() -> ms into row['results'][side]; an exception becomes a null with its text."""
    try:
        row["results"][side] = {"ms": float(fn())}
    except Exception as exc:  # a side refusing a shape is a data point
        row["results"][side] = {"ms": None, "error": error_text(exc)}


def finish_row(row):
    ours = row["results"].get("ours", {}).get("ms")
    fla = row["results"].get("fla", {}).get("ms")
    row["speedup_vs_fla"] = (fla / ours) if (ours and fla) else None
    return row


def state_bytes(B, H, K, V):
    """Bytes of the fp32 state read and written by one decoding step."""
    return 2 * B * H * K * V * 4


def add_state_bandwidth(row):
    """A decode row: its state bytes and each timed side's GB/s of them."""
    row["state_bytes"] = nbytes = state_bytes(row["B"], row["H"], row["K"], row["V"])
    for res in row["results"].values():
        res["state_gbps"] = nbytes / (res["ms"] * 1e-3) / 1e9 if res.get("ms") else None
    return row


def crossover(rows):
    """Per (linear op, mode): softmax_ms / ours_ms at each shape that has both (above 1: the
    linear op is faster than our softmax attention there)."""
    softmax = {(r["mode"], r["B"], r["T"]): r["results"]["ours"].get("ms") for r in rows if r["op"] == SOFTMAX_OP}
    out = []
    for op, mode in sorted({(r["op"], r["mode"]) for r in rows if r["op"] != SOFTMAX_OP and r["mode"] in CHUNK_MODES}):
        points = []
        for r in rows:
            if (r["op"], r["mode"]) != (op, mode):
                continue
            ours, sm = r["results"].get("ours", {}).get("ms"), softmax.get((mode, r["B"], r["T"]))
            if ours and sm:
                points.append({"B": r["B"], "T": r["T"], "softmax_over_linear": sm / ours})
        if points:
            faster = [p["T"] for p in points if p["softmax_over_linear"] > 1]
            out.append({"op": op, "mode": mode, "points": points,
                        "linear_faster_from_T": min(faster) if faster else None})
    return out


def summarize(rows):
    """Per (op, mode): the worst speedup and whether every shape reaches TARGET_RATIO (the
    softmax rows have no fla side and no target)."""
    out = []
    for key in sorted({(r["op"], r["mode"]) for r in rows if r["op"] != SOFTMAX_OP}):
        sub = [r for r in rows if (r["op"], r["mode"]) == key]
        rated = [r for r in sub if r["speedup_vs_fla"] is not None]
        failed = [r for r in sub if r["results"].get("ours", {}).get("ms") is None]
        worst = min(rated, key=lambda r: r["speedup_vs_fla"]) if rated else None
        status = ("not measured" if not rated and not failed else
                  "missed" if failed or any(r["speedup_vs_fla"] < TARGET_RATIO for r in rated) else "met")
        out.append({"op": key[0], "mode": key[1], "shapes": len(sub), "rated": len(rated),
                    "ours_failed": len(failed), "status": status,
                    "worst": None if worst is None else {"B": worst["B"], "T": worst["T"],
                                                         "speedup": worst["speedup_vs_fla"]}})
    return out


# --------------------------------------------------------------------------- timing

class Bench:
    """Real timings on the GPU: inputs per shape, ours and fla through their public APIs."""

    def __init__(self, args):
        import torch

        from flash_attn import linear_attn

        self.torch, self.ours = torch, linear_attn
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        self.rep_ms = args.rep_ms
        self.fla = {}
        self.fla_error = None
        if not args.no_fla:
            ops = [o for o in args.ops if set(args.mode) & set(CHUNK_MODES)]
            ops += [o for o in args.decode_ops if "decode" in args.mode]
            for op in ops:
                try:
                    self.fla[op] = getattr(importlib.import_module(FLA_MODULES[op]), op)
                except Exception as exc:  # no fla-core, or an op it lacks
                    self.fla_error = error_text(exc)

    def setup(self, B, T, H, D, state=False):
        torch = self.torch
        gen = torch.Generator(device="cuda").manual_seed(0)

        def randn(*shape):
            return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.float32)

        self.q, self.k, self.v = (randn(B, T, H, D).to(self.dtype) for _ in range(3))
        self.g = torch.nn.functional.logsigmoid(randn(B, T, H))
        self.gk = torch.nn.functional.logsigmoid(randn(B, T, H, D))
        self.do = randn(B, T, H, D).to(self.dtype)
        self.h0 = randn(B, H, D, D) * 0.1 if state else None

    def teardown(self):
        self.q = self.k = self.v = self.g = self.gk = self.do = self.h0 = None
        self.torch.cuda.empty_cache()

    def _call(self, fn, op, grad):
        torch = self.torch
        q, k, v = (x.detach().requires_grad_(grad) for x in (self.q, self.k, self.v))
        inputs = [q, k, v]
        if op == "chunk_simple_gla":
            g = self.g.detach().requires_grad_(grad)
            inputs.append(g)
            run = lambda: fn(q, k, v, g=g)  # noqa: E731
        elif op == "chunk_gla":
            g = self.gk.detach().requires_grad_(grad)
            inputs.append(g)
            run = lambda: fn(q, k, v, g)  # noqa: E731
        elif op.startswith("fused_recurrent_"):  # one decoding step against the carried state
            kw = {"initial_state": self.h0, "output_final_state": True}
            if op == "fused_recurrent_simple_gla":
                kw["g"] = self.g
            elif op == "fused_recurrent_gla":
                kw["gk"] = self.gk
            run = lambda: fn(q, k, v, **kw)  # noqa: E731
        elif op == "chunk_linear_attn":
            run = lambda: fn(q, k, v, normalize=False)  # noqa: E731
        else:
            run = lambda: fn(q, k, v)  # noqa: E731
        if not grad:
            return run
        return lambda: torch.autograd.grad(run()[0], inputs, self.do)

    def _softmax_call(self, grad):
        from flash_attn import flash_attn_func

        q, k, v = (x.detach().requires_grad_(grad) for x in (self.q, self.k, self.v))
        run = lambda: flash_attn_func(q, k, v, causal=True)  # noqa: E731
        if not grad:
            return run
        return lambda: self.torch.autograd.grad(run(), (q, k, v), self.do)

    def time_ms(self, side, op, mode):
        from flash_attn._bench import time_ms

        if op == SOFTMAX_OP:
            call = self._softmax_call(mode == "fwdbwd")
            call()
            return time_ms(call, rep_ms=self.rep_ms)
        fn = getattr(self.ours, op) if side == "ours" else self.fla.get(op)
        if fn is None:
            raise RuntimeError(f"fla-core is not importable here ({self.fla_error})")
        call = self._call(fn, op, mode == "fwdbwd")
        call()  # raises here, outside timing, when a side refuses the shape
        return time_ms(call, rep_ms=self.rep_ms)

    def agreement(self, op):
        """RMS(ours - fla) / RMS(fla) of the forward outputs, or None."""
        if op not in self.fla:
            return None
        a = self._call(getattr(self.ours, op), op, False)()[0].float()
        b = self._call(self.fla[op], op, False)()[0].float()
        return ((a - b).pow(2).mean().sqrt() / b.pow(2).mean().sqrt()).item()


class FakeBench:
    """--dry-run: made-up times (ours a little faster than fla, fla refusing the gated
    simple-GLA backward as on Hopper)."""

    def __init__(self, args):
        self.fla_error = None

    def setup(self, B, T, H, D, state=False):
        self.tokens = B * T * H * D
        self.T = T
        self.state_bytes = state_bytes(B, H, D, D) if state else 0

    def teardown(self):
        pass

    def time_ms(self, side, op, mode):
        if mode == "decode":  # fla: a launch-bound 60 us floor; ours: 8 us plus the state at 2.5 TB/s
            return 0.060 + self.state_bytes / 2.0e9 if side == "fla" else 0.008 + self.state_bytes / 2.5e9
        if side == "fla" and op == "chunk_simple_gla" and mode == "fwdbwd":
            raise RuntimeError("Triton miscompile on Hopper (dry run)")
        base = self.tokens / 1.2e8 * (3.0 if mode == "fwdbwd" else 1.0)
        if op == SOFTMAX_OP:  # quadratic in T: slower than the linear ops from T = 4096 on
            return base * 0.6 * self.T / 4096
        return base * (1.0 if side == "fla" else 0.6)

    def agreement(self, op):
        return 2e-3


def _measure(args, bench, op, mode, B, T):
    row = new_row(op, mode, B, T, args.heads, args.head_dim)
    if op == SOFTMAX_OP:
        record(row, "ours", lambda: bench.time_ms("ours", op, mode))
        return finish_row(row)
    for side in ["ours"] + ([] if args.no_fla else ["fla"]):
        record(row, side, lambda side=side: bench.time_ms(side, op, mode))
    if mode in ("fwd", "decode") and not args.no_fla:
        try:
            row["rms_ratio_vs_fla"] = bench.agreement(op)
        except Exception as exc:
            row["rms_ratio_vs_fla"] = None
            row["agreement_error"] = error_text(exc)
    if mode == "decode":
        add_state_bandwidth(row)
    return finish_row(row)


def run_grid(args, bench, log=print):
    rows = []
    chunk_modes = [m for m in args.mode if m in CHUNK_MODES]
    chunk_ops = list(args.ops) + ([] if args.no_softmax else [SOFTMAX_OP])
    grid = [(B, T, False, chunk_ops, chunk_modes) for B, T in args.shapes if chunk_modes]
    if "decode" in args.mode:
        grid += [(B, 1, True, args.decode_ops, ["decode"]) for B in args.batches]
    for B, T, state, ops, modes in grid:
        bench.setup(B, T, args.heads, args.head_dim, state=state)
        try:
            for op in ops:
                for mode in modes:
                    rows.append(_measure(args, bench, op, mode, B, T))
                    log(_row_line(rows[-1]))
        finally:
            bench.teardown()
    return rows


# --------------------------------------------------------------------------- output

def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def _row_line(r):
    ours, fla = r["results"].get("ours", {}), r["results"].get("fla", {})
    gbps = (f"  state GB/s ours {_fmt(ours.get('state_gbps'), '7.1f')} fla {_fmt(fla.get('state_gbps'), '7.1f')}"
            if "state_bytes" in r else "")
    return (f"{r['op']:<26} {r['mode']:<7} {r['B']:>2}x{r['T']:<6} ours {_fmt(ours.get('ms'), '8.3f')} ms  "
            f"fla {_fmt(fla.get('ms'), '8.3f')} ms  speedup {_fmt(r['speedup_vs_fla'], '5.2f')}" + gbps
            + (f"  [ours: {ours['error']}]" if ours.get("error") else "")
            + (f"  [fla: {fla['error']}]" if fla.get("error") else ""))


def plot(doc, path):
    """Times per shape: one panel per chunk mode, ours (solid) and fla (dashed) per op, our
    softmax attention in black; a decode panel with the state GB/s. None without matplotlib."""
    plt = _attn.pyplot()
    if plt is None:
        return None
    rows = doc["results"]
    panels = [m for m in doc["modes"] if any(r["mode"] == m for r in rows)]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, mode in zip(axes[0], panels):
        sub = [r for r in rows if r["mode"] == mode]
        decode = mode == "decode"
        labels = sorted({(r["B"], r["T"]) for r in sub}, key=lambda bt: (bt[1], -bt[0]) if not decode else bt)
        xs = {bt: i for i, bt in enumerate(labels)}
        ops = sorted({r["op"] for r in sub}, key=lambda o: (o == SOFTMAX_OP, o))
        for n, op in enumerate(ops):
            for side, style in (("ours", "-"), ("fla", "--")):
                key = "state_gbps" if decode else "ms"
                pts = sorted((xs[(r["B"], r["T"])], r["results"][side][key]) for r in sub
                             if r["op"] == op and r["results"].get(side, {}).get(key))
                if pts:
                    color = "black" if op == SOFTMAX_OP else colors[n % len(colors)]
                    name = "ours, flash_attn_func causal" if op == SOFTMAX_OP else f"{side}, {op}"
                    ax.plot(*zip(*pts), style, marker="o", ms=3, color=color, label=name)
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels([f"{b}x{t}" for b, t in labels], fontsize=8)
        ax.set_xlabel("batch x tokens" if not decode else "batch x 1 token")
        ax.set_ylabel("state GB/s (read + written)" if decode else "ms (log)")
        if not decode:
            ax.set_yscale("log")
        ax.set_title({"fwd": "forward", "fwdbwd": "forward + backward", "decode": "decode step"}[mode]
                     + f", H {doc['heads']}, K = V = {doc['head_dim']}, {doc['dtype']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return _attn.save_figure(plt, fig, f"{doc['env'].get('device')}, fla-core {doc['fla_version']}, "
                             f"commit {doc['commit']}", doc.get("dry_run"), path)


def print_summary(doc, log=print):
    log(f"\nlinear attention vs fla-core on {doc['env'].get('device')} (commit {doc['commit']})"
        + (" -- DRY RUN, MADE-UP NUMBERS" if doc.get("dry_run") else ""))
    for s in doc["summary"]:
        worst = s["worst"]
        log(f"  {s['op']:<26} {s['mode']:<7} target >= {TARGET_RATIO}x fla: {s['status']}"
            + (f" (worst {worst['speedup']:.2f}x at {worst['B']}x{worst['T']})" if worst else "")
            + (f", ours failed on {s['ours_failed']} shape(s)" if s["ours_failed"] else ""))
    for c in doc.get("crossover", []):
        log(f"  {c['op']:<26} {c['mode']:<7} vs our softmax attention (causal): "
            + ", ".join(f"{p['B']}x{p['T']} {p['softmax_over_linear']:.2f}x" for p in c["points"])
            + (f"; faster from T = {c['linear_faster_from_T']}" if c["linear_faster_from_T"] else "; never faster"))


def grid_name(args):
    """The --grid preset the shapes, heads and head dim match, else "custom"."""
    for name, grid in GRIDS.items():
        if (args.grid in (None, name) and [tuple(x) for x in args.shapes] == list(grid["shapes"])
                and (args.heads, args.head_dim) == (grid["heads"], grid["head_dim"])):
            return name
    return "custom"


def assemble(args, rows, env, commit, fla_version):
    chunked = bool(set(args.mode) & set(CHUNK_MODES))
    doc = {"benchmark": "linear_attn", "commit": commit, "env": env, "fla_version": fla_version,
           "dtype": args.dtype, "heads": args.heads, "head_dim": args.head_dim, "grid": grid_name(args),
           "shapes": [f"{B}x{T}" for B, T in args.shapes] if chunked else [],
           "ops": list(args.ops) if chunked else [], "modes": list(args.mode),
           "timing": {"method": "triton.testing.do_bench median (flash_attn._bench.time_ms)",
                      "rep_ms": args.rep_ms, "timed_region": {m: TIMED_REGION[m] for m in args.mode}},
           "inputs": "q, k, v randn; g = logsigmoid(randn) fp32 [B, T, H] (chunk_gla: [B, T, H, K]); "
                     "do randn; scale default; decode: T = 1, g [B, 1, H] (fused_recurrent_gla: gk "
                     "[B, 1, H, K]), initial_state 0.1 * randn fp32 [B, H, K, V]",
           "target": {"speedup_vs_fla": TARGET_RATIO, "source": "linear-attention issue"},
           "results": rows, "summary": summarize(rows)}
    if any(r["op"] == SOFTMAX_OP for r in rows):
        doc["softmax"] = {"op": "flash_attn.flash_attn_func(q, k, v, causal=True), the same q, k, v",
                          "crossover": "softmax_ms / ours_ms per linear op and shape; above 1: linear is faster"}
        doc["crossover"] = crossover(rows)
    if "decode" in args.mode:
        doc["decode"] = {"ops": list(args.decode_ops), "batches": list(args.batches),
                         "state_bandwidth": "state_gbps = 2 * B*H*K*V*4 bytes (fp32 state read + written) / time",
                         "reference": DECODE_ANCHORS}
    if args.dry_run:
        doc["dry_run"] = "made-up timings from benchmark_linear.FakeBench, not a measurement"
    return doc


def write_json(doc, args):
    args.out_dir.mkdir(parents=True, exist_ok=True)
    grid = f"{args.grid}_" if args.grid not in (None, "anchors") else ""
    path = args.out_dir / f"linear_{grid}{'-'.join(args.mode)}_{_slug(doc['env'].get('device') or 'gpu')}_" \
                          f"{_slug(doc['commit'])}.json"
    path.write_text(json.dumps(doc, indent=1) + "\n")
    plot(doc, path.with_suffix(".png"))
    return path


def main(argv=None, log=print):
    args = parse_args(argv)
    if args.dry_run:
        if args.out_dir is None:
            args.out_dir = Path(tempfile.mkdtemp(prefix="benchmark_linear_dry_run_"))
        env = {"torch": "dry-run", "cuda": None, "python": platform.python_version(), "device": "dry-run"}
        bench, fla_version = FakeBench(args), "dry-run"
    else:
        import torch

        from flash_attn._bench import environment
        from flash_attn.linear_attn import _kernels

        if not torch.cuda.is_available():
            sys.exit("benchmark_linear: no CUDA device (use --dry-run for a CPU check of the script)")
        reason = _kernels.unavailable_reason()
        if reason is not None:
            sys.exit(f"benchmark_linear: our kernels cannot run: {reason}")
        if args.out_dir is None:
            args.out_dir = REPO / "benchmarks" / "results"
        env = environment()
        bench = Bench(args)
        try:
            import fla

            fla_version = getattr(fla, "__version__", "unknown")
        except ImportError:
            fla_version = None
            if not args.no_fla:
                log("benchmark_linear: fla is not importable; timing ours only")
                args.no_fla = True
    rows = run_grid(args, bench, log)
    doc = assemble(args, rows, env, git_commit(), fla_version)
    path = write_json(doc, args)
    print_summary(doc, log)
    log(f"wrote {path}")
    return doc, path


if __name__ == "__main__":
    main()
