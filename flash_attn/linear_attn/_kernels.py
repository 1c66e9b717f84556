"""The CUDA route of flash_attn.linear_attn: flash_attn_linear_cuda's launchers (csrc/linear_attn)
composed into the simple-GLA forward and backward, with autograd.

Arguments arrive checked (._checks). Here: head dims are zero-padded to 64, 128 or 256
(exact: padded key columns add nothing, padded value columns are cut off), gates become
fp32, varlen offsets int32 with per-sequence chunk slots, and every output and workspace is
allocated before the launchers run (they only write into what they are given).

Forward (chunk size 64, csrc/linear_attn/linear_params.h has the formulas):
    chunk_state  (k, v)            -> h [slots, H, K, V]: the state entering every chunk
    chunk_output (q, k, h, v)      -> o
  or, by default (FLASH_ATTN_LINEAR_FUSED_FWD=0 turns it off; fused_plan), both in one pass that
  keeps the states in registers, one CTA per (sequence, head, V tile), and where those are fewer
  than the SMs, per segment of a sequence too (a first launch gives each segment's local state):
    chunk_fused_fwd (q, k, v)      -> o (csrc/linear_attn/chunk_fused.cuh)
Backward (h recomputed):
    chunk_state  (q, do, reverse)  -> dH [slots, H, K, V]: the gradient leaving every chunk; dh0
    chunk_output (k, q, dH, do)    -> dv
    chunk_output (do, v, h^T, k)   -> dq, and q . dq per row
    chunk_output (v, do, dH^T, q)  -> dk, and k . dk per row
    (the reverse chunk_state also gives exp(b_L) <dH_c, h_c> per chunk, and the dq / dk
     chunk_outputs q . dq_inter, k . dk_inter per row)
    gate_grad      (q, k, v, do)   -> dg, chunk by chunk (csrc/linear_attn/gate_grad.cu)
With FLASH_ATTN_LINEAR_SEGMENTED_STATES=1 (off by default: mixed on the H100; states_plan)
every chunk_state here (GLA's too) is cut into segments where its CTAs are few (long sequences):
a first launch gives each segment's local state, the second folds them in (chunk_state.cuh).
GLA (per-key gates g [B, T, H, K]) has its own output and gradient kernels around the same
chunk_state (with per-key weights):
    gla_cumsum   (g)                -> b: the chunk-local cumulative gates every GLA kernel reads
    chunk_state  (k, v, b)          -> h;  gla_output (q, k, v, h, b) -> o
  or, where its CTAs fill the SMs (gla_fused_plan; by default only at K = 128 with V a multiple
  of 128, whose 256-thread kernel computes the intra-chunk scores once per 128 V columns;
  FLASH_ATTN_LINEAR_GLA_FUSED_FWD=1 allows the narrower tiles, 0 turns it off), both in one
  pass with the states in registers, one CTA per (sequence, head, V tile):
    gla_fused_fwd (q, k, v, b)      -> o (csrc/linear_attn/gla_fused.cuh)
  backward (h: the forward's, kept when gradients are needed, save_states; else recomputed):
    chunk_state  (q, do, b, reverse) -> dH, dh0
    gla_output   (k, q, do, dH, b, upper) -> dv
  or both in one reverse pass of the 256-thread kernel where the forward's would run it
  (gla_reverse_plan; FLASH_ATTN_LINEAR_GLA_FUSED_BWD=0 turns it off):
    gla_fused_fwd (k, q, do, b, reverse) -> dv, dH, dh0
    gla_grad     (q, k, v, do, b, h, dH)  -> dq, dk, dg (chunk-local, csrc/linear_attn/gla_grad.cuh)
fused_recurrent_* run the token-by-token kernel forward; their backward is the chunked one
(the same function of the inputs), except fused_recurrent_gla with a value gate gv, whose
backward is token by token too (csrc/linear_attn/recurrent_grad.cuh has the formulas):
    recurrent_grad (q, k, v, gk, gv, h0, do, dht) -> dv, dgv, dh0 and fp32 parts of dq, dk, dgk
                                                     per 32 value columns, summed here
"""
import functools
import math
import os

import torch
import torch.nn.functional as F

from .. import build_info

CHUNK = 64
HEAD_DIMS = (64, 128, 256)
KERNEL_DTYPES = (torch.float16, torch.bfloat16)


# --------------------------------------------------------------------------- the extension

@functools.lru_cache(maxsize=None)
def _load():
    """(module, None) or (None, why it is unavailable)."""
    cfg = build_info.build_config()
    if not cfg.get("cuda"):
        return None, f"the CUDA extensions were not built ({cfg.get('skip_reason') or 'unknown reason'})"
    if not cfg.get("linear_attn"):
        return None, "flash_attn_linear_cuda was not built (FLASH_ATTN_DISABLE_LINEAR=1 or an older build)"
    try:
        import flash_attn_linear_cuda
    except ImportError as exc:
        return None, f"flash_attn_linear_cuda failed to load: {exc}"
    return flash_attn_linear_cuda, None


def extension():
    """The flash_attn_linear_cuda module, or None (tests replace this with a model of it)."""
    return _load()[0]


def unavailable_reason():
    """None when the linear-attention kernels can run, else a one-line reason."""
    if extension() is not None:
        return None
    return _load()[1] or "flash_attn_linear_cuda is not available"


