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
# fwd's KV-cache arguments (tests/test_kvcache_gpu.py::test_fwd_kvcache_argument_errors crashed a
# worker at afea440 on the H100): q (2, 1, 8, 128), cache (2, 64, 2, 128), pages of 32 rows.
KV = "ext.fwd(q2, {k}, {k}, None, None, 0.1, -1, -1, 0.0, {kw})"
KV_CASES = {
    "good: seqused_k": dict(k="cache", kw="seqused_k=used"),
    "good: paged": dict(k="pages", kw="seqused_k=used, block_table=table"),
    "seqused_k int64": dict(k="cache", kw="seqused_k=used.long()"),
    "seqused_k (3,)": dict(k="cache", kw="seqused_k=i32([3, 64, 1])"),
    "seqused_k strided": dict(k="cache", kw="seqused_k=i32([3, 0, 64, 0])[::2]"),
    "seqused_k on the CPU": dict(k="cache", kw="seqused_k=used.cpu()"),
    "leftpad_k without block_table": dict(k="cache", kw="seqused_k=used, leftpad_k=i32([0, 0])"),
    "block_table without seqused_k": dict(k="pages", kw="block_table=table"),
    "block_table (1, 2)": dict(k="pages", kw="seqused_k=used, block_table=i32([[0, 1]])"),
    "num_splits -1": dict(k="cache", kw="seqused_k=used, num_splits=-1"),
    "k batch 1": dict(k="cache[:1]", kw="seqused_k=used"),
}
for name, c in KV_CASES.items():
    CASES["fwd kv: " + name] = KV.format(**c)
PRE = ("import torch, flash_attn.build_info as bi; ext = bi.cuda_extension(); "
       "q = torch.randn(1, 8, 2, 128, device='cuda', dtype=torch.bfloat16)\n"
       "q2 = torch.randn(2, 1, 8, 128, device='cuda', dtype=torch.bfloat16)\n"
       "cache = torch.randn(2, 64, 2, 128, device='cuda', dtype=torch.bfloat16); pages = cache.view(4, 32, 2, 128)\n"
       "i32 = lambda v: torch.tensor(v, dtype=torch.int32, device='cuda')\n"
       "used = i32([3, 64]); table = i32([[0, 1], [1, 0]])\n")

for name, call in CASES.items():
    code = PRE + f"try:\n    {call}\n    print('no error')\nexcept Exception as e:\n    print(type(e).__name__, str(e)[:80])"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    print(f"{name}: rc {r.returncode}: {(r.stdout.strip() or r.stderr.strip()[-200:])}")
