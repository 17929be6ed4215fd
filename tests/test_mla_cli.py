"""CLI: convert --to mla (both formats), bench, and bad input (clear error, nothing written, source untouched)."""

import hashlib
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_attn_swap.cli import main
from hf_attn_swap.modeling.mla import MLAForCausalLM
from hf_attn_swap.testing import tiny_model

DATA_FREE = ["--factorization", "svd"]  # the tiny source has no tokenizer for calibration text


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A bias-free source (stock deepseek_v3 has no attention biases; Qwen2 sources need --format plugin)."""
    folder = tmp_path_factory.mktemp("src") / "llama-tiny"
    tiny_model("llama", num_attention_heads=4, num_key_value_heads=2).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def qwen2_source(tmp_path_factory):
    folder = tmp_path_factory.mktemp("src") / "qwen2-tiny"
    tiny_model("qwen2", num_attention_heads=4, num_key_value_heads=2).save_pretrained(folder)
    return folder


def convert_argv(source, out, kv_lora_rank, rope_dim, *extra):
    return [
        "convert", str(source), str(out), "--to", "mla",
        "--kv-lora-rank", str(kv_lora_rank), "--rope-dim", str(rope_dim), *extra,
    ]  # fmt: skip


def digest(folder):
    return {
        p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()
    }


def test_convert_to_stock_deepseek_v3(source, tmp_path):
    out = tmp_path / "mla"
    # default rope selection "high": a DeepSeek ladder with theta'
    assert main(convert_argv(source, out, 24, 8, *DATA_FREE)) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "DeepseekV3ForCausalLM" and model.config.kv_lora_rank == 24
    report = json.loads((out / "conversion.json").read_text())
    assert (
        report["kv_bytes_per_token_after"] == (24 + 8) * 2 * 4
        and report["kv_bytes_per_token_before"] == 2 * 2 * 16 * 2 * 4
    )
    assert (
        report["details"]["format"] == "deepseek_v3" and report["details"]["deepseek_v3"]["latent_rank"] == 24
    )
    assert report["kv_reduction"] == 0.5


def test_convert_to_plugin_format_with_energy_ranks(qwen2_source, tmp_path):
    out = tmp_path / "plugin"
    extra = ["--format", "plugin", "--rank-allocation", "energy", "--num-rope-key-heads", "2"]
    assert main(convert_argv(qwen2_source, out, 20, 4, *DATA_FREE, *extra)) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model, MLAForCausalLM) and model.config.num_rope_key_heads == 2
    assert (
        json.loads((out / "conversion.json").read_text())["kv_bytes_per_token_after"]
        == (2 * 20 + 2 * 2 * 4) * 4
    )


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--kv-lora-rank", "0", "--rope-dim", "8"], "out of range"),
        (["--kv-lora-rank", "65", "--rope-dim", "8"], "between 1 and 64"),
        (["--kv-lora-rank", "65", "--rope-dim", "8", "--format", "plugin"], "between 1 and 64"),
        (["--kv-lora-rank", "24", "--rope-dim", "7"], "must be even"),
        (["--kv-lora-rank", "24", "--rope-dim", "32"], "larger than the 16 rotary dims"),
        (["--kv-lora-rank", "24", "--rope-dim", "8", "--rope-selection", "norm"], "Use --format plugin"),
        (["--kv-lora-rank", "24", "--rope-dim", "8", "--num-rope-key-heads", "2"], "Use --format plugin"),
        (["--rope-dim", "8"], "needs --kv-budget"),
        (
            ["--kv-lora-rank", "24", "--rope-dim", "8", "--engine", "vllm", "--format", "plugin"],
            "transformers only",
        ),
        (["--kv-budget", "0.5", "--engine", "vllm", "--pad-kv-lora-rank", "256"], "--engine vllm sets --pad"),
        (["--kv-budget", "0.5", "--engine", "llama.cpp", "--pad-rope-dim", "16"], "sets no padding"),
        (["--kv-lora-rank", "600", "--rope-dim", "8", "--engine", "vllm"], "wider than the 512 + 64"),
    ],
)
def test_bad_input_is_a_clear_error_and_writes_nothing(source, tmp_path, capsys, extra, message):
    before = digest(source)
    out = tmp_path / "out"
    assert main(["convert", str(source), str(out), "--to", "mla", *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert digest(source) == before


def test_engine_preset_pads_the_latent_for_vllm_only(source, tmp_path):
    """--engine vllm writes the 512 + 64 shape of vLLM's CPU_MLA / FlashMLA (zero channels: the same function),
    --engine llama.cpp the unpadded one (the smallest cache); both from the same --kv-budget split."""
    ids = torch.randint(3, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    outs = {}
    for engine in ("vllm", "llama.cpp"):
        out = tmp_path / engine
        argv = ["convert", str(source), str(out), "--to", "mla", "--kv-budget", "0.5", "--engine", engine]
        assert main([*argv, *DATA_FREE]) == 0
        outs[engine] = AutoModelForCausalLM.from_pretrained(out).eval()
        report = json.loads((out / "conversion.json").read_text())
        assert report["details"]["deepseek_v3"]["latent_rank"] == 24
        config = outs[engine].config
        shape = (config.kv_lora_rank, config.qk_rope_head_dim)
        assert shape == ((512, 64) if engine == "vllm" else (24, 8))
        assert report["kv_bytes_per_token_after"] == 2 * sum(shape) * 4
    with torch.no_grad():
        padded, plain = (outs[e](ids).logits for e in ("vllm", "llama.cpp"))
    torch.testing.assert_close(padded, plain, rtol=1e-4, atol=1e-5)


def test_unsupported_architecture_writes_nothing(tmp_path, capsys):
    src = tmp_path / "qwen3"
    tiny_model("qwen3", num_attention_heads=4, num_key_value_heads=2).save_pretrained(src)
    out = tmp_path / "out"
    assert main(["convert", str(src), str(out), "--to", "mla", "--kv-lora-rank", "8", "--rope-dim", "8"]) == 2
    assert "supports the Llama-style families llama, mistral, qwen2" in capsys.readouterr().err
    assert not out.exists()


def test_bench_writes_measurements(source, tmp_path):
    out = tmp_path / "mla"
    threads = torch.get_num_threads()
    assert main(convert_argv(source, out, 24, 8, *DATA_FREE)) == 0
    report = tmp_path / "bench.json"
    argv = ["bench", str(out), "--context", "40", "--new-tokens", "3", "--attn-implementation", "latent_sdpa"]
    assert main(argv + ["--cache", "latent", "--json", str(report)]) == 0
    (result,) = json.loads(report.read_text())["rows"]
    assert result["kv_engine"]["cache_class"] == "LatentCache"
    assert result["engine"]["attn_implementation"] == "latent_sdpa" and result["attention"] == "absorbed"
    assert result["kv_bytes_per_token"] == (24 + 8) * 2 * 4  # latent + rope key, 2 layers, float32
    assert result["kv_layout"] == "latent" and result["kv_matches_formula"]
    assert result["decode_tokens_per_second"] > 0 and result["peak_rss_mib"] > 0
    assert main(["bench", str(out), "--context", "0"]) == 2
    assert torch.get_num_threads() == threads  # no --threads: torch's setting is left alone


def test_rope_dims_beyond_the_unscaled_band_are_refused_for_deepseek_v3_before_any_layer(
    tmp_path, capsys, monkeypatch
):
    """Llama-3's rope scaling leaves only the fastest pair of this tiny head unchanged (original length 64), and
    deepseek_v3 writes no scaling: 8 rope dims are refused from the config alone (no layer converted, nothing
    written), naming --format plugin, which does convert it (the default conversion of a realistic Llama-3:
    tests/test_mla_families.py)."""
    import hf_attn_swap.pipeline.convert as convert

    src = tmp_path / "llama3"
    scaling = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip
    tiny_model(
        "llama", num_attention_heads=4, num_key_value_heads=2, rope_parameters=scaling
    ).save_pretrained(src)
    capsys.readouterr()

    def streamed(*args, **kwargs):
        raise ValueError("the layer-by-layer conversion started")

    monkeypatch.setattr(convert, "stream_checkpoint", streamed)
    out = tmp_path / "out"
    assert main(convert_argv(src, out, 24, 8, *DATA_FREE)) == 2
    err = capsys.readouterr().err
    assert "llama3 rope scaling" in err and "--format plugin" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama3"]
    assert main(convert_argv(src, out, 24, 8, *DATA_FREE, "--format", "plugin")) == 2
    assert "layer-by-layer conversion started" in capsys.readouterr().err
