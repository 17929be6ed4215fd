"""Bad input fails in one line before any work (issue 23): what the fuzzer (``test_fuzz_cli.py``) found and the
known leftovers, one test each; published renames are synced; ``--help`` says each default once."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import re
from pathlib import Path

import pytest
import yaml
from _recipes_fixtures import REPO, make_tiny_setup

import hf_attn_swap.io.checkpoints
import hf_attn_swap.pipeline.evaluate
from hf_attn_swap.cli import COMMANDS, build_parser, main, run_script
from hf_attn_swap.io import folders
from hf_attn_swap.testing import TINY_TEXT, save_tiny_checkpoint


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bad_input_{name}", REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_error_line(capsys, prog: str) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), lines
    assert "Traceback" not in lines[0]
    return lines[0]


@pytest.fixture
def no_model_loads(monkeypatch):
    """Any model load fails the test: the error must come before it."""

    def load(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(hf_attn_swap.io.checkpoints, "load_causal_lm", load)


@pytest.fixture
def tiny(tmp_path):
    folder = save_tiny_checkpoint(tmp_path / "tiny", num_attention_heads=4, num_key_value_heads=2)
    (tmp_path / "text.txt").write_text(TINY_TEXT * 20)
    return folder


# -- eval: lm-eval tasks and option ranges before any model loads -----------------------------------------------
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--tasks", "no_such_task"], "unknown lm-eval task(s) ['no_such_task']"),
        (["--tasks", "hellaswag", "hellaswagg"], "unknown lm-eval task(s) ['hellaswagg']"),
        (["--tasks", "{untitled}"], "has no 'task:' name"),
        (["--tasks", "{broken}"], "does not read as an lm-eval task config"),
        (["--tasks", "hfas_text_mc"], "too little plain prose"),
        (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["--window", "1"], "--window must be at least 2 tokens, got 1"),
        (["--new-tokens", "0"], "--new-tokens must be at least 1"),
        (["--task-limit", "-1"], "--task-limit is a number of documents or a fraction"),
        (["--decode-contexts", "0"], "--decode-contexts must be at least 1"),
        (["--json", "{tmp}"], "--json"),
        (["--plots", "{text}"], "--plots"),
    ],
)
def test_eval_refuses_bad_tasks_and_options_before_loading(
    tiny, tmp_path, capsys, monkeypatch, no_model_loads, flags, message
):
    monkeypatch.setattr(hf_attn_swap.pipeline.evaluate, "registry_tasks", lambda: frozenset({"hellaswag"}))
    (tmp_path / "untitled.yaml").write_text("dataset_path: json\n")
    (tmp_path / "broken.yaml").write_text("task: [unclosed\n")
    paths = {"untitled": tmp_path / "untitled.yaml", "broken": tmp_path / "broken.yaml", "tmp": tmp_path}
    flags = [f.format(**paths, text=tmp_path / "text.txt") for f in flags]
    assert main(["eval", str(tiny), "--data", str(tmp_path / "text.txt"), *flags]) == 2
    assert message in one_error_line(capsys, "hf-attn-swap eval")


@pytest.mark.slow
def test_registry_tasks_are_lm_evals_own_names():
    names = hf_attn_swap.pipeline.evaluate.registry_tasks()
    assert {"hellaswag", "arc_easy", "lambada_openai"} <= names and "no_such_task" not in names


# -- recipes: settings of the wrong type --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "script, settings, message",
    [
        ("uptrain", {"learning_rate": "abc"}, "learning_rate must be a number, got 'abc'"),
        ("uptrain", {"max_tokens": [1]}, "max_tokens must be a number, got [1]"),
        ("uptrain", {"block_size": "x"}, "block_size must be a number, got 'x'"),
        ("uptrain", {"warmup_ratio": [1]}, "warmup_ratio must be a number, got [1]"),
        ("uptrain", {"data": {"a": 1}}, "data must be a list of strings"),
        ("uptrain", {"progress": "no"}, "progress must be true or false, got 'no'"),
        ("uptrain", {"learning_rate": float("nan")}, "learning_rate must be a finite number"),
        ("uptrain", {"convert": [1]}, "convert must be a mapping"),
        ("uptrain", {"convert": {"to": "gqa"}}, "the convert: section needs source"),
        ("uptrain", {"convert": {"source": "x", "heads": 1}}, "unknown convert: setting(s) ['heads']"),
        ("uptrain", {"lora_dropout": 1.5}, "lora_dropout is a probability in [0, 1)"),
        ("evaluate", {"models": ["a", "b"]}, "models must be a mapping"),
        ("evaluate", {"models": {"a": 3}}, "models must map names to checkpoint folders"),
        ("evaluate", {"window": "abc"}, "window must be a number, got 'abc'"),
        ("evaluate", {"tasks": {"a": 1}}, "tasks must be a list of strings"),
        ("evaluate", {"models": {"a": "{missing}"}}, "missing checkpoints: a"),
    ],
)
def test_recipe_settings_of_the_wrong_type_are_one_line(tmp_path, capsys, script, settings, message):
    (tmp_path / "text.txt").write_text(TINY_TEXT)
    base = {"model": str(tmp_path / "m"), "output": str(tmp_path / "out"), "max_tokens": 64}
    base["data"] = str(tmp_path / "text.txt")
    if script == "evaluate":
        base = {"models": {"a": str(tmp_path)}, "output": str(tmp_path / "out")}
    text = yaml.safe_dump({**base, **settings}).replace("{missing}", str(tmp_path / "missing"))
    (tmp_path / "recipe.yaml").write_text(text)
    argv = ["--config", str(tmp_path / "recipe.yaml")]
    prog = f"recipes/{script}.py"
    assert run_script(prog, lambda: load_script(script).main(argv)) == 2
    assert message in one_error_line(capsys, prog)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml", "text.txt"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("model: [unclosed\n", "is not valid YAML"),
        ("!!python/object/apply:os.system ['true']\n", "is not valid YAML"),
        ("- a\n- b\n", "must hold a YAML mapping of settings, not a list"),
        ("1: one\n", "setting names are words"),
        (b"\xff\xfe model: x\n", "is not UTF-8 text"),
    ],
)
def test_malformed_recipe_files_are_one_line(tmp_path, capsys, text, message):
    path = tmp_path / "recipe.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    for prog, job in [
        ("recipes/uptrain.py", lambda: load_script("uptrain").main(["--config", str(path)])),
        ("hf-attn-swap uptrain", lambda: main(["uptrain", "M", "O", "--config", str(path)])),
    ]:
        assert run_script(prog, job) == 2
        assert message in one_error_line(capsys, prog)


def test_usage_errors_are_one_line(capsys):
    for argv, prog, message in [
        (["convert", "SRC"], "hf-attn-swap convert", "the following arguments are required: out, --to"),
        (
            ["convert", "S", "O", "--to", "gqa", "--nope"],
            "hf-attn-swap convert",
            "unrecognized arguments: --nope",
        ),
        (["bogus"], "hf-attn-swap", "invalid choice: 'bogus'"),
    ]:
        with pytest.raises(SystemExit) as exit:
            main(argv)
        assert exit.value.code == 2
        line = one_error_line(capsys, prog)
        assert message in line and f"`{prog} --help`" in line
    with pytest.raises(SystemExit) as exit:
        load_script("evaluate").main([])
    assert exit.value.code == 2
    assert "--config" in one_error_line(capsys, "recipes/evaluate.py")


# -- uptrain --config honours the recipe's convert: section --------------------------------------------------------
def test_uptrain_command_converts_from_the_configs_convert_section(tmp_path, capsys):
    setup = make_tiny_setup(tmp_path, chars=20_000)
    recipe = tmp_path / "recipe.yaml"
    convert = {"source": str(setup["src"]), "to": "gqa", "num_key_value_heads": 1, "method": "mean"}
    recipe.write_text(yaml.safe_dump({"convert": convert, "data": str(setup["data"]), "block_size": 64}))
    model, out = tmp_path / "built-mqa", tmp_path / "trained"
    argv = ["uptrain", str(model), str(out), "--config", str(recipe), "--max-tokens", "256", "--no-progress"]
    capsys.readouterr()
    assert main([*argv, "--warmup-ratio", "2"]) == 2  # the run's settings are checked before converting
    assert "warmup_ratio" in one_error_line(capsys, "hf-attn-swap uptrain") and not model.exists()

    assert main(argv) == 0, capsys.readouterr().err
    assert json.loads((model / "conversion.json").read_text())["after"]["num_key_value_heads"] == 1
    assert json.loads((out / "training_log.json").read_text())["record"]["tokens_trained"] == 256


# -- a config.json that does not load, link loops, outputs that cannot be written ------------------------------------
@pytest.mark.parametrize(
    "fields, message",
    [
        (
            {"num_attention_heads": "four"},
            "config.json' does not load as a llama config (Validation error for field 'num_attention_heads'",
        ),
        ({"model_type": "nope"}, "config.json' has model_type 'nope', which transformers"),
    ],
)
def test_a_config_json_that_does_not_load_is_named_before_loading(
    tiny, tmp_path, capsys, no_model_loads, fields, message
):
    config = json.loads((tiny / "config.json").read_text())
    (tiny / "config.json").write_text(json.dumps({**config, **fields}))
    for argv in (["convert", str(tiny), str(tmp_path / "o"), "--to", "gqa", "--num-kv-heads", "1"],
                 ["eval", str(tiny)], ["verify", str(tiny), "--runtime", "transformers"],
                 ["push", str(tiny), "--repo-id", "org/name", "--dry-run"]):  # fmt: skip
        assert main(argv) == 2
        assert message in one_error_line(capsys, f"hf-attn-swap {argv[0]}")  # no transformers warning first
    assert not (tmp_path / "o").exists()


def test_link_loops_and_unwritable_outputs(tmp_path, capsys):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    assert not folders.overlaps(loop, tmp_path / "elsewhere")  # Path.resolve raises RuntimeError on a loop
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="is not a folder"):
        folders.check_output(tmp_path / "file" / "out")
    with pytest.raises(ValueError, match="exists and is not a file"):
        folders.check_output_file(tmp_path, "--json")
    broken = tmp_path / "broken"
    broken.symlink_to(tmp_path / "nowhere")
    with pytest.raises(FileExistsError, match="broken link"):
        folders.check_output(broken)


def test_verify_refuses_an_unreadable_table_or_interpreter_before_running(tiny, tmp_path, capsys):
    (tiny / "verify.json").write_text("[1]")
    assert main(["verify", str(tiny), "--runtime", "transformers"]) == 2
    assert "is not a verify JSON" in one_error_line(capsys, "hf-attn-swap verify")
    (tiny / "verify.json").unlink()
    assert main(["verify", str(tiny), "--runtime", "vllm", "--python", str(tmp_path / "text.txt")]) == 2
    assert "is not executable" in one_error_line(capsys, "hf-attn-swap verify")


def test_push_names_an_eval_json_that_is_not_one(tiny, tmp_path, capsys):
    for text in ('{"models": {"a": {"perpl', '{"models": 5}', "[1]"):
        (tmp_path / "eval.json").write_text(text)
        argv = [
            "push",
            str(tiny),
            "--repo-id",
            "org/name",
            "--dry-run",
            "--eval-json",
            str(tmp_path / "eval.json"),
        ]
        assert main(argv) == 2
        assert "eval.json" in one_error_line(capsys, "hf-attn-swap push")


# -- published renames are synced ---------------------------------------------------------------------------------
@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="names synced descriptors through /proc")
def test_every_published_rename_syncs_its_folder(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        real_replace(src, dst)
        events.append(("replace", str(Path(dst).resolve())))

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    out = tmp_path / "parent" / "out"
    with folders.atomic_output_dir(out) as tmp:
        (tmp / "config.json").write_text("{}")
    folders.atomic_write_text(tmp_path / "note.txt", "hello")
    with folders.atomic_output_dir(out, overwrite=True) as tmp:
        (tmp / "config.json").write_text("{}")

    def synced_after(path: Path) -> bool:
        published = [i for i, event in enumerate(events) if event == ("replace", str(path.resolve()))]
        parent = ("fsync", str(path.parent.resolve()))
        return bool(published) and all(parent in events[i + 1 :] for i in published)

    assert synced_after(out) and synced_after(tmp_path / "note.txt")
    first = events.index(("replace", str(out.resolve())))
    written = [path for kind, path in events[:first] if kind == "fsync" and path.endswith("/config.json")]
    assert written and ".out.partial-" in written[0]  # the files, before their folder is published


def test_fsync_dir_is_a_no_op_where_folders_cannot_be_synced(tmp_path, monkeypatch):
    def refuse(fd):
        raise OSError(22, "Invalid argument")

    monkeypatch.setattr(os, "fsync", refuse)
    folders.fsync_dir(tmp_path)
    folders.fsync_dir(tmp_path / "missing")


# -- --help -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_states_each_default_once_and_every_flag_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit:
        main([name, "--help"])
    assert exit.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: None)" not in text
    assert not re.search(r"default[^()]*\)\s*\(default:", text), text
    for action in build_parser().commands[name]._actions:
        if not isinstance(action, argparse._HelpAction):
            assert action.help and action.help.strip(), f"{name} {action.option_strings or action.dest}"
