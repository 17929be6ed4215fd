"""Every command and recipe, driven by generated flags, values, files and folders (hypothesis), in process.

For any input: the exit status is 0 or 2 (verify: also 1); a failure prints one line
``hf-attn-swap <command>: error: ...`` (a recipe: ``recipes/<name>.py: error: ...``) and no traceback; nothing is
written on error (no output path it names appears, no partial folder is left); and every source file or folder
is byte-for-byte untouched (hashed before and after each invocation).

The inputs point at a world of files made once: a tiny saved checkpoint (and its MQA conversion) for the valid
cases; broken checkpoints (truncated or wrongly typed config.json, truncated safetensors, a folder or a FIFO where
a file belongs, links that lead nowhere or to themselves); text, binary, empty and JSON files; YAML recipes (a
mapping of plausible settings with some junk, other YAML types, malformed YAML, bytes). Most inputs fail before
any model loads. Those that pass every check stop where the work would begin (``ReachedWork``: a model load or
build, the conversion job, the training text, the Hub client, a serving engine's driver, any subprocess), so every
check must come before it.

``FUZZ_EXAMPLES`` sets the number of invocations (default 2000: 1700 command lines, 300 recipe runs; derandomized,
so CI sees the same ones every run).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hf_attn_swap import cli
from hf_attn_swap.pipeline.convert import convert_checkpoint
from hf_attn_swap.testing import TINY_TEXT, save_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", 2000))
RECIPE_EXAMPLES = max(1, EXAMPLES * 3 // 20)
CLI_EXAMPLES = EXAMPLES - RECIPE_EXAMPLES
#: seconds one invocation may take before it counts as hung (reading a FIFO blocks forever)
HANG_SECONDS = 60
FUZZ_SETTINGS = dict(
    deadline=None,
    derandomize=True,  # the same examples on every run
    database=None,
    suppress_health_check=list(HealthCheck),
    print_blob=False,
)


class ReachedWork(BaseException):
    """Raised where the real work would begin: the input passed every check (a ``BaseException``, so that no
    handler in the code under test takes it for an error)."""


class Hung(BaseException):
    pass


def reached(*args, **kwargs):
    raise ReachedWork


def example_or_stop(name, refresh=False):
    """``example_model_path``: an unknown name fails as it does; a known model would be built (minutes)."""
    from hf_attn_swap.io.examples import EXAMPLES as PACKAGED

    if name not in PACKAGED:
        raise ValueError(f"unknown example model {name!r}; choose one of {sorted(PACKAGED)}")
    raise ReachedWork


# -- the files and folders the inputs point at ------------------------------------------------------------------
def make_world(root: Path) -> dict[str, Path]:
    """The sources (only ever read): name -> path."""
    good = save_tiny_checkpoint(root / "good", num_attention_heads=4, num_key_value_heads=2)
    paths = {"good": good, "mqa": root / "mqa"}
    convert_checkpoint(good, paths["mqa"], to="gqa", num_key_value_heads=1)
    config = json.loads((good / "config.json").read_text())

    def variant(name: str, change, base: Path = good) -> None:
        folder = root / name
        shutil.copytree(base, folder)
        change(folder)
        paths[name] = folder

    def truncate(file: Path, size: int) -> None:
        file.write_bytes(file.read_bytes()[:size])

    def write_config(**fields):
        return lambda f: (f / "config.json").write_text(json.dumps({**config, **fields}))

    variant("bad-json", lambda f: truncate(f / "config.json", 40))
    variant("list-json", lambda f: (f / "config.json").write_text("[1, 2]"))
    variant("truncated-weights", lambda f: truncate(f / "model.safetensors", 200))
    variant("empty-weights", lambda f: truncate(f / "model.safetensors", 0))
    variant("unknown-family", write_config(model_type="nope"))
    variant("wrong-types", write_config(num_attention_heads="four"))
    variant("no-tokenizer", lambda f: [(f / n).unlink() for n in ("tokenizer.json", "tokenizer_config.json")])
    variant("config-is-dir", lambda f: ((f / "config.json").unlink(), (f / "config.json").mkdir()))
    variant("config-fifo", lambda f: ((f / "config.json").unlink(), os.mkfifo(f / "config.json")))
    variant("bad-report", lambda f: truncate(f / "conversion.json", 30), base=paths["mqa"])
    variant("ckpt-ünï✓ code", lambda f: None)
    files = {
        "text.txt": TINY_TEXT * 40,
        "texts/a.txt": TINY_TEXT * 40,
        "empty.txt": "",
        "binary.txt": bytes(range(128, 256)) * 8,
        "prompts.txt": "The capital of France is\nOnce upon a time\n",
        "eval.json": json.dumps({"models": {"good": {"model": str(good), "perplexity": 3.0}}}),
        "eval-list.json": "[1]",
        "eval-truncated.json": '{"models": {"good": {"perpl',
        "task.yaml": "task: fuzz_task\ndataset_path: json\n",
        "task-untitled.yaml": "dataset_path: json\n",
        "task-broken.yaml": "task: [unclosed\n",
    }
    for name, content in files.items():
        path = root / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content if isinstance(content, bytes) else content.encode())
        paths[name.split("/")[0]] = root / name.split("/")[0]
    (root / "empty-dir").mkdir()
    os.mkfifo(root / "fifo")
    (root / "link-good").symlink_to(good)
    (root / "link-text").symlink_to(root / "text.txt")
    (root / "broken-link").symlink_to(root / "nowhere")
    (root / "loop-link").symlink_to(root / "loop-link")
    for name in ("empty-dir", "fifo", "link-good", "link-text", "broken-link", "loop-link", "missing"):
        paths[name] = root / name
    paths["inside-good"] = good / "sub"
    return paths


def tree_digest(folder: Path) -> str:
    """Names, types, link targets and file contents under ``folder`` (links and FIFOs are not followed)."""
    digest = hashlib.sha256()
    for top, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(dirs + files):
            path = Path(top) / name
            mode = path.lstat().st_mode
            digest.update(f"{path.relative_to(folder)}:{stat.S_IFMT(mode)}".encode())
            if stat.S_ISLNK(mode):
                digest.update(os.readlink(path).encode())
            elif stat.S_ISREG(mode):
                digest.update(path.read_bytes())
    return digest.hexdigest()


@contextlib.contextmanager
def fuzz_environment(root: Path):
    """The world, the folder each case's inputs and outputs go to, and the stops where the work begins."""
    import huggingface_hub
    import huggingface_hub.constants

    import hf_attn_swap.io.checkpoints
    import hf_attn_swap.io.examples
    import hf_attn_swap.pipeline.convert
    import hf_attn_swap.pipeline.evaluate
    import hf_attn_swap.pipeline.verify
    import hf_attn_swap.uptrain.run

    world = make_world(root / "world")
    from transformers import PreTrainedModel

    stops = [
        hf_attn_swap.io.checkpoints.load_causal_lm,  # every model load
        hf_attn_swap.uptrain.run.packed_blocks,  # uptrain: the training text
        hf_attn_swap.pipeline.convert.run_job,  # convert: the conversion
        hf_attn_swap.pipeline.verify.reference,  # verify: transformers' reference outputs
        hf_attn_swap.pipeline.verify.run_driver,  # a serving engine's driver
    ]
    with pytest.MonkeyPatch.context() as mp:
        # measuring the machine (bench's roofline) is work too, where a version of bench does it
        stops += [getattr(sys.modules.get("hf_attn_swap.evaluate.roofline"), "measure_machine", reached)]
        for module in [m for name, m in sys.modules.items() if name.startswith("hf_attn_swap") and m]:
            for attr, value in list(vars(module).items()):
                if any(value is stop for stop in stops):  # the function and every imported reference to it
                    mp.setattr(module, attr, reached)
        mp.setattr(PreTrainedModel, "__init__", reached)  # any other model built
        mp.setattr(subprocess, "Popen", reached)  # any other process started (an engine, a converter)
        mp.setattr(hf_attn_swap.io.examples, "example_model_path", example_or_stop)
        mp.setattr(huggingface_hub, "HfApi", reached)
        mp.setattr(huggingface_hub, "get_token", lambda: "hf_fuzz")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("HF_ATTN_SWAP_CACHE", str(root / "cache"))
        mp.setenv("HF_ATTN_SWAP_RUNTIMES", str(root / "runtimes"))
        # lm-eval's own registry takes seconds to index: two of its names stand for it
        mp.setattr(hf_attn_swap.pipeline.evaluate, "registry_tasks", lambda: {"hellaswag", "arc_easy"})
        mp.chdir(root)  # relative defaults (demo's runs/demo) land here
        yield {"world": world, "world_root": root / "world", "case": root / "case"}


