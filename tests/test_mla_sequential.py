"""Sequential calibration: carried inputs equal the original's where conversion is exact; it changes them when not."""

import copy

import torch

from hf_attn_swap.methods.mla import MLAConversionConfig
from hf_attn_swap.methods.mla.sequential import convert_to_mla_calibrated, input_correction
from hf_attn_swap.testing import tiny_model

TOKENS = torch.arange(3, 3 + 96) % 128
IDS = torch.randint(3, 128, (2, 14), generator=torch.Generator().manual_seed(1))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_exact_conversion_is_unchanged_by_sequential_calibration_and_correction():
    model = tiny_model("llama", num_attention_heads=4, num_key_value_heads=2).double()
    reference = logits(model)
    options = MLAConversionConfig(64, 16, rope_selection="freqfold", num_rope_key_heads=2, input_correction=True)
    report = convert_to_mla_calibrated(model, options, TOKENS, 48)
    assert report.details["calibration_order"] == "sequential"
    assert (logits(model) - reference).abs().max().item() < 1e-5  # activations are stored in float32


def test_sequential_order_differs_from_original_and_is_deterministic():
    source = tiny_model("llama", num_attention_heads=4, num_key_value_heads=2)
    outputs = {}
    for name, fields in {
        "original": dict(calibration_order="original"),
        "sequential": dict(),
        "corrected": dict(input_correction=True),
        "corrected again": dict(input_correction=True),
    }.items():
        model = copy.deepcopy(source)
        convert_to_mla_calibrated(model, MLAConversionConfig(12, 4, rope_selection="freqfold", **fields), TOKENS, 48)
        outputs[name] = logits(model)
    assert torch.equal(outputs["corrected"], outputs["corrected again"])
    for a, b in (("original", "sequential"), ("sequential", "corrected")):
        assert (outputs[a] - outputs[b]).abs().max().item() > 1e-5, (a, b)


def test_input_correction_is_the_least_squares_map():
    x = torch.randn(500, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    c = torch.randn(6, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(input_correction(x, x @ c.T, ridge=0.0), c, atol=1e-10)
    assert torch.allclose(input_correction(x, x, ridge=0.1), torch.eye(6, dtype=torch.float64), atol=1e-12)
