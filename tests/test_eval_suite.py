"""The grown ``eval`` command: several models, lm-eval tasks built offline from local text, decode speed,
JSON + markdown + PNG outputs, and issue 2's single-model JSON contract unchanged."""

from __future__ import annotations

import json
import math

import pytest
import torch
from _recipes_fixtures import make_tiny_setup, sample_text

from hf_attn_swap.cli import main as cli_main
from hf_attn_swap.evaluate.speed import measure_decode_speed
from hf_attn_swap.evaluate.tasks import run_lm_eval, task_documents, task_sources
from hf_attn_swap.io.checkpoints import load_causal_lm, load_tokenizer
from hf_attn_swap.testing import tiny_model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    setup = make_tiny_setup(tmp_path_factory.mktemp("evalsuite"))
    return setup["src"], setup["mqa"], setup["heldout"]


def test_single_model_json_keeps_the_eval_contract(pair, tmp_path):
    src, mqa, text = pair
    out = tmp_path / "e.json"
    args = [
        "eval",
        str(mqa),
        "--data",
        str(text),
        "--reference",
        str(src),
        "--max-tokens",
        "300",
        "--window",
        "100",
    ]
    assert cli_main([*args, "--json", str(out)]) == 0
    payload = json.loads(out.read_text())
    for key in ("perplexity", "tokens", "kl_to_reference", "kv_cache_bytes_per_token"):
        assert payload[key] is not None, key
    assert payload["tokens"] == 297 and payload["kv_cache_bytes_per_token"] == 2 * 1 * 16 * 2 * 4
    assert payload["models"]["tiny-mqa"]["perplexity"] == payload["perplexity"]


def test_several_models_with_tasks_speed_markdown_and_plots(pair, tmp_path, capsys):
    src, mqa, text = pair
    code = cli_main(
        ["eval", f"original={src}", f"mqa={mqa}", "--reference", str(src), "--data", str(text)]
        + ["--max-tokens", "300", "--window", "100", "--tasks", "hfas_text_mc"]
        + ["--task-limit", "4", "--decode-contexts", "8", "32", "--new-tokens", "4"]
        + ["--json", str(tmp_path / "e.json"), "--markdown", str(tmp_path / "e.md"), "--plots", str(tmp_path)]
    )
    assert code == 0, capsys.readouterr().err
    payload = json.loads((tmp_path / "e.json").read_text())
    assert "perplexity" not in payload and set(payload["models"]) == {"original", "mqa"}
    original, converted = payload["models"]["original"], payload["models"]["mqa"]
    assert original["kl_to_reference"] == 0 and converted["kl_to_reference"] > 0
    assert converted["kv_cache_bytes_per_token"] == original["kv_cache_bytes_per_token"] / 2
    for result in (original, converted):
        assert set(result["lm_eval"]) == {"hfas_text_mc"}
        assert 0 <= result["lm_eval"]["hfas_text_mc"]["acc"] <= 1
        assert result["lm_eval"]["hfas_text_mc"]["samples"] == 4
        assert [s["context"] for s in result["decode"]] == [8, 32]
        assert all(s["decode_tokens_per_second"] > 0 for s in result["decode"])
    table = (tmp_path / "e.md").read_text()
    assert "| original |" in table and "hfas_text_mc acc" in table and "tok/s @32" in table
    for png in ("quality_vs_kv.png", "decode_speed.png"):
        assert (tmp_path / png).read_bytes()[:4] == b"\x89PNG"