@pytest.fixture(scope="module")
def fuzz_env(tmp_path_factory):
    with fuzz_environment(tmp_path_factory.mktemp("fuzz")) as env:
        yield env


# -- values -----------------------------------------------------------------------------------------------------
GOOD_INTS = ["1", "2", "4", "8", "16", "64", "128"]
GOOD_NUMBERS = GOOD_INTS + ["0.5", "1e-3"]
BAD_NUMBERS = ["0", "-1", "-7", "1.5", "1e3", "99999999999999999999999", "nan", "inf", "-inf", "abc", ""]
BAD_NUMBERS += [" 7", "0x1f", "1_0", "٣"]
TEXT = ["abc", "", " ", "ü✓𝔘", "a\nb", "-", "--", "-x", "a=b", "None", "null", "[1]", "{}", "true", "~"]
GOOD_SOURCES = ["good", "mqa", "link-good", "ckpt-ünï✓ code"]
BAD_SOURCES = ["bad-json", "list-json", "truncated-weights", "empty-weights", "unknown-family", "wrong-types"]
BAD_SOURCES += [
    "no-tokenizer",
    "config-is-dir",
    "config-fifo",
    "bad-report",
    "empty-dir",
    "missing",
    "text.txt",
]
BAD_SOURCES += ["fifo", "broken-link", "loop-link", "inside-good"]
GOOD_FILES = ["text.txt", "texts", "link-text"]
BAD_FILES = ["empty.txt", "binary.txt", "prompts.txt", "eval.json", "eval-list.json", "eval-truncated.json"]
BAD_FILES += ["fifo", "empty-dir", "good", "missing", "broken-link", "loop-link"]
#: outputs: a name in the case's out folder, or @NAME: an existing world path given as an output
GOOD_OUTPUTS = ["new", "deep/a/b", "ünï✓ out"]
BAD_OUTPUTS = ["existing-dir", "existing-file", "existing-file/below", "@good", "@inside-good", "@text.txt"]
BAD_OUTPUTS += ["@fifo", "@broken-link", ""]
TASKS = [
    "hfas_text_mc",
    "hfas_text_lastword",
    "hellaswag",
    "no_such_task",
    "@task.yaml",
    "@task-untitled.yaml",
]
TASKS += ["@task-broken.yaml", "@texts", "@fifo", "@eval-list.json"]

