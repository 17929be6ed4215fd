"""Families users convert, into the stock deepseek_v3 format: biased sources (Qwen2's q/k/v biases, Llama's
``attention_bias``) with their biases folded into the weights, and rope-scaled sources (Llama-3's ``llama3``,
YaRN) on the frequencies their scaling leaves unchanged. What cannot be expressed is refused before any work."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from hf_attn_swap import convert_to_mla
from hf_attn_swap.adapters import get_adapter
from hf_attn_swap.cli import main
from hf_attn_swap.export import to_deepseek_v3
from hf_attn_swap.io.checkpoints import load_tokenizer
from hf_attn_swap.io.text import default_train_files, load_token_ids
from hf_attn_swap.methods.calibration import CalibrationText
from hf_attn_swap.methods.mla import MLAConversionConfig
from hf_attn_swap.methods.mla.biasfold import (
    ROPE_BIAS_WAVELENGTH,
    BiasFold,
    constant_direction,
    fold_column,
    fold_rope_key,
    value_bias,
)
from hf_attn_swap.testing import save_tiny_checkpoint, tiny_model

LLAMA3 = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 2048}  # fmt: skip
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 8192}


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


# -- the fold's pieces ------------------------------------------------------------------------------------------
def test_constant_direction_is_exact_when_the_inputs_have_one():
    """Rows with a constant coordinate (and noise elsewhere): u.x = 1 on every row, to the ridge's size."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, generator=generator, dtype=torch.float64)
    x[:, 3] = 2.5
    u, error = constant_direction(x, None, 0.0)
    assert error < 1e-5 and torch.allclose(x @ u, torch.ones(200, dtype=torch.float64), atol=1e-5)
    weights = torch.rand(200, generator=generator, dtype=torch.float64)
    u_w, error_w = constant_direction(x, weights, 1.0)
    assert error_w < 1e-5
    # without a constant direction the fit is only approximate, and the error says so
    _, noisy = constant_direction(torch.randn(200, 12, generator=generator, dtype=torch.float64), None, 0.0)
    assert noisy > 0.5


def test_fold_column_moves_the_bias_into_the_weights():
    generator = torch.Generator().manual_seed(1)
    rows = torch.randn(3, 5, 9, generator=generator, dtype=torch.float64)  # [..., hidden + 1]
    x = torch.randn(7, 8, generator=generator, dtype=torch.float64)
    x[:, 0] = 4.0
    u = torch.zeros(8, dtype=torch.float64)
    u[0] = 0.25  # u.x = 1 on every row
    folded = fold_column(rows, u)
    assert torch.equal(folded[..., -1], torch.zeros_like(folded[..., -1]))
    ones = torch.ones(7, 1, dtype=torch.float64)
    torch.testing.assert_close(
        torch.cat([x, ones], 1) @ folded.reshape(-1, 9).T, torch.cat([x, ones], 1) @ rows.reshape(-1, 9).T
    )


def test_rope_key_bias_folds_on_fast_components_and_is_dropped_on_slow_ones():
    """Rope keys [n, d_rope, hidden + 1] in rotate-half order: a component whose wavelength is under
    ROPE_BIAS_WAVELENGTH tokens folds its bias along u (exact where u.x = 1), a slower one loses it; both halves of
    a component (dims t and t + d_rope / 2) are treated alike and no bias column is left."""
    generator = torch.Generator().manual_seed(3)
    key = torch.randn(2, 8, 7, generator=generator, dtype=torch.float64)  # 4 components, hidden 6
    u = torch.zeros(6, dtype=torch.float64)
    u[2] = 0.5
    fold = BiasFold(query=u, key=u, residual=(0.0, 0.0))
    wavelengths = torch.tensor([10.0, ROPE_BIAS_WAVELENGTH / 2, ROPE_BIAS_WAVELENGTH * 2, 1e6], dtype=torch.float64)
    folded = fold_rope_key(key, fold, 2 * torch.pi / wavelengths)
    assert torch.equal(folded[..., -1], torch.zeros_like(folded[..., -1]))
    x = torch.randn(5, 6, generator=generator, dtype=torch.float64)
    x[:, 2] = 2.0  # u.x = 1
    biased = x @ key[..., :-1].transpose(-1, -2) + key[..., -1].unsqueeze(-2)  # [2, 5, 8]
    got = x @ folded[..., :-1].transpose(-1, -2)
    fast = torch.tensor([0, 1, 4, 5])  # components 0 and 1, both halves
    slow = torch.tensor([2, 3, 6, 7])
    torch.testing.assert_close(got[..., fast], biased[..., fast])
    torch.testing.assert_close(got[..., slow], (x @ key[..., :-1].transpose(-1, -2))[..., slow])