def test_lm_eval_lastword_matches_a_direct_loglikelihood(pair, tmp_path):
    """lm-eval's perplexity of the target word equals exp(-mean log p(word | context)) computed here."""
    src, _, text = pair
    model, tokenizer = load_causal_lm(src), load_tokenizer(src)
    result = run_lm_eval(model, tokenizer, ["hfas_text_lastword"], data=[text], limit=5)["hfas_text_lastword"]
    _, docs = task_documents(text.read_text())
    total = 0.0
    for doc in docs[:5]:
        context = tokenizer(doc["context"], add_special_tokens=False)["input_ids"]
        whole = tokenizer(doc["context"] + doc["target"], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([whole])
        with torch.no_grad():
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        positions = range(len(context) - 1, len(whole) - 1)
        total += sum(logp[p, whole[p + 1]].item() for p in positions)
    assert result["perplexity"] == pytest.approx(math.exp(-total / 5), rel=1e-4)


def test_local_task_documents_are_well_formed():
    mc, lastword = task_documents(sample_text("tutorial", 60_000), max_docs=50)
    assert len(mc) >= 4 and len(lastword) >= 4
    for doc in mc:
        assert len(doc["choices"]) == 4 == len(set(doc["choices"])) and 0 <= doc["label"] < 4
        assert doc["context"] and not doc["context"].endswith(doc["choices"][doc["label"]])
    assert all(d["target"].startswith(" ") and d["target"][1:].isalpha() for d in lastword)
    assert task_documents(sample_text("tutorial", 60_000), max_docs=50) == (mc, lastword)


def test_registry_tasks_are_found_next_to_local_ones(pair, tmp_path):
    """A registry name (``arc_easy``) asked for together with a local task or a task YAML still gets lm-eval's
    own registry indexed; local tasks alone do not (indexing it is slow)."""
    _, _, text = pair
    custom = tmp_path / "custom.yaml"
    custom.write_text("task: my_task\n")
    assert task_sources(["hfas_text_mc"], [text])[2] is False
    assert task_sources([str(custom)], [text])[:2] == (["my_task"], [tmp_path])
    assert task_sources([str(custom)], [text])[2] is False
    for tasks in (["hfas_text_mc", "arc_easy"], [str(custom), "arc_easy"], ["arc_easy"]):
        assert task_sources(tasks, [text])[2] is True, tasks

    from lm_eval.tasks import TaskManager

    names, paths, registry = task_sources(["hfas_text_mc", "arc_easy"], [text])
    manager = TaskManager(include_path=[str(p) for p in paths], include_defaults=registry)
    assert set(names) <= set(manager.all_tasks)


def test_decode_speed_refuses_contexts_beyond_the_model(pair):
    model = load_causal_lm(pair[0])
    limit = model.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"exceeds the model's {limit} positions"):
        measure_decode_speed(model, limit - 6, 16)


@pytest.mark.parametrize(
    "pad, eos, expected", [(0, 2, 0), (None, 2, 2), (None, [7, 2], 7), (None, None, 0), (5, [7], 5)]
)
def test_decode_pad_id_keeps_zero_and_takes_the_first_eos(pad, eos, expected):
    from transformers import GenerationConfig

    from hf_attn_swap.evaluate.speed import pad_token_id

    assert pad_token_id(GenerationConfig(pad_token_id=pad, eos_token_id=eos)) == expected


@pytest.mark.parametrize("kind", ["dynamic", "latent"])
def test_decode_speed_repeats_runs_from_the_cropped_cache(kind):
    """Timer repeats decoding from the same prefilled cache, cropped back each time (not one cold run): on every
    supported transformers, for DynamicCache and LatentCache."""
    from hf_attn_swap import convert_to_mla

    if kind == "dynamic":
        model = tiny_model("llama")
    else:
        model = tiny_model("qwen2", num_attention_heads=4, num_key_value_heads=2)
        convert_to_mla(model, 24, 8)
    model.generation_config.eos_token_id = None
    result = measure_decode_speed(model, 8, 4, min_run_time=0.2)
    assert result["decode_runs"] > 1
    assert result["cache_class"] == {"dynamic": "DynamicCache", "latent": "LatentCache"}[kind]
    assert result["cache_bytes_per_token"] > 0


def test_auto_attention_runs_mla_exports_on_the_latent_and_the_rest_as_loaded(pair, tmp_path):
    """``--attn-implementation auto``: the stock deepseek_v3 export runs ``latent_sdpa`` with the perplexity of stock
    ``sdpa`` (both cache the latent r + d_rope per layer); the Llama source keeps sdpa."""
    from hf_attn_swap.evaluate.suite import evaluate_checkpoints
    from hf_attn_swap.pipeline.convert import convert_checkpoint

    src, _, text = pair
    mla = tmp_path / "mla"
    convert_checkpoint(src, mla, to="mla", mla={"kv_lora_rank": 8, "qk_rope_head_dim": 8})
    config = json.loads((mla / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3"
    models = {"src": str(src), "mla": str(mla)}
    auto = evaluate_checkpoints(models, text, str(src), 300, 100, attn_implementation="auto")
    stock = evaluate_checkpoints(models, text, str(src), 300, 100, attn_implementation="sdpa")
    assert auto["src"]["attn_implementation"] == "sdpa" and auto["mla"]["attn_implementation"] == "latent_sdpa"
    assert stock["mla"]["attn_implementation"] == "sdpa"
    for name in models:
        assert math.isclose(auto[name]["perplexity"], stock[name]["perplexity"], rel_tol=1e-5), name
    latent_bytes = config["num_hidden_layers"] * (8 + 8) * 4
    assert auto["mla"]["kv_cache_bytes_per_token"] == stock["mla"]["kv_cache_bytes_per_token"] == latent_bytes
