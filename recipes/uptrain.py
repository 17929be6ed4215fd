"""Uptraining recipe: a YAML config (``recipes/configs/*.yaml``) plus ``key=value`` overrides.

    python recipes/uptrain.py --config recipes/configs/smollm2_mqa_layerwise.yaml
    python recipes/uptrain.py --config recipes/configs/smollm2_mqa_distill.yaml max_tokens=65536 learning_rate=5e-5
    accelerate launch --config_file recipes/configs/accelerate_multi_gpu.yaml \\
        recipes/uptrain.py --config recipes/configs/smollm2_mqa_distill.yaml bf16=true

When ``model`` does not exist yet and the config has a ``convert:`` section, the model is first converted from
``convert.source`` (``example:smollm2`` = the packaged SmolLM2) with ``hf_attn_swap.pipeline.convert.convert_checkpoint``;
the other keys of the section are its arguments: ``to: gqa`` with ``num_key_value_heads``/``method`` (``GQAConversionConfig``),
``to: mla`` with ``mla: {...}`` (``MLAConversionConfig``), ``calibration_data``/``calibration_tokens``. The rest of
the YAML is an ``UptrainConfig`` (read with ``HfArgumentParser.parse_dict``). Rerunning an interrupted recipe resumes
it. Same engine as ``hf-attn-swap uptrain`` (``hf_attn_swap.uptrain.uptrain``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def convert_if_missing(model: str, convert: dict | None) -> None:
    """Build ``model`` from the ``convert:`` section (once, on the main process) if it does not exist."""
    from accelerate import PartialState

    from hf_attn_swap.io.recipes import resolve_source
    from hf_attn_swap.pipeline.convert import convert_checkpoint
    from hf_attn_swap.uptrain.run import cpu_only

    if Path(model).expanduser().exists():
        return
    if not convert:
        raise FileNotFoundError(f"model {model!r} does not exist and the config has no convert: section")
    options = dict(convert)
    source = resolve_source(options.pop("source"))
    state = PartialState(cpu=cpu_only())
    with state.main_process_first():
        if state.is_main_process and not Path(model).expanduser().exists():
            print(convert_checkpoint(source, model, **options), file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    from hf_attn_swap.io.recipes import parse_recipe
    from hf_attn_swap.uptrain import UptrainConfig, uptrain

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", required=True, help="YAML recipe")
    parser.add_argument("overrides", nargs="*", metavar="key=value")
    args = parser.parse_args(argv)
    # HfArgumentParser.parse_dict: one UptrainConfig, validated by its __post_init__
    (config,) = parse_recipe(args.config, args.overrides, (UptrainConfig,), required=("model", "output"))
    convert_if_missing(config.model, config.convert)
    record = uptrain(config)
    if record is not None:  # main process
        keys = (
            "mode",
            "tokens_trained",
            "steps",
            "first_loss",
            "final_loss",
            "wall_seconds",
            "eval_before",
            "eval_after",
        )
        print(json.dumps({k: record[k] for k in keys}, indent=2))
    return 0


if __name__ == "__main__":
    from hf_attn_swap.cli import run_script

    sys.exit(run_script("recipes/uptrain.py", main))  # bad input: one line, exit 2
