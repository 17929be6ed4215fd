"""latent_sdpa's two forms (expanded prefill, absorbed decode): the choice rule, and expanded == absorbed == eager on
the expanded model for prefill, padded prefill, chunked prefill over a cache and cached greedy generation, on the
plugin model and on stock deepseek_v3; the cache holds only the latent whichever form ran."""

import pytest
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from hf_attn_swap import LatentCache, convert_to_mla
from hf_attn_swap.export.deepseek_v3 import to_deepseek_v3
from hf_attn_swap.modeling.compat import cache_kwargs
from hf_attn_swap.modeling.latent_attention import LatentShapes, force_latent_form, prefers_expanded
from hf_attn_swap.testing import tiny_model

SMOLLM2 = LatentShapes(heads=9, rank=88, nope_dim=64, rope_dim=32, value_dim=64)  # --kv-budget 0.3125
DEEPSEEK_V3 = LatentShapes(heads=128, rank=512, nope_dim=128, rope_dim=64, value_dim=128)
TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
FORMS = ("expanded", "absorbed", "auto")
#: name -> (family, KV heads, rank, d_rope, convert_to_mla options, export to stock deepseek_v3)
MODELS = {
    "plugin, shared rope key, biases": ("qwen2", 2, 24, 8, {}, False),
    "plugin, rope key per KV head, energy ranks": (
        "llama",
        2,
        20,
        4,
        dict(num_rope_key_heads=2, rank_allocation="energy"),
        False,
    ),  # fmt: skip
    "stock deepseek_v3": ("llama", 2, 24, 8, {}, True),
}


