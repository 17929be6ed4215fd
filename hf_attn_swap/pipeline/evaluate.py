"""The ``hf-attn-swap eval`` job and the options it shares with ``demo`` and ``recipes/evaluate.py``.

``EvalDataConfig`` (held-out text), ``EvalConfig`` (the rest of the suite: reference, tasks, decode speed, ...),
``LongContextConfig`` (``--task needle ...``: the long-context suite of ``hf_attn_swap.evaluate.longcontext``)
and ``EvalOutputs`` (which models, where the results go) are the command's flags (``HfArgumentParser``); the first
two and ``EvalRecipe`` are the recipe's YAML keys; ``run_suite`` runs ``hf_attn_swap.evaluate.suite.evaluate_suite`` with them.
"""

from __future__ import annotations

import functools
import re
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from ..evaluate.longcontext import LongContextConfig
from ..evaluate.suite import EVAL_DEFAULTS, evaluate_suite, parse_model_specs, suite_markdown, suite_plots
from ..io.folders import (
    atomic_write_text,
    check_output_file,
    check_output_folder,
    check_source,
    machine_info,
    write_json,
)
from ..io.recipes import coerce_fields

EvalDType = Literal["auto", "float32", "bfloat16", "float16"]


@dataclass
class EvalDataConfig:
    """The held-out text every model is scored on (``eval``, ``demo``, ``recipes/evaluate.py``)."""

    data: list[str] | None = field(
        default=None,
        metadata={
            "help": "text files or folders (default: the Python tutorial, python3.11-doc)",
            "metavar": "FILE",
        },
    )
    max_tokens: int = field(
        default=EVAL_DEFAULTS["max_tokens"], metadata={"help": "score the first N tokens"}
    )
    window: int = field(default=EVAL_DEFAULTS["window"], metadata={"help": "tokens per independent window"})

    def __post_init__(self):
        coerce_fields(self)  # one path -> a list of one; wrong types (YAML) fail here
        if self.max_tokens < 2:
            raise ValueError(f"--max-tokens must be at least 2, got {self.max_tokens}")
        if self.window < 2:
            raise ValueError(f"--window must be at least 2 tokens, got {self.window}")


@dataclass
class EvalConfig:
    """What besides perplexity is measured, and how the models are loaded."""

    reference: str | None = field(
        default=None, metadata={"help": "checkpoint whose next-token distributions KL is measured against"}
    )
    batch_size: int = field(default=1, metadata={"help": "windows per forward"})
    dtype: EvalDType = field(default="float32", metadata={"help": "dtype the models are loaded in"})
    attn_implementation: str | None = field(
        default=None,
        metadata={
            "help": "e.g. sdpa, eager, latent_sdpa; auto: latent_sdpa for MLA checkpoints (absorbed decode over the "
            "latent; stock sdpa re-expands the cached latent at every step and runs the narrower v head in CPU "
            "SDPA's unfused kernel), "
            "transformers' default for the rest"
        },
    )
    tasks: list[str] | None = field(
        default=None,
        metadata={
            "help": "lm-eval tasks: hfas_text_mc / hfas_text_lastword (built offline from --data), a task YAML "
            "or folder, or an lm-eval registry name (hellaswag, arc_easy, ...: needs internet)",
            "metavar": "TASK",
        },
    )
    task_limit: float | None = field(
        default=None, metadata={"help": "lm-eval: documents per task (int) or fraction"}
    )
    num_fewshot: int | None = field(default=None, metadata={"help": "lm-eval: few-shot examples"})
    decode_contexts: list[int] | None = field(
        default=None, metadata={"help": "measure decode tokens/s at these contexts", "metavar": "N"}
    )
    new_tokens: int = field(default=32, metadata={"help": "decode speed: tokens generated"})

    def __post_init__(self):
        coerce_fields(self)  # one task / context -> a list of one; wrong types (YAML) fail here
        limit, contexts = self.task_limit, self.decode_contexts or []
        checks = [
            (self.batch_size < 1, f"--batch-size must be at least 1, got {self.batch_size}"),
            (self.new_tokens < 1, f"--new-tokens must be at least 1, got {self.new_tokens}"),
            (any(c < 1 for c in contexts), f"--decode-contexts must be at least 1 token, got {contexts}"),
            (
                limit is not None and not (limit > 0 and (limit <= 1 or float(limit).is_integer())),
                f"--task-limit is a number of documents or a fraction in (0, 1], got {limit}",
            ),
            (self.num_fewshot is not None and self.num_fewshot < 0, f"--num-fewshot must be at least 0, got {self.num_fewshot}"),
            (self.tasks is not None and not all(t.strip() for t in self.tasks), f"--tasks names an empty task: {self.tasks}"),
        ]  # fmt: skip
        for bad, message in checks:
            if bad:
                raise ValueError(message)