#: flags (dests) that name a checkpoint, a file or folder to read, something to write
CHECKPOINT_FLAGS = {"model", "models", "src", "reference", "teacher"}
FILE_FLAGS = {"data", "calibration_data", "eval_data", "prompts", "eval_json", "python", "text"}
OUTPUT_FLAGS = {"out", "output", "json", "markdown", "plot", "plots", "checkpoint_dir", "workdir"}
#: string-typed flags that hold a number
NUMERIC_STRINGS = {"max_shard_size", "kv_budget", "mla_kv_budget", "rope_fold"}
#: flags a command needs in practice: given (with a plausible value) in most of its command lines
USUAL_FLAGS = {
    "convert": ["--num-kv-heads"],
    "uptrain": ["--max-tokens", "--data", "--block-size"],
    "eval": ["--max-tokens", "--data"],
    "push": ["--dry-run"],
    "bench": ["--new-tokens"],
}


def mostly(good, bad, odds: int = 8):
    """``good`` ``odds`` times out of ``odds + 1``, else ``bad``."""
    return st.integers(0, odds).flatmap(lambda i: bad if i == 0 else good)


class Case:
    """One invocation's folder: the YAML written for it (``in``) and the outputs it may name (``out``)."""

    def __init__(self, env):
        self.world = env["world"]
        self.folder = env["case"]
        shutil.rmtree(self.folder, ignore_errors=True)
        self.inputs, self.outputs = self.folder / "in", self.folder / "out"
        self.inputs.mkdir(parents=True)
        (self.outputs / "existing-dir").mkdir(parents=True)
        (self.outputs / "existing-dir" / "keep.txt").write_text("mine")
        (self.outputs / "existing-file").write_text("mine")

    def path(self, name: str) -> str:
        """A world path (``@NAME`` for outputs) or a path in the out folder."""
        if name in self.world:
            return str(self.world[name])
        if name.startswith("@"):
            return str(self.world[name[1:]])
        return str(self.outputs / name) if name else ""

    def source(self, data) -> str:
        return self.path(data.draw(mostly(st.sampled_from(GOOD_SOURCES), st.sampled_from(BAD_SOURCES), 1)))

    def file(self, data) -> str:
        return self.path(data.draw(mostly(st.sampled_from(GOOD_FILES), st.sampled_from(BAD_FILES), 2)))

    def output(self, data) -> str:
        return self.path(data.draw(mostly(st.sampled_from(GOOD_OUTPUTS), st.sampled_from(BAD_OUTPUTS), 2)))

    def task(self, data) -> str:
        name = data.draw(st.sampled_from(TASKS))
        return self.path(name) if name.startswith("@") else name

    def yaml_file(self, data, settings_strategy) -> str:
        """A recipe YAML: mostly a mapping of settings (now and then truncated), else another YAML type, broken
        YAML or bytes, or a path that is no YAML file."""
        kind = data.draw(st.sampled_from(["mapping"] * 27 + ["other", "broken", "path"]))
        if kind == "path":
            return self.file(data)
        if kind == "mapping":
            text = yaml.safe_dump(data.draw(settings_strategy(self)), allow_unicode=True)
            if data.draw(st.integers(0, 39)) == 0:
                text = text[: data.draw(st.integers(0, len(text)))]
        elif kind == "other":
            text = yaml.safe_dump(data.draw(yaml_values()))
        else:
            text = data.draw(st.sampled_from(BROKEN_YAML))
        path = self.inputs / f"recipe-{len(list(self.inputs.iterdir()))}.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return str(path)


