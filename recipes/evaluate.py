"""Evaluation recipe: several checkpoints -> JSON + markdown table + PNG plots, from a YAML config.

    python recipes/evaluate.py --config recipes/configs/evaluate_smollm2.yaml
    python recipes/evaluate.py --config recipes/configs/evaluate_smollm2.yaml max_tokens=2048 tasks=null

Config keys: ``models`` (name -> folder; ``example:smollm2`` for the packaged original), ``output`` (folder), and
the options of ``hf-attn-swap eval`` with the same defaults (``hf_attn_swap.pipeline.evaluate``): ``data``
(held-out text; default the Python tutorial), ``max_tokens``, ``window`` (``EvalDataConfig``), ``reference``,
``batch_size``, ``dtype``, ``attn_implementation``, ``tasks`` (lm-eval: the offline ``hfas_text_mc`` /
``hfas_text_lastword``, a task YAML, or registry names such as ``hellaswag`` when online), ``task_limit``,
``num_fewshot``, ``decode_contexts``, ``new_tokens`` (``EvalConfig``). Read with ``HfArgumentParser.parse_dict``.
"""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

from hf_attn_swap.pipeline.evaluate import EvalConfig, EvalDataConfig, EvalRecipe

#: the suite options a config may set besides models / reference / output
SUITE_KEYS = tuple(
    f.name for cls in (EvalDataConfig, EvalConfig) for f in dataclasses.fields(cls) if f.name != "reference"
)


def main(argv: list[str] | None = None) -> int:
    from hf_attn_swap.cli import recipe_parser
    from hf_attn_swap.evaluate.suite import suite_markdown, suite_plots
    from hf_attn_swap.io.folders import atomic_write_text, check_output_folder, machine_info, write_json
    from hf_attn_swap.io.recipes import load_recipe_yaml, parse_settings, resolve_source
    from hf_attn_swap.pipeline.evaluate import run_suite

    args = recipe_parser("recipes/evaluate.py", __doc__).parse_args(argv)
    config = load_recipe_yaml(args.config, args.overrides, required=("models",))
    recipe, data, suite = parse_settings(
        config, (EvalRecipe, EvalDataConfig, EvalConfig), Path(args.config).name
    )
    output = check_output_folder(recipe.output, "output")
    missing = [f"{n} ({p})" for n, p in recipe.models.items() if not _is_example(p) and not Path(p).exists()]
    if missing:
        raise FileNotFoundError(f"missing checkpoints: {', '.join(missing)} (convert/uptrain them first)")
    models = {name: str(resolve_source(path)) for name, path in recipe.models.items()}
    if suite.reference:
        suite = dataclasses.replace(suite, reference=str(resolve_source(suite.reference)))
    results = run_suite(models, data, suite)
    table = suite_markdown(results)
    print(table)
    write_json(
        output / "eval.json",
        {"models": results, "config": config, "command": sys.argv, "machine": machine_info()},
    )
    atomic_write_text(output / "eval.md", f"{table}\n\nCommand: `{' '.join(sys.argv)}`\n")
    for path in suite_plots(results, output):
        print(f"wrote {path}")
    print(f"wrote {output / 'eval.json'} and {output / 'eval.md'}")
    return 0


def _is_example(path: str) -> bool:
    return str(path).startswith("example:")


if __name__ == "__main__":
    from hf_attn_swap.cli import run_script

    sys.exit(run_script("recipes/evaluate.py", main))  # bad input: one line, exit 2
