"""kvpress at equal KV bytes (``hf_attn_swap.pipeline.compare_kvpress``, ``scripts/compare_kvpress.py``), without
kvpress: each retrieval prompt splits into the context a press compresses and the question after it; the job sends
the driver's request schema and turns a response into eval-shaped results (scores per cell, tables, heatmaps). A
fake driver stands in for kvpress: it keeps the most recent share of the context (a press without sink tokens) and
answers only when the asked needle survived. The real driver runs in ``tests/test_kvpress_runtime.py``."""

from __future__ import annotations

import importlib.util
import json
import random
import sys

import pytest
from _recipes_fixtures import sample_text
from conftest import REPO_ROOT

from hf_attn_swap.evaluate.longcontext import (
    RETRIEVAL_TASKS,
    LongContextConfig,
    prepare_long_context,
    task_text,
)
from hf_attn_swap.evaluate.suite import long_context_plots, suite_markdown
from hf_attn_swap.pipeline import compare_kvpress as job
from hf_attn_swap.pipeline.compare_kvpress import KVPressOptions, compare_kvpress, press_table
from hf_attn_swap.testing import save_tiny_checkpoint, tiny_tokenizer

POSITIONS = type("Positions", (), {"max_position_embeddings": 4096})()

FAKE_DRIVER = r'''
"""A stand-in for kvpress_driver.py (stdlib only; the tiny tokenizer maps character i to token i)."""
import json, re, sys

PRESSES = {"none": (None, False), "knorm": ("KnormPress", False), "snapkv": ("SnapKVPress", True)}
BYTES = 2 * 2 * 64 * 4  # per token and layer: K and V, 2 KV heads of 64, float32

if __name__ == "__main__":
    request = json.load(open(sys.argv[1]))
    assert set(request) == {"model", "samples", "presses", "options"}, request.keys()
    assert set(request["options"]) == {"attn_implementation", "threads"}
    runs = []
    for press in request["presses"]:
        assert set(press) == {"name", "compression_ratio"}
        outputs = []
        for sample in request["samples"]:
            assert set(sample) == {"context_ids", "question_ids", "max_new_tokens"}
            context = "".join(map(chr, sample["context_ids"]))
            question = "".join(map(chr, sample["question_ids"]))
            keep = int(len(context) * (1 - press["compression_ratio"]))
            key = re.search(r"number for (\S+)\?", question).group(1)
            found = re.search(rf"number for {re.escape(key)} is (\d{{7}})", context[len(context) - keep :])
            answer = f" {found.group(1)}." if found else " 0000000."
            outputs.append({"tokens": [ord(c) for c in answer][: sample["max_new_tokens"]],
                            "context_tokens": len(context), "prefill_tokens": len(context), "kept": [keep, keep],
                            "cache_bytes": 2 * keep * BYTES, "seconds": 0.01})
        class_name, aware = PRESSES[press["name"]]
        runs.append({"press": press["name"], "class": class_name, "compression_ratio": press["compression_ratio"],
                     "question_aware": aware, "outputs": outputs, "error": None, "seconds": 0.1})
    response = {"runtime": "kvpress", "version": "fake", "kvpress": "fake", "transformers": "x", "torch": "y",
                "model": request["model"], "notes": [], "runs": runs}
    json.dump(response, open(sys.argv[2], "w"))
'''


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    path = tmp_path_factory.mktemp("kvpress") / "tutorial.txt"
    path.write_text(sample_text("tutorial", 20_000))
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("kvpress") / "tiny")


@pytest.fixture
def fake_driver(tmp_path, monkeypatch):
    path = tmp_path / "fake_kvpress_driver.py"
    path.write_text(FAKE_DRIVER)
    monkeypatch.setattr(job, "KVPRESS_DRIVER", path)
    return path


def test_every_prompt_splits_into_context_and_question(text):
    """context + question = the prompt; the question is exactly the question text's tokens (it holds no
    statement); every statement lies in the context."""
    tokenizer = tiny_tokenizer()
    config = LongContextConfig(task=list(RETRIEVAL_TASKS), lengths=[700], depths=[0, 0.5, 1], trials=2)
    for task, samples in prepare_long_context(tokenizer, POSITIONS, config, [text]).samples.items():
        for s in samples:
            assert s.context_ids + s.question_ids == s.input_ids
            rng = random.Random(f"{config.seed}/{task}/{s.length}/{s.depth}/{s.trial}")
            _, question, answers = task_text(task, rng, config.needles)
            assert list(s.question_ids) == tokenizer(question, add_special_tokens=False)["input_ids"]
            assert answers == s.answers and max(s.needle_positions) < len(s.context_ids)
            assert len(s.context_ids) == len(s.input_ids) - s.question_tokens


