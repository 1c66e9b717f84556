"""Linear attention with flash-linear-attention's API (fla.ops): same names,
arguments, [B, T, H, K] layouts and (o, final_state) returns.

Every op is the recurrence of DESIGN.md,

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,   o_t = scale * q_t S_t,

with the gate g scalar per head (simple GLA; Retention and Lightning fix it
per head; none for plain linear attention) or per key (GLA). chunk_* are the
chunkwise-parallel form (training, prefill), fused_recurrent_* the
token-by-token form (decoding). CPU tensors run flash_attn.reference_linear
(differentiable). CUDA tensors in fp16/bf16 run the kernels of csrc/linear_attn
(extension flash_attn_linear_cuda; head dims padded to 64, 128 or 256): the simple-GLA
family (chunk_simple_gla, retention, lightning, chunk_linear_attn) and chunk_gla forward
and backward, fused_recurrent_* forward (their backward is the chunked one, except that
fused_recurrent_gla with a value gate gv has a token-by-token backward);
masked_linear_attention forward and backward by blockwise kernels (._masked). fp32 CUDA
inputs and head dims over 256 run the reference on the device.
"""
from .gla import chunk_gla, fused_recurrent_gla
from .lightning import chunk_lightning_attn, fused_recurrent_lightning_attn
from .linear import chunk_linear_attn
from .masked import masked_linear_attention
from .retention import chunk_retention, fused_recurrent_retention
from .simple_gla import chunk_simple_gla, fused_recurrent_simple_gla

__all__ = [
    "chunk_gla",
    "chunk_lightning_attn",
    "chunk_linear_attn",
    "chunk_retention",
    "chunk_simple_gla",
    "fused_recurrent_gla",
    "fused_recurrent_lightning_attn",
    "fused_recurrent_retention",
    "fused_recurrent_simple_gla",
    "masked_linear_attention",
]