def test_an_o_proj_bias_moves_into_the_value_bias():
    """o_proj(v + e) = o_proj(v) + b_o with e shared by the query heads of each KV head (exact when o_proj,
    seen per KV head, is onto: hidden <= H_kv d here)."""
    generator = torch.Generator().manual_seed(2)
    heads, kv_heads, d, hidden = 4, 2, 8, 16
    o = torch.randn(hidden, heads, d, generator=generator, dtype=torch.float64)
    b_o = torch.randn(hidden, generator=generator, dtype=torch.float64)
    e = value_bias(None, o, b_o, kv_heads)
    per_query = e.repeat_interleave(heads // kv_heads, 0)  # [H, d]
    torch.testing.assert_close(torch.einsum("ohd,hd->o", o, per_query), b_o)
    assert value_bias(None, o, None, kv_heads) is None


# -- biased sources -------------------------------------------------------------------------------------------
def biased(family: str, **config) -> torch.nn.Module:
    """A tiny model with non-zero attention biases (tiny_model initialises them to zero)."""
    model = tiny_model(family, num_attention_heads=4, num_key_value_heads=2, **config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(".bias") and ".self_attn." in name:
                param.copy_(0.5 * torch.randn(param.shape, generator=generator))
    return model


@pytest.mark.parametrize("family,config", [("qwen2", {}), ("llama", {"attention_bias": True})])
def test_biased_source_folds_its_biases_for_deepseek_v3_and_keeps_them_for_plugin(family, config):
    """deepseek_v3 (default format, calibrated): a bias-free plugin model, which the export writes exactly; the
    plugin format keeps every bias. Without calibration nothing can be folded and the export is refused."""
    ids = torch.arange(4, 132) % 120
    text = CalibrationText(ids, 64, "sequential")
    folded, kept, uncalibrated = biased(family, **config), biased(family, **config), biased(family, **config)
    report = convert_to_mla(folded, MLAConversionConfig(24, 8), calibration=text)
    convert_to_mla(kept, MLAConversionConfig(24, 8, format="plugin"), calibration=text)
    assert not any(n.endswith(".bias") for n, _ in folded.named_parameters() if ".self_attn." in n)
    assert any(p.abs().max() > 0 for n, p in kept.named_parameters() if n.endswith(".bias"))
    assert len(report.details["bias_fold_residual"]) == 2
    exported, _ = to_deepseek_v3(folded)
    batch = torch.randint(0, 120, (2, 24))
    with torch.no_grad():
        assert relative(exported(batch).logits, folded(batch).logits) < 1e-5
    convert_to_mla(uncalibrated, MLAConversionConfig(24, 8, factorization="svd"))
    with pytest.raises(ValueError, match="attention biases.*fold them into the weights.*--format plugin"):
        to_deepseek_v3(uncalibrated)


def test_a_biased_checkpoint_converts_to_a_bias_free_stock_folder(tmp_path, capsys):
    """hf-attn-swap convert QWEN OUT --to mla --kv-budget 0.25: stock deepseek_v3 without a bias tensor, loaded by
    transformers with no plugin equal to the in-memory conversion; --factorization svd without calibration
    text cannot fold, and is refused in one line before anything is written."""
    src = save_tiny_checkpoint(tmp_path / "qwen", "qwen2", num_attention_heads=4, num_key_value_heads=2)
    model = biased("qwen2", vocab_size=len(load_tokenizer(src)), max_position_embeddings=4096)
    model.save_pretrained(src)
    out = tmp_path / "out"
    assert (
        main(
            [
                "convert",
                str(src),
                str(out),
                "--to",
                "mla",
                "--kv-budget",
                "0.25",
                "--calibration-tokens",
                "512",
            ]
        )
        == 0
    )
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if k.endswith(".bias")]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["attention_bias"] is False
    report = json.loads((out / "conversion.json").read_text())
    expected = biased("qwen2", vocab_size=len(load_tokenizer(src)), max_position_embeddings=4096)
    ids = load_token_ids(load_tokenizer(src), default_train_files(), 512)
    convert_to_mla(
        expected, MLAConversionConfig(kv_budget="0.25"), calibration=CalibrationText(ids, 512, "sequential")
    )
    assert len(report["details"]["bias_fold_residual"]) == 2  # per layer: RMS of u.x - 1 (query, key rows)
    from transformers import AutoModelForCausalLM

    stock = AutoModelForCausalLM.from_pretrained(out).eval()
    batch = torch.randint(0, 100, (2, 20))
    with torch.no_grad():
        assert relative(stock(batch).logits, expected(batch).logits) < 1e-5
    capsys.readouterr()
    argv = [
        "convert",
        str(src),
        str(tmp_path / "refused"),
        "--to",
        "mla",
        "--kv-budget",
        "0.25",
        "--factorization",
        "svd",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "attention biases" in err and "--format plugin" in err
    assert not (tmp_path / "refused").exists()


# -- rope-scaled sources ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("scaling,family", [(LLAMA3, "llama"), (YARN, "qwen2")], ids=["llama3", "yarn"])
def test_rope_scaled_source_keeps_only_unscaled_frequencies_and_exports_exactly(scaling, family):
    """The default conversion keeps a ladder inside the band the scaling leaves unchanged; the stock export (a
    plain ladder, no scaling written, YaRN's attention factor folded into q) equals it."""
    model = tiny_model(family, num_attention_heads=4, num_key_value_heads=2, rope_parameters=scaling,
                       max_position_embeddings=32768)  # fmt: skip
    rope = get_adapter(model).layout(model.config).rope
    assert rope.rope_type == scaling["rope_type"] and 1 < rope.plain_pairs < rope.rotary_dim // 2
    report = convert_to_mla(model, MLAConversionConfig(kv_budget="0.5"))
    pairs = report.details["rope_pairs"][0]
    assert max(pairs) < rope.plain_pairs
    exported, details = to_deepseek_v3(model)
    assert exported.config.rope_parameters["rope_type"] == "default"
    batch = torch.randint(0, 120, (2, 40))
    with torch.no_grad():
        assert relative(exported(batch).logits, model(batch).logits) < 1e-5


def test_scalings_with_no_stable_ladder_are_refused_for_deepseek_v3(tmp_path, capsys):
    """linear rescales every frequency: no plain ladder holds any of them, refused in one line before any layer,
    naming --format plugin, which converts it. dynamic rescales all but pair 0 (frequency 1) past the trained
    length: the deepseek_v3 ladder keeps only that pair."""
    src = tmp_path / "linear"
    linear = {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}
    tiny_model("llama", num_attention_heads=4, num_key_value_heads=2, rope_parameters=linear).save_pretrained(
        src
    )
    capsys.readouterr()
    argv = [
        "convert",
        str(src),
        str(tmp_path / "out"),
        "--to",
        "mla",
        "--kv-budget",
        "0.5",
        "--factorization",
        "svd",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "rope scaling" in err and "--format plugin" in err, err
    assert not (tmp_path / "out").exists()
    assert main([*argv, "--format", "plugin"]) == 0
    dynamic = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    model = tiny_model("llama", num_attention_heads=4, num_key_value_heads=2, rope_parameters=dynamic)
    report = convert_to_mla(model, MLAConversionConfig(kv_budget="0.5"))
    assert report.details["rope_pairs"][0] == [0] and report.after["qk_rope_head_dim"] == 2
