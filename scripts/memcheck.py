#!/usr/bin/env python3
"""A few small ragged forward calls (and with --backward, their gradients through
autograd, on both the atomic and the deterministic backward paths), meant to run under
compute-sanitizer. Forward only: KV-cache decode steps on contiguous caches (cache_seqlens
negative or past the capacity, which the kernel must clamp), paged KV (block_table) decode and
prefill, with page sizes that do not divide the key tiles, ragged lengths, split and unsplit, and
block tables holding indices outside the pool (which the kernel must clamp, never follow):

    compute-sanitizer --tool memcheck --error-exitcode 1 python3 scripts/memcheck.py
    compute-sanitizer --tool memcheck --error-exitcode 1 python3 scripts/memcheck.py --backward
    compute-sanitizer --tool racecheck --error-exitcode 1 python3 scripts/memcheck.py --quick
    compute-sanitizer --tool memcheck --error-exitcode 1 python3 scripts/memcheck.py --linear
    compute-sanitizer --tool racecheck --error-exitcode 1 python3 scripts/memcheck.py --linear --quick

--linear checks the linear-attention kernels (flash_attn_linear_cuda) instead: chunked GLA and
simple GLA, forward and backward, ragged lengths, padded head dims, varlen with empty sequences.

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


def kvcache_cases(head_dims):
    """(label, kind, kwargs) of flash_attn_with_kvcache on contiguous caches (kind "kvcache"): the
    batched kernel reads the caches in place, q and out as GQA-packed strided views, and without
    new keys cache_seqlens goes to it unclamped (negative and past-capacity values included), so
    the kernel's own clamp is what keeps every read inside the caches."""
    out = []
    for d in head_dims:
        out += [
            (f"d{d} decode gqa q-from-qkv bad seqlens split", "kvcache",
             dict(seqlens=[0, 37, 10 ** 6, -5], cap=200, hq=8, hk=2, d=d, num_splits=0)),
            (f"d{d} decode mqa bad seqlens split3", "kvcache",
             dict(seqlens=[10 ** 6, 3], cap=130, hq=4, hk=1, d=d, num_splits=3)),
            (f"d{d} append gqa bad seqlens unsplit", "kvcache",
             dict(seqlens=[0, 199, 10 ** 6], cap=200, hq=8, hk=2, d=d, s_new=1, num_splits=1)),
            (f"d{d} append sq3 causal mha", "kvcache",
             dict(seqlens=[5, 190], cap=193, hq=4, hk=4, d=d, sq=3, s_new=3, causal=True, num_splits=0)),
        ]
    return out


def run_kvcache(kind, dtype, seqlens, cap, hq, hk, d, sq=1, s_new=0, causal=False, num_splits=0):
    """One flash_attn_with_kvcache call on (len(seqlens), cap, hk, d) caches, q sliced from a fused
    qkv tensor (b, sq, hq + 2 hk, d)."""
    from flash_attn import flash_attn_with_kvcache

    def randn(*shape):
        return torch.randn(*shape, device="cuda", dtype=dtype)

    b = len(seqlens)
    k_cache, v_cache = randn(b, cap, hk, d), randn(b, cap, hk, d)
    q = randn(b, sq, hq + 2 * hk, d)[:, :, :hq]
    new = (randn(b, s_new, hk, d), randn(b, s_new, hk, d)) if s_new else (None, None)
    out = flash_attn_with_kvcache(q, k_cache, v_cache, *new,
                                  cache_seqlens=torch.tensor(seqlens, device="cuda", dtype=torch.int32),
                                  causal=causal, num_splits=num_splits)
    torch.cuda.synchronize()
    return bool(torch.isfinite(out).all())


def paged_cases(head_dims):
    """(label, kind, kwargs) of the paged-KV calls: flash_attn_with_kvcache (kind "kvcache_paged")
    and flash_attn_varlen_func (kind "varlen_paged") on page pools."""
    out = []
    for d in head_dims:
        out += [
            (f"d{d} paged decode page16 gqa ragged split", "kvcache_paged",
             dict(seqlens=[0, 37, 200], page=16, hq=8, hk=2, d=d, num_splits=0)),
            (f"d{d} paged append page48 leftpad causal unsplit", "kvcache_paged",
             dict(seqlens=[5, 100, 47], page=48, hq=4, hk=4, d=d, sq=3, causal=True, leftpad=[0, 17, 47],
                  num_splits=1)),
            (f"d{d} paged decode page32 bad block table", "kvcache_paged",
             dict(seqlens=[3, 90, 10 ** 6], page=32, hq=4, hk=1, d=d, bad_table=True, num_splits=3)),
            (f"d{d} paged varlen prefill page16 causal", "varlen_paged",
             dict(lens_q=[17, 0, 65], lens_k=[40, 0, 129], page=16, hq=4, hk=2, d=d, causal=True)),
        ]
    return out