def require_extension(fn):
    ext = extension()
    if ext is None:
        raise NotImplementedError(f"flash_attn.linear_attn.{fn}: the CUDA linear-attention kernels are not "
                                  f"available ({unavailable_reason()}); CPU tensors run the PyTorch reference "
                                  f"(move the inputs with .cpu())")
    return ext


def kernel_head_dim(d):
    """The compiled head dim a dim of d is padded to, or None when d is too large."""
    return next((x for x in HEAD_DIMS if x >= d), None)


def on_kernel_device(x):
    """Whether x is where the kernels run (tests point this at the CPU, with a model of the
    extension in place of extension())."""
    return x.device.type == "cuda"


def runs_on_kernels(q, v):
    """Whether checked inputs go to the kernels: on a CUDA device, fp16/bf16, K and V <= 256.
    Other CUDA inputs run the PyTorch reference on the device."""
    return (on_kernel_device(q) and q.dtype in KERNEL_DTYPES and kernel_head_dim(q.shape[-1]) is not None
            and kernel_head_dim(v.shape[-1]) is not None)


# --------------------------------------------------------------------------- layout helpers

def _pad_last(x, d):
    if x is None or x.shape[-1] == d:
        return None if x is None else x.contiguous()
    return F.pad(x, (0, d - x.shape[-1])).contiguous()


def _pad_state(s, kd, vd):
    """[N, H, K, V] fp32 -> [N, H, kd, vd] contiguous fp32."""
    if s is None:
        return None
    s = s.float()
    if s.shape[-2:] != (kd, vd):
        s = F.pad(s, (0, vd - s.shape[-1], 0, kd - s.shape[-2]))
    return s.contiguous()


def _pad_inputs(q, k, v, h0):
    """q, k, v zero-padded to the compiled head dims, h0 (or None) to match in fp32, and the
    dims (K, V, kd, vd) that _unpad_outputs takes."""
    K, V = q.shape[-1], v.shape[-1]
    kd, vd = kernel_head_dim(K), kernel_head_dim(V)
    return _pad_last(q, kd), _pad_last(k, kd), _pad_last(v, vd), _pad_state(h0, kd, vd), (K, V, kd, vd)


def _unpad_outputs(o, ht, dims):
    """The padding cut off the kernels' o [..., V] and final state [..., K, V] (views)."""
    K, V, kd, vd = dims
    o = o[..., :V] if vd != V else o
    if ht is not None and (kd, vd) != (K, V):
        ht = ht[..., :K, :V]
    return o, ht


class Seqs:
    """Where each sequence's chunks are: cu_seqlens int32 (or None), chunk_offsets int32
    [N + 1] (each sequence's first state slot; varlen only), the slot count and N."""

    def __init__(self, B, T, cu_seqlens, device):
        if cu_seqlens is None:
            self.cu, self.offsets, self.num_seqs = None, None, B
            self.slots = B * math.ceil(T / CHUNK)
            return
        cu = cu_seqlens.to(device=device, dtype=torch.int32).contiguous()
        # the kernels' clamping (chunk_info.cuh): bos in [0, T], eos in [bos, T]
        bos = cu[:-1].clamp(0, T)
        eos = torch.maximum(cu[1:].clamp(0, T), bos)
        counts = torch.div(eos - bos + CHUNK - 1, CHUNK, rounding_mode="floor")
        offsets = torch.zeros(cu.shape[0], dtype=torch.int32, device=device)
        offsets[1:] = counts.cumsum(0)
        self.cu, self.offsets, self.num_seqs = cu, offsets, cu.shape[0] - 1
        # a bound that needs no device-to-host copy: sum ceil(len / 64) <= T / 64 + N
        self.slots = math.ceil(T / CHUNK) + self.num_seqs


def _gates(g, g_gamma):
    """fp32 contiguous scalar gates (g [B, T, H] or gamma [H]), or None."""
    return (None if g is None else g.float().contiguous(),
            None if g_gamma is None else g_gamma.float().contiguous())


# --------------------------------------------------------------------------- forward / backward

def _states(ext, x, z, g, gamma, init, seqs, final, scale=1.0, reverse=False, pair_states=None, pair_dot=None,
            gk_cum=None):
    B, T, H, R = x.shape
    states = x.new_empty(seqs.slots, H, R, z.shape[-1])
    plan = states_plan(x, z, seqs)
    if plan is None:
        ext.chunk_state(x, z, g, gamma, init, states, final, seqs.cu, seqs.offsets, scale, reverse, pair_states,
                        pair_dot, 0, gk_cum)
        return states
    # segments: two launches (chunk_state.cuh), 64-column tiles
    seg_chunks, segments = plan
    ext.chunk_state(x, z, g, gamma, init, states, final, seqs.cu, seqs.offsets, scale, reverse, pair_states,
                    pair_dot, 64, gk_cum, seg_chunks, *_segment_workspace(x, z, seqs, segments, gk_cum is not None))
    return states


def _segment_workspace(x, z, seqs, segments, per_row=False):
    """The segment kernels' workspace: seg_state fp32 [N * segments, H, R, Z] (each segment's
    local state) and seg_decay fp32 [N * segments, H] (its log-decay; [.., H, R] with per_row,
    GLA's per-key gates)."""
    N, H, R, Z = seqs.num_seqs * segments, x.shape[2], x.shape[3], z.shape[3]
    return (x.new_empty(N, H, R, Z, dtype=torch.float32),
            x.new_empty((N, H, R) if per_row else (N, H), dtype=torch.float32))


