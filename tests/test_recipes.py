"""The recipe scripts and their YAML configs."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import yaml
from _recipes_fixtures import REPO, make_tiny_setup

from hf_attn_swap.uptrain import MODES, UptrainConfig

CONFIGS = sorted((REPO / "recipes" / "configs").glob("*.yaml"))


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_configs_are_valid(path):
    values = yaml.safe_load(path.read_text())
    if path.name.startswith("accelerate_"):
        assert values["distributed_type"] in ("MULTI_GPU", "FSDP", "DEEPSPEED")
    elif path.name.startswith("evaluate_"):
        assert set(values) <= {"models", "reference", "output", *load_script("evaluate").SUITE_KEYS}
    else:
        config = UptrainConfig.from_yaml(path, ["max_tokens=1024", "learning_rate=3e-4"])
        assert config.mode in MODES and config.max_tokens == 1024 and config.learning_rate == 3e-4
        assert config.convert and config.convert["source"] == "example:smollm2"


def test_uptrain_recipe_converts_then_trains_then_evaluate_recipe_reports(tmp_path, capsys):
    src = make_tiny_setup(tmp_path)["src"]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {
                "model": str(tmp_path / "mqa"),
                "output": str(tmp_path / "mqa-layerwise"),
                "convert": {"source": str(src), "to": "gqa", "num_key_value_heads": 1, "method": "mean"},
                "data": str(tmp_path / "train.txt"),
                "mode": "layerwise",
                "max_tokens": 4096,
                "block_size": 64,
                "progress": False,
            }
        )
    )
    assert load_script("uptrain").main(["--config", str(recipe), "max_tokens=512"]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out[out.index('{\n  "mode"') :])
    assert summary["tokens_trained"] == 512 and summary["final_loss"] < summary["first_loss"] * 1.5
    assert json.loads((tmp_path / "mqa" / "conversion.json").read_text())["after"]["num_key_value_heads"] == 1

    evaluate = tmp_path / "evaluate.yaml"
    evaluate.write_text(
        yaml.safe_dump(
            {
                "models": {
                    "original": str(src),
                    "mqa": str(tmp_path / "mqa"),
                    "layerwise": str(tmp_path / "mqa-layerwise"),
                },
                "reference": str(src),
                "data": str(tmp_path / "heldout.txt"),
                "max_tokens": 256,
                "window": 128,
                "output": str(tmp_path / "report"),
            }
        )
    )
    assert load_script("evaluate").main(["--config", str(evaluate)]) == 0
    report = json.loads((tmp_path / "report" / "eval.json").read_text())
    assert set(report["models"]) == {"original", "mqa", "layerwise"}
    assert (tmp_path / "report" / "eval.md").is_file() and (
        tmp_path / "report" / "quality_vs_kv.png"
    ).is_file()


@pytest.mark.slow
def test_uptrain_recipe_under_torchrun_with_two_cpu_processes(tmp_path):
    """Data-parallel (gloo DDP on CPU): the budget counts both processes and only the main one writes OUT."""
    import os
    import subprocess
    import sys

    mqa = make_tiny_setup(tmp_path)["mqa"]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(
        yaml.safe_dump(
            {"model": str(mqa), "output": str(tmp_path / "out"), "data": str(tmp_path / "train.txt")}
            | {"mode": "layerwise", "max_tokens": 1024, "block_size": 64, "save_steps": 2, "progress": False}
        )
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*command, str(REPO / "recipes" / "uptrain.py"), "--config", str(recipe)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((tmp_path / "out" / "training_log.json").read_text())["record"]
    assert record["world_size"] == 2 and record["steps"] == 8 and record["tokens_per_step"] == 128
    assert proc.stdout.count('"tokens_trained": 1024') == 1


@pytest.mark.parametrize(
    "script, text, message",
    [
        ("uptrain", "mode: layerwise\nmax_tokens: 1024\noutput: out\n", "does not set model"),
        ("evaluate", "reference: example:smollm2\n", "does not set models"),
    ],
)
def test_recipe_without_its_required_keys_names_the_key(tmp_path, script, text, message):
    config = tmp_path / "recipe.yaml"
    config.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_script(script).main(["--config", str(config)])


@pytest.mark.parametrize(
    "script, text, message",
    [
        ("uptrain", "mode: layerwise\nmax_tokens: 1024\noutput: out\n", "does not set model"),
        ("evaluate", "models: {a: x}\nfoo: 1\n", "unknown recipe.yaml setting(s) ['foo']"),
    ],
)
def test_recipe_scripts_report_bad_input_in_one_line(tmp_path, script, text, message):
    """Run as a user would: one line naming the fix, exit 2, no traceback."""
    config = tmp_path / "recipe.yaml"
    config.write_text(text)
    proc = subprocess.run(
        [sys.executable, str(REPO / "recipes" / f"{script}.py"), "--config", str(config)],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert lines[0].startswith(f"recipes/{script}.py: error: ") and message in lines[0]