def run_paged(kind, dtype, page, hq, hk, d, seqlens=None, sq=1, causal=False, leftpad=None, bad_table=False,
              num_splits=0, lens_q=None, lens_k=None):
    """One paged call on a shuffled page pool with 3 spare pages; bad_table puts indices outside
    the pool (negative and past the end) and a cache_seqlens past the capacity in the table's way."""
    from flash_attn import flash_attn_varlen_func, flash_attn_with_kvcache

    def randn(*shape):
        return torch.randn(*shape, device="cuda", dtype=dtype)

    lengths = lens_k if kind == "varlen_paged" else [min(n, 300) + sq for n in seqlens]
    b, per_seq = len(lengths), -(-max(lengths) // page)
    num_blocks = b * per_seq + 3
    k_cache, v_cache = randn(num_blocks, page, hk, d), randn(num_blocks, page, hk, d)
    table = torch.randperm(num_blocks, device="cuda")[:b * per_seq].view(b, per_seq).to(torch.int32)
    if bad_table:
        table[0, 0], table[-1, -1] = -3, num_blocks + 5
    if kind == "varlen_paged":
        cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), device="cuda", dtype=torch.int32)
        cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), device="cuda", dtype=torch.int32)
        out = flash_attn_varlen_func(randn(sum(lens_q), hq, d), k_cache, v_cache, cu_q, cu_k, max(lens_q),
                                     max(lens_k), causal=causal, block_table=table)
    else:
        pad = None if leftpad is None else torch.tensor(leftpad, device="cuda", dtype=torch.int32)
        out = flash_attn_with_kvcache(randn(b, sq, hq, d), k_cache, v_cache, randn(b, sq, hk, d),
                                      randn(b, sq, hk, d),
                                      cache_seqlens=torch.tensor(seqlens, device="cuda", dtype=torch.int32),
                                      cache_leftpad=pad, causal=causal, block_table=table, num_splits=num_splits)
    torch.cuda.synchronize()
    return bool(torch.isfinite(out).all())


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


