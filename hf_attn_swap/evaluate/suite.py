"""Several checkpoints, one report: perplexity / KL / measured KV bytes (``evaluate_checkpoints``), lm-eval
tasks, decode tokens/s at several context lengths, the long-context suite (``longcontext``); as JSON-ready
dicts, a markdown table and PNG plots."""

from __future__ import annotations

import re
from pathlib import Path

from .longcontext import long_context_tasks, prepare_long_context, run_long_context, summary_tables

#: the evaluation protocol's defaults (API, CLI and recipes): the first 16 384 tokens in 1024-token windows
EVAL_DEFAULTS = {"max_tokens": 16384, "window": 1024}


def evaluate_suite(
    models: dict[str, str],
    data=None,
    reference: str | None = None,
    max_tokens: int = EVAL_DEFAULTS["max_tokens"],
    window: int = EVAL_DEFAULTS["window"],
    batch_size: int = 1,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    tasks: list[str] | None = None,
    task_limit: int | float | None = None,
    num_fewshot: int | None = None,
    task_data=None,
    decode_contexts: list[int] | None = None,
    new_tokens: int = 32,
    long_context=None,
) -> dict[str, dict]:
    """name -> metrics. Always: the ``eval`` keys (perplexity, tokens, kl_to_reference,
    kv_cache_bytes_per_token, ...). With ``tasks``: ``lm_eval`` = {task: {metric: value}}. With
    ``decode_contexts``: ``decode`` = [{context, decode_tokens_per_second, ...}]. With ``long_context``
    (``LongContextConfig``) tasks: ``long_context`` (``longcontext.run_long_context``), lengths checked and
    prompts built before any weight loads. Each model is loaded once."""
    from ..io.checkpoints import load_tokenizer

    long_inputs = prepare_long_contexts(models, long_context, data)
    loaded: dict = {}
    options = (max_tokens, window, batch_size, dtype, attn_implementation)
    results = evaluate_checkpoints(models, data, reference, *options, loaded_models=loaded)
    if not tasks and not decode_contexts and not long_inputs:
        return results
    from .speed import measure_decode_speed
    from .tasks import run_lm_eval

    for name, path in models.items():
        model = loaded.pop(name)
        if tasks:
            tokenizer = load_tokenizer(path)
            results[name]["lm_eval"] = run_lm_eval(
                model,
                tokenizer,
                tasks,
                data=task_data or data,
                limit=task_limit,
                num_fewshot=num_fewshot,
                batch_size=batch_size,
            )
        if decode_contexts:
            results[name]["decode"] = [
                measure_decode_speed(model, context, new_tokens) for context in sorted(decode_contexts)
            ]
        if name in long_inputs:
            results[name]["long_context"] = run_long_context(model, long_inputs[name])
        del model
    return results


def prepare_long_contexts(models: dict[str, str], config, data) -> dict:
    """name -> ``LongContextInputs`` (each model's own tokenizer and ``max_position_embeddings``), or {} when
    ``config`` is None or names no task. Reads configs and tokenizers only."""
    if config is None or not config.task:
        return {}
    from transformers import AutoConfig

    from ..io.checkpoints import load_tokenizer

    return {
        name: prepare_long_context(load_tokenizer(path), AutoConfig.from_pretrained(path), config, data, name)
        for name, path in models.items()
    }


def flat_row(name: str, result: dict) -> dict:
    """One table row: the plain metrics plus ``<task> <metric>`` and ``tok/s @<context>`` columns."""
    row = {"name": name, **{k: v for k, v in result.items() if not isinstance(v, (dict, list))}}
    for task, metrics in (result.get("lm_eval") or {}).items():
        for metric, value in metrics.items():
            if metric != "samples":
                row[f"{task} {metric}"] = value
    for speed in result.get("decode") or []:
        row[f"tok/s @{speed['context']}"] = speed["decode_tokens_per_second"]
    for task, task_result in long_context_tasks(result).items():
        if "accuracy" in task_result:
            row[f"{task} acc"] = task_result["accuracy"]
    return row


def suite_markdown(results: dict[str, dict]) -> str:

    rows = [flat_row(name, r) for name, r in results.items()]
    extra = []
    for row in rows:
        extra += [k for k in row if (" " in k and k not in extra and k not in dict(EVAL_COLUMNS))]
    columns = EVAL_COLUMNS + [(k, k) for k in extra]
    tables = [f"{title}\n\n{markdown_table(r, c)}" for title, r, c in summary_tables(results)]
    return "\n\n".join([markdown_table(rows, columns), *tables])


def suite_plots(results: dict[str, dict], folder) -> list[Path]:
    """``quality_vs_kv.png`` (perplexity and each task's first metric vs measured KV bytes/token); when
    measured, ``decode_speed.png``, ``longcontext_<model>.png`` (retrieval accuracy, length x depth, per task)
    and ``ppl_by_position.png`` (all models)."""
    from .plots import plot_decode_speed, plot_quality_vs_kv

    folder = Path(folder).expanduser()
    rows = {name: flat_row(name, r) for name, r in results.items()}
    metrics = [("perplexity", "perplexity")]
    for r in results.values():
        for task, task_metrics in (r.get("lm_eval") or {}).items():
            first = next((m for m in ("acc", "acc_norm", "exact_match") if m in task_metrics), None)
            if first and (f"{task} {first}", f"{task} {first}") not in metrics:
                metrics.append((f"{task} {first}", f"{task} {first}"))
    paths = [plot_quality_vs_kv(rows, folder / "quality_vs_kv.png", metrics)]
    speeds = {name: r["decode"] for name, r in results.items() if r.get("decode")}
    if speeds:
        paths.append(plot_decode_speed(speeds, folder / "decode_speed.png"))
    return paths + long_context_plots(results, folder)


