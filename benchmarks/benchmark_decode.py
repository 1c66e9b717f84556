#!/usr/bin/env python3
"""Decode speed: one new token against a KV cache, ours vs PyTorch SDPA (flash, cuDNN).

The grid of the inference issue (../shared/ANCHORS.md): 32 query heads, 8 KV heads,
head dim 128, bf16, batch x cache length in {1 x 131072, 8 x 32768, 32 x 8192,
128 x 2048}; every cache is full (cache_seqlens = its length). Methods:

  ours         flash_attn_with_kvcache on a contiguous cache
  ours_paged16 / ours_paged256   the same cache in pages of 16 / 256 rows (block_table;
               pages of one sequence scattered over the pool by a fixed permutation)
  sdpa_flash / sdpa_cudnn         torch SDPA on (b, h, 1, d) x (b, h_k, L, d) with
               enable_gqa (K and V expanded to h heads when the backend refuses it; the
               expansion happens once, outside the timed call)

Metric: the bandwidth of reading K and V once, 2 * b * L * h_k * d * 2 bytes / time, in
TB/s. Ratios ours / cuDNN (above 1: ours is faster) and paged / contiguous. Targets:
ours >= 0.95x cuDNN at every shape and >= 1.0x at 1 x 131072; paged within 10% of
contiguous. Times are medians of triton.testing.do_bench (flash_attn._bench.time_ms).
Writes <out-dir>/decode_<device>_<commit>.json and, with matplotlib, a PNG beside it (TB/s
per shape and method, cuDNN's level and the 0.95x target marked); --dry-run goes through the
same path with made-up timings and no GPU (for the CPU tests); --plot-json FILE redraws
the PNG of a JSON written earlier (no timing).

    python benchmarks/benchmark_decode.py
    python benchmarks/benchmark_decode.py --shapes 1x131072,8x32768 --methods ours,sdpa_cudnn
    python benchmarks/benchmark_decode.py --dry-run
    python benchmarks/benchmark_decode.py --plot-json benchmarks/results/decode_<device>_<commit>.json
"""
import argparse
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DEFAULT_SHAPES = ((1, 131072), (8, 32768), (32, 8192), (128, 2048))
METHODS = ("ours", "ours_paged16", "ours_paged256", "sdpa_flash", "sdpa_cudnn")
PAGE_SIZES = {"ours_paged16": 16, "ours_paged256": 256}
TARGET_VS_CUDNN, TARGET_LONG, LONG_SHAPE, PAGED_SLACK = 0.95, 1.0, (1, 131072), 0.10


# benchmark_linear.py shares its argument parsers and result helpers (the latter from
# benchmark_attn.py): one definition of each. Imported by name from this directory.
sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchmark_attn as _attn  # noqa: E402
import benchmark_linear as _linear  # noqa: E402
git_commit, error_text, _slug = _linear.git_commit, _linear.error_text, _linear._slug
_shape_list, _method_list = _linear._shape_list, _linear._choice_list(METHODS)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", type=_shape_list, default=list(DEFAULT_SHAPES), help="BxL list, e.g. 1x131072,8x32768")
    p.add_argument("--methods", type=_method_list, default=list(METHODS))
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--rep-ms", type=float, default=100.0, help="do_bench rep in ms")
    p.add_argument("--out-dir", default=None, help="default benchmarks/results (a temporary folder with --dry-run)")
    p.add_argument("--dry-run", action="store_true", help="no GPU: made-up timings through the same path")
    p.add_argument("--plot-json", default=None, help="only redraw the PNG of this JSON (written beside it)")
    return p.parse_args(argv)


def kv_bytes(b, length, kv_heads, head_dim, elem_bytes=2):
    """Bytes of K and V that one decode step reads."""
    return 2 * b * length * kv_heads * head_dim * elem_bytes


def new_row(b, length, args):
    return {"batch": b, "cache_len": length, "heads": args.heads, "kv_heads": args.kv_heads,
            "head_dim": args.head_dim, "kv_bytes": kv_bytes(b, length, args.kv_heads, args.head_dim),
            "results": {}}


def record(row, method, fn):
    """Times one method; a failure is recorded with its exception text instead of a time."""
    try:
        ms = float(fn())
        row["results"][method] = {"ms": ms, "tb_per_s": row["kv_bytes"] / (ms * 1e-3) / 1e12}
    except Exception as exc:  # noqa: BLE001 - any failure of one method must not stop the grid
        row["results"][method] = {"ms": None, "tb_per_s": None, "error": error_text(exc)}


def finish_row(row):
    """ours* / sdpa_cudnn and paged / contiguous, as time ratios (above 1: faster)."""
    res = row["results"]

    def ms(m):
        return res.get(m, {}).get("ms")

    ratios = {}
    for m in ("ours", "ours_paged16", "ours_paged256"):
        if ms(m) and ms("sdpa_cudnn"):
            ratios[f"{m}/sdpa_cudnn"] = ms("sdpa_cudnn") / ms(m)
    for m in ("ours_paged16", "ours_paged256"):
        if ms(m) and ms("ours"):
            ratios[f"{m}/ours"] = ms("ours") / ms(m)
    row["ratios"] = ratios
    return row