@dataclass
class EvalOutputs:
    """``hf-attn-swap eval MODEL...``: the checkpoints and where the results go."""

    model: list[str] = field(metadata={"help": "checkpoint folder(s), optionally NAME=PATH"})
    json: str | None = field(
        default=None, metadata={"help": "write the metrics to this JSON file", "metavar": "OUT"}
    )
    markdown: str | None = field(
        default=None, metadata={"help": "write the results table as markdown", "metavar": "OUT.md"}
    )
    plots: str | None = field(
        default=None,
        metadata={
            "help": "write quality_vs_kv.png (and decode_speed.png, longcontext_<model>.png, ppl_by_position.png) here",
            "metavar": "DIR",
        },
    )

    def __post_init__(self):
        coerce_fields(self)
        if not self.model:
            raise ValueError("eval needs at least one MODEL")

    def check(self) -> None:
        """The output paths can be written (checked before any model loads)."""
        for flag, path in (("--json", self.json), ("--markdown", self.markdown)):
            if path is not None:
                check_output_file(path, flag)
        if self.plots is not None:
            check_output_folder(self.plots, "--plots")


@dataclass
class EvalRecipe:
    """``recipes/evaluate.py``: the checkpoints (``example:NAME`` = a packaged model) and the output folder."""

    models: dict = field(metadata={"help": "name -> checkpoint folder (example:NAME: a packaged model)"})
    output: str = field(
        default="runs/evaluate", metadata={"help": "folder for eval.json, eval.md and the plots"}
    )

    def __post_init__(self):
        coerce_fields(self)
        bad = [k for k, v in self.models.items() if not isinstance(k, str) or not isinstance(v, str) or not v]
        if not self.models or bad:
            raise ValueError(
                f"models must map names to checkpoint folders (name: FOLDER or example:NAME), got {self.models!r}"
            )


def run_suite(
    models: dict[str, str],
    data: EvalDataConfig,
    suite: EvalConfig,
    long_context: LongContextConfig | None = None,
) -> dict[str, dict]:
    """``evaluate_suite`` with the options above (name -> metrics), after the checks that need no model: every
    checkpoint folder (``check_models``) and lm-eval task (``check_tasks``)."""
    check_models({**models, **({"reference": suite.reference} if suite.reference else {})})
    check_tasks(suite.tasks, data.data)
    return evaluate_suite(models, **asdict(data), **asdict(suite), long_context=long_context)


#: a Hugging Face Hub model id (``NAME`` or ``ORG/NAME``): such a model that is no local folder is downloaded
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?")


def check_models(models: dict[str, str]) -> None:
    """Every local checkpoint is a loadable folder (``check_source``: config.json, safetensors headers); a name
    that is neither an existing path nor a Hub id raises ``FileNotFoundError``."""
    for path in models.values():
        if Path(path).expanduser().exists() or not HUB_ID.fullmatch(str(path)) or ".." in str(path):
            check_source(path)


def check_tasks(tasks: list[str] | None, data=None) -> None:
    """Every lm-eval task of ``--tasks`` exists before any model loads: the local ones are built from ``data``
    (too little prose fails here), task YAML files and folders are read, registry names are looked up
    (``registry_tasks``). ``ValueError`` names the unknown ones."""
    if not tasks:
        return
    from ..evaluate.tasks import LOCAL_TASKS, task_sources

    manager = _task_manager()
    try:
        names, paths, registry = task_sources(tasks, data)
    except (TypeError, AttributeError, _yaml_error()) as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise ValueError(f"--tasks: a task YAML does not read as an lm-eval task config ({first})") from None
    known = (
        set(manager(include_path=[str(p) for p in paths], include_defaults=False).all_tasks)
        if paths
        else set()
    )
    if registry:
        known |= registry_tasks()
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(
            f"unknown lm-eval task(s) {unknown}: use {' or '.join(LOCAL_TASKS)} (offline, from --data), a task "
            "YAML or folder, or a name of `lm_eval ls tasks`"
        )


def _task_manager():
    try:
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ModuleNotFoundError(
            "lm-eval tasks need lm-evaluation-harness: pip install 'lm-eval>=0.4.5'"
        ) from err
    return TaskManager


def _yaml_error() -> type:
    import yaml

    return yaml.YAMLError


@functools.lru_cache(maxsize=1)
def registry_tasks() -> frozenset[str]:
    """The task, group and tag names of lm-eval's own registry (indexing it takes seconds: once per process)."""
    return frozenset(_task_manager()(include_defaults=True).all_tasks)


def run_eval(
    outputs: EvalOutputs,
    data: EvalDataConfig,
    suite: EvalConfig,
    long_context: LongContextConfig | None = None,
) -> int:
    """Evaluate, print the table, write the JSON (one model: its metrics also at the top level), markdown, plots."""
    outputs.check()
    results = run_suite(parse_model_specs(outputs.model), data, suite, long_context)
    meta = {"command": sys.argv, "machine": machine_info()}
    # one model: its metrics at the top level (the original contract); always: every model under "models"
    payload = {**next(iter(results.values())), **meta} if len(results) == 1 else dict(meta)
    payload["models"] = results
    table = suite_markdown(results)
    print(table)
    if outputs.json:
        print(f"wrote {write_json(outputs.json, payload)}")
    if outputs.markdown:
        path = atomic_write_text(outputs.markdown, f"{table}\n\nCommand: `{' '.join(sys.argv)}`\n")
        print(f"wrote {path}")
    if outputs.plots:
        for path in suite_plots(results, outputs.plots):
            print(f"wrote {path}")
    return 0
