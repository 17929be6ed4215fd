"""Evaluation recipe: several checkpoints -> JSON + markdown table + PNG plots, from a YAML config.

    python recipes/evaluate.py --config recipes/configs/evaluate_smollm2.yaml
    python recipes/evaluate.py --config recipes/configs/evaluate_smollm2.yaml max_tokens=2048 tasks=null

Config keys: ``models`` (name -> folder; ``example:smollm2`` for the packaged original), ``reference``,
``data`` (held-out text; default the Python tutorial), ``max_tokens``, ``window``, ``tasks`` (lm-eval: the
offline ``hfas_text_mc`` / ``hfas_text_lastword``, a task YAML, or registry names such as ``hellaswag`` when
online), ``task_limit``, ``num_fewshot``, ``decode_contexts``, ``new_tokens``, ``output`` (folder).
Same engine as ``hf-attn-swap eval`` (``hf_attn_swap.evaluate.suite``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SUITE_KEYS = (
    "data",
    "max_tokens",
    "window",
    "batch_size",
    "dtype",
    "attn_implementation",
    "tasks",
    "task_limit",
    "num_fewshot",
    "decode_contexts",
    "new_tokens",
)


def main(argv: list[str] | None = None) -> int:
    from hf_attn_swap.evaluate.suite import evaluate_suite, suite_markdown, suite_plots
    from hf_attn_swap.io.folders import machine_info, write_json
    from hf_attn_swap.uptrain.config import load_recipe_yaml, resolve_source

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="YAML config")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    config = load_recipe_yaml(args.config, args.overrides, required=("models",))
    unknown = set(config) - {"models", "reference", "output", *SUITE_KEYS}
    if unknown:
        raise SystemExit(f"unknown keys in {args.config}: {sorted(unknown)}")
    models = {name: str(resolve_source(path)) for name, path in config["models"].items()}
    reference = str(resolve_source(config["reference"])) if config.get("reference") else None
    missing = [f"{n} ({p})" for n, p in models.items() if not Path(p).exists()]
    if missing:
        raise SystemExit(f"missing checkpoints: {', '.join(missing)} (convert/uptrain them first)")
    results = evaluate_suite(models, reference=reference, **{k: config[k] for k in SUITE_KEYS if k in config})
    output = Path(config.get("output", "runs/evaluate")).expanduser()
    table = suite_markdown(results)
    print(table)
    write_json(
        output / "eval.json",
        {"models": results, "config": config, "command": sys.argv, "machine": machine_info()},
    )
    (output / "eval.md").write_text(f"{table}\n\nCommand: `{' '.join(sys.argv)}`\n")
    for path in suite_plots(results, output):
        print(f"wrote {path}")
    print(f"wrote {output / 'eval.json'} and {output / 'eval.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
