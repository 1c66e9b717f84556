#!/usr/bin/env python3
"""Forward and backward speed of flash_attn_func against PyTorch SDPA (flash and cuDNN backends).

The grid of ../shared/ANCHORS.md (flash-attn's own convention): 16k tokens per
batch (batch = 16384 // seqlen), model dim 2048 (nheads = 2048 // headdim),
self-attention, head dims 64/128/256, causal off and on, seqlen 512 to 16k,
bf16. Each time is the median of `triton.testing.do_bench`; SDPA gets its own
layout (batch, nheads, seqlen, headdim), made contiguous before timing.

Modes (--mode, default all three):
  fwd     the forward alone, inputs without requires_grad (as in issue 2's runs);
  bwd     the backward alone: each side's forward runs once outside the timed
          region, then `torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)`
          is timed;
  fwdbwd  a whole forward and backward per iteration.
Ours always goes through the public `flash_attn_func` (with requires_grad inputs
for bwd / fwdbwd, so the custom op's autograd route is what is timed).
FLOPs: fwd = 4*b*h*s^2*d, bwd = 2.5 x fwd, fwd+bwd = 3.5 x fwd, halved when causal.
With bwd or fwdbwd, the peak memory of one forward+backward is recorded too:
torch.cuda.max_memory_allocated() over the pass minus memory_allocated() just
before it (so the inputs q, k, v, dout are not counted), in GB (1e9 bytes).
A method that raises (ours beyond head dim 256, a backend refusing a
shape) is recorded as null with the exception's text; it counts as a missed
target.

Writes <out-dir>/attn_<modes>_<device>_<commit>.json (e.g. attn_fwd-bwd-fwdbwd_...;
attn_fwd_... when only the forward runs, the name and schema issue 2's files
have) and one .png beside it (a row of panels per mode, one more for memory),
then prints per-mode tables and, last, a summary of ratios to SDPA flash and
of the issues' targets (so a log's tail shows it).

    python benchmarks/benchmark_attn.py                  # the full grid, all modes
    python benchmarks/benchmark_attn.py --quick          # hd 128, two seqlens, all modes
    python benchmarks/benchmark_attn.py --mode bwd --headdims 128 --seqlens 2048,16384
    python benchmarks/benchmark_attn.py --dry-run        # no GPU: fake timings through the same path

Run time on an H100 (an estimate): do_bench spends max(t, 25 ms) warming up,
max(t, 100 ms) timing and ~7 more runs t of the function per call. On the
speeds of ANCHORS.md and of our first backward (0.55x flash), that model gives
14 s for the forward grid (108 calls), which took 26 s in all in issue 2's run,
and 46 s for all three modes (~300 calls, plus ~100 untimed memory passes).
Scaling the whole 46 s by the forward's 26/14 gives ~85 s; adding the
forward's 12 s of overhead once gives ~60 s: the full grid should take 1 to
1.5 minutes, well under 4 (`--dry-run` prints the model's figure for any grid).

The commit is taken from $FLASH_ATTN_GIT_COMMIT, else from `git` when the
script runs inside a checkout, else recorded as 'unknown'.
"""
import argparse
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TOKENS = 16384
MODEL_DIM = 2048
DEFAULT_HEADDIMS = (64, 128, 256)
DEFAULT_SEQLENS = (512, 1024, 2048, 4096, 8192, 16384)
MODES = ("fwd", "bwd", "fwdbwd")
MODE_NAMES = {"fwd": "forward", "bwd": "backward", "fwdbwd": "forward+backward"}
RESULT_KEYS = {"fwd": "results", "bwd": "results_bwd", "fwdbwd": "results_fwdbwd"}
METHODS = ("ours", "ours_det", "sdpa_flash", "sdpa_cudnn")
PEERS = ("sdpa_flash", "sdpa_cudnn")
LABELS = {"ours": "flash_attn (ours)", "ours_det": "flash_attn deterministic", "sdpa_flash": "SDPA flash",
          "sdpa_cudnn": "SDPA cuDNN"}
SHORT = {"ours": "ours", "ours_det": "det", "sdpa_flash": "flash", "sdpa_cudnn": "cudnn"}
COLORS = {"ours": "tab:red", "ours_det": "tab:orange", "sdpa_flash": "tab:blue", "sdpa_cudnn": "tab:green"}
TIMED_REGION = {
    "fwd": "one forward call; inputs without requires_grad",
    "bwd": "torch.autograd.grad(out, (q, k, v), dout, retain_graph=True); the forward ran once, untimed",
    "fwdbwd": "one forward and torch.autograd.grad(out, (q, k, v), dout) per iteration",
}
PEAK_MEMORY_METHOD = ("one forward + torch.autograd.grad after the timing runs: torch.cuda.max_memory_allocated() "
                      "minus memory_allocated() just before the pass (inputs q, k, v, dout not counted); "
                      "GB = 1e9 bytes")
