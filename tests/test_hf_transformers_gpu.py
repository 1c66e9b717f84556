"""Hugging Face transformers runs on this package, unmodified, as "flash_attention_2".

Small randomly initialized decoders (no downloads) in fp16/bf16 on the GPU:
- transformers must see this package as FlashAttention 2 (distribution name
  `flash_attn`, version >= 2.3.3) and call our functions, not a fallback;
- a left-padded batch gives the same logits on non-pad positions as the
  model's reference attention ("sdpa"; "eager" for Gemma 2, whose softcap SDPA
  ignores), judged like the kernel tests: the error against an fp32 copy of the
  model is at most 3x the reference implementation's own error in fp16/bf16
  (3x rather than 2x: the error passes through several layers);
- greedy generation gives the same tokens. Where the two runs pick different
  tokens, the reference's top-2 logits at that step must be a near tie, closer
  than the measured numeric noise between the implementations; the runs are
  not compared past that step.

Skips without transformers, without a GPU or without the compiled extension.
"""
import copy

import pytest
import torch

from flash_attn import build_info
from gpu_env import gpu_marks, unavailable_reason

UNAVAILABLE = unavailable_reason()
pytestmark = gpu_marks(UNAVAILABLE)

transformers = pytest.importorskip("transformers")

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
PROMPT_LENS = [23, 64, 1, 40]  # left-padded to 64; one single-token prompt
NEW_TOKENS = 16
PAD, BOS, EOS = 0, 1, 2


def _family(name):
    """(config, reference attn implementation) of a tiny decoder; None when this
    transformers lacks the model."""
    common = dict(vocab_size=512, num_hidden_layers=2, max_position_embeddings=256,
                  pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, initializer_range=0.1,
                  tie_word_embeddings=False)
    if name == "llama":  # GQA 8:2, head dim 32
        cfg = transformers.LlamaConfig(hidden_size=256, intermediate_size=512, num_attention_heads=8,
                                       num_key_value_heads=2, **common)
        return cfg, "sdpa"
    if name == "mistral":  # sliding window 16, MQA, head dim 64
        if not hasattr(transformers, "MistralConfig"):
            return None
        cfg = transformers.MistralConfig(hidden_size=512, intermediate_size=768, num_attention_heads=8,
                                         num_key_value_heads=1, sliding_window=16, **common)
        return cfg, "sdpa"
    if name == "gemma2":  # attention softcap, alternating sliding window, head dim 80 (padded)
        if not hasattr(transformers, "Gemma2Config"):
            return None
        cfg = transformers.Gemma2Config(hidden_size=256, intermediate_size=512, num_attention_heads=4,
                                        num_key_value_heads=2, head_dim=80, query_pre_attn_scalar=80,
                                        sliding_window=16, attn_logit_softcapping=20.0,
                                        final_logit_softcapping=None, **common)
        return cfg, "eager"  # transformers' SDPA path ignores the attention softcap
    raise ValueError(name)


def _need_features(name, dtype_name):
    cfg = build_info.build_config()
    if dtype_name not in cfg.get("dtypes", []):
        pytest.skip(f"{dtype_name} not compiled in this build")
    if name == "gemma2" and not build_info.has_feature("softcap"):
        pytest.skip("softcap kernels not compiled in this build")
    hdim = {"llama": 32, "mistral": 64, "gemma2": 80}[name]
    if not any(h >= hdim for h in build_info.compiled_head_dims()):
        pytest.skip(f"no compiled head dim >= {hdim}")


def _set_impl(model, impl):
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(impl)
    else:  # older transformers
        model.config._attn_implementation = impl
    assert model.config._attn_implementation == impl, (
        f"transformers chose {model.config._attn_implementation!r} instead of {impl!r}")


def _build(name, dtype):
    fam = _family(name)
    if fam is None:
        pytest.skip(f"transformers {transformers.__version__} has no {name} model")
    config, ref_impl = fam
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=ref_impl,
                                                           dtype=torch.float32)
    model.eval()
    ref32 = copy.deepcopy(model).to("cuda")
    model = model.to("cuda", dtype=dtype)
    return model, ref32, ref_impl


def _batch():
    """Left-padded prompts: input_ids and attention_mask (b, max_len), on the GPU."""
    gen = torch.Generator().manual_seed(1)
    width = max(PROMPT_LENS)
    ids = torch.full((len(PROMPT_LENS), width), PAD, dtype=torch.long)
    mask = torch.zeros(len(PROMPT_LENS), width, dtype=torch.long)
    for i, n in enumerate(PROMPT_LENS):
        ids[i, width - n:] = torch.randint(3, 512, (n,), generator=gen)
        ids[i, width - n] = BOS
        mask[i, width - n:] = 1
    return ids.cuda(), mask.cuda()


@torch.no_grad()
def _logits(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask).logits.float()