BROKEN_YAML = [
    "model: [unclosed\n",
    "\tmodel: tab\n",
    "a: 1\na: 2\n",
    "!!python/object/apply:os.system ['true']\n",
    "--- 1\n--- 2\n",
    "model: *nowhere\n",
    "{",
    "1: one\n",
    "? [a, b]\n: 1\n",
    b"\xff\xfe\x00model: x\n",
    "",
    "# only a comment\n",
]


def yaml_values():
    scalars = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(allow_nan=True, allow_infinity=True),
        st.sampled_from(TEXT + BAD_NUMBERS),
    )
    return st.recursive(
        scalars,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(TEXT), inner, max_size=3),
        max_leaves=4,
    )


def plausible(case: Case, name: str, hint: str):
    """A YAML value for the setting ``name`` of type ``hint``: mostly of its type and near its range."""
    if name in CHECKPOINT_FLAGS:
        typed = mostly(st.sampled_from(GOOD_SOURCES), st.sampled_from(BAD_SOURCES), 2).map(case.path)
    elif name in OUTPUT_FLAGS:
        typed = mostly(st.sampled_from(GOOD_OUTPUTS), st.sampled_from(BAD_OUTPUTS), 2).map(case.path)
    elif name in FILE_FLAGS:
        typed = mostly(st.sampled_from(GOOD_FILES), st.sampled_from(BAD_FILES), 2).map(case.path)
    elif name == "tasks":
        typed = st.sampled_from(TASKS).map(lambda n: case.path(n) if n.startswith("@") else n)
    elif "bool" in hint:
        typed = st.booleans()
    elif "int" in hint:
        typed = st.integers(-2, 300) | st.sampled_from([1024, 65536])
    elif "float" in hint:
        typed = st.floats(-0.5, 1.5) | st.sampled_from([1e-3, 0.5, "1e-3"])
    else:
        typed = st.sampled_from(TEXT)
    return mostly(typed, yaml_values(), 19)