def evaluate_targets(rows):
    """One verdict per target: met, missed or not measured (with the worst shape)."""
    def verdict(rule, items, bound):
        items = [(r, v) for r, v in items]
        measured = [(r, v) for r, v in items if v is not None]
        if not measured:
            return {"rule": rule, "status": "not measured"}
        worst_row, worst = min(measured, key=lambda x: x[1])
        ok = all(v >= bound for _, v in measured) and len(measured) == len(items)
        return {"rule": rule, "status": "met" if ok else "missed", "measured": len(measured), "shapes": len(items),
                "worst": {"batch": worst_row["batch"], "cache_len": worst_row["cache_len"], "ratio": worst}}

    out = [verdict(f"ours >= {TARGET_VS_CUDNN}x sdpa_cudnn at every shape",
                   [(r, r["ratios"].get("ours/sdpa_cudnn")) for r in rows], TARGET_VS_CUDNN)]
    long_rows = [r for r in rows if (r["batch"], r["cache_len"]) == LONG_SHAPE]
    if long_rows:
        out.append(verdict(f"ours >= {TARGET_LONG}x sdpa_cudnn at {LONG_SHAPE[0]}x{LONG_SHAPE[1]}",
                           [(r, r["ratios"].get("ours/sdpa_cudnn")) for r in long_rows], TARGET_LONG))
    for m in ("ours_paged16", "ours_paged256"):
        out.append(verdict(f"{m} within {PAGED_SLACK:.0%} of contiguous",
                           [(r, r["ratios"].get(f"{m}/ours")) for r in rows], 1.0 - PAGED_SLACK))
    return out


class CudaDecode:
    """Inputs of one shape on the GPU and the timed call of each method."""

    def __init__(self, args):
        import torch

        from flash_attn import _bench

        self.torch, self.bench, self.args = torch, _bench, args

    def setup(self, b, length):
        torch, a = self.torch, self.args
        dev, dt = "cuda", torch.bfloat16
        gen = torch.Generator(device=dev).manual_seed(b * 1_000_003 + length)
        self.q = torch.randn(b, 1, a.heads, a.head_dim, device=dev, dtype=dt, generator=gen)
        self.k_cache = torch.randn(b, length, a.kv_heads, a.head_dim, device=dev, dtype=dt, generator=gen)
        self.v_cache = torch.randn(b, length, a.kv_heads, a.head_dim, device=dev, dtype=dt, generator=gen)
        self.cache_seqlens = torch.full((b,), length, device=dev, dtype=torch.int32)
        self.paged = {}

    def teardown(self):
        self.q = self.k_cache = self.v_cache = self.paged = None
        self.torch.cuda.empty_cache()

    def _paged(self, page):
        """The cache in pages of `page` rows, each sequence's pages scattered over the pool."""
        if page not in self.paged:
            torch = self.torch
            b, length = self.k_cache.shape[:2]
            if length % page:
                raise ValueError(f"cache length {length} is not a multiple of the page size {page}")
            per_seq = length // page
            perm = torch.randperm(b * per_seq, generator=torch.Generator().manual_seed(page)).to("cuda")
            block_table = perm.view(b, per_seq).to(torch.int32)

            def pool(cache):
                pages = cache.reshape(b * per_seq, page, *cache.shape[2:])
                out = torch.empty_like(pages)
                out[perm] = pages
                return out
            self.paged[page] = (pool(self.k_cache), pool(self.v_cache), block_table)
        return self.paged[page]

    def _sdpa_call(self, backend_name):
        torch = self.torch
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {"sdpa_flash": SDPBackend.FLASH_ATTENTION, "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}[backend_name]
        q = self.q.transpose(1, 2)
        k, v = self.k_cache.transpose(1, 2), self.v_cache.transpose(1, 2)
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def with_gqa():
            with sdpa_kernel(backend):
                return sdpa(q, k, v, enable_gqa=True)
        try:
            with_gqa()
            return with_gqa
        except RuntimeError:  # the backend does not take GQA: expand K, V once, outside the timing
            rep = self.args.heads // self.args.kv_heads
            ke, ve = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)

            def expanded():
                with sdpa_kernel(backend):
                    return sdpa(q, ke, ve)
            return expanded

    def time_ms(self, method):
        from flash_attn import flash_attn_with_kvcache

        if method == "ours":
            def fn():
                return flash_attn_with_kvcache(self.q, self.k_cache, self.v_cache, cache_seqlens=self.cache_seqlens)
        elif method in PAGE_SIZES:
            k_pool, v_pool, block_table = self._paged(PAGE_SIZES[method])

            def fn():
                return flash_attn_with_kvcache(self.q, k_pool, v_pool, cache_seqlens=self.cache_seqlens,
                                               block_table=block_table)
        else:
            fn = self._sdpa_call(method)
        return self.bench.time_ms(fn, rep_ms=self.args.rep_ms)


