"""freqfold rope selection: exact where the math says so, ladder and fold validation."""

import copy

import pytest
import torch

from hf_attn_swap import convert_to_mla
from hf_attn_swap.methods.calibration import collect_attention_inputs
from hf_attn_swap.methods.mla import MLAConversionConfig
from hf_attn_swap.testing import tiny_model


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


IDS = torch.randint(3, 128, (2, 14), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kv", [1, 2])
def test_fold_one_every_pair_one_key_per_kv_head_full_rank_is_exact(kv):
    model = tiny_model("llama", num_attention_heads=4, num_key_value_heads=kv).double()
    reference = logits(model, IDS)
    calibration = collect_attention_inputs(model, torch.arange(3, 99) % 128, window=48)
    report = convert_to_mla(
        model, MLAConversionConfig(min(64, 2 * kv * 16), 16, rope_selection="freqfold", rope_fold=1,
                                   num_rope_key_heads=kv), calibration=calibration,
    )  # fmt: skip
    assert (logits(model, IDS) - reference).abs().max().item() < 1e-9
    assert report.details["rope_fold"] == 1 and model.config.rope_pairs is None  # the uniform ladder


def test_shared_key_is_exact_when_kv_heads_differ_by_a_rotation_per_frequency():
    """Complex mixing: head 1's pair p = head 0's pair p turned by an angle and scaled; one shared key is exact
    (a real per-pair mixing, RoRoPE, is not: the angle is different per pair)."""
    model = tiny_model("llama", num_attention_heads=4, num_key_value_heads=2).double()
    for layer in model.model.layers:
        k = layer.self_attn.k_proj.weight.data.view(2, 16, 64)
        angle = torch.linspace(0.3, 2.5, 8, dtype=torch.float64)[:, None]
        scale = torch.linspace(0.5, 2.0, 8, dtype=torch.float64)[:, None]
        first, second = k[0, :8], k[0, 8:]
        k[1, :8] = scale * (torch.cos(angle) * first - torch.sin(angle) * second)
        k[1, 8:] = scale * (torch.sin(angle) * first + torch.cos(angle) * second)
    reference = logits(model, IDS)
    folded, rotated = copy.deepcopy(model), copy.deepcopy(model)
    convert_to_mla(folded, MLAConversionConfig(64, 16, rope_selection="freqfold", rope_fold=1))
    assert (logits(folded, IDS) - reference).abs().max().item() < 1e-9
    convert_to_mla(rotated, MLAConversionConfig(64, 16, rope_selection="uniform"))
    assert (logits(rotated, IDS) - reference).abs().max().item() > 1e-4


def test_folding_keeps_more_key_energy_and_changes_the_model():
    model = tiny_model("llama", num_attention_heads=4, num_key_value_heads=2).double()
    calibration = collect_attention_inputs(model, torch.arange(3, 99) % 128, window=48)
    reference = logits(model, IDS)
    errors = {}
    for fold in (2, 4, 8):
        converted = copy.deepcopy(model)
        convert_to_mla(converted, MLAConversionConfig(64, 8, rope_selection="freqfold", rope_fold=fold),
                       calibration=calibration)  # fmt: skip
        errors[fold] = (logits(converted, IDS) - reference).abs().max().item()
    assert all(e > 1e-6 for e in errors.values()) and len(set(errors.values())) == 3, errors


@pytest.mark.parametrize("fold", [1, 3, 16])
def test_invalid_folds_raise_before_touching_the_model(fold):
    model = tiny_model("llama", num_attention_heads=4, num_key_value_heads=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="rope_fold=.* choose one of \\[2, 4, 8\\]"):
        convert_to_mla(model, MLAConversionConfig(32, 8, rope_selection="freqfold", rope_fold=fold))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize(
    "budget,split", [("0.5", (128, 64)), ("0.3125", (88, 32)), ("0.125", (32, 16)), ("120", (88, 32)), (48, (32, 16))]
)
def test_kv_budget_split_for_smollm2_shaped_heads(budget, split):
    from hf_attn_swap.methods.mla.budget import split_kv_budget

    ladders = [2 * m for m in range(1, 33) if 32 % m == 0]  # SmolLM2: 32 rotary pairs, no rope scaling
    values, rank, rope = split_kv_budget(str(budget), ladders, 384)
    assert (rank, rope) == split and values == rank + rope


@pytest.mark.parametrize("budget", ["0", "1.5", "abc", "-3", "400"])
def test_bad_kv_budgets_raise(budget):
    with pytest.raises(ValueError, match="kv_budget"):
        model = tiny_model("llama", num_attention_heads=4, num_key_value_heads=2)
        convert_to_mla(model, MLAConversionConfig(kv_budget=budget))


def test_kv_budget_converts_to_the_budget_and_records_the_split():
    model = tiny_model("llama", num_attention_heads=4, num_key_value_heads=2)  # 2 * 2 * 16 = 64 values
    report = convert_to_mla(model, MLAConversionConfig(kv_budget="0.5", rope_selection="freqfold"))
    assert report.after["kv_lora_rank"] + report.after["qk_rope_head_dim"] == 32
    assert report.after["qk_rope_head_dim"] == 8
    with pytest.raises(ValueError, match="not both"):
        MLAConversionConfig(kv_budget="0.5", kv_lora_rank=8)


def test_freqfold_with_sequential_calibration_is_deterministic_and_differs_from_original_order():
    from hf_attn_swap.methods.calibration import CalibrationText

    source = tiny_model("llama", num_attention_heads=4, num_key_value_heads=2)
    tokens = torch.arange(3, 99) % 128
    outputs = []
    for mode in ("sequential", "sequential", "original"):
        model = copy.deepcopy(source)
        convert_to_mla(model, MLAConversionConfig(kv_budget="0.25"), calibration=CalibrationText(tokens, 48, mode))
        outputs.append(logits(model, IDS))
    assert torch.equal(outputs[0], outputs[1])
    assert (outputs[0] - outputs[2]).abs().max().item() > 1e-5
