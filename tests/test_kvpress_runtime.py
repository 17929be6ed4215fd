"""The real kvpress driver (``drivers/kvpress_driver.py`` in the venv of ``scripts/install_runtimes.sh kvpress``) on
a tiny random Llama with SmolLM2's tokenizer, fed the long-context suite's needle prompts split into context and
question: a question-agnostic press at compression 0.5 leaves floor or ceil of half the context in every layer's
cache (SnapKV, question-aware: half of context + question but the last token), and compression 0.0 (and no press)
decodes exactly the tokens of plain transformers greedy decoding in this process (transformers >= 5.15 here, kvpress's
pin < 5.3 there). Run with ``python -m pytest -m runtimes``."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from _recipes_fixtures import sample_text

from hf_attn_swap.evaluate.longcontext import LongContextConfig, prepare_long_context
from hf_attn_swap.io.checkpoints import load_tokenizer
from hf_attn_swap.io.examples import example_model_path
from hf_attn_swap.pipeline.compare_kvpress import (
    KVPRESS_DRIVER,
    KVPressOptions,
    kvpress_request,
    press_result,
    run_kvpress_driver,
)
from hf_attn_swap.pipeline.verify import runtime_python
from hf_attn_swap.testing import tiny_model

pytestmark = pytest.mark.runtimes

HALF = ["expected_attention", "knorm", "streaming_llm", "snapkv"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("kvpress") / "tiny-llama"
    model = tiny_model(
        "llama", num_attention_heads=4, num_key_value_heads=2, head_dim=64, hidden_size=256, vocab_size=49152,
        max_position_embeddings=4096, attn_implementation="sdpa",
    )  # fmt: skip
    model.config.bos_token_id, model.config.eos_token_id, model.config.pad_token_id = 1, 2, 2
    model.generation_config.eos_token_id = 2
    model.save_pretrained(folder)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(example_model_path("smollm2") / name, folder / name)
    return folder, model


def test_presses_keep_half_of_the_context_and_no_compression_is_plain_greedy(tiny, tmp_path):
    folder, model = tiny
    text = tmp_path / "tutorial.txt"
    text.write_text(sample_text("tutorial", 20_000))
    config = LongContextConfig(task=["needle"], lengths=[401, 600], depths=[0.5], trials=1, max_new_tokens=12)
    inputs = prepare_long_context(load_tokenizer(folder), model.config, config, [text])
    samples = inputs.samples["needle"]
    request = kvpress_request(folder, samples, KVPressOptions(presses=[], threads=2))
    request["presses"] += [{"name": "knorm", "compression_ratio": 0.0}]
    request["presses"] += [{"name": name, "compression_ratio": 0.5} for name in HALF]
    response = run_kvpress_driver(request, runtime_python("kvpress"), KVPRESS_DRIVER)
    runs = {(r["press"], r["compression_ratio"]): r for r in response["runs"]}
    assert all(r["error"] is None for r in runs.values()), [r.get("traceback") for r in runs.values()]
    assert response["kvpress"] == "0.5.5" and response["transformers"].startswith("5.")

    for sample, none, uncompressed in zip(
        samples, runs["none", 0.0]["outputs"], runs["knorm", 0.0]["outputs"], strict=True
    ):
        ids = torch.tensor([sample.input_ids])
        with torch.inference_mode():
            out = model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=sample.max_new_tokens,
                do_sample=False, pad_token_id=2,
            )  # fmt: skip
        plain = out[0, ids.shape[1] :].tolist()
        assert none["tokens"] == plain == uncompressed["tokens"]
        assert none["kept"] == uncompressed["kept"] == [len(sample.context_ids)] * 2

    for name in HALF:
        run = runs[name, 0.5]
        assert run["question_aware"] == (name == "snapkv")
        for sample, out in zip(samples, run["outputs"], strict=True):
            prefill = len(sample.context_ids) + (len(sample.question_ids) - 1 if name == "snapkv" else 0)
            assert out["prefill_tokens"] == prefill and out["context_tokens"] == len(sample.context_ids)
            assert len(out["kept"]) == 2 and all(
                k in (prefill // 2, math.ceil(prefill / 2)) for k in out["kept"]
            )
            assert (
                out["cache_bytes"] == sum(out["kept"]) * 2 * 2 * 64 * 4
            )  # K and V, 2 KV heads of 64, float32
            assert 1 <= len(out["tokens"]) <= sample.max_new_tokens
        result = press_result(run, inputs, response, folder)  # the job's scoring of a real response
        assert result["long_context"]["tasks"]["needle"]["trials_per_cell"] == 1
        assert result["kept_fraction"]["max"] <= 0.5 + 1e-9