# The issues' targets on an H100. ratio: ours >= ratio x peer (TFLOP/s) at every shape with
# seqlen >= min_seqlen; tflops: ours >= that many TFLOP/s at one shape; det: the deterministic
# backward at most max_slowdown slower than the default at seqlen >= min_seqlen (only judged
# when --deterministic timed it).
TARGETS = {
    "fwd": [{"kind": "ratio", "peer": "sdpa_flash", "ratio": 1.0, "min_seqlen": 2048, "source": "issue 2"}],
    "bwd": [{"kind": "ratio", "peer": "sdpa_flash", "ratio": 1.0, "min_seqlen": 2048, "source": "issue 3"},
            {"kind": "tflops", "headdim": 128, "causal": False, "seqlen": 16384, "tflops": 296.0,
             "source": "issue 3"},
            {"kind": "det", "max_slowdown": 0.15, "min_seqlen": 2048, "source": "issue 3"}],
    "fwdbwd": [],
}


def _int_list(text):
    return [int(x) for x in re.split(r"[,\s]+", text.strip()) if x]


def _mode_list(text):
    parts = [x for x in re.split(r"[,\s]+", text.strip().lower()) if x]
    bad = [x for x in parts if x != "all" and x not in MODES]
    if bad or not parts:
        raise argparse.ArgumentTypeError(f"expected fwd, bwd, fwdbwd or all (comma-separated), got {text!r}")
    return list(MODES) if "all" in parts else [m for m in MODES if m in parts]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, default=None,
                   help="where the JSON and PNG go (default: benchmarks/results; a temporary folder with --dry-run)")
    p.add_argument("--mode", type=_mode_list, default=list(MODES),
                   help="fwd, bwd, fwdbwd or all, or a comma-separated list (default: all)")
    p.add_argument("--headdims", type=_int_list, default=None, help="e.g. 64,128,256")
    p.add_argument("--seqlens", type=_int_list, default=None, help="e.g. 512,2048,16384")
    p.add_argument("--causal", choices=("both", "on", "off"), default="both")
    p.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    p.add_argument("--quick", action="store_true",
                   help="head dim 128, seqlens 2048 and 8192, shorter timing (a smoke run)")
    p.add_argument("--peers-only", action="store_true",
                   help="time only the SDPA backends (for a machine without our kernels)")
    p.add_argument("--deterministic", action="store_true",
                   help="also time our backward with deterministic=True (bwd and fwdbwd modes)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory pass of bwd / fwdbwd")
    p.add_argument("--rep-ms", type=int, default=None, help="do_bench rep in ms (default 100, quick 30)")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--dry-run", action="store_true",
                   help="no GPU: run the whole path (tables, targets, JSON, plot) on made-up timings")
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


def file_stem(modes, device, commit):
    """attn_<modes joined by '-'>_<device>_<commit>: attn_fwd_... for a forward-only run."""
    return f"attn_{'-'.join(modes)}_{_slug(device or 'gpu')}_{_slug(commit)}"


