"""kvpress at equal KV bytes: the long-context suite's retrieval prompts through NVIDIA's KV-cache presses.

A conversion that keeps a fraction ``keep`` of the KV bytes per token (MLA -68.75 %: 0.3125; MQA of SmolLM2: 1/3)
is compared with each press at ``compression_ratio = 1 - keep``: the press drops that share of the prefilled
tokens from every layer's cache. kvpress pins its own transformers (< 5.3), so it runs in its own venv
(``bash scripts/install_runtimes.sh kvpress``) through ``drivers/kvpress_driver.py``, which prefills each prompt's
context with the press (question-aware presses: with the question, as kvpress's own evaluation does), decodes
greedily and reports the generated ids and each layer's kept tokens. This process builds the prompts
(``prepare_long_context``), splits each into ``context_ids`` and ``question_ids``, scores the decoded text with
``score_answer`` and returns entries shaped like ``hf-attn-swap eval``'s (name -> ``{"long_context": ...}``), so
``suite_markdown`` / ``suite_plots`` and merged eval JSONs work unchanged. The original model without a press is
decoded by the same driver as the baseline.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..evaluate.longcontext import (
    RETRIEVAL_TASKS,
    LongContextConfig,
    LongContextInputs,
    Sample,
    long_context_result,
    prepare_long_context,
    summarise,
    trial_row,
)
from .verify import DRIVERS, runtime_python

KVPRESS_DRIVER = DRIVERS / "kvpress_driver.py"
DEFAULT_PRESSES = ("expected_attention", "knorm", "streaming_llm", "snapkv")


def press_table(driver: Path = KVPRESS_DRIVER) -> dict[str, tuple[str | None, bool]]:
    """The driver's ``PRESSES`` (name -> (kvpress class, question-aware)), read without kvpress installed."""
    spec = importlib.util.spec_from_file_location("hf_attn_swap_kvpress_driver", driver)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.PRESSES


@dataclass(frozen=True)
class KVPressOptions:
    """What ``compare_kvpress`` runs: presses at ``compression_ratio = 1 - keep``, the no-press baseline, the
    interpreter that has kvpress (default: its cached venv), attention kernel, threads, the driver (tests)."""

    keep: float = 0.3125
    presses: list[str] = field(default_factory=lambda: list(DEFAULT_PRESSES))
    baseline: bool = True
    python: str | None = None
    attn_implementation: str = "sdpa"
    threads: int | None = None
    driver: str | None = None

    def __post_init__(self):
        known = [n for n in press_table(self.driver_path) if n != "none"]
        unknown = [p for p in self.presses if p not in known]
        if unknown:
            raise ValueError(f"unknown --presses {unknown[0]!r}: choose from {', '.join(known)}")
        if not 0 < self.keep <= 1:
            raise ValueError(f"--keep must lie in (0, 1] (the fraction of KV bytes kept), got {self.keep}")
        if not self.presses and not self.baseline:
            raise ValueError("nothing to run: name --presses or keep the no-press baseline")

    @property
    def driver_path(self) -> Path:
        return Path(self.driver) if self.driver else KVPRESS_DRIVER

    def press_specs(self) -> list[dict]:
        """The request's presses: the baseline (``none``) first, then each press at ``1 - keep``."""
        ratio = round(1 - self.keep, 10)
        specs = [{"name": "none", "compression_ratio": 0.0}] if self.baseline else []
        return specs + [{"name": name, "compression_ratio": ratio} for name in self.presses]


def split_sample(sample: Sample) -> dict:
    """A request sample: the context (what a press compresses), the question + answer prefix, the budget."""
    return {
        "context_ids": list(sample.context_ids),
        "question_ids": list(sample.question_ids),
        "max_new_tokens": sample.max_new_tokens,
    }


def kvpress_request(model: str | Path, samples: list[Sample], options: KVPressOptions) -> dict:
    """The driver's request (schema in ``drivers/kvpress_driver.py``)."""
    return {
        "model": str(model),
        "samples": [split_sample(s) for s in samples],
        "presses": options.press_specs(),
        "options": {"attn_implementation": options.attn_implementation, "threads": options.threads},
    }


