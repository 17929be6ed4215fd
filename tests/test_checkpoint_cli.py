"""Folder-level conversion and the CLI: stock reload in a fresh process, atomic output, untouched source."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import time

import pytest
import torch
from conftest import NATIVE_FAMILIES, PYTHON, subprocess_env, tree_digest

from hf_attn_swap.cli import main
from hf_attn_swap.io.checkpoints import load_causal_lm
from hf_attn_swap.methods.report import load_report
from hf_attn_swap.pipeline.convert import convert_checkpoint
from hf_attn_swap.testing import tiny_model

STOCK_LOADER = textwrap.dedent(
    """
    import sys, torch

    class BlockPlugin:  # prove stock transformers alone can load the output
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "hf_attn_swap":
                raise ImportError("hf_attn_swap is blocked in this process")

    sys.meta_path.insert(0, BlockPlugin())
    from transformers import AutoModelForCausalLM
    ids = torch.load(sys.argv[1])
    out = {}
    for folder in sys.argv[3:]:
        # float64 on both sides: the check is the exported weights, not float32 kernel order (plugin vs stock
        # classes, CPU vector width), which moved logits by up to 6e-6 on CI's machine
        model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval().double()
        with torch.no_grad():
            out[folder] = model(ids).logits
    assert not any(m.startswith("hf_attn_swap") for m in sys.modules), "the plugin must not be needed"
    torch.save(out, sys.argv[2])
    """
)


def test_converted_checkpoints_reload_in_stock_transformers(saved_tiny, tmp_path):
    """Every family: convert SRC -> OUT, then a fresh process WITHOUT hf_attn_swap reloads OUT with identical
    logits to the in-memory converted model."""
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    expected, outs = {}, []
    for family in NATIVE_FAMILIES:
        src = saved_tiny(family, name=f"{family}-src", num_attention_heads=4, num_key_value_heads=4)
        out = tmp_path / f"{family}-kv1"
        report = convert_checkpoint(src, out, num_key_value_heads=1)
        assert report.after == {"num_key_value_heads": 1}
        assert load_report(out)["kv_bytes_per_token_after"] == report.kv_bytes_per_token_after
        assert (out / "tokenizer.json").is_file()
        model = load_causal_lm(out, attn_implementation="eager").double()
        assert model.config.num_key_value_heads == 1
        with torch.no_grad():
            expected[str(out)] = model(ids).logits
        outs.append(str(out))
    torch.save(ids, tmp_path / "ids.pt")
    env = subprocess_env(PYTHONPATH="")
    script = tmp_path / "stock_loader.py"
    script.write_text(STOCK_LOADER)
    subprocess.run(
        [PYTHON, str(script), str(tmp_path / "ids.pt"), str(tmp_path / "logits.pt"), *outs],
        check=True,
        env=env,
        cwd=tmp_path,
    )
    got = torch.load(tmp_path / "logits.pt")
    for folder in outs:
        torch.testing.assert_close(got[folder], expected[folder], atol=1e-10, rtol=0)


def test_bad_inputs_write_nothing_and_leave_source_untouched(saved_tiny, tmp_path):
    src = saved_tiny("llama", num_attention_heads=4, num_key_value_heads=4)
    digest = tree_digest(src)
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="does not divide"):
        convert_checkpoint(src, out, num_key_value_heads=3)
    with pytest.raises(ValueError, match="needs --num-kv-heads"):
        convert_checkpoint(src, out)
    with pytest.raises(ValueError, match="unsupported dtype"):
        convert_checkpoint(src, out, num_key_value_heads=2, dtype="int8")
    with pytest.raises(ValueError, match="overlaps the source"):
        convert_checkpoint(src, src, num_key_value_heads=2, overwrite=True)
    with pytest.raises(ValueError, match="overlaps the source"):
        convert_checkpoint(src, src / "inside", num_key_value_heads=2)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        convert_checkpoint(tmp_path / "missing", out, num_key_value_heads=2)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        convert_checkpoint(tmp_path, out, num_key_value_heads=2)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]  # no partial folders either
    assert tree_digest(src) == digest


def test_existing_output_needs_overwrite(saved_tiny, tmp_path):
    src = saved_tiny("llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        convert_checkpoint(src, out, num_key_value_heads=2)
    assert (out / "keep.txt").read_text() == "mine"
    convert_checkpoint(src, out, num_key_value_heads=2, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()


def test_failure_while_saving_leaves_no_output(saved_tiny, tmp_path, monkeypatch):
    """An error while writing leaves nothing; an interrupt (Ctrl-C) leaves only the hidden folder a rerun resumes
    from (layer-by-layer conversion), never a partial OUT."""
    from hf_attn_swap.io import shards

    src = saved_tiny("llama")
    digest = tree_digest(src)
    real_finish = shards.ShardWriter.finish
    for error in (OSError("disk full"), KeyboardInterrupt()):

        def broken_finish(self, error=error):
            (self.folder / "model.safetensors").write_bytes(b"half")
            raise error

        monkeypatch.setattr(shards.ShardWriter, "finish", broken_finish)
        with pytest.raises(type(error)):
            convert_checkpoint(src, tmp_path / "out", num_key_value_heads=2)
        assert not (tmp_path / "out").exists() and tree_digest(src) == digest
    partial = [p.name for p in tmp_path.iterdir() if p.name != "src"]
    assert len(partial) == 1 and partial[0].startswith(".out.partial-")
    monkeypatch.setattr(shards.ShardWriter, "finish", real_finish)
    convert_checkpoint(src, tmp_path / "out", num_key_value_heads=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "src"]


KILLED_WRITER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from hf_attn_swap.io.shards import ShardWriter
    from hf_attn_swap.pipeline.convert import convert_checkpoint
    real_finish = ShardWriter.finish
    def slow_finish(self):
        names = real_finish(self)
        Path(sys.argv[3]).write_text("saved")  # weights are on disk, the rest is not
        time.sleep(60)
        return names
    ShardWriter.finish = slow_finish
    convert_checkpoint(sys.argv[1], sys.argv[2], num_key_value_heads=2)
    """
)


