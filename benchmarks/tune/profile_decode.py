"""Where a decode step's time goes: the CUDA kernels of one flash_attn_with_kvcache call
(torch.profiler) and the host time per call, at the ANCHORS decode shapes.

    python benchmarks/tune/profile_decode.py [--paged 256]
"""
import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

from flash_attn import flash_attn_with_kvcache


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--paged", type=int, default=0, help="page size (0 = contiguous cache)")
    args = ap.parse_args()
    for b, length in [(1, 131072), (8, 32768), (32, 8192), (128, 2048)]:
        q = torch.randn(b, 1, 32, 128, device="cuda", dtype=torch.bfloat16)
        if args.paged:
            pages = b * length // args.paged
            k = torch.randn(pages, args.paged, 8, 128, device="cuda", dtype=torch.bfloat16)
            table = torch.randperm(pages, device="cuda", dtype=torch.int32).view(b, -1)
        else:
            k = torch.randn(b, length, 8, 128, device="cuda", dtype=torch.bfloat16)
            table = None
        v = torch.randn_like(k)
        seqlens = torch.full((b,), length, device="cuda", dtype=torch.int32)

        def step():
            return flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens, block_table=table)

        for _ in range(5):
            step()
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(50):
            step()
        host_us = (time.perf_counter() - t0) / 50 * 1e6
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                step()
            torch.cuda.synchronize()
        print(f"=== b {b} len {length} paged {args.paged}: host {host_us:.1f} us per call (launch-bound if above the GPU time)")
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=70))


if __name__ == "__main__":
    main()
