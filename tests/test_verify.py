"""``hf-attn-swap verify`` without the engines' venvs: the transformers driver in a child interpreter vs the
in-process reference, the comparison, bad input, and the verify table in the push model card. The engines
themselves: tests/test_runtimes.py (``pytest -m runtimes``)."""

from __future__ import annotations

import json
import sys

import pytest

from hf_attn_swap.cli import main
from hf_attn_swap.pipeline import verify
from hf_attn_swap.pipeline.hub import model_card
from hf_attn_swap.testing import save_tiny_checkpoint


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("verify") / "tiny", "llama")


def test_transformers_driver_in_its_own_interpreter_equals_the_reference(tiny, tmp_path, capsys):
    out = tmp_path / "verify.json"
    code = main(
        [
            "verify",
            str(tiny),
            "--runtime",
            "transformers",
            "--python",
            sys.executable,
            "--max-new-tokens",
            "6",
            "--json",
            str(out),
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "| transformers" in printed and "3/3" in printed and "verify: PASSED" in printed
    result = json.loads(out.read_text())["runtimes"]["transformers"]
    (row,) = result["rows"]
    assert row["tokens_equal"] == row["prompts"] == 3
    assert row["max_dlogprob"] <= 1e-6  # same library, same float32 math, another process
    assert not (tiny / verify.VERIFY_FILE).exists()  # --json elsewhere: the model folder is untouched


def test_a_mismatch_exits_1(tiny, monkeypatch, capsys):
    real = verify.reference

    def shifted(models, max_new_tokens):  # the reference's last token of the first prompt changed
        outputs = real(models, max_new_tokens)
        first = next(iter(outputs.values()))[0]
        first["tokens"][-1] += 1
        return outputs

    monkeypatch.setattr(verify, "reference", shifted)
    code = main(["verify", str(tiny), "--runtime", "transformers", "--max-new-tokens", "3", "--no-save"])
    printed = capsys.readouterr().out
    assert code == 1
    assert "2/3" in printed and "MISMATCH" in printed and "verify: FAILED" in printed


def test_compare_counts_equal_prompts_and_log_prob_deltas_up_to_the_first_divergence():
    expected = [
        {"tokens": [1, 2, 3], "logprobs": [-0.1, -0.2, -0.3]},
        {"tokens": [4, 5, 6], "logprobs": [-1.0, -1.0, -1.0]},
    ]
    got = [
        {"tokens": [1, 2, 3], "logprobs": [-0.1, -0.25, -0.3]},
        {"tokens": [4, 9, 6], "logprobs": [-1.0, -1.5, -9.0]},  # diverges at 1: position 2 is not compared
    ]
    row = verify.compare(expected, got)
    assert row["prompts"] == 2 and row["tokens_equal"] == 1
    assert row["first_divergence"] == [None, 1]
    assert row["max_dlogprob"] == pytest.approx(0.5)


def test_vllm_plan_runs_mla_folders_patched_and_stock_on_each_backend():
    llama = verify.plan("vllm", {"model_type": "llama"})
    assert llama == [{"backend": "default", "options": {"variants": ["unpatched"]}}]
    small = verify.plan("vllm", {"model_type": "deepseek_v3", "kv_lora_rank": 72, "qk_rope_head_dim": 48})
    assert [p["backend"] for p in small] == ["mla-disabled"]
    padded = verify.plan("vllm", {"model_type": "deepseek_v3", "kv_lora_rank": 512, "qk_rope_head_dim": 64})
    assert [p["backend"] for p in padded] == ["mla-disabled", "cpu-mla"]
    assert all(p["options"]["variants"] == ["patched", "unpatched"] for p in padded)
    assert [p["options"]["mla_disable"] for p in padded] == [True, False]


@pytest.mark.parametrize(
    "args, message",
    [
        (["MISSING", "--runtime", "mlx"], "does not exist"),
        (["TINY", "--runtime", "transformers", "--python", "/no/such/python"], "--python '/no/such/python'"),
        (["TINY", "--runtime", "vllm"], "bash scripts/install_runtimes.sh vllm"),
        (
            ["TINY", "--runtime", "transformers", "--max-new-tokens", "0"],
            "--max-new-tokens must be at least 1",
        ),
        (["TINY", "--runtime", "transformers", "--prompts", "/no/prompts.txt"], "--prompts file"),
        (["NOTOKENIZER", "--runtime", "transformers"], "has no usable tokenizer"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_ATTN_SWAP_RUNTIMES", str(tmp_path / "no-venvs"))
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((tiny / name).read_bytes())
    paths = {"MISSING": str(tmp_path / "missing"), "TINY": str(tiny), "NOTOKENIZER": str(bare)}
    code = main(["verify", *[paths.get(a, a) for a in args]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and err[0].startswith("hf-attn-swap verify: error:") and message in err[0], err
    assert not (tiny / verify.VERIFY_FILE).exists() and not (bare / verify.VERIFY_FILE).exists()


def test_push_card_carries_the_latest_verify_table(tiny, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    for path in tiny.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    row = {
        "runtime": "mlx",
        "backend": "default",
        "variant": "",
        "model": "model",
        "prompts": 3,
        "tokens_equal": 3,
        "first_divergence": [None] * 3,
        "max_dlogprob": 1.7e-5,
        "seconds": 2.0,
        "counts": True,
        "passed": True,
        "error": None,
    }
    old = {"runtime": "mlx", "version": "0.1", "rows": [{**row, "max_dlogprob": 0.5}], "notes": []}
    verify.save_result(folder / verify.VERIFY_FILE, old)
    verify.save_result(
        folder / verify.VERIFY_FILE,
        {"runtime": "mlx", "version": "0.32.2", "rows": [row], "notes": ["a note"]},
    )
    card = model_card(folder, "me/tiny")
    assert "## Serving engines" in card
    assert "| mlx 0.32.2 | default | — | model | 3/3 | 1.70e-05 | 2.0 | pass |" in card
    assert "- a note" in card and "5.00e-01" not in card
    (folder / verify.VERIFY_FILE).unlink()
    assert "## Serving engines" not in model_card(folder, "me/tiny")


def test_a_driver_that_dies_half_way_fails_the_models_it_never_reached(tiny, monkeypatch):
    def crashed(runtime, python, request, timeout=None):  # wrote its response for no model, then died
        return {"runtime": runtime, "version": "x", "notes": [], "runs": [], "returncode": -9}

    monkeypatch.setattr(verify, "run_driver", crashed)
    result = verify.verify_models({"tiny": tiny}, "transformers", max_new_tokens=2, python=sys.executable)
    (row,) = result["rows"]
    assert not result["passed"] and not row["passed"]
    assert row["error"] == "the driver exited with -9 before this model"