def exact_eager(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers' eager attention on the expanded keys/values, with the softmax in the input dtype (its own
    ``eager`` takes the softmax in float32, which caps a float64 comparison at ~1e-7)."""
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:  # eager_mask: additive, dtype min where masked
        scores = scores + attention_mask[:, :, :, : key.shape[-2]]
    probs = scores.softmax(dim=-1)
    return torch.matmul(probs, value).transpose(1, 2).contiguous(), probs


EAGER = "hf_attn_swap_test_exact_eager"
AttentionInterface.register(EAGER, exact_eager)
AttentionMaskInterface.register(EAGER, eager_mask)


def build(name, dtype):
    family, kv, rank, rope_dim, options, export = MODELS[name]
    model = tiny_model(family, num_attention_heads=4, num_key_value_heads=kv)
    convert_to_mla(model, rank, rope_dim, **options)
    if export:
        model = to_deepseek_v3(model).model
    model = model.to(dtype).eval()
    model.generation_config.eos_token_id = None  # random weights: never stop early
    return model


def batch(length=12, pads=5):
    ids = torch.randint(3, 128, (2, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :pads] = 0
    return ids, mask


def forward(model, attn, form="auto", **inputs):
    model.set_attn_implementation(attn)
    with torch.no_grad(), force_latent_form(form):
        return model(**inputs).logits


def relative(out, reference, pads=0):
    """max |out - reference| / max |reference| over the real (unpadded) tokens of both rows."""
    rows = [(out[0], reference[0]), (out[1, pads:], reference[1, pads:])]
    return max(((a - b).abs().max() / b.abs().max()).item() for a, b in rows)


def test_rule_expands_prompts_and_absorbs_decode_steps():
    for shapes in (SMOLLM2, DEEPSEEK_V3):
        for length in (16, 1024, 4096):
            assert prefers_expanded(shapes, length, length)  # a prompt without a cache
            assert not prefers_expanded(shapes, 1, length + 1)  # one decode step over the cache
    # the module docstring's formulas, and its SmolLM2 crossover for a chunk over 1024 cached tokens
    assert SMOLLM2.absorbed_cost(3, 10) == 3 * 9 * 88 * 128 + 3 * 10 * 9 * 2 * (88 + 32)
    assert SMOLLM2.expanded_cost(3, 10) == 10 * 9 * 88 * 128 + 3 * 10 * 9 * (96 + 96)
    assert prefers_expanded(SMOLLM2, 197, 1024 + 197) and not prefers_expanded(SMOLLM2, 196, 1024 + 196)
    # a latent narrower than the head gains nothing per score from expanding: always absorbed
    narrow = LatentShapes(heads=9, rank=16, nope_dim=64, rope_dim=16, value_dim=64)
    assert not prefers_expanded(narrow, 4096, 4096)
    with pytest.raises(ValueError, match="absorbed, expanded"):
        with force_latent_form("latent"):
            pass


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
@pytest.mark.parametrize("name", list(MODELS))
def test_prefill_forms_equal_eager(name, dtype):
    model = build(name, dtype)
    ids, mask = batch()
    for inputs, pads in ((dict(input_ids=ids), 0), (dict(input_ids=ids, attention_mask=mask), 5)):
        eager = forward(model, EAGER, **inputs)
        for form in FORMS:
            assert relative(forward(model, "latent_sdpa", form, **inputs), eager, pads) <= TOLERANCE[dtype], (
                form
            )
    # the padding mask is applied: unmasking the pads changes the real tokens' logits
    unmasked = forward(model, "latent_sdpa", "expanded", input_ids=ids)
    assert relative(unmasked, forward(model, EAGER, input_ids=ids, attention_mask=mask), 5) > 1e-3


@pytest.mark.parametrize("name", list(MODELS))
def test_chunked_prefill_over_a_latent_cache_equals_eager(name):
    """Chunks of 5, 4 and 3 tokens (query length > 1 over a non-empty cache), left padding, in each form."""
    model = build(name, torch.float64)
    ids, mask = batch()
    eager = forward(model, EAGER, input_ids=ids, attention_mask=mask)
    for form in FORMS:
        cache = LatentCache(config=model.config)
        chunks = []
        for start, end in ((0, 5), (5, 9), (9, 12)):
            inputs = dict(input_ids=ids[:, start:end], attention_mask=mask[:, :end], use_cache=True)
            chunks.append(forward(model, "latent_sdpa", form, **inputs, **cache_kwargs(cache)))
        assert relative(torch.cat(chunks, dim=1), eager, pads=5) <= 1e-10, form
        assert_latent_only(model, cache, batch_size=2, length=12)


def assert_latent_only(model, cache, batch_size, length):
    """Each layer caches c [B, 1, S, r] and the rope keys [B, n, S, d_rope], nothing else."""
    config = model.config
    rope_heads = getattr(config, "num_rope_key_heads", 1)
    ranks = [layer.self_attn.kv_lora_rank for layer in model.model.layers]
    for layer, rank in zip(cache.layers, ranks, strict=True):
        assert layer.keys.shape == (batch_size, 1, length, rank)
        assert layer.values.shape == (batch_size, rope_heads, length, config.qk_rope_head_dim)
    width = sum(rank + rope_heads * config.qk_rope_head_dim for rank in ranks)
    assert cache.nbytes() == batch_size * length * width * model.dtype.itemsize


@pytest.mark.parametrize("name", list(MODELS))
def test_cached_greedy_generate_equals_recomputing(name):
    """generate() prefills expanded (kv_b_proj runs over the prompt, once per layer) and decodes absorbed."""
    model = build(name, torch.float64)
    ids, mask = batch()
    calls = []
    for layer in model.model.layers:
        layer.self_attn.kv_b_proj.register_forward_hook(
            lambda module, args, out: calls.append(args[0].shape[-2])
        )
    model.set_attn_implementation("latent_sdpa")
    cache = LatentCache(config=model.config)
    with torch.no_grad():
        cached = model.generate(
            ids, attention_mask=mask, max_new_tokens=6, do_sample=False, **cache_kwargs(cache)
        )
    assert calls == [12] * len(model.model.layers)  # the prompt only; the 5 decode steps read the latent
    assert_latent_only(model, cache, batch_size=2, length=12 + 5)
    # recomputing: every step is an uncached forward of the whole sequence, eager on the expanded model
    sequence, full_mask = ids, mask
    for _ in range(6):
        logits = forward(model, EAGER, input_ids=sequence, attention_mask=full_mask, use_cache=False)
        sequence = torch.cat([sequence, logits[:, -1:].argmax(-1)], dim=1)
        full_mask = torch.cat([full_mask, torch.ones_like(full_mask[:, :1])], dim=1)
    assert torch.equal(cached, sequence)


def test_static_cache_prefill_in_each_form_equals_recomputing():
    """An empty static cache makes sdpa_mask drop the causal mask (keys beyond the prompt are empty slots)."""
    model = build("stock deepseek_v3", torch.float64)
    ids, _ = batch()
    model.set_attn_implementation(EAGER)
    expected = model.generate(ids, max_new_tokens=4, do_sample=False)  # DynamicCache, expanded eager
    model.set_attn_implementation("latent_sdpa")
    for form in FORMS:
        with torch.no_grad(), force_latent_form(form):
            out = model.generate(ids, max_new_tokens=4, do_sample=False, cache_implementation="static")
        assert torch.equal(out, expected), form
