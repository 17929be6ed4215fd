"""One validated options dataclass per job: the Python API, the CLI (HfArgumentParser), the YAML recipes and
conversion.json share its defaults; bad values fail on construction with one line."""

from __future__ import annotations

import dataclasses
import inspect
import json

import pytest
import torch
import yaml
from transformers import HfArgumentParser

from hf_attn_swap import convert_to_gqa, convert_to_mla
from hf_attn_swap.cli import COMMANDS, build_parser, main, parse
from hf_attn_swap.evaluate.suite import EVAL_DEFAULTS
from hf_attn_swap.methods.calibration import CalibrationConfig
from hf_attn_swap.methods.gqa import GQAConversionConfig
from hf_attn_swap.methods.mla import MLAConversionConfig
from hf_attn_swap.pipeline.convert import convert_checkpoint
from hf_attn_swap.pipeline.evaluate import EvalDataConfig
from hf_attn_swap.testing import tiny_model
from hf_attn_swap.uptrain import UptrainConfig

OPTION_CLASSES = sorted({cls for command in COMMANDS.values() for cls in command.options}, key=str)


@pytest.mark.parametrize("cls", OPTION_CLASSES, ids=lambda c: c.__name__)
def test_every_field_has_help_and_plain_hf_argument_parser_reads_the_class(cls):
    assert all(f.metadata.get("help") for f in dataclasses.fields(cls)), cls
    HfArgumentParser(cls)  # what parse_dict / the recipes build


def defaults(function, names):
    parameters = inspect.signature(function).parameters
    return {name: parameters[name].default for name in names}


def test_python_api_defaults_are_the_config_defaults():
    mla = MLAConversionConfig()
    names = ["rope_selection", "factorization", "num_rope_key_heads", "rank_allocation", "balance_kv"]
    assert defaults(convert_to_mla, names) == {n: getattr(mla, n) for n in names}
    assert (
        mla.rope_selection == "freqfold" and mla.factorization is None
    )  # README: freqfold; pca when calibrated
    assert defaults(convert_to_gqa, ["method"]) == {"method": GQAConversionConfig().method}
    calibration = CalibrationConfig()
    assert defaults(convert_checkpoint, ["method", "calibration_tokens", "calibration_window"]) == {
        "method": GQAConversionConfig().method,
        "calibration_tokens": calibration.calibration_tokens,
        "calibration_window": calibration.calibration_window,
    }
    assert EvalDataConfig().max_tokens == EVAL_DEFAULTS["max_tokens"]


def test_cli_defaults_are_the_config_defaults():
    _, (args, gqa, mla, calibration) = parse(["convert", "SRC", "OUT", "--to", "mla"])
    assert (gqa, mla, calibration) == (GQAConversionConfig(), MLAConversionConfig(), CalibrationConfig())
    _, (_, data, *_) = parse(["eval", "MODEL"])
    assert data == EvalDataConfig()
    _, (config, _) = parse(["uptrain", "MODEL", "OUT"])
    assert config == UptrainConfig(model="MODEL", output="OUT")


