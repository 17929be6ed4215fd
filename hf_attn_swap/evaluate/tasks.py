"""lm-evaluation-harness tasks through its Python API, including tasks built offline from local text.

``build_local_tasks`` turns held-out text (default: the Python tutorial) into two lm-eval task folders
(JSONL + YAML, ``dataset_path: json``), so no download is needed:

- ``hfas_text_mc``: 4-way multiple choice. Context: a prose paragraph without its last sentence; choices: its
  true last sentence and the last sentences of 3 other paragraphs (seeded). Metrics ``acc`` / ``acc_norm``.
- ``hfas_text_lastword``: LAMBADA-style. Context: a sentence without its last word; target: that word.
  Metrics ``acc`` (the word is the greedy continuation) and ``perplexity`` of the word.

Any other name (``hellaswag``, ``arc_easy``, ``lambada_openai``, ...) is an lm-eval Hub task and needs internet
the first time; a path to a task YAML or folder is added to lm-eval's include path.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from pathlib import Path

from ..io.folders import cache_dir
from ..io.text import default_eval_files, prose_paragraphs, resolve_text_files

LOCAL_TASKS = ("hfas_text_mc", "hfas_text_lastword")
FORMAT_VERSION = 1
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")

MC_YAML = """task: hfas_text_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: {version}
"""

LASTWORD_YAML = """task: hfas_text_lastword
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood
doc_to_text: "{{{{context}}}}"
doc_to_target: "{{{{target}}}}"
target_delimiter: ""
metric_list:
  - metric: perplexity
    aggregation: perplexity
    higher_is_better: false
  - metric: acc
    aggregation: mean
    higher_is_better: true
metadata:
  version: {version}
"""


def task_documents(text: str, max_docs: int = 500, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(multiple-choice docs, last-word docs) built from ``text`` (see the module docstring)."""
    rng = random.Random(seed)
    split = [_SENTENCE_END.split(p) for p in prose_paragraphs(text, min_chars=120, max_chars=800)]
    endings = [(" ".join(s[:-1]), s[-1]) for s in split if len(s) >= 2 and 20 <= len(s[-1]) <= 300]
    mc = []
    for i, (context, answer) in enumerate(endings[:max_docs]):
        others = [e for j, (_, e) in enumerate(endings) if j != i and e != answer]
        if len(others) < 3:
            break
        choices = [answer, *rng.sample(others, 3)]
        rng.shuffle(choices)
        mc.append({"context": context, "choices": choices, "label": choices.index(answer)})
    lastword = []
    for sentences in split:
        for sentence in sentences:
            words = sentence.split(" ")
            word = words[-1].rstrip(".!?,;:")
            if len(words) >= 8 and word.isalpha() and len(lastword) < max_docs:
                lastword.append({"context": " ".join(words[:-1]), "target": " " + word})
    return mc, lastword


def build_local_tasks(data=None, folder: str | Path | None = None, max_docs: int = 500) -> Path:
    """Write the local tasks for the text at ``data`` (default: the Python tutorial) into ``folder``
    (default: a cache folder keyed by the text); returns the folder to pass as lm-eval ``include_path``."""
    files = resolve_text_files(data or default_eval_files())
    text = "\n\n".join(f.read_text(encoding="utf-8", errors="replace") for f in files)
    if folder is None:
        key = hashlib.sha256(f"{FORMAT_VERSION}:{max_docs}:".encode() + text.encode()).hexdigest()[:16]
        folder = cache_dir() / "lm_eval_tasks" / key
    folder = Path(folder).expanduser()
    mc, lastword = task_documents(text, max_docs)
    if len(mc) < 4 or len(lastword) < 4:
        raise ValueError(
            f"the text at {[str(f) for f in files[:3]]} has too little plain prose for the local lm-eval tasks "
            f"({len(mc)} paragraphs, {len(lastword)} sentences): pass more text with --data"
        )
    folder.mkdir(parents=True, exist_ok=True)
    for name, docs, template in (
        ("hfas_text_mc", mc, MC_YAML),
        ("hfas_text_lastword", lastword, LASTWORD_YAML),
    ):
        jsonl = folder / f"{name}.jsonl"
        jsonl.write_text("".join(json.dumps(d) + "\n" for d in docs))
        (folder / f"{name}.yaml").write_text(
            template.format(data=json.dumps(str(jsonl)), version=FORMAT_VERSION)
        )
    return folder


def run_lm_eval(
    model,
    tokenizer,
    tasks: list[str],
    data=None,
    limit: int | float | None = None,
    num_fewshot: int | None = None,
    batch_size: int = 1,
    include_path: list[str | Path] | None = None,
) -> dict[str, dict]:
    """Evaluate an in-memory causal LM on lm-eval ``tasks``; returns task -> {metric: value}.

    Names in ``LOCAL_TASKS`` are built from ``data`` offline; paths to YAML files or folders are included
    as task definitions; other names are looked up in lm-eval's registry (Hub datasets).
    """
    try:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ModuleNotFoundError(
            "lm-eval tasks need lm-evaluation-harness: pip install 'lm-eval>=0.4.5'"
        ) from err

    names, paths, registry = task_sources(tasks, data, include_path)
    manager = TaskManager(include_path=[str(p) for p in paths] or None, include_defaults=registry)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=str(model.device))
    out = simple_evaluate(
        model=lm,
        tasks=names,
        task_manager=manager,
        limit=limit,
        num_fewshot=num_fewshot,
        log_samples=False,
        bootstrap_iters=0,
        verbosity="WARNING",
    )
    results = {}
    for task, metrics in out["results"].items():
        results[task] = {
            k.split(",")[0]: v
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and "stderr" not in k and k not in ("samples", "sample_len")
        }
        results[task]["samples"] = out.get("n-samples", {}).get(task, {}).get("effective")
    return results


def task_sources(
    tasks: list[str], data=None, include_path: list[str | Path] | None = None
) -> tuple[list[str], list[Path], bool]:
    """(task names, folders for lm-eval's ``include_path``, whether lm-eval's own registry is needed).

    Task YAML files and folders become include paths; ``LOCAL_TASKS`` are built from ``data``; every other
    name is a registry task, so the (slow to index) registry is loaded only when such a name is asked for.
    """
    paths = [Path(p).expanduser() for p in include_path or []]
    names, registry = [], False
    for task in tasks:
        path = Path(task).expanduser()
        if path.suffix in (".yaml", ".yml") and path.is_file():
            paths.append(path.parent)
            names.append(_yaml_task_name(path))
        elif path.is_dir():
            paths.append(path)
            names.extend(_yaml_task_name(p) for p in sorted(path.glob("*.yaml")))
        else:
            names.append(task)
            registry = registry or task not in LOCAL_TASKS
    if any(n in LOCAL_TASKS for n in names):
        paths.append(build_local_tasks(data))
    return names, paths, registry or not paths


def _yaml_task_name(path: Path) -> str:
    import yaml

    class _Loader(yaml.SafeLoader):
        pass

    _Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    config = yaml.load(path.read_text(), Loader=_Loader) or {}
    if "task" not in config:
        raise ValueError(f"{path} has no 'task:' name: it is not an lm-eval task config")
    return config["task"]