def settings_of(case: Case, *classes, extra=None, required=()):
    """A mapping of settings of ``classes``: the ``required`` ones and up to 5 others, now and then any of them
    (required ones missing) and an unknown key."""
    fields = {
        f.name: plausible(case, f.name, str(f.type))
        for cls in classes
        for f in dataclasses.fields(cls)
        if f.name != "convert"
    }
    fields.update(extra or {})
    needed = {k: v for k, v in fields.items() if k in required}
    optional = {k: v for k, v in fields.items() if k not in required}
    chosen = st.lists(st.sampled_from(sorted(optional)), max_size=5, unique=True)
    complete = chosen.flatmap(
        lambda keys: st.fixed_dictionaries({**needed, **{k: optional[k] for k in keys}})
    )
    odd = st.fixed_dictionaries({}, optional={**fields, "bogus_key": st.just(1)})
    return mostly(complete, odd, 19)


# -- the command lines ------------------------------------------------------------------------------------------
PARSER = cli.build_parser()


def command_actions(name: str) -> list[argparse.Action]:
    return [a for a in PARSER.commands[name]._actions if not isinstance(a, argparse._HelpAction)]


def flag_words(data, case: Case, action: argparse.Action) -> list[str]:
    """The argv words a flag takes (or a positional's own words)."""
    if action.nargs == 0:  # a switch
        return []
    dest = action.dest
    if action.choices:
        values = [str(c) for c in action.choices]
        pick = lambda: data.draw(mostly(st.sampled_from(values), st.sampled_from(TEXT), 9))  # noqa: E731
    elif dest in CHECKPOINT_FLAGS:
        pick = lambda: case.source(data)  # noqa: E731
    elif dest in OUTPUT_FLAGS:
        pick = lambda: case.output(data)  # noqa: E731
    elif dest in FILE_FLAGS:
        pick = lambda: case.file(data)  # noqa: E731
    elif dest == "config":
        pick = lambda: case.yaml_file(data, uptrain_settings)  # noqa: E731
    elif dest in ("tasks", "task"):
        pick = lambda: case.task(data)  # noqa: E731
    elif action.type in (int, float) or dest in NUMERIC_STRINGS:
        good = GOOD_INTS if action.type is int else GOOD_NUMBERS
        pick = lambda: data.draw(mostly(st.sampled_from(good), st.sampled_from(BAD_NUMBERS), 3))  # noqa: E731
    else:
        pick = lambda: data.draw(st.sampled_from(TEXT + GOOD_NUMBERS + ["cpu", "cuda:7", "ORG/NAME"]))  # noqa: E731
    if action.nargs in (None, "?"):
        count = 1 if action.nargs is None or data.draw(st.integers(0, 4)) else 0
    else:
        count = data.draw(st.integers(0 if action.nargs == "*" else 1, 3))
    return [pick() for _ in range(count)]