def test_the_job_sends_the_split_and_scores_the_response(checkpoint, text, fake_driver, tmp_path):
    """The fake keeps the recent half of the context: the needle at depth 0.75 survives, at 0.1 it does not;
    question-aware presses are named apart; the results feed the eval tables and heatmaps unchanged."""
    config = LongContextConfig(task=["needle"], lengths=[600], depths=[0.1, 0.75], trials=2)
    options = KVPressOptions(keep=0.5, presses=["knorm", "snapkv"], python=sys.executable, threads=1)
    results = compare_kvpress(checkpoint, config, options, [text])
    assert list(results) == ["no press", "knorm keep 0.5", "snapkv keep 0.5 (question-aware)"]
    baseline, knorm = results["no press"], results["knorm keep 0.5"]
    needle = knorm["long_context"]["tasks"]["needle"]
    assert [(c["depth"], c["accuracy"]) for c in needle["cells"]] == [(0.1, 0.0), (0.75, 1.0)]
    assert baseline["long_context"]["tasks"]["needle"]["accuracy"] == 1.0
    assert knorm["press"] == {"press": "knorm", "class": "KnormPress", "compression_ratio": 0.5,
                              "question_aware": False}  # fmt: skip
    assert knorm["kv_cache_bytes_per_token"] == pytest.approx(
        baseline["kv_cache_bytes_per_token"] / 2, rel=0.01
    )
    for row in needle["outputs"]:
        assert row["kept"] == [row["prefill_tokens"] // 2] * 2 and row["output"] in (
            " 0000000.",
            f" {row['answers'][0]}.",
        )
    assert knorm["long_context"]["config"]["lengths"] == [600] and knorm["long_context"]["data"] == [
        str(text)
    ]
    table = suite_markdown(results)
    assert "| knorm keep 0.5 |" in table and "needle acc" in table and "**needle** (accuracy" in table
    pngs = long_context_plots(results, tmp_path / "plots")
    assert len(pngs) == 3 and all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)


@pytest.mark.parametrize(
    "options, message",
    [
        ({"presses": ["bogus"]}, "unknown --presses 'bogus': choose from expected_attention, knorm"),
        ({"keep": 0.0}, "--keep must lie in (0, 1]"),
        ({"presses": [], "baseline": False}, "nothing to run"),
    ],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace("[", r"\[")):
        KVPressOptions(**options)


def test_the_real_driver_lists_the_presses_without_kvpress():
    presses = press_table()
    assert {"none", "expected_attention", "knorm", "streaming_llm", "snapkv"} <= set(presses)
    assert presses["snapkv"][1] and not any(aware for name, (_, aware) in presses.items() if name != "snapkv")


def test_an_interpreter_without_kvpress_names_the_install_command(checkpoint, text, tmp_path, monkeypatch):
    config = LongContextConfig(task=["needle"], lengths=[400], depths=[0.5], trials=1)
    monkeypatch.setenv("HF_ATTN_SWAP_RUNTIMES", str(tmp_path / "none"))
    with pytest.raises(FileNotFoundError, match="bash scripts/install_runtimes.sh kvpress"):
        compare_kvpress(checkpoint, config, KVPressOptions(), [text])
    if importlib.util.find_spec("kvpress") is None:  # this interpreter: the real driver cannot import kvpress
        with pytest.raises(
            ValueError, match="has no kvpress: run `bash scripts/install_runtimes.sh kvpress`"
        ):
            compare_kvpress(checkpoint, config, KVPressOptions(python=sys.executable), [text])


def load_script():
    spec = importlib.util.spec_from_file_location(
        "compare_kvpress_script", REPO_ROOT / "scripts/compare_kvpress.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_script_writes_eval_shaped_json_markdown_and_plots(
    checkpoint, text, fake_driver, tmp_path, capsys
):
    script = load_script()
    out = tmp_path / "kvpress.json"
    flags = [
        "--model",
        str(checkpoint),
        "--lengths",
        "500",
        "--depths",
        "0.5",
        "--trials",
        "1",
        "--keep",
        "0.3125",
    ]
    flags += ["--presses", "knorm", "--python", sys.executable, "--data", str(text), "--json", str(out)]
    flags += ["--markdown", str(tmp_path / "t.md"), "--plots", str(tmp_path / "plots")]
    assert script.main(flags) == 0
    payload = json.loads(out.read_text())
    assert list(payload["models"]) == ["no press", "knorm keep 0.3125"] and payload["keep"] == 0.3125
    assert payload["models"]["knorm keep 0.3125"]["press"]["compression_ratio"] == 0.6875
    assert (tmp_path / "t.md").read_text().startswith("| model |")
    assert sorted(p.name for p in (tmp_path / "plots").iterdir()) == [
        "longcontext_knorm_keep_0.3125.png",
        "longcontext_no_press.png",
    ]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--presses", "h2o"], "unknown --presses 'h2o'"),
        (["--keep", "1.5"], "--keep must lie in (0, 1]"),
        (["--depths", "2"], "--depths must lie in [0, 1]"),
        (["--model", "/nonexistent"], "--model '/nonexistent': no config.json there"),
    ],
)
def test_the_script_refuses_bad_input_with_one_line(checkpoint, flags, message, capsys):
    from hf_attn_swap.cli import run_script

    script = load_script()
    assert run_script("compare_kvpress.py", lambda: script.main(["--model", str(checkpoint), *flags])) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("compare_kvpress.py: error: ") and "\n" not in err and message in err, err