def test_kill_9_during_write_leaves_no_output(saved_tiny, tmp_path):
    src = saved_tiny("llama")
    digest = tree_digest(src)
    out, marker = tmp_path / "out", tmp_path / "marker"
    proc = subprocess.Popen(
        [PYTHON, "-c", KILLED_WRITER, str(src), str(out), str(marker)], env=subprocess_env()
    )
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline, "writer died before saving"
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists()
    assert tree_digest(src) == digest


def test_cli_convert_and_errors(saved_tiny, tmp_path, capsys):
    src = saved_tiny("qwen2", num_attention_heads=4, num_key_value_heads=2)
    out = tmp_path / "mqa"
    assert main(["convert", str(src), str(out), "--to", "gqa", "--num-kv-heads", "1"]) == 0
    assert "num_key_value_heads=2 -> num_key_value_heads=1" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == 1
    assert main(["convert", str(src), str(tmp_path / "bad"), "--to", "gqa", "--num-kv-heads", "3"]) == 2
    err = capsys.readouterr().err
    assert "larger than the current 2 KV heads" in err and "Valid choices" in err and "[1, 2]" in err
    assert not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit):
        main(
            [
                "convert",
                str(src),
                str(tmp_path / "bad"),
                "--to",
                "gqa",
                "--num-kv-heads",
                "1",
                "--dtype",
                "int4",
            ]
        )


def test_console_entry_point_runs_as_module(tmp_path):
    result = subprocess.run(
        [
            PYTHON,
            "-m",
            "hf_attn_swap",
            "convert",
            str(tmp_path / "nope"),
            str(tmp_path / "o"),
            "--to",
            "gqa",
            "--num-kv-heads",
            "1",
        ],
        capture_output=True,
        text=True,
        env=subprocess_env(),
    )
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "example-model smollm2" in result.stderr


