"""latent_sdpa (absorbed decoding) == eager expanded attention: prefill and step-by-step decode, with padding."""

import pytest
import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from hf_attn_swap import LatentCache, convert_to_mla
from hf_attn_swap.modeling.compat import cache_kwargs
from hf_attn_swap.modeling.latent_attention import latent_sdpa_attention_forward
from hf_attn_swap.testing import tiny_model

VARIANTS = {
    "shared rope key": dict(family="qwen2", kv=2, rank=24, rope_dim=8, options={}),
    "rope key per KV head, energy ranks": dict(
        family="llama",
        kv=2,
        rank=20,
        rope_dim=4,
        options=dict(num_rope_key_heads=2, rank_allocation="energy"),
    ),
    "norm selection": dict(family="mistral", kv=1, rank=16, rope_dim=6, options=dict(rope_selection="norm")),
}


def build(variant):
    spec = VARIANTS[variant]
    model = tiny_model(spec["family"], num_attention_heads=4, num_key_value_heads=spec["kv"])
    convert_to_mla(model, spec["rank"], spec["rope_dim"], **spec["options"])
    model.generation_config.eos_token_id = None  # random weights: never stop early
    return model


def padded_batch():
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    return ids, mask


def run(model, attn, **inputs):
    model.set_attn_implementation(attn)
    with torch.no_grad():
        return model(**inputs)


def close(a, b, rtol=1e-5):
    return (a - b).abs().max().item() <= rtol * max(1.0, b.abs().max().item())


def test_registered_with_attention_and_mask_interfaces():
    assert ALL_ATTENTION_FUNCTIONS["latent_sdpa"] is latent_sdpa_attention_forward
    assert ALL_MASK_ATTENTION_FUNCTIONS["latent_sdpa"] is sdpa_mask


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_prefill_with_padding_equals_eager(variant):
    model = build(variant)
    ids, mask = padded_batch()
    eager = run(model, "eager", input_ids=ids, attention_mask=mask).logits
    latent = run(model, "latent_sdpa", input_ids=ids, attention_mask=mask).logits
    assert close(latent[0], eager[0]) and close(latent[1, 5:], eager[1, 5:])
    # the padding mask is applied: unmasking the pads changes the real tokens' logits
    unmasked = run(model, "latent_sdpa", input_ids=ids).logits
    assert not close(unmasked[1, 5:], eager[1, 5:])


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_step_by_step_decode_equals_eager(variant):
    model = build(variant)
    ids, mask = padded_batch()
    eager = run(model, "eager", input_ids=ids, attention_mask=mask).logits  # expanded, no cache
    model.set_attn_implementation("latent_sdpa")
    cache = LatentCache(config=model.config)
    with torch.no_grad():
        out = model(input_ids=ids[:, :4], attention_mask=mask[:, :4], **cache_kwargs(cache), use_cache=True)
        steps = [out.logits]
        for t in range(4, 12):  # one token at a time: the absorbed decode path
            out = model(
                input_ids=ids[:, t : t + 1],
                attention_mask=mask[:, : t + 1],
                **cache_kwargs(cache),
                use_cache=True,
            )
            steps.append(out.logits)
    decoded = torch.cat(steps, dim=1)
    assert close(decoded[0], eager[0]) and close(decoded[1, 5:], eager[1, 5:])


def test_decode_never_re_expands_the_cache():
    """latent_sdpa runs kv_b_proj over the prompt once (expanded prefill) and never over the cache when decoding."""
    model = build("shared rope key")
    calls = []
    for layer in model.model.layers:
        layer.self_attn.kv_b_proj.register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    ids, mask = padded_batch()
    expected = {
        "latent_sdpa": [torch.Size([2, 12, 24])] * 2,  # once per layer, over the 12 prompt tokens only
        "eager": [torch.Size([2, 12 + step, 24]) for step in range(4) for _ in range(2)],  # the whole cache each step
    }
    for attn in expected:
        calls.clear()
        model.set_attn_implementation(attn)
        model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
        assert calls == expected[attn], attn


def test_latent_sdpa_on_a_model_without_latent_attention_is_a_clear_error():
    model = tiny_model("llama", attn_implementation="latent_sdpa")
    with pytest.raises(ValueError, match="only works for multi-head latent attention"):
        model(input_ids=torch.tensor([[3, 4, 5]]))
