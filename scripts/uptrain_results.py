"""Markdown table of an ``hf-attn-swap eval`` JSON over converted and uptrained checkpoints, joined with the
training records each checkpoint's ``conversion.json`` carries (mode, tokens, wall time). No typed numbers:
every cell comes from the two files.

    python scripts/uptrain_results.py runs/uptrain_eval.json [more.json ...] > runs/uptrain_results.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def conversion_record(folder: str) -> dict:
    path = Path(folder) / "conversion.json"
    return json.loads(path.read_text()) if path.exists() else {}


def describe_conversion(record: dict) -> str:
    if not record:
        return "original"
    after = record.get("after", {})
    if record.get("target") == "mla":
        return (
            f"MLA {record.get('method')} r={after.get('kv_lora_rank')} d_rope={after.get('qk_rope_head_dim')}"
        )
    return f"{record.get('method')} → {after.get('num_key_value_heads')} KV head(s)"


def rows(models: dict) -> list[list[str]]:
    table = []
    for name, result in models.items():
        record = conversion_record(result["model"])
        training = record.get("training") or []
        trained = (
            " + ".join(
                f"{t['mode']} {t['tokens_trained'] // 1024}k (lr {t['learning_rate']:g})" for t in training
            )
            or "—"
        )
        wall = " + ".join(f"{t['wall_seconds']:.0f}" for t in training) or "—"
        tasks = result.get("lm_eval") or {}
        mc = tasks.get("hfas_text_mc", {}).get("acc")
        last = tasks.get("hfas_text_lastword", {}).get("acc")
        table.append(
            [
                name,
                describe_conversion(record),
                f"{result['kv_cache_bytes_per_token']:.0f}",
                trained,
                wall,
                f"{result['perplexity']:.4g}"
                if result["perplexity"] < 1e4
                else f"{result['perplexity']:.0f}",
                f"{result['kl_to_reference']:.3f}",
                f"{result['top1_agreement']:.3f}",
                "—" if mc is None else f"{mc:.2f}",
                "—" if last is None else f"{last:.2f}",
            ]
        )
    return table


HEADER = [
    "model",
    "conversion",
    "KV bytes/token (measured)",
    "uptraining (mode, tokens, lr)",
    "uptrain wall s",
    "perplexity",
    "KL to original (nats)",
    "top-1 agreement",
    "hfas_text_mc acc",
    "hfas_text_lastword acc",
]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("eval_json", nargs="+", help="outputs of `hf-attn-swap eval NAME=PATH... --json`")
    models = {}
    for path in parser.parse_args().eval_json:
        models.update(json.loads(Path(path).read_text())["models"])
    print("| " + " | ".join(HEADER) + " |")
    print("|" + "---|" * len(HEADER))
    for row in rows(models):
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