def linear_cases(quick):
    """(label, kwargs) of the linear-attention calls: op chunk_gla / fused_recurrent_gla /
    fused_recurrent_gla_gv (with a value gate: its own backward kernel) / chunk_simple_gla,
    batch B x T or varlen lens, H heads, head dims K, V."""
    out = [
        ("chunk_gla 2x65 K64 V64", dict(op="chunk_gla", B=2, T=65, H=2, K=64, V=64)),
        ("chunk_gla varlen empty seqs K100 V72", dict(op="chunk_gla", lens=[0, 65, 1, 130, 0], H=2, K=100, V=72)),
        ("fused_recurrent_gla gk+gv varlen reverse K100 V72", dict(op="fused_recurrent_gla_gv", lens=[40, 0, 33], H=2,
                                                                   K=100, V=72)),
        # recurrent.cuh's larger-grid layouts (H100 / H200, 132 SMs; the varlen case above has the small-grid
        # one): a decoding step on 136 x 2 heads (V 72 padded to 128) = 272 CTAs of whole 128-column rows;
        # two steps on 1088 CTAs of 32 columns and 8 state rows per thread
        ("fused_recurrent_gla decode 136x1 K100 V72", dict(op="fused_recurrent_gla", B=136, T=1, H=2, K=100, V=72)),
        ("fused_recurrent_gla 136x2 K100 V72", dict(op="fused_recurrent_gla", B=136, T=2, H=2, K=100, V=72)),
        # few CTAs, so the one-pass forward cuts the sequences into segments (_kernels.fused_plan)
        ("chunk_simple_gla segments varlen", dict(op="chunk_simple_gla", lens=[0, 700, 1, 333], H=1, K=128, V=128)),
        # the same with chunk_state in segments too (the two-pass forward and the backward's passes)
        ("chunk_simple_gla segmented states varlen", dict(op="chunk_simple_gla", lens=[0, 700, 1, 333], H=1, K=128,
                                                          V=128, env={"FLASH_ATTN_LINEAR_SEGMENTED_STATES": "1",
                                                                      "FLASH_ATTN_LINEAR_FUSED_FWD": "0"})),
        ("chunk_gla segmented states varlen", dict(op="chunk_gla", lens=[0, 700, 1, 333], H=1, K=128, V=128,
                                                   env={"FLASH_ATTN_LINEAR_SEGMENTED_STATES": "1"})),
        # K = V = 128 on 2 CTAs: GLA's one-pass forward from raw gates, in segments (two launches)
        ("chunk_gla one pass segments varlen", dict(op="chunk_gla", lens=[0, 1500, 1, 700, 0], H=2, K=128, V=128)),
        # 5 sequences x 28 heads x 1 V tile (K, V padded to 128: the 256-thread kernel's 128 columns) =
        # 140 CTAs, at least the SMs of an H100 / H200 (132): GLA's one-pass forward (gla_fused_fwd;
        # _kernels.gla_fused_plan), rows past the sequences' ends unwritten
        ("chunk_gla one pass varlen empty seqs K100 V72", dict(op="chunk_gla", lens=[0, 65, 1, 130, 0], H=28, K=100,
                                                               V=72)),
        # sm90: the wgmma one-pass forward with two V tiles per CTA (K = 256: 3 pairs of 32 columns;
        # K = 128 with the pairs forced), whose warpgroups exchange partial scores in shared memory
        ("chunk_simple_gla pairs varlen K256 V192", dict(op="chunk_simple_gla", lens=[0, 200, 1, 130], H=2, K=256,
                                                         V=192)),
        ("chunk_simple_gla pairs forced K128", dict(op="chunk_simple_gla", B=1, T=300, H=1, K=128, V=128,
                                                    env={"FLASH_ATTN_LINEAR_SM90_PAIR": "1"})),
        # sm90: the backward's dv, dk, dq in one wgmma kernel (chunk_bwd_sm90.cuh), all three per CTA and
        # split (dv + dk, then dq), varlen with empty sequences and a 17-row chunk
        ("chunk_simple_gla fused backward one varlen K64", dict(op="chunk_simple_gla", lens=[0, 65, 1, 130, 0], H=2,
                                                                K=64, V=64,
                                                                env={"FLASH_ATTN_LINEAR_FUSED_BWD_SM90": "one"})),
        ("chunk_simple_gla fused backward split 1x17 K100", dict(op="chunk_simple_gla", B=1, T=17, H=2, K=100, V=100,
                                                                 env={"FLASH_ATTN_LINEAR_FUSED_BWD_SM90": "split"})),
        # K = V = 256: four N tiles of 64 per chunk, each with its slices of dH and h
        ("chunk_simple_gla fused backward varlen K256", dict(op="chunk_simple_gla", lens=[0, 65, 1, 17], H=1, K=256,
                                                             V=256)),
    ]
    if not quick:
        out += [
            ("chunk_gla 1x129 K256 V192", dict(op="chunk_gla", B=1, T=129, H=1, K=256, V=192)),
            ("chunk_gla 1x17 K128 V256", dict(op="chunk_gla", B=1, T=17, H=3, K=128, V=256)),
            # 2 x 34 heads x 2 V tiles of 32 = 136 CTAs: the one-pass forward at K = 256
            ("chunk_gla one pass 2x129 K256 V64", dict(op="chunk_gla", B=2, T=129, H=34, K=256, V=64)),
            ("fused_recurrent_gla varlen reverse", dict(op="fused_recurrent_gla", lens=[40, 0, 90], H=2, K=64, V=128)),
            ("chunk_simple_gla varlen empty seqs", dict(op="chunk_simple_gla", lens=[0, 65, 1, 130, 0], H=2, K=64,
                                                        V=128)),
            ("chunk_simple_gla segments 1x600 K256 V64", dict(op="chunk_simple_gla", B=1, T=600, H=1, K=256, V=64)),
            ("chunk_simple_gla segments 1x1000 K64 V64", dict(op="chunk_simple_gla", B=1, T=1000, H=1, K=64, V=64)),
        ]
    return out