def cli_argv(data, case: Case) -> list[str]:
    """A command line of a random command: its positionals and required flags (almost always), its usual flags
    (mostly), 0 to 4 others (mostly at most 1), and now and then an unknown flag, ``--help`` or a positional
    moved to the end."""
    name = data.draw(st.sampled_from(list(cli.COMMANDS)))
    actions = command_actions(name)
    argv = [name]
    usual = set(USUAL_FLAGS.get(name, []))
    for action in actions:
        needed = not action.option_strings or action.required
        if (needed and data.draw(st.integers(0, 29))) or (
            usual & set(action.option_strings) and data.draw(st.integers(0, 4))
        ):
            words = flag_words(data, case, action)
            argv += words if not action.option_strings else [action.option_strings[-1], *words]
    optional = [a for a in actions if a.option_strings and not a.required]
    count = data.draw(mostly(st.integers(0, 1), st.integers(2, 4), 2))
    for action in data.draw(st.lists(st.sampled_from(optional), min_size=count, max_size=count)):
        argv += [data.draw(st.sampled_from(action.option_strings)), *flag_words(data, case, action)]
    extra = data.draw(st.integers(0, 59))
    if extra == 0:
        argv.append("--no-such-flag")
    elif extra == 1:
        argv.append("--help")
    elif extra == 2 and len(argv) > 2:
        argv.append(argv.pop(1))
    return argv  # fmt: skip


def uptrain_settings(case: Case):
    from hf_attn_swap.uptrain import UptrainConfig

    convert = {
        "source": mostly(
            st.sampled_from(GOOD_SOURCES), st.sampled_from(BAD_SOURCES + ["example:nope"]), 2
        ).map(case.path),
        "to": st.sampled_from(["gqa", "gqa", "mla", "xyz", 3]),
        "num_key_value_heads": st.sampled_from([1, 1, 2, 3, 0, -1, "two", None]),
        "method": st.sampled_from(["mean", "fit", "median", 3]),
        "mla": st.sampled_from([{"kv_lora_rank": 8, "qk_rope_head_dim": 4}, {"rank": 8}, [1], "x"]),
        "calibration_tokens": st.sampled_from([64, 0, "many"]),
        "bogus": st.just(1),
    }
    section = mostly(
        st.fixed_dictionaries({"source": convert.pop("source")}, optional=convert), yaml_values(), 6
    )
    extra = {"model": mostly(st.sampled_from(GOOD_SOURCES + ["@new-model"]), st.sampled_from(BAD_SOURCES), 2)}
    extra["model"] = extra["model"].map(lambda n: case.path(n[1:]) if n == "@new-model" else case.path(n))
    extra["convert"] = section
    return settings_of(case, UptrainConfig, extra=extra, required=("model", "output", "max_tokens"))


def evaluate_settings(case: Case):
    from hf_attn_swap.pipeline.evaluate import EvalConfig, EvalDataConfig, EvalRecipe

    source = mostly(st.sampled_from(GOOD_SOURCES), st.sampled_from(BAD_SOURCES + ["example:nope"]), 2)
    models = st.dictionaries(st.sampled_from(["a", "b", "ü"]), source.map(case.path), min_size=1, max_size=2)
    extra = {"models": mostly(models, yaml_values(), 9)}
    return settings_of(
        case, EvalRecipe, EvalDataConfig, EvalConfig, extra=extra, required=("models", "output")
    )


OVERRIDES = st.tuples(
    st.sampled_from(["max_tokens", "learning_rate", "mode", "models", "block_size", "window", "x", ""]),
    st.sampled_from(TEXT + GOOD_NUMBERS + BAD_NUMBERS),
).map("=".join) | st.sampled_from(["novalue", "a==b", "--x"])


# -- one invocation and its checks ------------------------------------------------------------------------------
def _alarm(signum, frame):
    raise Hung


