"""One cache-conformance suite over every kind of model hf_attn_swap produces.

Every model below is a tiny random model (2 layers, 4 query heads of dim 16) converted by the project: native-GQA
families converted to 2 KV heads, the grouped plugin families converted to 2 KV heads, the plugin MLA model and
its stock ``deepseek_v3`` export (rank 24, rope dim 8), each under the attention implementations users run it with.
For each: cached generation (greedy, sampled, beam search) == the same generation recomputing the whole sequence
at every step, a left-padded batch of 2 == each row alone, crop + refeed == the uncropped forward, and the bytes
the real cache holds == the formula. Run against the installed transformers (CI: the newest and the floor).
"""

from __future__ import annotations

import copy
import functools
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from hf_attn_swap import LatentCache, convert_to_gqa, convert_to_mla
from hf_attn_swap.evaluate.metrics import measure_kv_cache_bytes_per_token
from hf_attn_swap.export.deepseek_v3 import to_deepseek_v3
from hf_attn_swap.modeling import compat
from hf_attn_swap.modeling.compat import CacheNotUpdatedError, cache_kwargs, output_cache
from hf_attn_swap.testing import tiny_model

LAYERS, HEAD_DIM, KV_HEADS, RANK, ROPE_DIM = 2, 16, 2, 24, 8
GQA_BYTES = LAYERS * 2 * KV_HEADS * HEAD_DIM * 4  # K and V of the kept heads, fp32
MLA_BYTES = LAYERS * (RANK + ROPE_DIM) * 4  # latent + one shared rope key, fp32

NATIVE = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"]
GROUPED = {  # name -> (model_type, config overrides); all causal LMs
    "gpt2": ("gpt2", {}),
    "gpt_neox": ("gpt_neox", {}),
    "opt": ("opt", {}),
    "falcon": ("falcon", {}),
    "bert-decoder": ("bert", {"is_decoder": True}),
}
MLA = ["mla-plugin-sdpa", "mla-plugin-latent_sdpa", "deepseek_v3-sdpa", "deepseek_v3-latent_sdpa"]
MODELS = [*(f"{name}-{attn}" for name in NATIVE for attn in ("eager", "sdpa")), *GROUPED, *MLA]
MODELS.remove("gemma2-sdpa")  # stock Gemma2 has no sdpa path (soft-capping)


@functools.cache
def _build(name: str):
    """(model, cache factory or None for the model's own default, expected cache bytes per token)."""
    family, _, attn = name.rpartition("-")
    if family in NATIVE:
        model = tiny_model(family, attn_implementation=attn)
        convert_to_gqa(model, KV_HEADS)
        return model, None, GQA_BYTES
    if name in GROUPED:
        model_type, overrides = GROUPED[name]
        model = tiny_model(
            model_type, attn_implementation="sdpa", auto_class=AutoModelForCausalLM, **overrides
        )
        convert_to_gqa(model, KV_HEADS)
        return model, None, GQA_BYTES
    model = tiny_model("qwen2", num_attention_heads=4, num_key_value_heads=2)
    convert_to_mla(model, RANK, ROPE_DIM)
    expected = MLA_BYTES
    if family == "deepseek_v3":
        model, _ = to_deepseek_v3(model)
        expected = LAYERS * (model.config.kv_lora_rank + model.config.qk_rope_head_dim) * 4
    model.set_attn_implementation(attn)
    make_cache = (lambda: LatentCache(config=model.config)) if attn == "latent_sdpa" else None
    return model, make_cache, expected


def build(name):
    model, make_cache, expected = _build(name)
    model.eval()
    model.generation_config.eos_token_id = None  # random weights: never stop early
    model.generation_config.pad_token_id = 0
    return model, make_cache, expected


def ids(batch=1, length=5, seed=1):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


def generate(model, make_cache, prompt, use_cache=True, **kwargs):
    if use_cache and make_cache is not None:
        kwargs.update(cache_kwargs(make_cache()))
    return model.generate(
        prompt,
        attention_mask=torch.ones_like(prompt),
        use_cache=use_cache,
        return_dict_in_generate=True,
        **kwargs,
    )