def run_linear(dtype, op, H, K, V, B=1, T=None, lens=None, env=None):
    """One forward and backward (initial and final states, gradients of every input), with the
    environment variables `env` set meanwhile; True when everything is finite."""
    saved = {name: os.environ.get(name) for name in env or {}}
    os.environ.update(env or {})
    try:
        return _run_linear(dtype, op, H, K, V, B, T, lens)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def _run_linear(dtype, op, H, K, V, B, T, lens):
    import torch.nn.functional as F

    import flash_attn.linear_attn as la

    cu = None
    if lens is not None:
        T = sum(lens)
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), device="cuda", dtype=torch.int32)
    N = B if lens is None else len(lens)

    def leaf(*shape, dt=dtype, gate=False):
        x = torch.randn(*shape, device="cuda", dtype=torch.float32)
        return (F.logsigmoid(x) if gate else x).to(dt).requires_grad_(True)

    q, k, v = leaf(B, T, H, K), leaf(B, T, H, K), leaf(B, T, H, V)
    h0 = leaf(N, H, K, V, dt=torch.float32)
    if op == "chunk_simple_gla":
        g = leaf(B, T, H, dt=torch.float32, gate=True)
        o, ht = la.chunk_simple_gla(q, k, v, g=g, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    elif op == "chunk_gla":
        g = leaf(B, T, H, K, dt=torch.float32, gate=True)
        o, ht = la.chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True, cu_seqlens=cu)
    else:
        g = leaf(B, T, H, K, dt=torch.float32, gate=True)
        gv = leaf(B, T, H, V, dt=torch.float32, gate=True) if op == "fused_recurrent_gla_gv" else None
        o, ht = la.fused_recurrent_gla(q, k, v, gk=g, gv=gv, initial_state=h0, output_final_state=True, reverse=True,
                                       cu_seqlens=cu)
    inputs = (q, k, v, g, h0) + ((gv,) if op == "fused_recurrent_gla_gv" else ())
    grads = torch.autograd.grad((o.float() * torch.randn_like(o, dtype=torch.float32)).sum() + ht.sum(), inputs)
    torch.cuda.synchronize()
    return all(bool(torch.isfinite(t).all()) for t in (o, ht, *grads))


def main_linear(quick):
    from flash_attn.linear_attn import _kernels

    reason = _kernels.unavailable_reason() or (None if torch.cuda.is_available() else "no CUDA device")
    if reason:
        print(f"memcheck: nothing to check: {reason}")
        return 2
    bad, todo = 0, linear_cases(quick)
    for dtype in (torch.bfloat16,) if quick else (torch.bfloat16, torch.float16):
        for label, kw in todo:
            finite = run_linear(dtype, **kw)
            bad += not finite
            print(f"  {'ok ' if finite else 'NON-FINITE'} {label} {dtype}", flush=True)
    print(f"memcheck: {len(todo)} linear-attention calls per dtype, {bad} with non-finite outputs or gradients")
    return 1 if bad else 0


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="one head dim only (for racecheck)")
    p.add_argument("--backward", action="store_true",
                   help="also differentiate each call (atomic and deterministic backward)")
    p.add_argument("--linear", action="store_true",
                   help="the linear-attention kernels instead (forward and backward; --quick: fewer calls)")
    args = p.parse_args(argv)
    if args.linear:
        return main_linear(args.quick)

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
    else:  # forward only
        todo += kvcache_cases(picks)
        if build_info.has_feature("paged"):  # head dims with a paged kernel at or above them
            paged_kernels = [x for x in hdims if x in (64, 128, 256)]
            todo += paged_cases([x for x in picks if paged_kernels and x <= paged_kernels[-1]])
    runners = {"kvcache": run_kvcache, "kvcache_paged": run_paged, "varlen_paged": run_paged}
    for label, kind, kw in todo:
        finite = runners[kind](kind, dtype, **kw) if kind in runners else run(kind, dtype, **kw)
        bad += not finite
        print(f"  {'ok ' if finite else 'NON-FINITE'} {label}", flush=True)
    print(f"memcheck: {len(todo)} calls, {bad} with non-finite outputs ({'bf16' if dtype == torch.bfloat16 else 'fp16'})")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
