"""PNG figures (matplotlib, headless): uptraining loss curves, quality vs KV budget, decode speed vs context,
long-context retrieval accuracy (length x depth), perplexity by position and served speed / memory against the
roofline (``bench``)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path, tight: bool = True) -> Path:
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    if tight:  # False for figures made with layout="constrained" (a colorbar shared by several panels)
        fig.tight_layout()
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
    return path


def plot_loss_curve(
    log_history: list[dict], tokens_per_step: int, path, title: str = "uptraining loss"
) -> Path:
    """Training loss (Trainer ``log_history`` entries with ``loss``) against training tokens."""
    plt = _pyplot()
    points = [(e["step"] * tokens_per_step, e["loss"]) for e in log_history if "loss" in e and "step" in e]
    fig, ax = plt.subplots(figsize=(6, 4))
    if points:
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, marker="." if len(xs) < 50 else None)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_quality_vs_kv(results: dict[str, dict], path, metrics: list[tuple[str, str]] | None = None) -> Path:
    """One panel per metric (key, label): each model is a labelled point at its measured KV bytes/token.

    ``results``: model name -> flat metrics (``kv_cache_bytes_per_token`` plus the metric keys).
    Perplexity is drawn on a log axis.
    """
    plt = _pyplot()
    metrics = metrics or [("perplexity", "perplexity")]
    metrics = [(k, label) for k, label in metrics if any(r.get(k) is not None for r in results.values())]
    metrics = metrics or [("perplexity", "perplexity")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4), squeeze=False)
    for ax, (key, label) in zip(axes[0], metrics, strict=True):
        for name, r in results.items():
            x, y = r.get("kv_cache_bytes_per_token"), r.get(key)
            if x is None or y is None:
                continue
            ax.scatter([x], [y])
            ax.annotate(name, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
        if key == "perplexity":
            ax.set_yscale("log")
        ax.set_xlabel("KV cache bytes / token (measured)")
        ax.set_ylabel(label)
        ax.set_title(f"{label} vs KV budget")
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_decode_speed(results: dict[str, list[dict]], path) -> Path:
    """Decode tokens/s against context length, one line per model (``results``: name -> speed rows)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, rows in results.items():
        rows = sorted(rows, key=lambda r: r["context"])
        ax.plot(
            [r["context"] for r in rows],
            [r["decode_tokens_per_second"] for r in rows],
            marker="o",
            label=name,
        )
    ax.set_xscale("log", base=2)
    ax.set_xlabel("context (tokens)")
    ax.set_ylabel("decode tokens / s")
    ax.set_title("decode speed vs context")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_accuracy_heatmap(tasks: dict[str, list[dict]], path, title: str = "") -> Path:
    """One panel per retrieval task: accuracy per (context length, needle depth) cell, annotated.

    ``tasks``: task -> cells ``{"length", "depth", "accuracy"}`` (``longcontext.run_retrieval``'s ``cells``)."""
    plt = _pyplot()
    fig, axes = plt.subplots(
        1, len(tasks), figsize=(1.6 + 3.6 * len(tasks), 3.8), squeeze=False, layout="constrained"
    )
    for ax, (task, cells) in zip(axes[0], tasks.items(), strict=True):
        lengths = sorted({c["length"] for c in cells})
        depths = sorted({c["depth"] for c in cells})
        grid = [[float("nan")] * len(lengths) for _ in depths]
        for c in cells:
            grid[depths.index(c["depth"])][lengths.index(c["length"])] = c["accuracy"]
        image = ax.imshow(grid, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto", origin="upper")
        for row, column in ((r, k) for r in range(len(depths)) for k in range(len(lengths))):
            ax.text(column, row, f"{grid[row][column]:.2f}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths])
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{title} {task}".strip(), fontsize=10)
    fig.colorbar(image, ax=axes[0].tolist(), label="accuracy", shrink=0.8)
    return _save(fig, path, tight=False)


def plot_perplexity_by_position(results: dict[str, list[dict]], path) -> Path:
    """Perplexity per position bucket, one line per model (``results``: name -> ``{"start", "end",
    "perplexity"}`` buckets), drawn at each bucket's middle on a log axis."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, buckets in results.items():
        points = [((b["start"] + b["end"]) / 2, b["perplexity"]) for b in buckets if b["perplexity"]]
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=name)
    ax.set_yscale("log")
    ax.set_xlabel("position in the sequence (tokens, bucket middle)")
    ax.set_ylabel("perplexity")
    ax.set_title("perplexity by position")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_serving(rows: list[dict], path) -> Path:
    """``bench`` rows (one per model and context): decode tokens/s with each model's roofline (dashed), prefill
    tokens/s, and the sequences a KV budget holds, against context, one line per model."""
    plt = _pyplot()
    rows = [r for r in rows if not r.get("error")]
    panels = [
        ("decode_tokens_per_second", "decode tokens / s (dashed: roofline)"),
        ("prefill_tokens_per_second", "prefill tokens / s"),
        (
            "max_batch_at_budget",
            f"sequences in {rows[0]['kv_budget_mib']:g} MiB of KV" if rows else "sequences",
        ),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for name in dict.fromkeys(r["model"] for r in rows):
        mine = sorted((r for r in rows if r["model"] == name), key=lambda r: r["context"])
        contexts = [r["context"] for r in mine]
        for ax, (key, _) in zip(axes, panels, strict=True):
            line = ax.plot(contexts, [r[key] for r in mine], marker="o", label=name)[0]
            if key == "decode_tokens_per_second":
                ax.plot(
                    contexts, [r["roofline_tokens_per_second"] for r in mine], ls="--", color=line.get_color()
                )
    runtime = rows[0]["runtime"] if rows else ""
    for ax, (_, label) in zip(axes, panels, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(label)
        ax.set_title(f"{runtime}: {label.split(' (')[0]}", fontsize=10)
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=7)
    return _save(fig, path)