@pytest.mark.parametrize("name", MODELS)
def test_cached_greedy_generation_equals_full_recompute(name):
    model, make_cache, _ = build(name)
    cached, recomputed = (
        generate(model, make_cache, ids(), use_cache, max_new_tokens=8, do_sample=False, output_logits=True)
        for use_cache in (True, False)
    )
    assert torch.equal(cached.sequences, recomputed.sequences)
    torch.testing.assert_close(
        torch.stack(cached.logits), torch.stack(recomputed.logits), rtol=1e-4, atol=1e-5
    )
    cache = output_cache(cached)
    assert cache.get_seq_length() == 5 + 8 - 1  # the last generated token is never fed back
    if make_cache is not None:
        assert isinstance(cache, LatentCache)


@pytest.mark.parametrize("name", MODELS)
def test_cached_sampling_equals_full_recompute(name):
    model, make_cache, _ = build(name)
    runs = []
    for use_cache in (True, False):
        torch.manual_seed(7)
        runs.append(
            generate(
                model, make_cache, ids(batch=2), use_cache, max_new_tokens=8, do_sample=True, top_k=20
            ).sequences
        )
    assert torch.equal(*runs)


@pytest.mark.parametrize("name", MODELS)
def test_cached_beam_search_equals_full_recompute(name):
    model, make_cache, _ = build(name)
    cached, recomputed = (
        generate(
            model,
            make_cache,
            ids(),
            use_cache,
            max_new_tokens=6,
            num_beams=3,
            num_return_sequences=2,
            do_sample=False,
        ).sequences
        for use_cache in (True, False)
    )
    assert cached.shape == (2, 5 + 6) and torch.equal(cached, recomputed)


STATIC = [name for name in MODELS if name.rpartition("-")[0] in NATIVE or name in GROUPED]


@pytest.mark.parametrize("name", STATIC)
def test_static_cache_generation_equals_full_recompute(name):
    """``cache_implementation="static"`` (a StaticCache grows a length tensor in place: no false alarm)."""
    model, _, _ = build(name)
    cached, recomputed = (
        generate(model, None, ids(), use_cache, max_new_tokens=6, do_sample=False, **static).sequences
        for use_cache, static in ((True, {"cache_implementation": "static"}), (False, {}))
    )
    assert torch.equal(cached, recomputed)


def test_training_with_gradient_checkpointing_raises_no_false_alarm():
    """transformers drops the cache on purpose under gradient checkpointing: the cache check must stay quiet."""
    for name in ("mla-plugin-sdpa", "gpt2", "llama-sdpa"):
        model = copy.deepcopy(_build(name)[0])
        model.train()
        enable = (
            getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        )
        enable()  # the name since transformers 5.24 (the old one warns there)
        x = ids(batch=2, length=6)
        model(input_ids=x, labels=x).loss.backward()  # no use_cache=False, as user training loops call it


@pytest.mark.parametrize("name", MODELS)
def test_left_padded_batch_equals_unpadded_rows(name):
    model, make_cache, _ = build(name)
    long, short = ids(1, 7, seed=2), ids(1, 4, seed=3)
    batch = torch.cat([long, torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1)])
    mask = torch.ones_like(batch)
    mask[1, :3] = 0
    kwargs = dict(max_new_tokens=6, do_sample=False)
    if make_cache is not None:
        kwargs.update(cache_kwargs(make_cache()))
    together = model.generate(batch, attention_mask=mask, **kwargs)
    for row, prompt in ((0, long), (1, short)):
        alone = generate(model, make_cache, prompt, max_new_tokens=6, do_sample=False).sequences
        assert torch.equal(together[row, -6:], alone[0, -6:]), f"row {row}"


