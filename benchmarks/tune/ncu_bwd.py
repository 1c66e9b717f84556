"""One attention backward of ours (default and deterministic) and of SDPA's flash backend at the
same shape, for Nsight Compute side by side (issue 3: where our backward loses to FlashAttention-2):

    ncu -k regex:"flash_bwd|dot_do_o" --section SpeedOfLight --section ComputeWorkloadAnalysis \\
        --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy \\
        --section LaunchStats python ncu_bwd.py [HDIM SEQLEN CAUSAL]

(default 64 8192 0; batch x seqlen = 16k tokens, model dim 2048, bf16, as benchmark_attn.py).
Kernel names: ours flash::flash_bwd_dk_dv_kernel / flash_bwd_dq_kernel / flash_bwd_dot_do_o_kernel,
SDPA's pytorch_flash::flash_bwd_* (the FlashAttention-2 kernels). What to compare: tensor pipe
utilization, shared-memory wavefronts and bank conflicts per MMA, the top stall reasons, registers
and achieved occupancy. The gradients of the three runs are checked against each other first.
"""
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from flash_attn import flash_attn_func

d, s, causal = (int(x) for x in sys.argv[1:4]) if len(sys.argv) == 4 else (64, 8192, 0)
b, h = max(1, 16384 // s), 2048 // d
q, k, v, do = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))


def ours(deterministic):
    qq, kk, vv = (x.detach().requires_grad_() for x in (q, k, v))
    out = flash_attn_func(qq, kk, vv, causal=bool(causal), deterministic=deterministic)
    return torch.autograd.grad(out, (qq, kk, vv), do)


def sdpa():
    qq, kk, vv = (x.detach().transpose(1, 2).requires_grad_() for x in (q, k, v))
    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        out = torch.nn.functional.scaled_dot_product_attention(qq, kk, vv, is_causal=bool(causal))
    grads = torch.autograd.grad(out, (qq, kk, vv), do.transpose(1, 2))
    return tuple(g.transpose(1, 2) for g in grads)


runs = {"ours": ours(False), "ours_det": ours(True), "sdpa_flash": sdpa()}
torch.cuda.synchronize()
for name in ("ours", "ours_det"):
    err = max(((a.float() - r.float()).abs().max() / r.float().abs().max()).item()
              for a, r in zip(runs[name], runs["sdpa_flash"]))
    print(f"hdim {d} seqlen {s} causal {causal}: max |{name} - sdpa_flash| / max |sdpa_flash| = {err:.2e}")
