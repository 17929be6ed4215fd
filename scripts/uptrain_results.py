"""The uptraining table: ``hf-attn-swap eval`` JSONs over converted and uptrained checkpoints (the first on the main
text, each further one adds its text's perplexity and KL), joined with the training records each checkpoint's
``conversion.json`` carries (mode, tokens, learning rate, wall time). No typed numbers: every cell comes from those
files. ``--json`` writes columns, rows, the eval commands and the machine for ``scripts/tables.py --add``.

    python scripts/uptrain_results.py runs/uptrain-sweep/eval_tutorial.json runs/uptrain-sweep/eval_gpl3.json \
        --json runs/uptrain-sweep/uptrain.json > runs/uptrain-sweep/uptrain_results.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def conversion_record(folder: str) -> dict:
    path = Path(folder) / "conversion.json"
    return json.loads(path.read_text()) if path.exists() else {}


def describe_conversion(record: dict) -> str:
    if not record:
        return "original"
    after = record.get("after", {})
    if record.get("target") == "mla":
        return f"MLA {record.get('method')} r {after.get('kv_lora_rank')} + d_rope {after.get('qk_rope_head_dim')}"
    return f"{record.get('method')} → {after.get('num_key_value_heads')} KV head(s)"


def text_name(result: dict) -> str:
    """'tutorial' for a folder's files, the file name for one file."""
    files = [Path(f) for f in result.get("data") or []]
    if not files:
        return "text"
    return files[0].name if len(files) == 1 else files[0].parent.name


def training(record: dict) -> tuple[str, str, int]:
    steps = record.get("training") or []
    trained = " + ".join(f"{t['mode']} {t['tokens_trained'] // 1024}k (lr {t['learning_rate']:g})" for t in steps)
    wall = " + ".join(f"{t['wall_seconds']:.0f}" for t in steps)
    return trained or "—", wall or "—", sum(t["tokens_trained"] for t in steps)


def ppl(value: float) -> str:
    return f"{value:.4g}" if value < 1e4 else f"{value:.0f}"


def table(evals: list[dict]) -> tuple[list[str], list[list]]:
    """Columns and rows: one row per model of the first eval, perplexity / KL / top-1 per text."""
    main = evals[0]["models"]
    texts = [text_name(next(iter(e["models"].values()))) for e in evals]
    columns = ["model", "conversion", "KV bytes/token (measured)", "uptraining (mode, tokens, lr)",
               "training tokens", "uptrain wall s"]  # fmt: skip
    for i, text in enumerate(texts):
        columns += [f"perplexity, {text}", f"KL, {text}"] + ([f"top-1, {text}"] if i == 0 else [])
    rows = []
    for name, result in main.items():
        record = conversion_record(result["model"])
        trained, wall, tokens = training(record)
        row = [name, describe_conversion(record),
               round(result["kv_cache_bytes_per_token"]), trained, tokens, wall]  # fmt: skip
        for i, other in enumerate(e["models"].get(name) for e in evals):
            if other is None:
                raise SystemExit(f"model {name!r} is missing from eval JSON {i + 1}: evaluate the same models")
            row += [ppl(other["perplexity"]), round(other["kl_to_reference"], 4)]
            row += [round(other["top1_agreement"], 4)] if i == 0 else []
        rows.append(row)
    return columns, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("eval_json", nargs="+", help="outputs of `hf-attn-swap eval NAME=PATH... --json`")
    parser.add_argument("--json", help="also write columns, rows, commands and machine here")
    args = parser.parse_args()
    evals = [json.loads(Path(path).read_text()) for path in args.eval_json]
    columns, rows = table(evals)
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")
    if args.json:
        payload = {
            "columns": columns,
            "rows": rows,
            "evals": [{"file": p, "command": e.get("command")} for p, e in zip(args.eval_json, evals, strict=True)],
            "command": [sys.executable, *sys.argv],
            "machine": evals[0].get("machine"),
            "commit": (evals[0].get("machine") or {}).get("commit"),
        }
        Path(args.json).write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