@pytest.mark.parametrize("name", MODELS)
def test_crop_then_refeed_equals_uncropped_forward(name):
    model, make_cache, _ = build(name)
    x = ids(batch=2, length=7, seed=4)  # shorter than every sliding window (Gemma2: 8)
    cache = make_cache() if make_cache is not None else DynamicCache(config=model.config)
    with torch.no_grad():
        full = model(input_ids=x, use_cache=True, **cache_kwargs(cache)).logits
        assert cache.get_seq_length() == 7
        cache.crop(-3)
        assert cache.get_seq_length() == 4
        again = model(input_ids=x[:, 4:], use_cache=True, **cache_kwargs(cache)).logits
    assert cache.get_seq_length() == 7
    torch.testing.assert_close(again, full[:, 4:], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", MODELS)
def test_measured_cache_bytes_equal_the_formula(name):
    model, _, expected = build(name)
    assert measure_kv_cache_bytes_per_token(model, tokens=7) == expected  # < every sliding window


@pytest.mark.parametrize("name", ["llama-sdpa", "gpt2", "opt", "bert-decoder", "mla-plugin-latent_sdpa"])
def test_project_calls_into_transformers_raise_no_deprecation_warning(name):
    """generate, forward with a cache and without one (evaluation), the cache measurement: nothing the project
    passes or reads is deprecated (warning_once's memory is cleared: an earlier test must not hide a warning)."""
    from transformers.utils import logging

    logging.warning_once.cache_clear()
    model, make_cache, _ = build(name)
    messages = []
    handler = _ListHandler(messages)
    logger = logging.get_logger("transformers")
    logger.addHandler(handler)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            warnings.simplefilter("error", DeprecationWarning)
            generate(model, make_cache, ids(), max_new_tokens=3, do_sample=False)
            measure_kv_cache_bytes_per_token(model, tokens=4)
            with torch.no_grad():
                model(ids(), use_cache=False)
    finally:
        logger.removeHandler(handler)
    assert not [m for m in messages if "deprecated" in m], messages


class _ListHandler:
    level = 0

    def __init__(self, messages):
        self.messages = messages

    def handle(self, record):
        self.messages.append(record.getMessage())

    def __getattr__(self, name):  # the rest of logging.Handler's interface: no-ops
        return lambda *args, **kwargs: None


@pytest.mark.parametrize("name", ["gpt2", "opt", "bert-decoder", "falcon", "gpt_neox", "mla-plugin-sdpa"])
def test_a_cache_the_attention_cannot_find_is_an_error_not_silent_recompute(name):
    """Simulate the next rename (5.24's broke decoding silently): transformers hands the cache to the attention
    layers under a name they do not read. Decoding must stop with an error naming the transformers version."""
    model, make_cache, _ = _build(name)
    model = copy.deepcopy(model)
    attentions = [
        m
        for m in model.modules()
        if type(m).__module__.startswith("hf_attn_swap") and hasattr(m, "layer_idx")
    ]
    assert len(attentions) == LAYERS
    for module in attentions:
        module.forward = _without_cache(module.forward)
    model.generation_config.eos_token_id = None
    with pytest.raises(CacheNotUpdatedError, match=r"transformers \d+\.\d+"):
        generate(model, make_cache, ids(), max_new_tokens=3, do_sample=False)


def _without_cache(forward):
    def forward_that_never_sees_the_cache(*args, **kwargs):
        for name in ("cache", "past_key_values", "layer_past"):
            kwargs.pop(name, None)
        return forward(*args, **kwargs)

    return forward_that_never_sees_the_cache


def test_use_cache_without_a_cache_object_raises():
    with pytest.raises(CacheNotUpdatedError, match="use_cache=True but received no cache"):
        compat.update_layer_cache({"use_cache": True}, torch.zeros(1), torch.zeros(1), 0)
    key, value = torch.zeros(1), torch.ones(1)
    assert compat.update_layer_cache({"use_cache": False}, key, value, 0) == (key, value)


def test_the_cache_is_taken_under_either_name():
    cache = DynamicCache()
    for name in ("cache", "past_key_values", "layer_past"):
        kwargs = {name: cache, "other": 1}
        assert compat.pop_cache(kwargs) is cache and kwargs == {"other": 1}
    assert compat.pop_cache({}) is None
    assert compat.pop_cache({"cache": cache}, cache) is cache  # the same cache twice is fine
    with pytest.raises(ValueError, match="two different caches"):
        compat.pop_cache({"cache": cache, "past_key_values": DynamicCache()})
