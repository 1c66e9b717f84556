"""One decode step (hq 32, hk 8, d 128, bf16), contiguous then paged, for Nsight Compute:

    ncu -k regex:flash_fwd_kernel --section SpeedOfLight --section MemoryWorkloadAnalysis \\
        --section WarpStateStats python ncu_decode.py [BATCH LENGTH PAGE] [--cudnn]

(default 32 8192 256). The paged cache's pages are a random permutation of the pool, as in
benchmark_decode.py; the two outputs must agree exactly. --cudnn also runs the same step
through SDPA's cuDNN backend (widen the kernel filter, e.g. -k regex:"flash_fwd|cudnn|sm90"),
so both can be read side by side.
"""
import sys

import torch

from flash_attn import flash_attn_with_kvcache

args = [a for a in sys.argv[1:] if a != "--cudnn"]
b, L, page = (int(x) for x in args[:3]) if len(args) == 3 else (32, 8192, 256)
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
if "--cudnn" in sys.argv:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        c = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                                             enable_gqa=True).transpose(1, 2)
    torch.cuda.synchronize()
    print(f"max |cudnn - ours| = {(a - c).abs().max().item()}")