def run_kvpress_driver(request: dict, python: Path, driver: Path = KVPRESS_DRIVER) -> dict:
    """Run the driver under ``python`` (the kvpress venv); its response. ``ValueError`` naming the install
    command when that interpreter has no kvpress, ``RuntimeError`` with the log's tail when it wrote nothing."""
    with tempfile.TemporaryDirectory(prefix="hf_attn_swap_kvpress_") as tmp:
        req, resp, log = Path(tmp) / "request.json", Path(tmp) / "response.json", Path(tmp) / "driver.log"
        req.write_text(json.dumps(request))
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
        env.setdefault("TOKENIZERS_PARALLELISM", "false")
        with open(log, "w") as out:
            proc = subprocess.run(
                [str(python), str(driver), str(req), str(resp)], stdout=out, stderr=subprocess.STDOUT, cwd=tmp,
                env=env,
            )  # fmt: skip
        if not resp.is_file():
            lines = log.read_text(errors="replace").splitlines()
            if any("ModuleNotFoundError" in ln for ln in lines):
                raise ValueError(
                    f"{python} has no kvpress: run `bash scripts/install_runtimes.sh kvpress` or pass --python"
                )
            tail = "\n".join(lines[-25:])
            raise RuntimeError(f"kvpress driver ({python}) exited with {proc.returncode}:\n{tail}")
        return json.loads(resp.read_text())


def press_name(run: dict, keep: float) -> str:
    """A result's name: ``no press``, ``knorm keep 0.3125``, ``snapkv keep 0.3125 (question-aware)``."""
    if run["press"] == "none":
        return "no press"
    return f"{run['press']} keep {keep:g}" + (" (question-aware)" if run.get("question_aware") else "")


def press_result(run: dict, inputs: LongContextInputs, response: dict, model: str | Path) -> dict:
    """One results entry (eval-shaped): the press, the measured cache, ``long_context`` with every task."""
    entry = {
        "model": str(model),
        "press": {k: run.get(k) for k in ("press", "class", "compression_ratio", "question_aware")},
        "kvpress": {k: response.get(k) for k in ("kvpress", "transformers", "torch")},
        "seconds": run["seconds"],
    }
    if run["error"]:
        return {**entry, "error": run["error"], "traceback": run.get("traceback")}
    outputs, tasks, index = run["outputs"], {}, 0
    for task, samples in inputs.samples.items():
        rows = []
        for sample, out in zip(samples, outputs[index : index + len(samples)], strict=True):
            text = inputs.tokenizer.decode(out["tokens"], skip_special_tokens=True)
            rows.append(
                {**trial_row(sample, text), "prefill_tokens": out["prefill_tokens"], "kept": out["kept"]}
            )
        seconds = sum(o["seconds"] for o in outputs[index : index + len(samples)])
        tasks[task] = {**summarise(rows), "outputs": rows, "seconds": round(seconds, 2)}
        index += len(samples)
    kept = [k / o["prefill_tokens"] for o in outputs for k in o["kept"]]
    return {
        **entry,
        "kv_cache_bytes_per_token": sum(o["cache_bytes"] / o["prefill_tokens"] for o in outputs)
        / len(outputs),
        "kept_fraction": {"min": min(kept), "max": max(kept)},
        "long_context": long_context_result(inputs, tasks),
    }


def compare_kvpress(
    model: str | Path, config: LongContextConfig, options: KVPressOptions, data=None
) -> dict[str, dict]:
    """name -> eval-shaped result per press (and the baseline). Prompts are built and the kvpress interpreter
    found before the driver loads any weight.

    Args: model (a transformers folder kvpress supports: Llama, Qwen2/3, Mistral, Phi-3, Gemma 3), config (the
    retrieval tasks, lengths, depths, trials, seed), options, data (haystack text; default the Python tutorial).
    Returns the results dict (``suite_markdown`` / ``suite_plots`` take it)."""
    from transformers import AutoConfig

    from ..io.checkpoints import load_tokenizer

    tasks = config.task or ["needle"]
    if any(t not in RETRIEVAL_TASKS for t in tasks):
        raise ValueError(f"kvpress runs the retrieval tasks only ({', '.join(RETRIEVAL_TASKS)}), got {tasks}")
    config = replace(config, task=tasks)
    python = runtime_python("kvpress", options.python)
    inputs = prepare_long_context(load_tokenizer(model), AutoConfig.from_pretrained(model), config, data)
    samples = [s for task_samples in inputs.samples.values() for s in task_samples]
    response = run_kvpress_driver(kvpress_request(model, samples, options), python, options.driver_path)
    return {
        press_name(run, options.keep): press_result(run, inputs, response, model) for run in response["runs"]
    }
