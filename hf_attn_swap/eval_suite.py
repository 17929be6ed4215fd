"""Several checkpoints, one report: perplexity / KL / measured KV bytes (``evaluate_checkpoints``), lm-eval
tasks, decode tokens/s at several context lengths; as JSON-ready dicts, a markdown table and PNG plots."""

from __future__ import annotations

from pathlib import Path


def evaluate_suite(
    models: dict[str, str],
    data=None,
    reference: str | None = None,
    max_tokens: int = 4096,
    window: int = 1024,
    batch_size: int = 1,
    dtype: str = "float32",
    attn_implementation: str | None = None,
    tasks: list[str] | None = None,
    task_limit: int | float | None = None,
    num_fewshot: int | None = None,
    task_data=None,
    decode_contexts: list[int] | None = None,
    new_tokens: int = 32,
) -> dict[str, dict]:
    """name -> metrics. Always: the ``eval`` keys (perplexity, tokens, kl_to_reference,
    kv_cache_bytes_per_token, ...). With ``tasks``: ``lm_eval`` = {task: {metric: value}}. With
    ``decode_contexts``: ``decode`` = [{context, decode_tokens_per_second, ...}]."""
    from .checkpoint import load_causal_lm, load_tokenizer
    from .cli import evaluate_checkpoints

    results = evaluate_checkpoints(
        models, data, reference, max_tokens, window, batch_size, dtype, attn_implementation
    )
    if not tasks and not decode_contexts:
        return results
    from .lm_eval_tasks import run_lm_eval
    from .speed import measure_decode_speed

    for name, path in models.items():
        model = load_causal_lm(path, dtype, attn_implementation)
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
        del model
    return results


def flat_row(name: str, result: dict) -> dict:
    """One table row: the plain metrics plus ``<task> <metric>`` and ``tok/s @<context>`` columns."""
    row = {"name": name, **{k: v for k, v in result.items() if not isinstance(v, (dict, list))}}
    for task, metrics in (result.get("lm_eval") or {}).items():
        for metric, value in metrics.items():
            if metric != "samples":
                row[f"{task} {metric}"] = value
    for speed in result.get("decode") or []:
        row[f"tok/s @{speed['context']}"] = speed["decode_tokens_per_second"]
    return row


def suite_markdown(results: dict[str, dict]) -> str:
    from .cli import EVAL_COLUMNS, markdown_table

    rows = [flat_row(name, r) for name, r in results.items()]
    extra = []
    for row in rows:
        extra += [k for k in row if (" " in k and k not in extra and k not in dict(EVAL_COLUMNS))]
    columns = EVAL_COLUMNS + [(k, k) for k in extra]
    return markdown_table(rows, columns)


def suite_plots(results: dict[str, dict], folder) -> list[Path]:
    """``quality_vs_kv.png`` (perplexity and each task's first metric vs measured KV bytes/token) and,
    when decode speed was measured, ``decode_speed.png``."""
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
    return paths
