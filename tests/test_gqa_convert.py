"""convert_to_gqa on every native-GQA family: exactness, validation, no-op, generation, padding."""

from __future__ import annotations

import pytest
import torch
from conftest import NATIVE_FAMILIES, make_groups_identical

from hf_attn_swap import UnsupportedArchitectureError, convert_to_gqa
from hf_attn_swap.adapters import get_adapter
from hf_attn_swap.testing import tiny_model

# (query heads, KV heads before, KV heads after): MHA->GQA, MHA->MQA, GQA->MQA, 3 groups -> 1 like SmolLM2
LAYOUTS = [(4, 4, 2), (4, 4, 1), (4, 2, 1), (6, 3, 1)]


def _ids(batch=2, length=12, seed=0):
    return torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("family", NATIVE_FAMILIES)
@pytest.mark.parametrize("heads,kv_before,kv_after", LAYOUTS)
def test_identical_heads_in_group_convert_exactly(family, heads, kv_before, kv_after):
    model = tiny_model(family, num_attention_heads=heads, num_key_value_heads=kv_before)
    make_groups_identical(model, kv_after)
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
        report = convert_to_gqa(model, kv_after)
        after = model(ids).logits
    torch.testing.assert_close(after, before, atol=1e-5, rtol=0)
    assert model.config.num_key_value_heads == kv_after
    adapter = get_adapter(model)
    for attn in adapter.attention_modules(model):
        assert adapter.read(attn).num_key_value_heads == kv_after
        assert attn.num_key_value_groups == heads // kv_after
    assert report.kv_bytes_per_token_after * kv_before == report.kv_bytes_per_token_before * kv_after


@pytest.mark.parametrize("family", ["llama", "qwen2", "phi3"])
def test_distinct_heads_change_the_function(family):
    """The exactness test above is not vacuous: pooling different heads must change the logits."""
    model = tiny_model(family, num_attention_heads=4, num_key_value_heads=4)
    ids = _ids()
    with torch.no_grad():
        before = model(ids).logits
        convert_to_gqa(model, 1)
        after = model(ids).logits
    assert (after - before).abs().max() > 1e-2


def test_mean_pooling_weights_are_group_means():
    model = tiny_model("qwen2", num_attention_heads=4, num_key_value_heads=4)
    adapter = get_adapter(model)
    old = [adapter.read(a).to(torch.float32) for a in adapter.attention_modules(model)]
    convert_to_gqa(model, 2)
    for w_old, attn in zip(old, adapter.attention_modules(model), strict=True):
        w_new = adapter.read(attn)
        torch.testing.assert_close(w_new.k[0], (w_old.k[0] + w_old.k[1]) / 2)
        torch.testing.assert_close(w_new.v[1], (w_old.v[2] + w_old.v[3]) / 2)
        torch.testing.assert_close(w_new.k_bias[1], (w_old.k_bias[2] + w_old.k_bias[3]) / 2)
        torch.testing.assert_close(w_new.q, w_old.q)  # queries and outputs are not touched
        torch.testing.assert_close(w_new.o, w_old.o)


def test_same_head_count_is_a_no_op():
    model = tiny_model("llama", num_attention_heads=4, num_key_value_heads=2)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [a.k_proj for a in get_adapter(model).attention_modules(model)]
    report = convert_to_gqa(model, 2)
    assert not report.changed
    assert report.kv_bytes_per_token_before == report.kv_bytes_per_token_after
    assert [a.k_proj for a in get_adapter(model).attention_modules(model)] == modules
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])


@pytest.mark.parametrize(
    "bad,message",
    [
        (0, "at least 1"),
        (-2, "at least 1"),
        (3, "does not divide"),
        (8, "larger than the current"),
        (2.0, "int"),
    ],
)
def test_invalid_head_counts_raise_before_touching_the_model(bad, message):
    model = tiny_model("llama", num_attention_heads=4, num_key_value_heads=4)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=message) as err:
        convert_to_gqa(model, bad)
    if not isinstance(bad, float):
        assert "Valid choices" in str(err.value) and "[1, 2, 4]" in str(err.value)
    assert model.config.num_key_value_heads == 4
    for key, value in model.state_dict().items():
        assert torch.equal(value, state[key])


def test_unknown_method_and_unsupported_family():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="unknown GQA method"):
        convert_to_gqa(model, 2, method="median")
    from transformers import AutoModelForCausalLM, BloomConfig

    bloom = AutoModelForCausalLM.from_config(BloomConfig(vocab_size=64, hidden_size=32, n_layer=1, n_head=4))
    with pytest.raises(UnsupportedArchitectureError, match="Supported families: .*llama"):
        convert_to_gqa(bloom, 1)


def test_bfloat16_model_converts_in_its_dtype():
    model = tiny_model("llama", num_attention_heads=4, num_key_value_heads=4).to(torch.bfloat16)
    report = convert_to_gqa(model, 1)
    assert report.dtype == "bfloat16"
    assert (
        report.kv_bytes_per_token_after == 2 * 1 * 16 * 2 * 2
    )  # K+V x 1 head x 16 dims x 2 layers x 2 bytes
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


@pytest.mark.parametrize("family", NATIVE_FAMILIES)
def test_cached_generation_equals_full_forward(family):
    """generate() with the KV cache == greedy decoding by re-running the whole prefix without a cache."""
    model = tiny_model(family, num_attention_heads=4, num_key_value_heads=4)
    convert_to_gqa(model, 2)
    prompt = _ids(batch=1, length=6, seed=1)
    out = model.generate(
        prompt,
        max_new_tokens=10,
        do_sample=False,
        use_cache=True,
        output_logits=True,
        return_dict_in_generate=True,
        pad_token_id=0,
        eos_token_id=None,
    )
    seq = prompt
    with torch.no_grad():
        for step in range(10):
            logits = model(seq, use_cache=False).logits[:, -1]
            torch.testing.assert_close(out.logits[step], logits, atol=1e-5, rtol=1e-5)
            seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(out.sequences, seq)


@pytest.mark.parametrize("family", NATIVE_FAMILIES)
@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_left_padded_batch_equals_unpadded_rows(family, attn_implementation):
    if family == "gemma2" and attn_implementation == "sdpa":
        pytest.skip("stock Gemma2 has no sdpa path (attention logit soft-capping)")
    model = tiny_model(
        family, num_attention_heads=4, num_key_value_heads=4, attn_implementation=attn_implementation
    )
    convert_to_gqa(model, 1)
    long, short = _ids(1, 11, seed=2)[0], _ids(1, 7, seed=3)[0]
    pad = long.numel() - short.numel()
    batch = torch.stack([long, torch.cat([torch.zeros(pad, dtype=torch.long), short])])
    mask = torch.ones_like(batch)
    mask[1, :pad] = 0
    with torch.no_grad():
        padded = model(batch, attention_mask=mask).logits
        alone_long = model(long[None]).logits[0]
        alone_short = model(short[None]).logits[0]
    torch.testing.assert_close(padded[0], alone_long, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(padded[1, pad:], alone_short, atol=1e-5, rtol=1e-5)