def test_cli_spellings_switches_and_positionals():
    _, (args, gqa, mla, calibration) = parse(
        ["convert", "--overwrite", "S", "O", "--to", "mla", "--rope-dim", "8", "--kv-lora-rank", "24"]
        + ["--no-balance-kv", "--calibration-data", "a.txt", "b.txt"]
    )
    assert args.overwrite and (args.src, args.out) == ("S", "O")
    assert (mla.kv_lora_rank, mla.qk_rope_head_dim, mla.balance_kv) == (24, 8, False)
    assert calibration.calibration_data == ["a.txt", "b.txt"]
    _, (_, gqa, *_) = parse(["convert", "S", "O", "--to", "gqa", "--num-key-value-heads", "2"])
    assert gqa.num_key_value_heads == 2
    _, (config, _) = parse(["uptrain", "M", "O", "--lr", "3e-4", "--no-resume", "--bf16"])
    assert (config.learning_rate, config.resume, config.bf16) == (3e-4, False, True)
    with pytest.raises(SystemExit):  # argparse's own usage errors stay exit 2
        build_parser().parse_args(["convert", "S", "O", "--to", "mla", "--format", "stock"])


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: MLAConversionConfig(rope_selection="middle"), "unknown rope selection 'middle'"),
        (lambda: MLAConversionConfig(factorization="qr"), "unknown factorization 'qr'"),
        (lambda: MLAConversionConfig(format="stock"), "unknown format 'stock'"),
        (lambda: MLAConversionConfig(kv_lora_rank=8.0), "kv_lora_rank must be an int"),
        (lambda: GQAConversionConfig(1, "median"), "unknown GQA method 'median'"),
        (lambda: GQAConversionConfig(1.5), "num_key_value_heads must be an int"),
        (lambda: CalibrationConfig(calibration_tokens=0), "calibration_tokens must be a positive"),
        (lambda: UptrainConfig(learning_rate="fast"), "learning_rate must be a number"),
    ],
)
def test_bad_values_fail_on_construction_with_one_line(build, message):
    with pytest.raises(ValueError, match=message) as err:
        build()
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["convert", "S", "O", "--to", "mla", "--rope-selection", "middle"], "unknown rope selection"),
        (["convert", "S", "O", "--to", "gqa", "--num-kv-heads", "1", "--method", "median"], "unknown GQA"),
        (["convert", "S", "O", "--to", "gqa", "--calibration-tokens", "0"], "calibration_tokens must be"),
    ],
)
def test_cli_rejects_invalid_options_in_one_line(tmp_path, capsys, argv, message):
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"hf-attn-swap {argv[0]}: error: ") and message in err[0]


def test_config_objects_are_the_loose_arguments():
    ids = torch.randint(3, 128, (1, 10), generator=torch.Generator().manual_seed(0))
    loose, boxed = (tiny_model("llama", num_attention_heads=4, num_key_value_heads=2) for _ in range(2))
    boxed.load_state_dict(loose.state_dict())
    a = convert_to_mla(loose, 12, 4, rope_selection="uniform")
    b = convert_to_mla(boxed, MLAConversionConfig(12, 4, rope_selection="uniform"))
    assert a.to_dict() == b.to_dict()
    with torch.no_grad():
        assert torch.equal(loose(ids).logits, boxed(ids).logits)
    with pytest.raises(ValueError, match="not both"):
        convert_to_mla(tiny_model("llama"), MLAConversionConfig(12, 4), rope_selection="low")
    model = tiny_model("llama", num_attention_heads=4, num_key_value_heads=4)
    assert convert_to_gqa(model, GQAConversionConfig(2)).after == {"num_key_value_heads": 2}


def test_conversion_json_records_the_options(saved_tiny, tmp_path):
    src = saved_tiny("llama", num_attention_heads=4, num_key_value_heads=4)
    convert_checkpoint(src, tmp_path / "gqa", GQAConversionConfig(2))
    details = json.loads((tmp_path / "gqa" / "conversion.json").read_text())["details"]
    assert details["options"] == dataclasses.asdict(GQAConversionConfig(2, "mean"))
    convert_checkpoint(
        src, tmp_path / "mla", "mla", mla={"kv_lora_rank": 9, "qk_rope_head_dim": 8, "factorization": "svd"}
    )
    details = json.loads((tmp_path / "mla" / "conversion.json").read_text())["details"]
    expected = MLAConversionConfig(9, 8, factorization="svd")
    assert details["options"] == dataclasses.asdict(expected) and details["calibration_data"] is None
    with pytest.raises(ValueError, match="unknown MLA option"):
        convert_checkpoint(src, tmp_path / "x", "mla", mla={"rank": 8})


def test_uptrain_flags_override_the_recipe_and_unknown_keys_are_named(tmp_path, capsys):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"mode": "lora", "learning_rate": "1e-3", "data": "t.txt", "lora_r": 4}))
    _, (config, command) = parse(["uptrain", "M", "O", "--config", str(recipe), "--lora-r", "8"])
    assert (config.mode, config.learning_rate, config.data, config.lora_r) == ("lora", 1e-3, ["t.txt"], 8)
    assert command.config == str(recipe)
    recipe.write_text("mode: lora\nlearnig_rate: 1.0e-3\n")
    assert main(["uptrain", "M", "O", "--config", str(recipe)]) == 2
    assert "unknown uptrain setting(s) ['learnig_rate']" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown uptrain setting"):
        UptrainConfig.from_dict({"learnig_rate": 1})