@pytest.mark.cuda
def test_transformers_sees_flash_attn_2():
    from transformers.utils import import_utils

    import flash_attn

    assert import_utils.is_flash_attn_2_available(), (
        "transformers does not see flash_attn as FlashAttention 2: it needs the distribution "
        "'flash_attn' (or 'flash-attn') installed with version >= 2.3.3, and CUDA; found "
        f"distributions {import_utils.PACKAGE_DISTRIBUTION_MAPPING.get('flash_attn')}, "
        f"flash_attn.__version__ = {flash_attn.__version__}")
    assert import_utils.is_flash_attn_greater_or_equal("2.8.0")
    # the names transformers imports from us (modeling_flash_attention_utils._lazy_imports)
    from flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache  # noqa: F401
    from flash_attn.bert_padding import pad_input, unpad_input  # noqa: F401


def _assert_our_functions_used():
    import flash_attn
    from transformers import modeling_flash_attention_utils as mfa

    assert mfa._flash_fn is flash_attn.flash_attn_func, f"transformers uses {mfa._flash_fn!r}, not ours"
    assert mfa._flash_varlen_fn is flash_attn.flash_attn_varlen_func, (
        f"transformers uses {mfa._flash_varlen_fn!r}, not ours")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2"])
def test_padded_logits_match(name, dtype_name):
    _need_features(name, dtype_name)
    model, ref32, ref_impl = _build(name, DTYPES[dtype_name])
    ids, mask = _batch()
    valid = mask.bool()
    want = _logits(ref32, ids, mask)[valid]
    base = _logits(model, ids, mask)[valid]
    _set_impl(model, "flash_attention_2")
    got = _logits(model, ids, mask)[valid]
    _assert_our_functions_used()
    assert torch.isfinite(got).all(), "non-finite logits with flash_attention_2"
    err, base_err = (got - want).abs().max().item(), (base - want).abs().max().item()
    scale = want.abs().max().item()
    tol = max(3 * base_err, 1e-3 * scale)
    assert err <= tol, (f"{name} {dtype_name}: max |logits_fa - logits_fp32| = {err:.3e} > {tol:.3e} "
                        f"({ref_impl} in {dtype_name}: {base_err:.3e})")

    # no padding at all: transformers then calls flash_attn_func (the dense path)
    full = torch.ones_like(mask)
    dense_ids = ids.clone()
    dense_ids[~valid] = 7
    want = _logits(ref32, dense_ids, full)
    got = _logits(model, dense_ids, full)
    _set_impl(model, ref_impl)
    base = _logits(model, dense_ids, full)
    err, base_err = (got - want).abs().max().item(), (base - want).abs().max().item()
    tol = max(3 * base_err, 1e-3 * want.abs().max().item())
    assert err <= tol, f"{name} {dtype_name} unpadded: {err:.3e} > {tol:.3e} ({ref_impl}: {base_err:.3e})"


@torch.no_grad()
def _generate(model, ids, mask):
    res = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=NEW_TOKENS,
                         min_new_tokens=NEW_TOKENS, pad_token_id=PAD, return_dict_in_generate=True,
                         output_scores=True)
    tokens = res.sequences[:, ids.shape[1]:]
    scores = torch.stack([s.float() for s in res.scores], dim=1)  # (b, steps, vocab)
    return tokens, scores


@pytest.mark.cuda
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2"])
def test_greedy_generation_matches(name, dtype_name):
    _need_features(name, dtype_name)
    model, ref32, ref_impl = _build(name, DTYPES[dtype_name])
    ids, mask = _batch()
    valid = mask.bool()
    # numeric noise between the implementations, measured on the prompt
    want32 = _logits(ref32, ids, mask)[valid]
    noise = (_logits(model, ids, mask)[valid] - want32).abs().max().item()
    ref_tokens, ref_scores = _generate(model, ids, mask)
    _set_impl(model, "flash_attention_2")
    tokens, scores = _generate(model, ids, mask)
    _assert_our_functions_used()
    assert tokens.shape == ref_tokens.shape
    # noise of one implementation vs fp32, times 3 (as for logits), for each of the two
    allowed = 2 * 3 * noise + 1e-3 * ref_scores[torch.isfinite(ref_scores)].abs().max().item()
    for i in range(len(PROMPT_LENS)):
        same = (tokens[i] == ref_tokens[i]).tolist()
        steps = same.index(False) if False in same else len(same)
        finite = torch.isfinite(ref_scores[i, :steps + (steps < len(same))])
        diff = (scores[i, :steps + (steps < len(same))] - ref_scores[i, :steps + (steps < len(same))])
        drift = diff[finite].abs().max().item() if finite.any() else 0.0
        assert drift <= allowed, (f"{name} {dtype_name} sequence {i}: step scores differ by {drift:.3e} "
                                  f"(allowed {allowed:.3e}) over the first {steps + 1} steps")
        if steps < len(same):
            ours, theirs = tokens[i, steps].item(), ref_tokens[i, steps].item()
            margin = (ref_scores[i, steps, theirs] - ref_scores[i, steps, ours]).item()
            assert margin <= 2 * drift + 1e-6, (
                f"{name} {dtype_name} sequence {i}: generation differs at step {steps} "
                f"(token {ours} vs {ref_impl}'s {theirs}) without a near tie: "
                f"{ref_impl}'s margin {margin:.3e} > 2 x score drift {drift:.3e}")