FUSED_FWD_ENV = "FLASH_ATTN_LINEAR_FUSED_FWD"
# Segments: the grid aims at FUSED_CTAS_PER_SM CTAs per SM (two fit at K = 128), with at most
# MAX_SEGMENTS per sequence (each CTA folds the earlier segments' states in, so their count
# is a cost) and at least MIN_SEGMENT_CHUNKS chunks in each.
FUSED_CTAS_PER_SM = 2
MAX_SEGMENTS = 32
MIN_SEGMENT_CHUNKS = 4


SEGMENTED_STATES_ENV = "FLASH_ATTN_LINEAR_SEGMENTED_STATES"
# chunk_state's CTAs (64 x 64 state tiles, ~49 KB of shared memory) fit four per SM
STATES_CTAS_PER_SM = 4


def _env_switch(name, default):
    """An on/off environment variable: "", 0, false, off and no are off."""
    return os.environ.get(name, default).strip().lower() not in ("", "0", "false", "off", "no")


def fused_forward_enabled():
    """Whether the one-pass forward may run (FLASH_ATTN_LINEAR_FUSED_FWD=0 turns it off)."""
    return _env_switch(FUSED_FWD_ENV, "1")


@functools.lru_cache(maxsize=None)
def _device_sms(index):
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device):
    """The SM count of a CUDA device (tests of the route on the CPU replace this)."""
    return _device_sms(device.index if device.index is not None else torch.cuda.current_device())


def segmented_states_enabled():
    """Whether chunk_state may cut sequences into segments (FLASH_ATTN_LINEAR_SEGMENTED_STATES=1;
    default off: on the H100 at 766b2f8 it sped up only chunk_simple_gla's forward + backward on
    long single sequences and slowed other cases by up to 14%, benchmarks/tune/NOTES.md)."""
    return _env_switch(SEGMENTED_STATES_ENV, "0")


