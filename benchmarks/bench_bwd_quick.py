"""First timing of the backward kernels (issue 3): ours vs SDPA flash / cuDNN backward,
hd 64/128, bf16, 16k tokens, model dim 2048. Backward only: each side's forward runs
once outside the timed region. FLOPs bwd = 2.5 x fwd (ANCHORS.md convention).

  python benchmarks/bench_bwd_quick.py --out results.json
"""
import argparse
import json
import platform

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from triton.testing import do_bench

from flash_attn import build_info


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    ext = build_info.cuda_extension()
    rows = []
    for d in (64, 128, 256):
        if d not in build_info.build_config().get("backward_head_dims", []):
            continue
        for causal in (False, True):
            for s in (2048, 8192):
                b, h = 16384 // s, 2048 // d
                q, k, v, do = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
                scale = d ** -0.5
                out, lse = ext.fwd(q, k, v, None, None, scale, -1, 0 if causal else -1, 0.0)[:2]
                ours = do_bench(lambda: ext.bwd(do, q, k, v, out, lse, None, None, None, None, scale, -1,
                                                0 if causal else -1, 0.0, False), return_mode="median")
                flops = 2.5 * 4 * b * h * s * s * d / (2 if causal else 1)
                row = {"headdim": d, "causal": causal, "seqlen": s, "batch": b, "nheads": h,
                       "ours_ms": ours, "ours_tflops": flops / ours / 1e9}
                qt, kt, vt = (x.transpose(1, 2).detach().requires_grad_(True) for x in (q, k, v))
                dot = do.transpose(1, 2)
                for name, backend in (("sdpa_flash", SDPBackend.FLASH_ATTENTION), ("sdpa_cudnn", SDPBackend.CUDNN_ATTENTION)):
                    with sdpa_kernel(backend):
                        o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
                        ms = do_bench(lambda: torch.autograd.grad(o, (qt, kt, vt), dot, retain_graph=True),
                                      return_mode="median")
                    row[f"{name}_ms"] = ms
                    row[f"{name}_tflops"] = flops / ms / 1e9
                    row[f"ours/{name}"] = ms / ours
                rows.append(row)
                print(f"hd{d} causal={causal} s={s}: ours {row['ours_tflops']:.1f}, flash {row['sdpa_flash_tflops']:.1f}, "
                      f"cudnn {row['sdpa_cudnn_tflops']:.1f} TFLOP/s (ours/flash {row['ours/sdpa_flash']:.2f})")
    result = {"benchmark": "attn_bwd_quick", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "cuda": torch.version.cuda, "python": platform.python_version(), "build": build_info.build_config(),
              "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
