"""LatentCache: measured bytes, sampling and beam search == DynamicCache, a user-passed cache, batch ops, autograd.

Cached == recomputed generation, left padding and crop + refeed for every model: tests/test_cache_conformance.py."""

import pytest
import torch
from transformers import DynamicCache

from hf_attn_swap import LatentCache, convert_to_mla
from hf_attn_swap.evaluate.metrics import measure_kv_cache_bytes_per_token
from hf_attn_swap.modeling.compat import cache_kwargs, output_cache
from hf_attn_swap.modeling.latent_cache import LatentLayer
from hf_attn_swap.testing import tiny_model


def mla_model(rank=24, rope_dim=8, attn="eager", **kwargs):
    model = tiny_model("qwen2", num_attention_heads=4, num_key_value_heads=2)
    convert_to_mla(model, rank, rope_dim, **kwargs)
    model.set_attn_implementation(attn)
    model.generation_config.eos_token_id = None  # random weights: never stop early
    model.generation_config.pad_token_id = 0
    return model


def prompt(batch=2, length=9, seed=0):
    ids = torch.randint(3, 128, (batch, length), generator=torch.Generator().manual_seed(seed))
    return ids, torch.ones_like(ids)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_measured_bytes_per_token_is_latent_plus_rope(dtype):
    model = mla_model().to(dtype)
    measured = measure_kv_cache_bytes_per_token(model, tokens=16)
    assert measured == (24 + 8) * 2 * dtype.itemsize  # (r + d_rope) x layers x bytes
    out = model(input_ids=prompt()[0], use_cache=True)
    assert isinstance(output_cache(out), LatentCache)
    assert (
        output_cache(out).nbytes()
        == output_cache(out).allocated_nbytes()
        == 2 * 9 * (24 + 8) * 2 * dtype.itemsize
    )


def test_per_layer_ranks_and_rope_heads_are_measured():
    model = tiny_model("llama", num_attention_heads=4, num_key_value_heads=2)
    report = convert_to_mla(model, 12, 4, num_rope_key_heads=2, rank_allocation="energy")
    ranks = report.details["ranks"]
    assert measure_kv_cache_bytes_per_token(model) == sum(r + 2 * 4 for r in ranks) * 4
    assert report.kv_bytes_per_token_after == sum(r + 2 * 4 for r in ranks) * 4


def test_layer_views_growth_crop_and_batch_ops():
    layer = LatentLayer()
    latent = torch.randn(3, 1, 5, 6)
    rope = torch.randn(3, 2, 5, 4)
    keys, values = layer.update(latent, rope)
    assert torch.equal(keys, latent) and torch.equal(values, rope)
    assert layer.nbytes() == layer.allocated_nbytes() == 3 * 5 * (6 + 2 * 4) * 4
    more_latent, more_rope = torch.randn(3, 1, 1, 6), torch.randn(3, 2, 1, 4)
    keys, values = layer.update(more_latent, more_rope)  # grows the buffer, keeps the content
    assert torch.equal(keys, torch.cat([latent, more_latent], 2)) and torch.equal(
        values, torch.cat([rope, more_rope], 2)
    )
    assert layer.get_seq_length() == 6 and layer.allocated_nbytes() > layer.nbytes()
    layer.crop(-2)
    assert torch.equal(layer.keys, latent[:, :, :4]) and torch.equal(layer.values, rope[:, :, :4])
    with pytest.raises(ValueError, match="negative"):
        layer.crop(3)
    layer.reorder_cache(torch.tensor([2, 0, 0]))
    assert torch.equal(layer.keys, latent[[2, 0, 0], :, :4])
    layer.batch_select_indices(torch.tensor([0]))
    assert torch.equal(layer.values, rope[[2], :, :4])
    layer.batch_repeat_interleave(2)
    assert layer.keys.shape == (2, 1, 4, 6) and torch.equal(layer.keys[1], latent[2, :, :4])
    with pytest.raises(ValueError, match="MLA latents"):
        layer.update(torch.randn(2, 4, 1, 6), torch.randn(2, 2, 1, 4))


