"""Where the chunked linear-attention ops spend their GPU time: every CUDA kernel of one call
(torch.profiler), ours and fla-core side by side, at the ANCHORS shapes (H 16, K = V 128, bf16).

    python benchmarks/tune/profile_linear.py [--ops chunk_gla,chunk_retention] [--shapes 8x2048,1x65536]
                                             [--mode fwd,fwdbwd] [--no-fla] [--json OUT.json]

Per (op, mode, shape, side): the kernels sorted by total time (us per call, calls per call), so
a slow phase (the sequential state pass, the output pass, a gate cumsum, a torch op between
kernels) shows by name. The inputs and calls are benchmark_linear.py's (its Bench class), so
the numbers line up with its JSON. fla-core's Triton kernels are autotuned on their first call;
that call runs before the profiled ones.
"""
import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import benchmark_linear as bl  # noqa: E402


def kernel_table(prof, calls):
    """[(kernel name, us per call, launches per call)] of the profiled CUDA kernels, largest first."""
    total, count = defaultdict(float), defaultdict(int)
    for evt in prof.events():
        if evt.device_type.name == "CUDA":
            total[evt.name] += evt.device_time_total if hasattr(evt, "device_time_total") else evt.cuda_time_total
            count[evt.name] += 1
    rows = [(name, total[name] / calls, count[name] / calls) for name in total]
    return sorted(rows, key=lambda r: -r[1])


def profile_call(call, calls=5):
    import torch
    from torch.profiler import ProfilerActivity, profile

    call()  # first call: allocations, autotuning (fla), outside the profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            call()
        torch.cuda.synchronize()
    return kernel_table(prof, calls)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ops", type=bl._choice_list(bl.ALL_OPS), default=["chunk_simple_gla", "chunk_retention", "chunk_gla"])
    p.add_argument("--shapes", type=bl._shape_list, default=[(8, 2048), (1, 65536)])
    p.add_argument("--mode", type=bl._choice_list(bl.CHUNK_MODES), default=list(bl.CHUNK_MODES))
    p.add_argument("--no-fla", action="store_true")
    p.add_argument("--top", type=int, default=8, help="kernels listed per call")
    p.add_argument("--json", default=None, help="also write every table here")
    args = p.parse_args(argv)
    bench = bl.Bench(bl.parse_args(["--ops", ",".join(args.ops), "--mode", ",".join(args.mode)]
                                   + (["--no-fla"] if args.no_fla else [])))
    out = []
    for B, T in args.shapes:
        bench.setup(B, T, 16, 128)
        try:
            for op in args.ops:
                for mode in args.mode:
                    for side in ("ours",) + (() if args.no_fla else ("fla",)):
                        fn = getattr(bench.ours, op) if side == "ours" else bench.fla.get(op)
                        if fn is None:
                            continue
                        try:
                            table = profile_call(bench._call(fn, op, mode == "fwdbwd"))
                        except Exception as exc:  # a side refusing the shape (fla on Hopper, ...)
                            print(f"=== {op} {mode} {B}x{T} {side}: {bl.error_text(exc)}")
                            continue
                        gpu_us = sum(r[1] for r in table)
                        print(f"=== {op} {mode} {B}x{T} {side}: {gpu_us:.0f} us of kernels per call")
                        for name, us, n in table[:args.top]:
                            print(f"  {us:9.1f} us  x{n:4.1f}  {name[:110]}")
                        out.append({"op": op, "mode": mode, "B": B, "T": T, "side": side, "gpu_us": gpu_us,
                                    "kernels": [{"name": n_, "us": u, "launches": c} for n_, u, c in table]})
        finally:
            bench.teardown()
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
