#!/usr/bin/env python3
"""A few small ragged forward calls (and with --backward, their gradients through
autograd, on both the atomic and the deterministic backward paths), meant to run under
compute-sanitizer:

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 scripts/memcheck.py
    compute-sanitizer --tool memcheck --error-exitcode 1 python3 scripts/memcheck.py --backward
    compute-sanitizer --tool racecheck --error-exitcode 1 python3 scripts/memcheck.py --quick

torch's caching allocator is turned off (PYTORCH_NO_CUDA_MEMORY_CACHING=1, set
before torch starts), so every tensor is its own allocation and a read or
write just past one is reported instead of landing in a neighbour's bytes.
Shapes are tiny: sanitizers slow kernels down by orders of magnitude.
Exits 0 when every call ran and gave finite outputs; 2 when there is nothing
to check (no GPU or no kernels).
"""
import argparse
import os
import sys

os.environ.setdefault("PYTORCH_NO_CUDA_MEMORY_CACHING", "1")

import torch  # noqa: E402


def cases(head_dims, alibi, softcap):
    """(label, kind, kwargs) of the calls to make."""
    out = []
    for d in head_dims:
        out += [
            (f"d{d} causal 17x33 gqa", "dense", dict(b=1, sq=17, sk=33, hq=4, hk=2, d=d, causal=True)),
            (f"d{d} window 1x239 mqa", "dense", dict(b=2, sq=1, sk=239, hq=4, hk=1, d=d, window=(37, 19))),
            (f"d{d} 129x65 transposed q", "dense", dict(b=1, sq=129, sk=65, hq=2, hk=2, d=d, transposed=True)),
            (f"d{d} varlen empty seqs causal", "varlen",
             dict(lens_q=[0, 17, 1, 0, 70], lens_k=[5, 0, 33, 0, 129], hq=4, hk=2, d=d, causal=True)),
            (f"d{d} varlen empty seqs window", "varlen",
             dict(lens_q=[3, 0, 130], lens_k=[0, 9, 64], hq=2, hk=1, d=d, window=(8, 4))),
        ]
        if alibi or softcap:
            out.append((f"d{d} alibi={alibi} softcap={softcap} 113x203", "dense",
                        dict(b=1, sq=113, sk=203, hq=2, hk=1, d=d, causal=True,
                             alibi=alibi, softcap=2.5 if softcap else 0.0)))
    return out


def run(kind, dtype, b=1, sq=1, sk=1, hq=1, hk=1, d=64, causal=False, window=(-1, -1),
        alibi=False, softcap=0.0, transposed=False, lens_q=None, lens_k=None, backward=None):
    """backward: None (forward only), "atomic" or "deterministic" (then the gradients of
    q, k, v must be finite too)."""
    from flash_attn import flash_attn_func, flash_attn_varlen_func

    def randn(*shape):
        return torch.randn(*shape, device="cuda", dtype=dtype, requires_grad=backward is not None)

    if kind == "varlen":
        cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), device="cuda", dtype=torch.int32)
        cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), device="cuda", dtype=torch.int32)
        q, k, v = randn(sum(lens_q), hq, d), randn(sum(lens_k), hk, d), randn(sum(lens_k), hk, d)
        slopes = torch.rand(len(lens_q), hq, device="cuda") if alibi else None
        out = flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k), causal=causal,
                                     window_size=window, softcap=softcap, alibi_slopes=slopes,
                                     deterministic=backward == "deterministic")
    else:
        q = randn(b, hq, sq, d).transpose(1, 2) if transposed else randn(b, sq, hq, d)
        k, v = randn(b, sk, hk, d), randn(b, sk, hk, d)
        slopes = torch.rand(hq, device="cuda") if alibi else None
        out = flash_attn_func(q, k, v, causal=causal, window_size=window, softcap=softcap,
                              alibi_slopes=slopes, deterministic=backward == "deterministic")
    tensors = [out]
    if backward is not None:
        tensors += list(torch.autograd.grad(out, (q, k, v), torch.randn_like(out)))
    torch.cuda.synchronize()
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one head dim only (for racecheck)")
    p.add_argument("--backward", action="store_true",
                   help="also differentiate each call (atomic and deterministic backward)")
    args = p.parse_args(argv)

    from flash_attn import build_info
    from flash_attn._bench import ours_unavailable_reason

    reason = ours_unavailable_reason()
    if reason:
        print(f"memcheck: nothing to check: {reason}")
        return 2
    cfg = build_info.build_config()
    dtype = torch.bfloat16 if "bf16" in cfg["dtypes"] else torch.float16
    hdims = sorted(build_info.compiled_head_dims())
    if args.backward:  # head dims whose backward kernel (64, 128 or 256; others run padded) is built
        bwd = cfg.get("backward_head_dims") or []
        hdims = [x for x in hdims if (64 if x <= 64 else 128 if x <= 128 else 256) in bwd]
    # the smallest, a padded odd one, and the largest compiled head dim
    picks = [hdims[0]] if args.quick else sorted({hdims[0], min(59, hdims[-1]), hdims[-1]})
    bad = 0
    todo = cases(picks, build_info.has_feature("alibi"), build_info.has_feature("softcap"))
    if args.backward:
        todo = [(f"{label} bwd {mode}", kind, dict(kw, backward=mode))
                for label, kind, kw in todo for mode in ("atomic", "deterministic")]
    for label, kind, kw in todo:
        finite = run(kind, dtype, **kw)
        bad += not finite
        print(f"  {'ok ' if finite else 'NON-FINITE'} {label}", flush=True)
    print(f"memcheck: {len(todo)} calls, {bad} with non-finite outputs ({'bf16' if dtype == torch.bfloat16 else 'fp16'})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
