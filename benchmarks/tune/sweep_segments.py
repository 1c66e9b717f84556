"""Sweep the segment plan of the one-pass chunked forwards (flash_attn.linear_attn._kernels:
FUSED_CTAS_PER_SM, MAX_SEGMENTS, MIN_SEGMENT_CHUNKS; MAX_SEGMENTS and MIN_SEGMENT_CHUNKS also
shape chunk_gla's plan) at the ANCHORS shapes and two of fla-core's, and print / save the times.

    python benchmarks/tune/sweep_segments.py --out sweep.json

Each setting is (CTAs per SM, max segments, min chunks per segment); the first is the library's.
Times: flash_attn._bench.time_ms (do_bench median), bf16, K = V = 128.
"""
import argparse
import json

import torch
import torch.nn.functional as F

from flash_attn import linear_attn as la
from flash_attn._bench import time_ms
from flash_attn.linear_attn import _kernels

SETTINGS = [(2, 32, 4), (1, 32, 4), (3, 32, 4), (2, 2, 4), (2, 4, 4), (2, 8, 4), (2, 32, 8), (2, 32, 16)]
SHAPES = [(8, 2048, 16), (4, 4096, 16), (2, 8192, 16), (1, 16384, 16), (1, 65536, 16), (16, 4096, 8), (16, 8192, 8)]
CASES = [("chunk_retention", "fwd"), ("chunk_simple_gla", "fwd"), ("chunk_gla", "fwd"), ("chunk_retention", "fwdbwd")]


def make_call(op, mode, B, T, H, D=128):
    def randn(*shape, grad=mode == "fwdbwd"):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16).requires_grad_(grad)

    q, k, v = randn(B, T, H, D), randn(B, T, H, D), randn(B, T, H, D)
    if op == "chunk_retention":
        fn = lambda: la.chunk_retention(q, k, v)[0]  # noqa: E731
    elif op == "chunk_simple_gla":
        g = F.logsigmoid(torch.randn(B, T, H, device="cuda"))
        fn = lambda: la.chunk_simple_gla(q, k, v, g=g)[0]  # noqa: E731
    else:
        gk = F.logsigmoid(torch.randn(B, T, H, D, device="cuda")) / 16
        fn = lambda: la.chunk_gla(q, k, v, gk)[0]  # noqa: E731
    if mode == "fwd":
        return fn
    do = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16)
    return lambda: torch.autograd.grad(fn(), (q, k, v), do)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="JSON file for the table")
    args = p.parse_args()
    rows = []
    for B, T, H in SHAPES:
        for op, mode in CASES:
            call = make_call(op, mode, B, T, H)
            times = {}
            for cps, max_seg, min_chunks in SETTINGS:
                _kernels.FUSED_CTAS_PER_SM, _kernels.MAX_SEGMENTS, _kernels.MIN_SEGMENT_CHUNKS = cps, max_seg, min_chunks
                times[f"{cps}/{max_seg}/{min_chunks}"] = time_ms(call)
            base = times["2/32/4"]
            best = min(times, key=times.get)
            rows.append({"op": op, "mode": mode, "B": B, "T": T, "H": H, "ms": times})
            print(f"{op:17s} {mode:6s} {B:2d}x{T:<6d} H{H:<2d} base {base:.3f} ms  best {best} {times[best]:.3f} ms "
                  f"({base / times[best]:.2f}x)  " + " ".join(f"{k}:{v:.3f}" for k, v in times.items()), flush=True)
            del call
            torch.cuda.empty_cache()
    if args.out:
        doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "settings": SETTINGS,
               "setting_key": "ctas_per_sm/max_segments/min_segment_chunks", "rows": rows}
        with open(args.out, "w") as f:
            json.dump(doc, f, indent=1)


if __name__ == "__main__":
    main()