class FakeDecode:
    """--dry-run: made-up, shape-dependent timings; no torch CUDA needed."""

    SPEED_TB_S = {"ours": 2.6, "ours_paged16": 2.3, "ours_paged256": 2.5, "sdpa_flash": 2.2, "sdpa_cudnn": 2.8}

    def __init__(self, args):
        self.args = args

    def setup(self, b, length):
        self.bytes = kv_bytes(b, length, self.args.kv_heads, self.args.head_dim)

    def teardown(self):
        pass

    def time_ms(self, method):
        return self.bytes / (self.SPEED_TB_S[method] * 1e12) * 1e3


def run_grid(args, bench, log=print):
    rows = []
    for b, length in args.shapes:
        row = new_row(b, length, args)
        bench.setup(b, length)
        try:
            for method in args.methods:
                record(row, method, lambda m=method: bench.time_ms(m))
        finally:
            bench.teardown()
        rows.append(finish_row(row))
        parts = [f"{m} {row['results'][m]['tb_per_s']:.2f}" if row["results"][m]["ms"] else f"{m} failed"
                 for m in args.methods]
        log(f"b={b} L={length}: TB/s " + ", ".join(parts))
    return rows


def plot(doc, path):
    """Grouped bars: TB/s of each method at each shape, a tick at 0.95x cuDNN per shape.
    Returns path, or None without matplotlib."""
    plt = _attn.pyplot()
    if plt is None:
        return None
    rows = doc["rows"]
    methods = [m for m in METHODS if any(r["results"].get(m, {}).get("tb_per_s") for r in rows)]
    fig, ax = plt.subplots(figsize=(8, 4.4))
    width = 0.8 / max(1, len(methods))
    for n, m in enumerate(methods):
        xs = [i + (n - (len(methods) - 1) / 2) * width for i in range(len(rows))]
        ys = [r["results"].get(m, {}).get("tb_per_s") or 0.0 for r in rows]
        ax.bar(xs, ys, width, label=m)
    for i, r in enumerate(rows):
        cudnn = r["results"].get("sdpa_cudnn", {}).get("tb_per_s")
        if cudnn:
            ax.hlines(TARGET_VS_CUDNN * cudnn, i - 0.45, i + 0.45, colors="black", linestyles="dotted",
                      label=f"{TARGET_VS_CUDNN}x cuDNN" if i == 0 else None)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{r['batch']} x {r['cache_len']}" for r in rows], fontsize=8)
    ax.set_xlabel("batch x cache length (one new token, 32 q / 8 kv heads, d 128)")
    ax.set_ylabel("TB/s of K + V read")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return _attn.save_figure(plt, fig, f"decode, {doc['device']}, commit {doc['commit']}",
                             doc["device"] == "dry-run", path)


def main(argv=None):
    args = parse_args(argv)
    if args.plot_json:
        src = Path(args.plot_json)
        out = plot(json.loads(src.read_text()), src.with_suffix(".png"))
        print(f"wrote {out}" if out else "benchmark_decode: matplotlib is not installed, no plot")
        return 0 if out else 2
    if args.dry_run:
        bench, device, env = FakeDecode(args), "dry-run", {"note": "made-up timings (--dry-run)"}
    else:
        import torch

        from flash_attn import _bench

        reason = _bench.ours_unavailable_reason()
        if reason:
            print(f"benchmark_decode: cannot run: {reason}")
            return 2
        bench, device, env = CudaDecode(args), torch.cuda.get_device_name(), _bench.environment()
    commit = git_commit()
    rows = run_grid(args, bench)
    doc = {"benchmark": "decode: one new token against a full KV cache", "device": device, "env": env,
           "commit": commit, "dtype": "bf16", "metric": "TB/s of K + V read once (2 * b * L * h_k * d * 2 bytes)",
           "timing": "median of triton.testing.do_bench (flash_attn._bench.time_ms)",
           "rows": rows, "targets": evaluate_targets(rows)}
    out_dir = Path(args.out_dir) if args.out_dir else (
        Path(tempfile.mkdtemp()) if args.dry_run else REPO / "benchmarks" / "results")
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"decode_{_slug(device)}_{_slug(commit)}.json"
    path.write_text(json.dumps(doc, indent=1))
    png = plot(doc, path.with_suffix(".png"))
    for t in doc["targets"]:
        worst = t.get("worst")
        print(f"  {t['rule']}: {t['status']}" + (f" (worst {worst['ratio']:.2f}x at {worst['batch']}x"
                                                 f"{worst['cache_len']})" if worst else ""))
    print(f"wrote {path}" + (f" and {png.name}" if png else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