def long_context_plots(results: dict[str, dict], folder: Path) -> list[Path]:
    """``longcontext_<model>.png`` per model that ran a retrieval task, ``ppl_by_position.png`` for all."""
    from .plots import plot_accuracy_heatmap, plot_perplexity_by_position

    paths, positions = [], {}
    for name, result in results.items():
        tasks = long_context_tasks(result)
        cells = {task: r["cells"] for task, r in tasks.items() if "cells" in r}
        if cells:
            safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
            paths.append(plot_accuracy_heatmap(cells, folder / f"longcontext_{safe}.png", title=name))
        if "ppl-position" in tasks:
            positions[name] = tasks["ppl-position"]["buckets"]
    if positions:
        paths.append(plot_perplexity_by_position(positions, folder / "ppl_by_position.png"))
    return paths


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """``columns``: (key, header). Floats get 4 significant decimals, None prints as an em dash."""

    def fmt(value):
        if value is None:
            return "—"
        if isinstance(value, float) and value.is_integer() and abs(value) >= 1:
            return str(int(value))
        if isinstance(value, float):
            return f"{value:.4g}" if abs(value) >= 1e-3 or value == 0 else f"{value:.3e}"
        return str(value)

    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(row.get(k)) for k, _ in columns) + " |" for row in rows]
    return "\n".join(lines)


def evaluate_checkpoints(
    models: dict[str, str],
    data,
    reference: str | None,
    max_tokens: int,
    window: int,
    batch_size: int = 1,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    loaded_models: dict | None = None,
) -> dict[str, dict]:
    """Load each checkpoint (name -> path) once, evaluate all on the same windows; adds measured KV bytes.
    ``loaded_models``, if given, receives the loaded models (name -> model) for further measurements."""
    from ..io.checkpoints import load_tokenizer
    from ..io.text import default_eval_files, load_token_ids, resolve_text_files
    from .metrics import evaluate_models, measure_kv_cache_bytes_per_token

    if max_tokens is not None and max_tokens < 2:
        raise ValueError(f"--max-tokens must be at least 2, got {max_tokens}")
    files = resolve_text_files(data or default_eval_files())
    first_path = next(iter(models.values()))
    tokenizer = load_tokenizer(reference or first_path)
    token_ids = load_token_ids(tokenizer, files, max_tokens)
    loaded = {name: load_for_eval(path, dtype, attn_implementation) for name, path in models.items()}
    ref_model = None
    if reference is not None:
        same = [name for name, path in models.items() if Path(path).resolve() == Path(reference).resolve()]
        ref_model = loaded[same[0]] if same else load_for_eval(reference, dtype, attn_implementation)
        vocab_ref = ref_model.get_output_embeddings().weight.shape[0]
        for name, model in loaded.items():
            if model.get_output_embeddings().weight.shape[0] != vocab_ref:
                raise ValueError(f"{name} and the reference have different vocabularies: KL is undefined")
    results = evaluate_models(loaded, token_ids, window=window, reference=ref_model, batch_size=batch_size)
    for name, model in loaded.items():
        results[name].update(
            model=str(models[name]),
            reference=None if reference is None else str(reference),
            num_key_value_heads=getattr(model.config, "num_key_value_heads", None),
            kv_cache_bytes_per_token=measure_kv_cache_bytes_per_token(model, token_ids[:16]),
            dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
            attn_implementation=model.config._attn_implementation,
            data=[str(f) for f in files[:50]] + ([f"... {len(files) - 50} more"] if len(files) > 50 else []),
            max_tokens=max_tokens,
        )
    if loaded_models is not None:
        loaded_models.update(loaded)
    return results


def load_for_eval(path: str, dtype: str, attn_implementation: str | None):
    """``load_causal_lm``; ``attn_implementation="auto"`` picks per checkpoint (``modeling.attention_for``:
    ``latent_sdpa`` for MLA exports, transformers' default for the rest)."""
    from transformers import AutoConfig

    from ..io.checkpoints import load_causal_lm
    from ..modeling import attention_for

    if attn_implementation == "auto":
        attn_implementation = attention_for(AutoConfig.from_pretrained(str(path)), "auto")
    return load_causal_lm(path, dtype, attn_implementation)


EVAL_COLUMNS = [
    ("name", "model"),
    ("num_key_value_heads", "KV heads"),
    ("kv_cache_bytes_per_token", "KV bytes/token (measured)"),
    ("perplexity", "perplexity"),
    ("kl_to_reference", "KL to reference (nats)"),
    ("top1_agreement", "top-1 agreement"),
    ("tokens", "scored tokens"),
]


def parse_model_specs(specs: list[str]) -> dict[str, str]:
    """``PATH`` or ``NAME=PATH`` -> {name: path} (name defaults to the folder name)."""
    models: dict[str, str] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or Path(spec).expanduser().exists():
            name, path = Path(spec).name, spec
        if name in models:
            raise ValueError(f"two models are named {name!r}: give them names with NAME=PATH")
        models[name] = path
    return models