def shapes(args):
    causals = {"both": (False, True), "on": (True,), "off": (False,)}[args.causal]
    for d in args.headdims:
        for causal in causals:
            for s in args.seqlens:
                yield {"headdim": d, "causal": causal, "seqlen": s,
                       "batch": max(1, TOKENS // s), "nheads": MODEL_DIM // d}


def pass_flops(shape, mode):
    """FLOPs of one pass of `mode` on a grid shape (self-attention, seqlen_q = seqlen_k)."""
    from flash_attn._bench import attn_flops

    s = shape["seqlen"]
    return attn_flops(shape["batch"], shape["nheads"], s, s, shape["headdim"], shape["causal"], mode)


def methods_for(mode, with_ours=True, deterministic=False):
    """The methods timed in one mode: ours (and its deterministic backward), then the peers."""
    ours = ["ours"] if with_ours else []
    if with_ours and deterministic and mode != "fwd":
        ours.append("ours_det")
    return ours + list(PEERS)


def error_text(exc):
    """'Type: first line of the message', at most 300 characters (what a JSON row records)."""
    msg = str(exc).strip()
    return f"{type(exc).__name__}: {msg.splitlines()[0] if msg else ''}"[:300]


def _shape_label(r):
    return f"hd{r['headdim']} {'causal' if r['causal'] else 'non-causal'} s={r['seqlen']}"


def _tflops(row, method):
    return row["results"].get(method, {}).get("tflops")


def new_row(shape, mode):
    return dict(shape, flops=pass_flops(shape, mode), results={})


def record_time(row, method, fn):
    """Times fn() -> ms into row['results'][method]; an exception becomes a null with its text."""
    try:
        ms = fn()
        row["results"][method] = {"ms": ms, "tflops": row["flops"] / ms / 1e9}
    except Exception as exc:  # a backend that refuses a shape is a data point, not a crash
        row["results"][method] = {"ms": None, "tflops": None, "error": error_text(exc)}


def finish_row(row):
    """Ratios of ours to each peer (TFLOP/s), and of the deterministic backward to the default."""
    ours = _tflops(row, "ours")
    row["ratios"] = {}
    for peer in PEERS:
        theirs = _tflops(row, peer)
        row["ratios"][f"ours/{peer}"] = (ours / theirs) if (ours and theirs) else None
    if "ours_det" in row["results"]:
        det = _tflops(row, "ours_det")
        row["ratios"]["ours_det/ours"] = (det / ours) if (det and ours) else None
    return row


def memory_row(shape, inputs_bytes):
    return dict(shape, inputs_gb=inputs_bytes / 1e9, results={})


def record_memory(row, method, fn):
    try:
        row["results"][method] = {"peak_gb": fn() / 1e9}
    except Exception as exc:
        row["results"][method] = {"peak_gb": None, "error": error_text(exc)}


def finish_memory_row(row):
    """Ratios ours / peer of the peak memory (below 1: ours needs less)."""
    ours = row["results"].get("ours", {}).get("peak_gb")
    row["ratios"] = {}
    for peer in PEERS:
        theirs = row["results"].get(peer, {}).get("peak_gb")
        row["ratios"][f"ours/{peer}"] = (ours / theirs) if (ours and theirs) else None
    return row


# --- targets ---------------------------------------------------------------------------------

def rule_text(rule):
    if rule["kind"] == "ratio":
        return f"ours >= {rule['ratio']}x {rule['peer']} at seqlen >= {rule['min_seqlen']}"
    if rule["kind"] == "tflops":
        return (f"ours >= {rule['tflops']:g} TFLOP/s at hd{rule['headdim']} "
                f"{'causal' if rule['causal'] else 'non-causal'} s={rule['seqlen']}")
    if rule["kind"] == "det":
        return (f"deterministic backward within {rule['max_slowdown']:.0%} of the default "
                f"(time) at seqlen >= {rule['min_seqlen']}")
    raise ValueError(rule["kind"])


def judge(rule, rows):
    """How one target fares on one mode's rows: a dict with 'status' met / missed / not measured.

    Ours null (unsupported or failed) counts as missed; a shape where the peer has no time
    cannot be judged and is counted under 'unjudged'.
    """
    out = {"rule": rule_text(rule), "source": rule.get("source")}
    timed_ours = any("ours" in r["results"] for r in rows)
    if rule["kind"] == "ratio":
        key = f"ours/{rule['peer']}"
        domain = [r for r in rows if r["seqlen"] >= rule["min_seqlen"]]
        judged = [r for r in domain if _tflops(r, rule["peer"]) and "ours" in r["results"]]
        missed = [r for r in judged if r["ratios"].get(key) is None or r["ratios"][key] < rule["ratio"]]
        rated = [r for r in judged if r["ratios"].get(key) is not None]
        worst = min(rated, key=lambda r: r["ratios"][key]) if rated else None
        out.update(shapes=len(judged), met=len(judged) - len(missed), missed=len(missed),
                   unsupported=sum(1 for r in judged if _tflops(r, "ours") is None),
                   unjudged=len(domain) - len(judged),
                   worst=None if worst is None else {
                       "headdim": worst["headdim"], "causal": worst["causal"], "seqlen": worst["seqlen"],
                       "ratio": worst["ratios"][key]},
                   missed_shapes=[{"headdim": r["headdim"], "causal": r["causal"], "seqlen": r["seqlen"],
                                   "ratio": r["ratios"].get(key),
                                   **({"error": r["results"]["ours"].get("error")}
                                      if r["results"]["ours"].get("error") else {})} for r in missed])
        out["status"] = "not measured" if not judged else ("missed" if missed else "met")
        if not domain:
            out["note"] = f"no shape of this run's grid has seqlen >= {rule['min_seqlen']}"
        elif not timed_ours:
            out["note"] = "ours was not timed"
        elif not judged:
            out["note"] = f"{rule['peer']} has no time on any shape it covers"
    elif rule["kind"] == "tflops":
        hit = [r for r in rows if r["headdim"] == rule["headdim"] and r["causal"] == rule["causal"]
               and r["seqlen"] == rule["seqlen"]]
        if not hit:
            out.update(status="not measured", value=None, note="that shape is not in this run's grid")
        elif "ours" not in hit[0]["results"]:
            out.update(status="not measured", value=None, note="ours was not timed")
        else:
            res = hit[0]["results"]["ours"]
            value = res.get("tflops")
            out.update(value=value, fraction=(value / rule["tflops"]) if value else None,
                       status="met" if value is not None and value >= rule["tflops"] else "missed")
            if res.get("error"):
                out["error"] = res["error"]
    elif rule["kind"] == "det":
        domain = [r for r in rows if r["seqlen"] >= rule["min_seqlen"] and "ours_det" in r["results"]
                  and _tflops(r, "ours")]
        limit = 1.0 + rule["max_slowdown"]
        missed = [r for r in domain if r["results"]["ours_det"].get("ms") is None
                  or r["results"]["ours_det"]["ms"] > limit * r["results"]["ours"]["ms"]]
        slow = [r["results"]["ours_det"]["ms"] / r["results"]["ours"]["ms"] for r in domain
                if r["results"]["ours_det"].get("ms") is not None]
        out.update(shapes=len(domain), met=len(domain) - len(missed), missed=len(missed),
                   worst_slowdown=(max(slow) - 1.0) if slow else None,
                   status="not measured" if not domain else ("missed" if missed else "met"))
        if not domain:
            out["note"] = "the deterministic backward was not timed (--deterministic) at a covered shape"
    else:
        raise ValueError(rule["kind"])
    return out


def evaluate_targets(rows_by_mode):
    """{mode: [judged target, ...]} for each mode that ran."""
    return {mode: [judge(rule, rows) for rule in TARGETS[mode]] for mode, rows in rows_by_mode.items()}


def target_line(mode, t):
    head = f"[{MODE_NAMES[mode]}] {t['rule']} ({t.get('source')}): {t['status'].upper()}"
    if t["status"] == "not measured":
        return head + f" ({t.get('note', 'nothing to judge')})"
    if "value" in t:
        if t["value"] is None:
            return head + f": ours unsupported ({t.get('error') or 'no time'})"
        return head + f": {t['value']:.1f} TFLOP/s ({t['fraction']:.2f}x of the target)"
    ws = t.get("worst_slowdown")
    text = head + f": {t['met']}/{t['shapes']} shapes meet it"
    if "worst_slowdown" in t:
        return text + (f"; worst {ws:+.0%} time" if ws is not None else "")
    if t["unsupported"]:
        hds = sorted({s["headdim"] for s in t["missed_shapes"] if s["ratio"] is None})
        text += f" ({t['unsupported']} unsupported or failed: hd {', '.join(map(str, hds))})"
    if t["worst"]:
        w = t["worst"]
        text += f"; worst {w['ratio']:.2f}x at {_shape_label(w)}"
    if t["unjudged"]:
        text += f"; {t['unjudged']} shape(s) unjudged (peer has no time)"
    return text


# --- the JSON --------------------------------------------------------------------------------

def assemble(meta, rows_by_mode, memory_rows=None):
    """The result file's content. Issue 2's forward keys stay as they were ('results' = the
    forward rows, 'target' = the forward's ratio target); the other modes go under
    results_bwd / results_fwdbwd, all targets under 'targets', memory under 'peak_memory'."""
    targets = evaluate_targets(rows_by_mode)
    doc = dict(meta)
    doc["modes"] = [m for m in MODES if m in rows_by_mode]
    doc["benchmark"] = "attn_" + "-".join(doc["modes"])
    if "fwd" in targets:
        doc["target"] = targets["fwd"][0]
    doc["targets"] = targets
    for mode in MODES:
        if mode in rows_by_mode:
            doc[RESULT_KEYS[mode]] = rows_by_mode[mode]
    if memory_rows is not None:
        doc["peak_memory_method"] = PEAK_MEMORY_METHOD
        doc["peak_memory"] = memory_rows
    return doc


# --- measuring ---------------------------------------------------------------------------------

class CudaBench:
    """Times the methods on one shape's inputs, created once for all modes."""

    def __init__(self, args):
        import torch

        from flash_attn import _bench

        self.torch, self.b = torch, _bench
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
        self.timing = {"rep_ms": args.rep_ms}
        self.backends = _bench.sdpa_backends()

    def setup(self, shape):
        torch = self.torch
        b, s, h, d = shape["batch"], shape["seqlen"], shape["nheads"], shape["headdim"]
        gen = torch.Generator(device="cuda").manual_seed(0)
        # q, k, v drawn first, as the forward-only script did
        self.q, self.k, self.v, self.dout = (torch.randn(b, s, h, d, device="cuda", dtype=self.dtype, generator=gen)
                                             for _ in range(4))
        self.qt, self.kt, self.vt = self.b.sdpa_inputs(self.q, self.k, self.v)
        self.dout_t = self.dout.transpose(1, 2).contiguous()
        self.inputs_bytes = sum(t.numel() * t.element_size() for t in (self.q, self.k, self.v, self.dout))

    def teardown(self):
        for name in ("q", "k", "v", "dout", "qt", "kt", "vt", "dout_t"):
            self.__dict__.pop(name, None)
        self.torch.cuda.synchronize()
        self.torch.cuda.empty_cache()

    def time_ms(self, method, mode, causal):
        try:
            return self._time_ms(method, mode, causal)
        finally:
            self.torch.cuda.synchronize()

    def _time_ms(self, method, mode, causal):
        b = self.b
        if method in ("ours", "ours_det"):
            if mode == "fwd":
                return b.time_ours_ms(self.q, self.k, self.v, causal, **self.timing)
            return b.time_ours_grad_ms(self.q, self.k, self.v, self.dout, causal, mode,
                                       deterministic=method == "ours_det", **self.timing)
        backend = self.backends[method]
        if mode == "fwd":
            return b.time_sdpa_ms(self.qt, self.kt, self.vt, causal, backend, **self.timing)
        return b.time_sdpa_grad_ms(self.qt, self.kt, self.vt, self.dout_t, causal, backend, mode, **self.timing)

    def peak_bytes(self, method, causal):
        b = self.b
        if method in ("ours", "ours_det"):
            return b.peak_ours_fwdbwd_bytes(self.q, self.k, self.v, self.dout, causal,
                                            deterministic=method == "ours_det")
        return b.peak_sdpa_fwdbwd_bytes(self.qt, self.kt, self.vt, self.dout_t, causal, self.backends[method])


class FakeBench:
    """--dry-run: made-up but plausible times shaped like ANCHORS.md's H100 table, with our
    backward refusing head dims above 256 and cuDNN refusing some shapes, so that every path
    (errors included) runs without a GPU. `modeled_s` adds up what do_bench would spend."""

    FLASH_TFLOPS = {"fwd": 320.0, "bwd": 265.0, "fwdbwd": 280.0}
    RELATIVE = {"fwd": {"ours": 1.08, "ours_det": 1.08, "sdpa_flash": 1.0, "sdpa_cudnn": 1.8},
                "bwd": {"ours": 0.55, "ours_det": 0.5, "sdpa_flash": 1.0, "sdpa_cudnn": 1.6},
                "fwdbwd": {"ours": 0.65, "ours_det": 0.6, "sdpa_flash": 1.0, "sdpa_cudnn": 1.65}}

    def __init__(self, args):
        self.rep_ms = args.rep_ms
        self.modeled_s = 0.0

    def setup(self, shape):
        self.shape = shape
        self.inputs_bytes = 4 * shape["batch"] * shape["seqlen"] * shape["nheads"] * shape["headdim"] * 2

    def teardown(self):
        pass

    def _refuse(self, method, mode, causal):
        d, s = self.shape["headdim"], self.shape["seqlen"]
        if method.startswith("ours") and mode != "fwd" and d > 256:
            raise RuntimeError(f"the backward supports head dims <= 256, got {d} (dry run)")
        if method == "sdpa_cudnn" and mode != "fwd" and d >= 256 and causal and s == 512:
            raise RuntimeError("No available kernel. Aborting execution. (dry run: a peer refusing a shape)")

    def time_ms(self, method, mode, causal):
        self._refuse(method, mode, causal)
        s, d = self.shape["seqlen"], self.shape["headdim"]
        tf = self.FLASH_TFLOPS[mode] * self.RELATIVE[mode][method] * (1.0 + 0.05 * (d == 128))
        tf *= s / (s + 300.0) * (s / (s + 1200.0) if causal else 1.0) * 1.25
        ms = pass_flops(self.shape, mode) / tf / 1e9
        # do_bench: one call, 5 to estimate, max(1, 25 ms / t) warm-up, max(1, rep / t) timed; and
        # our own first call (plus the untimed forward for bwd) before it
        self.modeled_s += (7 * ms + max(ms, 25.0) + max(ms, float(self.rep_ms))) / 1e3
        return ms

    def peak_bytes(self, method, causal):
        self._refuse(method, "fwdbwd", causal)
        one = self.inputs_bytes / 4  # one (b, s, h, d) tensor
        lse = self.shape["batch"] * self.shape["nheads"] * self.shape["seqlen"] * 4
        extra = {"ours": 2.5, "ours_det": 2.5, "sdpa_flash": 2.0, "sdpa_cudnn": 0.5}[method]
        return int((4 + extra) * one + 2 * lse)


def run_grid(args, bench, with_ours, log=print):
    """Times every (shape, mode, method) and, with bwd or fwdbwd, the peak memory.
    Returns ({mode: rows}, memory rows or None)."""
    rows_by_mode = {mode: [] for mode in args.mode}
    want_memory = not args.no_memory and any(m != "fwd" for m in args.mode)
    memory_rows = [] if want_memory else None
    grid = list(shapes(args))
    for i, shape in enumerate(grid, 1):
        bench.setup(shape)
        parts = []
        try:
            for mode in args.mode:
                row = new_row(shape, mode)
                methods = methods_for(mode, with_ours, args.deterministic)
                for m in methods:
                    record_time(row, m, lambda m=m: bench.time_ms(m, mode, shape["causal"]))
                rows_by_mode[mode].append(finish_row(row))
                parts.append(f"{mode} " + ", ".join(
                    f"{SHORT[m]} {_tflops(row, m):.1f}" if _tflops(row, m) else f"{SHORT[m]} -" for m in methods))
            if want_memory:
                mrow = memory_row(shape, bench.inputs_bytes)
                methods = methods_for("bwd", with_ours, args.deterministic)
                for m in methods:
                    record_memory(mrow, m, lambda m=m: bench.peak_bytes(m, shape["causal"]))
                memory_rows.append(finish_memory_row(mrow))
                parts.append("GB " + ", ".join(
                    f"{SHORT[m]} {mrow['results'][m]['peak_gb']:.2f}" if mrow["results"][m]["peak_gb"] is not None
                    else f"{SHORT[m]} -" for m in methods))
        finally:
            bench.teardown()
        log(f"[{i}/{len(grid)}] {_shape_label(shape)}: " + " | ".join(parts), flush=True)
    return rows_by_mode, memory_rows


# --- plot and tables ---------------------------------------------------------------------------

def pyplot():
    """matplotlib.pyplot with the file-only Agg backend, or None (with a note on stderr) when
    matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot written", file=sys.stderr)
        return None
    return plt


def plot(rows_by_mode, memory_rows, meta, path):
    plt = pyplot()
    if plt is None:
        return None
    panels = [(mode, rows, "tflops") for mode, rows in rows_by_mode.items()]
    if memory_rows:
        panels.append(("memory", memory_rows, "peak_gb"))
    all_rows = [r for _, rows, _ in panels for r in rows]
    headdims = sorted({r["headdim"] for r in all_rows})
    seqlens = sorted({r["seqlen"] for r in all_rows})
    fig, axes = plt.subplots(len(panels), len(headdims), figsize=(5.2 * len(headdims), 4.2 * len(panels)),
                             squeeze=False)
    for axrow, (mode, rows, key) in zip(axes, panels):
        for ax, d in zip(axrow, headdims):
            for causal, style in ((False, "-"), (True, "--")):
                sub = sorted((r for r in rows if r["headdim"] == d and r["causal"] == causal),
                             key=lambda r: r["seqlen"])
                for m in METHODS:
                    pts = [(r["seqlen"], r["results"][m][key]) for r in sub
                           if m in r["results"] and r["results"][m].get(key)]
                    if pts:
                        xs, ys = zip(*pts)
                        ax.plot(xs, ys, style, marker="o", ms=3, color=COLORS[m],
                                label=f"{LABELS[m]}, {'causal' if causal else 'non-causal'}")
            ax.set_xscale("log", base=2)
            ax.set_xticks(seqlens)
            ax.set_xticklabels([f"{s // 1024}k" if s >= 1024 else str(s) for s in seqlens])
            name = "peak memory, one fwd+bwd" if mode == "memory" else MODE_NAMES[mode]
            ax.set_title(f"{name}, head dim {d}")
            ax.set_xlabel("sequence length (16k tokens per batch)")
            ax.set_ylabel("GB above the inputs" if mode == "memory"
                          else f"{MODE_NAMES[mode]} TFLOP/s ({meta['dtype']})")
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            failed = [m for m in METHODS if sub_rows_failed(rows, d, m, key)]
            if failed:
                ax.text(0.02, 0.97, "no result (see the JSON's errors): " + ", ".join(LABELS[m] for m in failed),
                        transform=ax.transAxes, va="top", fontsize=7, color="gray")
        handles = max((ax.get_legend_handles_labels() for ax in axrow), key=lambda hl: len(hl[0]))
        if handles[0]:
            axrow[0].legend(*handles, fontsize=7, loc="lower right")
    return save_figure(plt, fig, f"{meta['env'].get('device')}, torch {meta['env'].get('torch')}, "
                       f"commit {meta['commit']}", meta.get("dry_run"), path)


def save_figure(plt, fig, title, dry_run, path):
    """Titles fig (marked when the numbers are a dry run's), writes it to path as PNG, closes it."""
    fig.suptitle(title + (" (DRY RUN: made-up numbers)" if dry_run else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def sub_rows_failed(rows, headdim, method, key):
    """True when `method` ran at this head dim but has no value on any of its shapes."""
    sub = [r for r in rows if r["headdim"] == headdim and method in r["results"]]
    return bool(sub) and all(r["results"][method].get(key) is None for r in sub)


def _fmt(x, spec):
    return format(x, spec) if x is not None else "-"


def print_mode_table(mode, rows, meta):
    methods = [m for m in METHODS if any(m in r["results"] for r in rows)]
    has_det = "ours_det" in methods
    print()
    print(f"{MODE_NAMES[mode]}, {meta['dtype']}, {meta['env'].get('device')}, commit {meta['commit']} "
          f"(TFLOP/s; ratio = ours / peer; timed: {TIMED_REGION[mode]})")
    head = (f"{'hdim':>4} {'causal':>6} {'seqlen':>6} {'b':>3} {'h':>3} | "
            + " ".join(f"{SHORT[m]:>6}" for m in methods) + f" | {'/flash':>6} {'/cudnn':>6}"
            + (f" {'det/ours':>8}" if has_det else ""))
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['headdim']:>4} {str(r['causal']):>6} {r['seqlen']:>6} {r['batch']:>3} {r['nheads']:>3} | "
              + " ".join(f"{_fmt(_tflops(r, m), '6.1f'):>6}" for m in methods)
              + f" | {_fmt(r['ratios'].get('ours/sdpa_flash'), '6.2f'):>6} "
              f"{_fmt(r['ratios'].get('ours/sdpa_cudnn'), '6.2f'):>6}"
              + (f" {_fmt(r['ratios'].get('ours_det/ours'), '8.2f'):>8}" if has_det else ""))
    print_errors(rows)


def print_errors(rows):
    """One line per (method, error text), with the shapes it happened at."""
    groups = {}
    for r in rows:
        for m, res in r["results"].items():
            if res.get("error"):
                groups.setdefault((m, res["error"]), []).append(r)
    for (m, err), rs in groups.items():
        where = ", ".join(_shape_label(r) for r in rs[:3]) + (f" and {len(rs) - 3} more" if len(rs) > 3 else "")
        print(f"  {m} failed on {len(rs)} shape(s) ({where}): {err}")


def print_memory_table(memory_rows, meta):
    methods = [m for m in METHODS if any(m in r["results"] for r in memory_rows)]
    print()
    print(f"peak memory of one forward+backward, {meta['dtype']} (GB above the inputs; ratio = ours / peer, "
          f"below 1 = ours uses less)")
    head = (f"{'hdim':>4} {'causal':>6} {'seqlen':>6} {'inputs':>6} | "
            + " ".join(f"{SHORT[m]:>6}" for m in methods) + f" | {'/flash':>6} {'/cudnn':>6}")
    print(head)
    print("-" * len(head))
    for r in memory_rows:
        print(f"{r['headdim']:>4} {str(r['causal']):>6} {r['seqlen']:>6} {r['inputs_gb']:>6.2f} | "
              + " ".join(f"{_fmt(r['results'][m].get('peak_gb') if m in r['results'] else None, '6.2f'):>6}"
                         for m in methods)
              + f" | {_fmt(r['ratios'].get('ours/sdpa_flash'), '6.2f'):>6} "
              f"{_fmt(r['ratios'].get('ours/sdpa_cudnn'), '6.2f'):>6}")
    print_errors(memory_rows)


def print_summary(doc):
    """Last: ours / SDPA flash per mode, head dim and mask across seqlens, then the targets."""
    modes = doc["modes"]
    rows_by_mode = {m: doc[RESULT_KEYS[m]] for m in modes}
    seqlens = sorted({r["seqlen"] for rows in rows_by_mode.values() for r in rows})
    print()
    print(f"=== summary, commit {doc['commit']}, {doc['env'].get('device')}"
          + (" -- DRY RUN, MADE-UP NUMBERS" if doc.get("dry_run") else ""))
    print("ours / SDPA flash (TFLOP/s ratio, above 1 = faster; 'n/a' = ours unsupported or failed)")
    head = f"{'mode':<8} {'hdim':>4} {'causal':>6} | " + " ".join(f"{s:>6}" for s in seqlens)
    print(head)
    print("-" * len(head))

    def line(label, rows, value):
        keys = sorted({(r["headdim"], r["causal"]) for r in rows})
        for d, c in keys:
            by_s = {r["seqlen"]: r for r in rows if r["headdim"] == d and r["causal"] == c}
            cells = [value(by_s[s]) if s in by_s else "" for s in seqlens]
            print(f"{label:<8} {d:>4} {str(c):>6} | " + " ".join(f"{x:>6}" for x in cells))

    def ratio_cell(r):
        x = r["ratios"].get("ours/sdpa_flash")
        if x is not None:
            return f"{x:.2f}"
        return "n/a" if "ours" in r["results"] else "-"

    for mode in modes:
        line({"fwdbwd": "fwd+bwd"}.get(mode, mode), rows_by_mode[mode], ratio_cell)
    if doc.get("peak_memory"):
        print("peak memory of one forward+backward, ours / SDPA flash (below 1 = ours uses less)")
        line("memory", doc["peak_memory"], ratio_cell)
    print("targets:")
    for mode in modes:
        if not doc["targets"][mode]:
            print(f"  [{MODE_NAMES[mode]}] no target set (issue 3 asks for the numbers only)")
        for t in doc["targets"][mode]:
            if t["status"] == "not measured" and "worst_slowdown" in t and not any(
                    "ours_det" in r["results"] for r in rows_by_mode[mode]):
                continue  # the deterministic rule, without --deterministic: nothing to say
            print("  " + target_line(mode, t))


# --- main ----------------------------------------------------------------------------------------

def _meta(args, commit, env, build):
    from flash_attn._bench import PASS_FLOP_FACTORS

    timer = "triton.testing.do_bench median" if env.get("triton") else "CUDA events median"
    meta = {"benchmark": None, "dtype": args.dtype, "commit": commit, "env": env, "build": build,
            "tokens_per_batch": TOKENS, "model_dim": MODEL_DIM,
            "timing": f"{timer}, rep={args.rep_ms} ms",
            "flops": "4*b*h*s^2*d, halved when causal",
            "flops_by_mode": {m: ("4*b*h*s^2*d" if m == "fwd" else f"{PASS_FLOP_FACTORS[m]:g} x fwd")
                              + ", halved when causal" for m in args.mode},
            "timed_region": {m: TIMED_REGION[m] for m in args.mode},
            "sdpa_layout": "(batch, nheads, seqlen, headdim), contiguous, prepared before timing"}
    if args.dry_run:
        meta["dry_run"] = "made-up timings from benchmark_attn.FakeBench, not a measurement"
    return meta


def write_outputs(doc, rows_by_mode, memory_rows, args):
    args.out_dir.mkdir(parents=True, exist_ok=True)
    stem = file_stem(doc["modes"], doc["env"].get("device"), doc["commit"])
    json_path = args.out_dir / f"{stem}.json"
    json_path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"wrote {json_path}")
    if not args.no_plot:
        png = plot(rows_by_mode, memory_rows, doc, args.out_dir / f"{stem}.png")
        if png:
            print(f"wrote {png}")
    return json_path


def report(doc, rows_by_mode, memory_rows):
    for mode, rows in rows_by_mode.items():
        print_mode_table(mode, rows, doc)
    if memory_rows:
        print_memory_table(memory_rows, doc)
    print_summary(doc)


def dry_run(args):
    # the fake needs flash_attn._bench's FLOP count only: take the source tree's when none is installed
    if importlib.util.find_spec("flash_attn") is None:
        sys.path.insert(0, str(REPO))
    import platform

    if args.out_dir is None:
        args.out_dir = Path(tempfile.mkdtemp(prefix="benchmark_attn_dry_run_"))
    env = {"flash_attn": "dry-run", "torch": "dry-run", "cuda": None, "python": platform.python_version(),
           "date": None, "triton": None, "device": "dry-run", "sm": None, "multiprocessors": None, "cudnn": None}
    bench = FakeBench(args)
    rows_by_mode, memory_rows = run_grid(args, bench, with_ours=not args.peers_only)
    doc = assemble(_meta(args, git_commit(), env, {"dry_run": True}), rows_by_mode, memory_rows)
    write_outputs(doc, rows_by_mode, memory_rows, args)
    print(f"dry run: a real run of this grid would spend about {bench.modeled_s:.0f} s inside do_bench "
          "at these made-up speeds (plus start-up, allocation and plotting)")
    report(doc, rows_by_mode, memory_rows)
    return 0


def main(argv=None):
    args = parse_args(argv)
    if args.dry_run:
        return dry_run(args)
    if args.out_dir is None:
        args.out_dir = REPO / "benchmarks" / "results"
    try:
        import torch
    except ImportError:
        print("benchmark_attn: torch is not installed", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("benchmark_attn: no CUDA device is visible to torch "
              f"(torch {torch.__version__}, CUDA {torch.version.cuda}); nothing to measure "
              "(--dry-run runs the script on made-up timings)", file=sys.stderr)
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

    env = environment()
    meta = _meta(args, git_commit(), env, build_info.build_config())
    rows_by_mode, memory_rows = run_grid(args, CudaBench(args), with_ours=reason is None and not args.peers_only)
    doc = assemble(meta, rows_by_mode, memory_rows)
    write_outputs(doc, rows_by_mode, memory_rows, args)
    report(doc, rows_by_mode, memory_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
