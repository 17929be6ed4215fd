"""The ``hf-attn-swap eval`` job and the options it shares with ``demo`` and ``recipes/evaluate.py``.

``EvalDataConfig`` (held-out text), ``EvalConfig`` (the rest of the suite: reference, tasks, decode speed, ...),
``LongContextConfig`` (``--task needle ...``: the long-context suite of ``hf_attn_swap.evaluate.longcontext``)
and ``EvalOutputs`` (which models, where the results go) are the command's flags (``HfArgumentParser``); the first
two and ``EvalRecipe`` are the recipe's YAML keys; ``run_suite`` runs ``hf_attn_swap.evaluate.suite.evaluate_suite`` with them.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

from ..evaluate.longcontext import LongContextConfig
from ..evaluate.suite import EVAL_DEFAULTS, evaluate_suite, parse_model_specs, suite_markdown, suite_plots
from ..io.folders import machine_info, write_json

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
        if isinstance(self.data, (str, Path)):
            self.data = [str(self.data)]


@dataclass
class EvalConfig:
    """What besides perplexity is measured, and how the models are loaded."""

    reference: str | None = field(
        default=None, metadata={"help": "checkpoint whose next-token distributions KL is measured against"}
    )
    batch_size: int = field(default=1, metadata={"help": "windows per forward"})
    dtype: EvalDType = field(default="float32", metadata={"help": "dtype the models are loaded in"})
    attn_implementation: str | None = field(default=None, metadata={"help": "e.g. sdpa, eager"})
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
        if isinstance(self.tasks, str):
            self.tasks = [self.tasks]
        if isinstance(self.decode_contexts, int):
            self.decode_contexts = [self.decode_contexts]


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


@dataclass
class EvalRecipe:
    """``recipes/evaluate.py``: the checkpoints (``example:NAME`` = a packaged model) and the output folder."""

    models: dict = field(metadata={"help": "name -> checkpoint folder (example:NAME: a packaged model)"})
    output: str = field(
        default="runs/evaluate", metadata={"help": "folder for eval.json, eval.md and the plots"}
    )


def run_suite(
    models: dict[str, str],
    data: EvalDataConfig,
    suite: EvalConfig,
    long_context: LongContextConfig | None = None,
) -> dict[str, dict]:
    """``evaluate_suite`` with the options above (name -> metrics)."""
    return evaluate_suite(models, **asdict(data), **asdict(suite), long_context=long_context)


def run_eval(
    outputs: EvalOutputs,
    data: EvalDataConfig,
    suite: EvalConfig,
    long_context: LongContextConfig | None = None,
) -> int:
    """Evaluate, print the table, write the JSON (one model: its metrics also at the top level), markdown, plots."""
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
        path = Path(outputs.markdown).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{table}\n\nCommand: `{' '.join(sys.argv)}`\n")
        print(f"wrote {path}")
    if outputs.plots:
        for path in suite_plots(results, outputs.plots):
            print(f"wrote {path}")
    return 0
