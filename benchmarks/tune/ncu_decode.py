"""One decode step (hq 32, hk 8, d 128, bf16), contiguous then paged, for Nsight Compute:

    ncu -k regex:flash_fwd_kernel --section SpeedOfLight --section MemoryWorkloadAnalysis \\
        --section WarpStateStats python ncu_decode.py [BATCH LENGTH PAGE]

(default 32 8192 256). The paged cache's pages are a random permutation of the pool, as in
benchmark_decode.py; the two outputs must agree exactly.
"""
import sys

import torch

from flash_attn import flash_attn_with_kvcache

b, L, page = (int(x) for x in sys.argv[1:4]) if len(sys.argv) == 4 else (32, 8192, 256)
hq, hk, d = 32, 8, 128
if L % page:
    raise SystemExit(f"LENGTH {L} must be a multiple of PAGE {page}")
q = torch.randn(b, 1, hq, d, device="cuda", dtype=torch.bfloat16)
k = torch.randn(b, L, hk, d, device="cuda", dtype=torch.bfloat16)
v = torch.randn_like(k)
seqlens = torch.full((b,), L, dtype=torch.int32, device="cuda")
n_pages = b * L // page
perm = torch.randperm(n_pages, device="cuda")
table = perm.view(b, L // page).to(torch.int32)
k_pool = torch.empty(n_pages, page, hk, d, device="cuda", dtype=torch.bfloat16)
v_pool = torch.empty_like(k_pool)
k_pool[perm] = k.view(n_pages, page, hk, d)
v_pool[perm] = v.view(n_pages, page, hk, d)
a = flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens)
p = flash_attn_with_kvcache(q, k_pool, v_pool, cache_seqlens=seqlens, block_table=table)
torch.cuda.synchronize()
print(f"batch {b} length {L} page {page}: max |paged - contiguous| = {(a - p).abs().max().item()}")
