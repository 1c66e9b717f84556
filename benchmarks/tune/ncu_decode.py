"""One decode step at 32 x 8k (hq 32, hk 8, d 128, bf16), contiguous then paged (pages of 256),
for Nsight Compute: ncu -k regex:flash_fwd_kernel python ncu_decode.py."""
import torch

from flash_attn import flash_attn_with_kvcache

b, L, hq, hk, d, page = 32, 8192, 32, 8, 128, 256
q = torch.randn(b, 1, hq, d, device="cuda", dtype=torch.bfloat16)
k = torch.randn(b, L, hk, d, device="cuda", dtype=torch.bfloat16)
v = torch.randn_like(k)
seqlens = torch.full((b,), L, dtype=torch.int32, device="cuda")
perm = torch.randperm(b * L // page, device="cuda")
table = perm.view(b, L // page).to(torch.int32)
k_pool = torch.empty(b * L // page, page, hk, d, device="cuda", dtype=torch.bfloat16)
v_pool = torch.empty_like(k_pool)
k_pool[perm] = k.view(b * L // page, page, hk, d)
v_pool[perm] = v.view(b * L // page, page, hk, d)
a = flash_attn_with_kvcache(q, k, v, cache_seqlens=seqlens)
p = flash_attn_with_kvcache(q, k_pool, v_pool, cache_seqlens=seqlens, block_table=table)
torch.cuda.synchronize()
print("max diff paged vs contiguous", (a - p).abs().max().item())
