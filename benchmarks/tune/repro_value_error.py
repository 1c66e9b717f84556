"""Argument errors raised inside flash_attn_2_cuda must reach Python as ValueError (on the
H100 machine, torch 2.11, some crashed the interpreter). Each case runs in its own
subprocess so one crash does not hide the others."""
import subprocess
import sys

CASES = {
    "dropout_1 (double in message)": "ext.fwd(q, q, q, None, None, 0.1, -1, -1, 0.0, 1.0)",
    "q float32 (dtype in message)": "ext.fwd(q.float(), q.float(), q.float(), None, None, 0.1, -1, -1, 0.0)",
    "return_softmax without dropout (literal)": "ext.fwd(q, q, q, None, None, 0.1, -1, -1, 0.0, 0.0, True)",
    "softcap with dropout (NotImplementedError)": "ext.fwd(q, q, q, None, None, 0.1, -1, -1, 5.0, 0.1)",
}
PRE = ("import torch, flash_attn.build_info as bi; ext = bi.cuda_extension(); "
       "q = torch.randn(1, 8, 2, 128, device='cuda', dtype=torch.bfloat16)\n")

for name, call in CASES.items():
    code = PRE + f"try:\n    {call}\n    print('no error')\nexcept Exception as e:\n    print(type(e).__name__, str(e)[:80])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    print(f"{name}: rc {r.returncode}: {(r.stdout.strip() or r.stderr.strip()[-200:])}")
