"""Uptraining recipe: a YAML config (``recipes/configs/*.yaml``) plus ``key=value`` overrides.

    python recipes/uptrain.py --config recipes/configs/smollm2_mqa_layerwise.yaml
    python recipes/uptrain.py --config recipes/configs/smollm2_mqa_distill.yaml max_tokens=65536 learning_rate=5e-5
    accelerate launch --config_file recipes/configs/accelerate_multi_gpu.yaml \\
        recipes/uptrain.py --config recipes/configs/smollm2_mqa_distill.yaml bf16=true

When ``model`` does not exist yet and the config has a ``convert:`` section, the model is first converted from
``convert.source`` (``example:smollm2`` = the packaged SmolLM2) with ``hf_attn_swap.pipeline.convert.convert_checkpoint``;
the other keys of the section are its arguments: ``to: gqa`` with ``num_key_value_heads``/``method`` (``GQAConversionConfig``),
``to: mla`` with ``mla: {...}`` (``MLAConversionConfig``), ``calibration_data``/``calibration_tokens``
(``hf_attn_swap.pipeline.train.build_model``; the training settings are checked before the conversion starts). The
rest of the YAML is an ``UptrainConfig`` (read with ``HfArgumentParser.parse_dict``). Rerunning an interrupted recipe
resumes it. Same engine as ``hf-attn-swap uptrain --config`` (which honours the ``convert:`` section too).
"""

from __future__ import annotations

import json
import sys


def main(argv: list[str] | None = None) -> int:
    from hf_attn_swap.cli import recipe_parser
    from hf_attn_swap.io.recipes import parse_recipe
    from hf_attn_swap.pipeline.train import build_model
    from hf_attn_swap.uptrain import UptrainConfig, uptrain

    args = recipe_parser("recipes/uptrain.py", __doc__).parse_args(argv)
    # HfArgumentParser.parse_dict: one UptrainConfig, validated by its __post_init__
    (config,) = parse_recipe(args.config, args.overrides, (UptrainConfig,), required=("model", "output"))
    build_model(config)  # the settings are checked, then MODEL is converted if the config says how
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