def test_sampling_and_beam_search_match_dynamic_cache():
    model = mla_model(attn="latent_sdpa")
    ids, mask = prompt()
    runs = {}
    for name, make_cache in (("latent", lambda: LatentCache(config=model.config)), ("dynamic", DynamicCache)):
        torch.manual_seed(3)
        sampled = model.generate(
            ids, attention_mask=mask, max_new_tokens=6, do_sample=True, top_k=20, **cache_kwargs(make_cache())
        )
        beams = model.generate(
            ids, attention_mask=mask, max_new_tokens=6, num_beams=3, num_return_sequences=2, do_sample=False,
            **cache_kwargs(make_cache()),
        )  # fmt: skip
        runs[name] = (sampled, beams)
    assert torch.equal(runs["latent"][0], runs["dynamic"][0])
    assert torch.equal(runs["latent"][1], runs["dynamic"][1])
    assert runs["latent"][1].shape == (4, 9 + 6)
    # beam search really reorders: the default (LatentCache) run equals the eager, expanded DynamicCache run
    eager = mla_model(attn="eager")
    expected = eager.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False)
    assert torch.equal(
        model.generate(ids, attention_mask=mask, max_new_tokens=6, num_beams=3, do_sample=False), expected
    )


def test_generate_keeps_a_user_passed_cache():
    """Only generate()'s own default cache becomes a LatentCache: a DynamicCache passed in is used and filled."""
    model = mla_model(attn="latent_sdpa")
    ids, mask = prompt()
    default = model.generate(ids, attention_mask=mask, max_new_tokens=3, return_dict_in_generate=True)
    assert type(output_cache(default)) is LatentCache
    for cache in (DynamicCache(), LatentCache(config=model.config)):
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=3, **cache_kwargs(cache), return_dict_in_generate=True
        )
        assert output_cache(out) is cache and cache.get_seq_length() == 9 + 2  # the last token is not fed
        assert torch.equal(out.sequences, default.sequences)


def test_backward_through_cached_decode_steps_matches_dynamic_cache():
    """In-place appends must not overwrite what autograd saved from earlier steps (latent_sdpa saves cache views)."""
    model = mla_model(attn="latent_sdpa")
    ids, _ = prompt(batch=2, length=8)
    grads = {}
    for name, cache in (("latent", LatentCache(config=model.config)), ("dynamic", DynamicCache())):
        model.zero_grad()
        outputs = [model(input_ids=ids[:, :5], **cache_kwargs(cache), use_cache=True)]
        for t in range(5, 8):
            outputs.append(model(input_ids=ids[:, t : t + 1], **cache_kwargs(cache), use_cache=True))
        sum(out.logits.square().mean() for out in outputs).backward()
        grads[name] = [p.grad.clone() for p in model.parameters()]
    for latent, dynamic in zip(grads["latent"], grads["dynamic"], strict=True):
        assert torch.allclose(latent, dynamic, rtol=1e-4, atol=1e-6)


def test_latent_and_rope_key_form_one_joint_key_row_per_token():
    """latent_sdpa decodes against [c ; k_rope] as one key of dim r + d_rope without copying the cache."""
    from hf_attn_swap.modeling.latent_attention import _joint_view

    layer = LatentLayer()
    latent, rope = torch.randn(2, 1, 7, 6), torch.randn(2, 1, 7, 4)
    keys, values = layer.update(latent, rope)
    joint = _joint_view(keys, values)
    assert joint is not None and joint.data_ptr() == layer.buffer.data_ptr()
    assert torch.equal(joint, torch.cat([latent, rope], dim=-1))
    assert _joint_view(latent, rope) is None  # separate tensors (DynamicCache): two products instead
