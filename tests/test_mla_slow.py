"""Real-model MLA checks on the packaged SmolLM2-135M (run with ``python -m pytest -m slow``)."""

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_attn_swap import LatentCache, convert_to_mla
from hf_attn_swap.evaluate.metrics import measure_kv_cache_bytes_per_token
from hf_attn_swap.io.checkpoints import load_causal_lm, load_tokenizer
from hf_attn_swap.io.examples import example_model_path
from hf_attn_swap.io.text import default_eval_files, load_token_ids
from hf_attn_swap.modeling.compat import cache_kwargs
from hf_attn_swap.pipeline.convert import convert_checkpoint

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    src = example_model_path("smollm2")
    ids = load_token_ids(load_tokenizer(src), default_eval_files(), 192)
    return src, load_causal_lm(src, "float32", "sdpa"), ids


def relative(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_full_rank_with_every_rope_dim_reproduces_smollm2(smollm2):
    _, model, ids = smollm2
    with torch.no_grad():
        reference = model(input_ids=ids[None]).logits
    converted = copy.deepcopy(model)
    report = convert_to_mla(converted, 384, 64, num_rope_key_heads=3)  # 3 rope keys x 64 dims + rank 384
    with torch.no_grad():
        assert relative(converted(input_ids=ids[None]).logits, reference) <= 1e-5
    assert report.kv_bytes_per_token_after == (384 + 3 * 64) * 30 * 4


def test_deepseek_v3_export_of_smollm2(smollm2, tmp_path):
    """-68.75% KV: the stock checkpoint equals the in-memory conversion, and latent_sdpa equals stock sdpa."""
    src, model, ids = smollm2
    out = tmp_path / "mla"
    options = {
        "kv_lora_rank": 104,
        "qk_rope_head_dim": 16,
        "rope_selection": "uniform",
        "factorization": "svd",
    }
    report = convert_checkpoint(src, out, to="mla", mla=options)
    assert report.kv_bytes_per_token_after == 120 * 30 * 4 and report.kv_reduction == pytest.approx(0.6875)
    in_memory = copy.deepcopy(model)
    convert_to_mla(in_memory, 104, 16, rope_selection="uniform")  # deepseek_v3 learns all 104 latent channels
    stock = AutoModelForCausalLM.from_pretrained(out, attn_implementation="sdpa").eval()
    latent = AutoModelForCausalLM.from_pretrained(out, attn_implementation="latent_sdpa").eval()
    with torch.no_grad():
        expected = in_memory(input_ids=ids[None]).logits
        assert relative(stock(input_ids=ids[None]).logits, expected) <= 1e-4
        for _ in range(2):
            assert relative(latent(input_ids=ids[None]).logits, expected) <= 1e-4
    assert measure_kv_cache_bytes_per_token(stock, ids[:16]) == 120 * 30 * 4
    cache = LatentCache(config=latent.config)
    stock.generation_config.eos_token_id = latent.generation_config.eos_token_id = None
    greedy = stock.generate(ids[None, :64], max_new_tokens=12, do_sample=False)
    assert torch.equal(
        latent.generate(ids[None, :64], max_new_tokens=12, do_sample=False, **cache_kwargs(cache)), greedy
    )
    assert cache.nbytes() == (64 + 11) * 120 * 30 * 4


PROMPTS = (
    "The Python tutorial explains how to",
    "def fibonacci(n):\n    ",
    "Lists, tuples and dictionaries are",
)


@pytest.mark.parametrize("pads", [(None, None), (512, 64)])
def test_deepseek_v3_export_of_smollm2_generates_the_plugin_models_tokens(smollm2, tmp_path, pads):
    """-68.75% KV (r 72, d_rope 48, high): the stock export (eps 1e-5 -> 1e-6 by the residual rescaling,
    interleaved rope, linear-regime latent norm; also padded to vLLM's 512 + 64 kernels) greedily decodes the
    plugin model's 32 tokens for 3 prompts in stock transformers."""
    src, model, _ = smollm2
    options = {"kv_lora_rank": 72, "qk_rope_head_dim": 48, "rope_selection": "high", "factorization": "svd"}
    options.update(pad_kv_lora_rank=pads[0], pad_rope_dim=pads[1])
    convert_checkpoint(src, tmp_path / "mla", to="mla", mla=options)
    plugin = copy.deepcopy(model)
    convert_to_mla(plugin, 72, 48, rope_selection="high", factorization="svd")
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "mla", dtype=torch.float32).eval()
    assert type(stock).__name__ == "DeepseekV3ForCausalLM" and stock.config.rope_interleave
    tokenizer = load_tokenizer(src)
    for prompt in PROMPTS:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        runs = [
            m.generate(ids, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
            for m in (plugin, stock)
        ]
        assert torch.equal(runs[0], runs[1]), (
            prompt,
            tokenizer.decode(runs[0][0]),
            tokenizer.decode(runs[1][0]),
        )