def invoke(capsys, job) -> tuple[int | str, str, str]:
    """Run ``job`` (-> exit status) as the console script does: (status or "work", stdout, stderr)."""
    capsys.readouterr()
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(HANG_SECONDS)
    try:
        status = job()
    except ReachedWork:
        status = "work"
    except SystemExit as exit:
        status = exit.code if isinstance(exit.code, int) else f"SystemExit({exit.code!r})"
    except Hung:
        status = f"hung for {HANG_SECONDS} s"
    except BaseException:  # noqa: BLE001 - the property under test: nothing escapes
        status = "exception:\n" + traceback.format_exc()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
    out, err = capsys.readouterr()
    return status, out, err


def snapshot(env, case: Case) -> dict:
    return {
        "world": tree_digest(env["world_root"]),
        "inputs": tree_digest(case.inputs),
        "outputs": sorted(str(p.relative_to(case.outputs)) for p in case.outputs.rglob("*"))
        + [tree_digest(case.outputs)],
    }


def check(prog: str, argv, status, out: str, err: str, before: dict, after: dict, allowed=(0, 2)) -> None:
    shown = f"{prog} {argv!r}"
    assert status in (*allowed, "work"), f"{shown}: status {status}\nstderr: {err[-3000:]}"
    assert "Traceback" not in out + err, f"{shown}: traceback\n{err[-3000:]}"
    if status not in (0, "work"):
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), f"{shown}: stderr\n{err[-3000:]}"
    assert after["world"] == before["world"], f"{shown}: a source file or folder changed"
    assert after["inputs"] == before["inputs"], f"{shown}: an input file changed"
    if status != 0:
        assert after["outputs"] == before["outputs"], f"{shown}: wrote {after['outputs'][:-1]} on error"


def _tally(statuses) -> str:
    tally: dict[str, int] = {}
    for s in statuses:
        key = str(s).split("\n")[0]
        tally[key] = tally.get(key, 0) + 1
    return json.dumps(tally)


def test_fuzz_every_command(fuzz_env, capsys):
    statuses = []

    @settings(max_examples=CLI_EXAMPLES, **FUZZ_SETTINGS)
    @given(st.data())
    def run(data):
        case = Case(fuzz_env)
        argv = cli_argv(data, case)
        before = snapshot(fuzz_env, case)
        status, out, err = invoke(capsys, lambda: cli.main(argv))
        name = argv[0] if argv[0] in cli.COMMANDS else ""
        allowed = (0, 1, 2) if name == "verify" else (0, 2)
        check(
            f"hf-attn-swap {name}".strip(), argv, status, out, err, before, snapshot(fuzz_env, case), allowed
        )
        statuses.append(status)

    run()
    assert len(statuses) >= CLI_EXAMPLES
    with capsys.disabled():
        print(f"\nfuzzed {len(statuses)} command lines: {_tally(statuses)}")


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"fuzz_recipe_{name}", REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fuzz_recipes(fuzz_env, capsys):
    scripts = {"uptrain": (load_script("uptrain"), uptrain_settings)}
    scripts["evaluate"] = (load_script("evaluate"), evaluate_settings)
    statuses = []

    @settings(max_examples=RECIPE_EXAMPLES, **FUZZ_SETTINGS)
    @given(st.data())
    def run(data):
        case = Case(fuzz_env)
        name = data.draw(st.sampled_from(sorted(scripts)))
        module, recipe_settings = scripts[name]
        argv = ["--config", case.yaml_file(data, recipe_settings)]
        argv += data.draw(mostly(st.just([]), st.lists(OVERRIDES, min_size=1, max_size=2), 3))
        if not data.draw(st.integers(0, 39)):
            argv = argv[2:]  # no --config
        before = snapshot(fuzz_env, case)
        prog = f"recipes/{name}.py"
        status, out, err = invoke(capsys, lambda: cli.run_script(prog, lambda: module.main(argv)))
        check(prog, argv, status, out, err, before, snapshot(fuzz_env, case))
        statuses.append(status)

    run()
    assert len(statuses) >= RECIPE_EXAMPLES
    with capsys.disabled():
        print(f"\nfuzzed {len(statuses)} recipe runs: {_tally(statuses)}")