def _truncate_weights(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _break_config(folder):
    (folder / "config.json").write_text('{"model_type": "llama", "hidden_size": 64,')


@pytest.mark.parametrize(
    "damage,message",
    [
        (_truncate_weights, "model.safetensors' is truncated or corrupt"),
        (_break_config, "config.json' is not valid JSON"),
    ],
)
@pytest.mark.parametrize(
    "target",
    [
        ["--to", "gqa", "--num-kv-heads", "2"],
        ["--to", "mla", "--kv-lora-rank", "8", "--rope-dim", "8", "--factorization", "svd"],
    ],
)
def test_damaged_source_is_a_one_line_error(saved_tiny, tmp_path, damage, message, target):
    """A new user's damaged download: exit 2 with one line naming the file and the fix, no traceback, nothing
    written, the source as it was."""
    src = saved_tiny("llama", num_attention_heads=4, num_key_value_heads=4)
    damage(src)
    digest = tree_digest(src)
    done = subprocess.run(
        [PYTHON, "-m", "hf_attn_swap", "convert", str(src), str(tmp_path / "out"), *target],
        capture_output=True, text=True, env=subprocess_env(),
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-2000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "re-save" in lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"] and tree_digest(src) == digest


@pytest.mark.parametrize(
    "target,fix",
    [
        (["--to", "mla", "--kv-lora-rank", "8", "--rope-dim", "8"], "--factorization svd"),
        (
            ["--to", "gqa", "--num-kv-heads", "1", "--method", "fit", "--calibration-data", "TEXT"],
            "--method mean",
        ),
    ],
)
def test_calibration_without_a_tokenizer_names_the_fix(tmp_path, text_file, capsys, target, fix):
    src = tmp_path / "src"  # weights and config only
    tiny_model("llama", num_attention_heads=4, num_key_value_heads=4).save_pretrained(src)
    digest = tree_digest(src)
    argv = [
        "convert",
        str(src),
        str(tmp_path / "out"),
        *[str(text_file) if a == "TEXT" else a for a in target],
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [
        line for line in err.splitlines() if line.strip() and not line.startswith("Writing model shards")
    ]
    assert len(lines) == 1 and "has no tokenizer files" in lines[0] and fix in lines[0], err
    assert "sentencepiece" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["src", text_file.name])
    assert tree_digest(src) == digest


def test_demo_job_runs_end_to_end(saved_tiny, tmp_path, text_file, capsys, monkeypatch):
    """The README's main job, on a tiny stand-in for the packaged SmolLM2: converts with two methods (one
    calibrated), evaluates them beside the original and writes demo.json with the measured numbers."""
    import hf_attn_swap.io.examples

    src = saved_tiny("llama", num_attention_heads=4, num_key_value_heads=4)
    monkeypatch.setattr(hf_attn_swap.io.examples, "example_model_path", lambda name, refresh=False: src)
    workdir = tmp_path / "demo"
    argv = ["demo", "--method", "mean", "fit", "--workdir", str(workdir), "--data", str(text_file)]
    argv += ["--max-tokens", "96", "--window", "32", "--calibration-data", str(text_file)]
    assert main(argv) == 0, capsys.readouterr().err
    payload = json.loads((workdir / "demo.json").read_text())
    results = payload["results"]
    mla = "MLA deepseek_v3 (r 32 + d_rope 8)"  # --kv-budget 0.3125 of 2 x 4 x 16 = 128 values: 40 = 32 + 8
    assert set(results) == {"original (4 KV heads)", "mean-pooled (1 KV heads)", "fit-pooled (1 KV heads)", mla}
    assert results[mla]["kv_cache_bytes_per_token"] == 2 * 40 * 4 and results[mla]["kl_to_reference"] > 0
    original = results["original (4 KV heads)"]
    assert original["kl_to_reference"] == 0 and original["kv_cache_bytes_per_token"] == 2 * 2 * 4 * 16 * 4
    for name in ("mean-pooled (1 KV heads)", "fit-pooled (1 KV heads)"):
        assert (
            results[name]["kv_cache_bytes_per_token"] == 2 * 2 * 1 * 16 * 4
        )  # layers x K,V x H_kv x d x fp32
        assert results[name]["kl_to_reference"] > 0 and results[name]["tokens"] == original["tokens"]
    assert payload["calibration"]["files"] == 1 and "| model |" in capsys.readouterr().out


@pytest.mark.parametrize(
    "target,message",
    [
        (["--to", "gqa", "--num-kv-heads", "2", "--kv-lora-rank", "8"], "only apply to --to mla"),
        (
            ["--to", "mla", "--kv-lora-rank", "16", "--rope-dim", "8", "--method", "fit"],
            "only apply to --to gqa",
        ),
    ],
)
def test_options_of_the_other_target_are_refused_not_dropped(saved_tiny, tmp_path, capsys, target, message):
    src = saved_tiny("llama", num_attention_heads=4, num_key_value_heads=4)
    assert main(["convert", str(src), str(tmp_path / "out"), *target]) == 2
    assert message in capsys.readouterr().err and not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="only apply to to="):
        convert_checkpoint(src, tmp_path / "out", "gqa", num_key_value_heads=2, mla={"kv_lora_rank": 8})
    with pytest.raises(ValueError, match="only apply to to="):
        convert_checkpoint(
            src, tmp_path / "out", "mla", mla={"kv_lora_rank": 8, "qk_rope_head_dim": 4}, method="fit"
        )


def test_calibration_text_for_a_data_free_method_is_refused_not_ignored(
    saved_tiny, tmp_path, text_file, capsys
):
    src = saved_tiny("llama", num_attention_heads=4, num_key_value_heads=4)
    argv = ["convert", str(src), str(tmp_path / "out"), "--to", "gqa", "--num-kv-heads", "2"]
    assert main([*argv, "--calibration-data", str(text_file)]) == 2
    assert "method 'mean' reads no calibration text: drop --calibration-data" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
