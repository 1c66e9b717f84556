"""Small ragged backward cases (GQA, causal, window, varlen with empty sequences) meant
to run under `compute-sanitizer --tool memcheck` with PYTORCH_NO_CUDA_MEMORY_CACHING=1;
prints one line per case and whether the gradients are finite."""
import torch

from flash_attn import build_info

ext = build_info.cuda_extension()
for (sq, sk, h, hk, wl, wr) in [(17, 33, 4, 2, -1, 0), (1, 239, 8, 1, 37, 19), (129, 65, 2, 2, -1, -1)]:
    q = torch.randn(2, sq, h, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(2, sk, hk, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    do = torch.randn_like(q)
    out, lse = ext.fwd(q, k, v, None, None, 0.125, wl, wr, 0.0)
    g = ext.bwd(do, q, k, v, out, lse, None, None, None, None, 0.125, wl, wr, 0.0, False)
    print("ok", sq, sk, all(bool(torch.isfinite(x).all()) for x in g[:3]))
# varlen: an empty-key sequence, an empty-query sequence, tile-breaking lengths, GQA
cu_q = torch.tensor([0, 17, 17, 147, 148], device="cuda", dtype=torch.int32)
cu_k = torch.tensor([0, 33, 38, 38, 167], device="cuda", dtype=torch.int32)
q = torch.randn(148, 4, 128, device="cuda", dtype=torch.bfloat16)
k = torch.randn(167, 2, 128, device="cuda", dtype=torch.bfloat16)
v = torch.randn_like(k)
do = torch.randn_like(q)
out, lse = ext.varlen_fwd(q, k, v, None, cu_q, cu_k, None, 130, 129, None, 0.09, -1, 0, 0.0)
g = ext.varlen_bwd(do, q, k, v, out, lse, None, None, None, cu_q, cu_k, 130, 129, None, 0.09, -1, 0, 0.0, False)
torch.cuda.synchronize()
print("ok varlen", all(bool(torch.isfinite(x).all()) for x in g[:3]))