def _segment_plan(ctas, slots, T):
    """(seg_chunks, segments per sequence) for a grid of `ctas` CTAs per segment set and `slots`
    resident CTAs on the GPU: (0, 1) when the CTAs fill the SMs (`slots` / the CTAs per SM) or
    the sequences are too short to cut; else as many segments as the slots hold, at most
    MAX_SEGMENTS (each CTA folds the earlier segments' states in, so their count is a cost),
    at least MIN_SEGMENT_CHUNKS chunks each. The chunk count per sequence is bounded by
    ceil(T / 64) (T: the padded length, or all tokens when packed), which needs no device-to-host
    copy of cu_seqlens."""
    chunks = math.ceil(T / CHUNK)
    segments = min(slots // max(ctas, 1), MAX_SEGMENTS, chunks // MIN_SEGMENT_CHUNKS)
    if segments < 2:
        return 0, 1
    seg_chunks = math.ceil(chunks / segments)
    return seg_chunks, math.ceil(chunks / seg_chunks)


def states_plan(x, z, seqs):
    """None (chunk_state walks whole sequences) or (seg_chunks, segments per sequence) when
    segmented states are on and the (sequence, head, 64 x 64 tile) CTAs are fewer than two per SM."""
    if not segmented_states_enabled():
        return None
    T, H, R, Z = x.shape[1], x.shape[2], x.shape[3], z.shape[3]
    ctas, sms = seqs.num_seqs * H * (R // 64) * (Z // 64), num_sms(x.device)
    if ctas >= 2 * sms:
        return None
    plan = _segment_plan(ctas, STATES_CTAS_PER_SM * sms, T)
    return None if plan[1] == 1 else plan


def fused_plan(ext, q, v, seqs):
    """None (the two-pass forward) or (seg_chunks, segments per sequence) for chunk_fused_fwd.

    One CTA per (sequence, head, V tile) walks its sequence's chunks in order. When those CTAs
    are at least the SMs: no segments, (0, 1). Else each sequence is cut into segments of
    seg_chunks chunks (a CTA each), as many as FUSED_CTAS_PER_SM CTAs per SM hold (_segment_plan)."""
    if not fused_forward_enabled() or not hasattr(ext, "chunk_fused_tile_v"):  # (older builds lack it)
        return None
    T, H, K, V = q.shape[1], q.shape[2], q.shape[3], v.shape[3]
    bv = ext.chunk_fused_tile_v(K)
    if V % bv:
        return None
    ctas, sms = seqs.num_seqs * H * (V // bv), num_sms(q.device)
    if ctas >= sms:
        return 0, 1
    # rounded down in _segment_plan: one more segment than fits would start a nearly empty wave
    return _segment_plan(ctas, FUSED_CTAS_PER_SM * sms, T)


def chunk_forward(ext, q, k, v, g, gamma, scale, h0, output_final_state, seqs, keep_h=False):
    """Padded, contiguous inputs -> (o, h_T fp32 or None, h or None); with keep_h, h is the chunk
    states (chunk_state's [slots, H, K, V] in q's dtype) for the backward: the one-pass kernel
    writes them out (h_out), the two-pass forward computed them anyway."""
    N, H, K, V = seqs.num_seqs, q.shape[2], q.shape[3], v.shape[3]
    final = q.new_empty(N, H, K, V, dtype=torch.float32) if output_final_state else None
    plan = fused_plan(ext, q, v, seqs)
    if plan is not None:
        seg_chunks, segments = plan
        o = torch.empty_like(v)
        h = q.new_empty(seqs.slots, H, K, V) if keep_h else None
        # with segments: their local states and log-decays (chunk_fused.cuh, pass 1)
        ws = _segment_workspace(q, v, seqs, segments) if segments > 1 else (None, None)
        if h is None:
            ext.chunk_fused_fwd(q, k, v, g, gamma, h0, o, final, seqs.cu, scale, seg_chunks, *ws)
        else:
            ext.chunk_fused_fwd(q, k, v, g, gamma, h0, o, final, seqs.cu, scale, seg_chunks, *ws, h, seqs.offsets)
        return o, final, h
    h = _states(ext, k, v, g, gamma, h0, seqs, final)
    o = torch.empty_like(v)
    ext.chunk_output(q, k, v, h, o, None, None, g, gamma, seqs.cu, seqs.offsets, scale, scale, False, False)
    return o, final, (h if keep_h else None)


def recurrent_forward(ext, q, k, v, g, gamma, scale, h0, output_final_state, seqs, reverse=False, gk=None, gv=None):
    N, H, K, V = seqs.num_seqs, q.shape[2], q.shape[3], v.shape[3]
    final = q.new_empty(N, H, K, V, dtype=torch.float32) if output_final_state else None
    o = torch.empty_like(v)
    ext.recurrent(q, k, v, g, gamma, gk, gv, h0, o, final, seqs.cu, seqs.offsets, scale, reverse)
    return o, final


FUSED_BWD_SM90_ENV = "FLASH_ATTN_LINEAR_FUSED_BWD_SM90"
FUSED_BWD_SM90_JOBS = {"one": (7,), "split": (3, 4)}  # chunk_bwd_fused's job sets per launch
FUSED_BWD_SM90_DEFAULT = "one"
# Which products the last chunk_backward ran: "fused_one" / "fused_split" (chunk_bwd_sm90.cuh) or
# "chunk_output" (three passes); None before the first. Tests assert the route with it.
last_backward_products = None


def fused_backward_mode():
    """FLASH_ATTN_LINEAR_FUSED_BWD_SM90: how the simple-GLA backward computes dv, dk and dq on a
    device that runs sm90a code, at K = V in {64, 128, 256} (after padding): "one" (the default)
    launches the wgmma kernel once with all three products per CTA; "split" twice, dv + dk (two CTAs
    per SM at K = V = 128) and dq; "0" (or off) runs the three chunk_output passes. On the H100,
    fwd + bwd of chunk_retention at 16 x 4096, H 8, K = V = 128: 1.537 ms (0), 1.392 (split),
    1.281 (one); benchmarks/results/linear_bwd_sm90_ab/."""
    raw = os.environ.get(FUSED_BWD_SM90_ENV, FUSED_BWD_SM90_DEFAULT).strip().lower()
    if raw in FUSED_BWD_SM90_JOBS:
        return raw
    return "off" if not _env_switch(FUSED_BWD_SM90_ENV, "1") else FUSED_BWD_SM90_DEFAULT


def _fused_backward(ext, q, k, v, do, h, dH, dq, dk, dv, rq, rk, g, gamma, cu, off, scale):
    """dv, dk, dq (and rq, rk) by chunk_bwd_fused where fused_backward_mode allows it and the
    extension has a kernel for this device and shape: the mode that ran, or None (nothing written)."""
    mode = fused_backward_mode()
    if mode == "off" or not hasattr(ext, "chunk_bwd_fused"):
        return None
    for i, jobs in enumerate(FUSED_BWD_SM90_JOBS[mode]):
        ran = ext.chunk_bwd_fused(q, k, v, do, h, dH, dq, dk, dv, rq, rk, g, gamma, cu, off, scale, jobs)
        if not ran:
            assert i == 0, "chunk_bwd_fused ran one of its launches but not the other"
            return None
    return mode


def chunk_backward(ext, q, k, v, g, gamma, scale, h0, do, dht, seqs, need_dg, h=None):
    """Padded, contiguous inputs (h: the forward's chunk states, or None to recompute them) ->
    (dq, dk, dv, dg fp32 [B, T, H] or None, dh0 fp32)."""
    B, T, H, K = q.shape
    V = v.shape[3]
    if h is None:
        h = _states(ext, k, v, g, gamma, h0, seqs, None)
    dh0 = q.new_empty(seqs.num_seqs, H, K, V, dtype=torch.float32)
    # exp(b_L) <dH_c, h_c> per chunk and state tile: the gate gradient's inter-chunk term
    pair = q.new_empty(seqs.slots, H, (K // 64) * (V // 32), dtype=torch.float32) if need_dg else None
    dH = _states(ext, q, do, g, gamma, dht, seqs, dh0, scale=scale, reverse=True,
                 pair_states=h if need_dg else None, pair_dot=pair)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    rq = q.new_empty(K // 64, B, T, H, dtype=torch.float32) if need_dg else None
    rk = q.new_empty(K // 64, B, T, H, dtype=torch.float32) if need_dg else None
    cu, off = seqs.cu, seqs.offsets
    global last_backward_products
    fused = _fused_backward(ext, q, k, v, do, h, dH, dq, dk, dv, rq, rk, g, gamma, cu, off, scale)
    if fused is not None:
        last_backward_products = "fused_" + fused
    else:
        last_backward_products = "chunk_output"
        ext.chunk_output(k, q, do, dH, dv, None, None, g, gamma, cu, off, 1.0, scale, False, True)
        ext.chunk_output(do, v, k, h, dq, q if need_dg else None, rq, g, gamma, cu, off, scale, scale, True, False)
        ext.chunk_output(v, do, q, dH, dk, k if need_dg else None, rk, g, gamma, cu, off, 1.0, scale, True, True)
    dg = None
    if need_dg:
        dg = q.new_empty(B, T, H, dtype=torch.float32)
        ext.gate_grad(q, k, v, do, g, gamma, rq, rk, pair, dg, cu, off, scale)
    return dq, dk, dv, dg, dh0


class SimpleGLAFunction(torch.autograd.Function):
    """o, h_T = simple GLA of (q, k, v, g | gamma, h0); the forward by the chunked or the
    token-by-token kernels (recurrent=True), the backward always chunked."""

    @staticmethod
    def forward(ctx, q, k, v, g, gamma, h0, scale, output_final_state, cu_seqlens, recurrent):
        ext = extension()
        qp, kp, vp, h0p, dims = _pad_inputs(q, k, v, h0)
        g32, gamma32 = _gates(g, gamma)
        seqs = Seqs(q.shape[0], q.shape[1], cu_seqlens, q.device)
        h = None
        if recurrent:
            o, ht = recurrent_forward(ext, qp, kp, vp, g32, gamma32, scale, h0p, output_final_state, seqs)
        else:
            keep_h = any(ctx.needs_input_grad[:6]) and save_states()  # (grad mode is off in forward)
            o, ht, h = chunk_forward(ext, qp, kp, vp, g32, gamma32, scale, h0p, output_final_state, seqs, keep_h)
        ctx.save_for_backward(qp, kp, vp, g32, gamma32, h0p, h)
        ctx.seqs, ctx.scale, ctx.dims = seqs, scale, dims
        ctx.g_dtype = None if g is None else g.dtype
        ctx.gamma_dtype = None if gamma is None else gamma.dtype
        ctx.h0_given = h0 is not None
        return _unpad_outputs(o, ht, dims)

    @staticmethod
    def backward(ctx, do, dht):
        qp, kp, vp, g32, gamma32, h0p, h = ctx.saved_tensors
        K, V, kd, vd = ctx.dims
        need_dg = ctx.needs_input_grad[3] or ctx.needs_input_grad[4]
        dop = _pad_last(do.to(vp.dtype), vd)
        dhtp = _pad_state(dht, kd, vd)
        dq, dk, dv, dg, dh0 = chunk_backward(extension(), qp, kp, vp, g32, gamma32, ctx.scale, h0p, dop, dhtp,
                                             ctx.seqs, need_dg, h)
        dgate = dgamma = None
        if ctx.needs_input_grad[3]:
            dgate = dg.to(ctx.g_dtype)
        if ctx.needs_input_grad[4]:
            dgamma = dg.sum((0, 1)).to(ctx.gamma_dtype)
        dh0 = dh0[..., :K, :V].contiguous() if ctx.h0_given and ctx.needs_input_grad[5] else None
        return (dq[..., :K], dk[..., :K], dv[..., :V], dgate, dgamma, dh0, None, None, None, None)


# --------------------------------------------------------------------------- GLA (per-key gates)

def gla_cumsum(ext, g, seqs):
    """Padded fp32 gates [B, T, H, K] -> b, their chunk-local cumulative sums (fp32)."""
    b = torch.empty_like(g)
    ext.gla_cumsum(g, b, seqs.cu, seqs.offsets, seqs.slots)
    return b


GLA_FUSED_FWD_ENV = "FLASH_ATTN_LINEAR_GLA_FUSED_FWD"
GLA_FUSED_WIDE_TILE_V = 128  # tile_size.h gla_fused_tile_v: the 256-thread kernel's V tile
GLA_FUSED_CTAS_PER_SM = 1    # the 256-thread kernel's 162 KB of shared memory: one CTA per SM


def gla_fused_mode():
    """FLASH_ATTN_LINEAR_GLA_FUSED_FWD: "auto" (unset, the default) runs GLA's one-pass forward
    where it takes the 256-thread kernel (K = 128, V a multiple of 128: A computed once per 128 V
    columns; 0.730 -> 0.522 ms at 8x2048 on the H100, benchmarks/results/gla_fused_wide_ab/);
    on (1) with the 128-thread kernel too, whose V tiles each recompute the scores A (0.815 vs
    0.731 ms at 8x2048, f20592b); off (0) never. Any mode needs FLASH_ATTN_LINEAR_FUSED_FWD on."""
    raw = os.environ.get(GLA_FUSED_FWD_ENV, "auto").strip().lower()
    if raw == "auto":
        return "auto"
    return "on" if _env_switch(GLA_FUSED_FWD_ENV, "0") else "off"


def gla_fused_plan(ext, q, v, seqs):
    """None (the three-launch forward) or (seg_chunks, segments per sequence, wide) for
    gla_fused_fwd: gla_fused_mode allows this tile and the extension has it. Its one CTA per
    (sequence, head, V tile) walks the sequence's chunks in order. When they fill the SMs to
    within 1/16: (0, 1). The slack admits 8 x 16 heads at K = V = 128 (128 CTAs) on a 132-SM
    H100: one CTA per SM either way (the 256-thread kernel takes 162 KB of shared memory), 4 SMs
    idle. Else the 256-thread kernel (wide) cuts the sequences into segments, one CTA per SM
    (_segment_plan), and the narrow one is not used. wide: the kernel sums the raw gates itself
    (no gla_cumsum launch)."""
    mode = gla_fused_mode()
    if mode == "off" or not fused_forward_enabled():
        return None
    if not hasattr(ext, "gla_fused_tile_v"):  # (older builds lack it)
        return None
    K, V = q.shape[3], v.shape[3]
    bv = ext.gla_fused_tile_v(K, V)
    wide = bv == GLA_FUSED_WIDE_TILE_V
    if (mode == "auto" and not wide) or V % bv:
        return None
    grid = _gla_one_pass_grid(q, v, seqs, bv, wide)
    return None if grid is None else (*grid, wide)


def _gla_one_pass_grid(q, v, seqs, bv, wide):
    """(seg_chunks, segments per sequence) of a GLA one-pass kernel's grid, or None where the
    chunk-parallel launches are the better choice: (0, 1) when its CTAs fill the SMs to within
    1/16 (gla_fused_plan says why), else segments for the 256-thread kernel (wide) where the
    sequences are long enough to cut (_segment_plan)."""
    ctas, sms = seqs.num_seqs * q.shape[2] * (v.shape[3] // bv), num_sms(q.device)
    if ctas >= sms - sms // 16:
        return 0, 1
    if not wide:
        return None
    seg_chunks, segments = _segment_plan(ctas, GLA_FUSED_CTAS_PER_SM * sms, q.shape[1])
    return (seg_chunks, segments) if segments > 1 else None


GLA_FUSED_BWD_ENV = "FLASH_ATTN_LINEAR_GLA_FUSED_BWD"


def gla_reverse_plan(ext, q, v, seqs):
    """None (chunk_state's reverse pass, then gla_output for dv) or (seg_chunks, segments) for
    chunk_gla's backward reverse pass in one kernel (gla_fused_fwd with reverse: dv and the state
    gradients dH, run_gla_fused_reverse in gla_fused.cuh): the 256-thread kernel only (K = 128,
    V a multiple of 128), on the forward's grid rule (_gla_one_pass_grid).
    FLASH_ATTN_LINEAR_GLA_FUSED_BWD=0 turns it off."""
    if not _env_switch(GLA_FUSED_BWD_ENV, "1") or not hasattr(ext, "gla_fused_tile_v"):
        return None
    if ext.gla_fused_tile_v(q.shape[3], v.shape[3]) != GLA_FUSED_WIDE_TILE_V:
        return None
    return _gla_one_pass_grid(q, v, seqs, GLA_FUSED_WIDE_TILE_V, True)


SAVE_STATES_ENV = "FLASH_ATTN_LINEAR_SAVE_STATES"


def save_states():
    """Whether a chunked forward keeps its chunk states h [chunks, H, K, V] (input dtype, twice
    q's size) for the backward when gradients are needed, instead of the backward recomputing
    them (one chunk_state pass: ~0.23 ms for chunk_gla at 8x2048 x 16 heads, K = V = 128, on an
    H100; ~0.9 ms for the simple-GLA family at 1x65536). Every chunked op: unset (the default),
    "auto" or 1 keep them (the simple-GLA family's forward + backward 14-20% faster on an H100 at
    7b9305c, benchmarks/results/save_states_ab/); FLASH_ATTN_LINEAR_SAVE_STATES=0 gives the
    memory back for the recompute."""
    return _env_switch(SAVE_STATES_ENV, "1")


def gla_chunk_forward(ext, q, k, v, g, scale, h0, output_final_state, seqs, keep_b=True, keep_h=False):
    """Padded, contiguous inputs, g the raw fp32 gates -> (o, h_T fp32 or None, b = gla_cumsum(g)
    or None, h or None). b is what the backward needs; with keep_b=False it may be None (the
    256-thread one-pass kernel sums the gates itself and writes b out only when asked). With
    keep_h, h is the chunk states (chunk_state's [slots, H, K, V] in q's dtype) where the path
    gives them: the three launches compute them anyway, the 256-thread kernel writes them out;
    the 128-thread one-pass kernel does not (None)."""
    N, H, K, V = seqs.num_seqs, q.shape[2], q.shape[3], v.shape[3]
    final = q.new_empty(N, H, K, V, dtype=torch.float32) if output_final_state else None
    o = torch.empty_like(v)
    plan = gla_fused_plan(ext, q, v, seqs)
    if plan is not None and plan[2]:
        seg_chunks, segments, _ = plan
        b = torch.empty_like(g) if keep_b else None
        h = q.new_empty(seqs.slots, H, K, V) if keep_h else None
        # with segments: their local states and per-key log-decays (gla_fused.cuh, pass 1)
        ws = _segment_workspace(q, v, seqs, segments, per_row=True) if segments > 1 else (None, None)
        ext.gla_fused_fwd(q, k, v, None, h0, o, final, seqs.cu, scale, g, b, seg_chunks, *ws, h,
                          seqs.offsets if h is not None else None)
        return o, final, b, h
    b = gla_cumsum(ext, g, seqs)
    if plan is not None:
        ext.gla_fused_fwd(q, k, v, b, h0, o, final, seqs.cu, scale)
        return o, final, b, None
    h = _states(ext, k, v, None, None, h0, seqs, final, gk_cum=b)
    ext.gla_output(q, k, v, h, b, o, seqs.cu, seqs.offsets, scale, scale, False)
    return o, final, b, (h if keep_h else None)


def gla_chunk_backward(ext, q, k, v, b, scale, h0, do, dht, seqs, h=None):
    """Padded, contiguous inputs (h: the forward's chunk states, or None to recompute them) ->
    (dq, dk, dv, dg fp32 [B, T, H, K], dh0 fp32)."""
    H, K, V = q.shape[2], q.shape[3], v.shape[3]
    if h is None:
        h = _states(ext, k, v, None, None, h0, seqs, None, gk_cum=b)
    dh0 = q.new_empty(seqs.num_seqs, H, K, V, dtype=torch.float32)
    cu, off = seqs.cu, seqs.offsets
    dv = torch.empty_like(v)
    plan = gla_reverse_plan(ext, q, v, seqs)
    if plan is not None:  # dv and dH in one reverse pass (roles: q = k, k = q, v = do)
        seg_chunks, segments = plan
        dH = q.new_empty(seqs.slots, H, K, V)
        ws = _segment_workspace(q, v, seqs, segments, per_row=True) if segments > 1 else (None, None)
        ext.gla_fused_fwd(k, q, do, b, dht, dv, dh0, cu, scale, None, None, seg_chunks, *ws, dH, off, reverse=True)
    else:
        dH = _states(ext, q, do, None, None, dht, seqs, dh0, scale=scale, reverse=True, gk_cum=b)
        ext.gla_output(k, q, do, dH, b, dv, cu, off, 1.0, scale, True)
    dq, dk, dg = torch.empty_like(q), torch.empty_like(k), torch.empty_like(b)
    ext.gla_grad(q, k, v, do, b, h, dH, dq, dk, dg, cu, off, scale)
    return dq, dk, dv, dg, dh0


def recurrent_backward(ext, q, k, v, gk, gv, scale, h0, do, dht, seqs):
    """The token-by-token gradients of GLA with per-key gates gk and/or per-value gates gv
    (padded, contiguous, fp32 gates; no scalar gate) -> (dq, dk, dv, dgk fp32 or None, dgv fp32
    or None, dh0 fp32). The kernel writes dq, dk and dgk as fp32 parts per 32 value columns,
    summed here in a fixed order."""
    B, T, H, K = q.shape
    V = v.shape[3]
    part = (V // 32, B, T, H, K)
    dq_part, dk_part = q.new_empty(part, dtype=torch.float32), q.new_empty(part, dtype=torch.float32)
    dgk_part = None if gk is None else q.new_empty(part, dtype=torch.float32)
    dv = torch.empty_like(v)
    dgv = None if gv is None else torch.empty_like(gv)
    dh0 = q.new_empty(seqs.num_seqs, H, K, V, dtype=torch.float32)
    ext.recurrent_grad(q, k, v, gk, gv, h0, do, dht, dq_part, dk_part, dgk_part, dv, dgv, dh0, seqs.cu, seqs.offsets,
                       scale, False)
    dgk = None if dgk_part is None else dgk_part.sum(0)
    return dq_part.sum(0).to(q.dtype), dk_part.sum(0).to(k.dtype), dv, dgk, dgv, dh0


class GLAFunction(torch.autograd.Function):
    """o, h_T = GLA of (q, k, v, gk [B, T, H, K], gv [B, T, H, V], h0), gv only with
    recurrent=True (and then gk may be None); the forward by the chunked kernels or the
    token-by-token one (recurrent=True), the backward chunked, or token by token with gv."""

    @staticmethod
    def forward(ctx, q, k, v, g, gv, h0, scale, output_final_state, cu_seqlens, recurrent):
        ext = extension()
        qp, kp, vp, h0p, dims = _pad_inputs(q, k, v, h0)
        # padded keys / values: gate 0 (no decay) on zero q, k / v
        gp = None if g is None else _pad_last(g.float(), dims[2])
        gvp = None if gv is None else _pad_last(gv.float(), dims[3])
        seqs = Seqs(q.shape[0], q.shape[1], cu_seqlens, q.device)
        if recurrent:
            o, ht = recurrent_forward(ext, qp, kp, vp, None, None, scale, h0p, output_final_state, seqs, gk=gp,
                                      gv=gvp)
            ctx.gates_cumulative, h = False, None
        else:
            assert gvp is None, "the chunked GLA kernels have no value gate"
            # the backward needs only b: it is saved in place of the gates (same size, fp32), and
            # the backward's gla_cumsum launch is saved too
            keep_b = any(ctx.needs_input_grad[:6])  # (grad mode is off inside forward)
            o, ht, b, h = gla_chunk_forward(ext, qp, kp, vp, gp, scale, h0p, output_final_state, seqs, keep_b,
                                            keep_b and save_states())
            ctx.gates_cumulative = b is not None
            gp = gp if b is None else b
        ctx.save_for_backward(qp, kp, vp, gp, gvp, h0p, h)
        ctx.seqs, ctx.scale, ctx.dims = seqs, scale, dims
        ctx.g_dtype = None if g is None else g.dtype
        ctx.gv_dtype = None if gv is None else gv.dtype
        ctx.h0_given = h0 is not None
        return _unpad_outputs(o, ht, dims)

    @staticmethod
    def backward(ctx, do, dht):
        qp, kp, vp, gp, gvp, h0p, h = ctx.saved_tensors
        K, V, kd, vd = ctx.dims
        ext = extension()
        dop = _pad_last(do.to(vp.dtype), vd)
        dhtp = _pad_state(dht, kd, vd)
        dgv = None
        if gvp is None:
            b = gp if ctx.gates_cumulative else gla_cumsum(ext, gp, ctx.seqs)
            dq, dk, dv, dg, dh0 = gla_chunk_backward(ext, qp, kp, vp, b, ctx.scale, h0p, dop, dhtp, ctx.seqs, h)
        else:
            dq, dk, dv, dg, dgv, dh0 = recurrent_backward(ext, qp, kp, vp, gp, gvp, ctx.scale, h0p, dop, dhtp,
                                                          ctx.seqs)
        dgate = dg[..., :K].to(ctx.g_dtype) if gp is not None and ctx.needs_input_grad[3] else None
        dgv = dgv[..., :V].to(ctx.gv_dtype) if gvp is not None and ctx.needs_input_grad[4] else None
        dh0 = dh0[..., :K, :V].contiguous() if ctx.h0_given and ctx.needs_input_grad[5] else None
        return dq[..., :K], dk[..., :K], dv[..., :V], dgate, dgv, dh0, None, None, None, None


# --------------------------------------------------------------------------- entry points

def _flip_sequences(x, cu_seqlens):
    """Each sequence of x [B, T, ...] run backwards. Packed sequences: flipping the packed
    row reverses their order too, which _flipped_cu and the state flips undo."""
    return None if x is None else x.flip(1)


def _flipped_cu(cu_seqlens, T):
    return None if cu_seqlens is None else (T - cu_seqlens.flip(0)).to(cu_seqlens.dtype)


def _reversed_inputs(xs, initial_state, cu_seqlens):
    """reverse=True through the autograd Functions: the [B, T, ...] tensors xs (None passes)
    with each sequence run backwards, and the initial states and cu_seqlens to match.
    _reversed_outputs turns (o, ht) back."""
    T = xs[0].shape[1]
    xs = [_flip_sequences(x, cu_seqlens) for x in xs]
    if cu_seqlens is not None and initial_state is not None:
        initial_state = initial_state.flip(0)
    return xs, initial_state, _flipped_cu(cu_seqlens, T)


def _reversed_outputs(o, ht, cu_seqlens):
    o = o.flip(1)
    if ht is not None and cu_seqlens is not None:
        ht = ht.flip(0)
    return o, ht


def _decode(ext, q, k, v, scale, initial_state, output_final_state, reverse, cu_seqlens, g=None, gamma=None,
            gk=None, gv=None):
    """fused_recurrent_* without gradients (decoding): the token-by-token kernel, reverse in
    place, no autograd; scalar gates g / gamma or GLA's per-key gk / per-value gv."""
    qp, kp, vp, h0p, dims = _pad_inputs(q, k, v, initial_state)
    _, _, kd, vd = dims
    g32, gamma32 = _gates(g, gamma)
    gk32 = None if gk is None else _pad_last(gk.float(), kd)
    gv32 = None if gv is None else _pad_last(gv.float(), vd)
    seqs = Seqs(q.shape[0], q.shape[1], cu_seqlens, q.device)
    o, ht = recurrent_forward(ext, qp, kp, vp, g32, gamma32, scale, h0p, output_final_state, seqs, reverse, gk32,
                              gv32)
    o, ht = _unpad_outputs(o, ht, dims)
    return o, None if ht is None else ht.contiguous()  # the next step's initial_state


def simple_gla(fn, mode, q, k, v, g, g_gamma, scale, initial_state, output_final_state, reverse, cu_seqlens):
    """chunk_* (mode "chunk") and fused_recurrent_* (mode "recurrent") of the simple-GLA family
    on CUDA: fp16/bf16 inputs with head dims <= 256. Checked arguments, states [N, H, K, V].
    Returns (o, final state or None)."""
    ext = require_extension(fn)
    grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, k, v, g, g_gamma, initial_state))
    if mode == "recurrent" and not grad:
        return _decode(ext, q, k, v, scale, initial_state, output_final_state, reverse, cu_seqlens, g=g,
                       gamma=g_gamma)
    if reverse:
        (q, k, v, g), initial_state, cu_seqlens = _reversed_inputs((q, k, v, g), initial_state, cu_seqlens)
    o, ht = SimpleGLAFunction.apply(q, k, v, g, g_gamma, initial_state, scale, output_final_state, cu_seqlens,
                                    mode == "recurrent")
    return _reversed_outputs(o, ht, cu_seqlens) if reverse else (o, ht)


def gla(fn, mode, q, k, v, gk, gv, scale, initial_state, output_final_state, reverse, cu_seqlens):
    """chunk_gla (mode "chunk") and fused_recurrent_gla (mode "recurrent") on CUDA: fp16/bf16
    inputs with head dims <= 256, per-key gates gk [B, T, H, K] and/or (recurrent only)
    per-value gates gv. Checked arguments, states [N, H, K, V]. Returns (o, final state or None).
    With gradients and gv the backward is token by token (recurrent_backward), else chunked."""
    ext = require_extension(fn)
    grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, k, v, gk, gv, initial_state))
    if mode == "recurrent" and not grad:
        return _decode(ext, q, k, v, scale, initial_state, output_final_state, reverse, cu_seqlens, gk=gk, gv=gv)
    if reverse:
        (q, k, v, gk, gv), initial_state, cu_seqlens = _reversed_inputs((q, k, v, gk, gv), initial_state,
                                                                        cu_seqlens)
    o, ht = GLAFunction.apply(q, k, v, gk, gv, initial_state, scale, output_final_state, cu_seqlens,
                              mode == "recurrent")
    return _reversed_outputs(o, ht, cu_seqlens) if reverse else (o, ht)
