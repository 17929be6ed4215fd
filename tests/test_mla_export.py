"""Stock deepseek_v3 export: function-preserving (latent norm in its linear regime, residual stream rescaled to
eps 1e-6, interleaved RoPE, zero padding), bias-free, loads without the plugin, latent_sdpa."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, DeepseekV3Config, DeepseekV3ForCausalLM

from hf_attn_swap import LatentCache, convert_to_mla
from hf_attn_swap.cli import main
from hf_attn_swap.evaluate.metrics import measure_kv_cache_bytes_per_token
from hf_attn_swap.export.deepseek_v3 import (
    NORM_ERROR_TARGETS,
    interleave_rope,
    linear_regime,
    to_deepseek_v3,
)
from hf_attn_swap.io.folders import add_legacy_rope_fields, atomic_output_dir
from hf_attn_swap.modeling.compat import cache_kwargs
from hf_attn_swap.testing import tiny_model

REPO = Path(__file__).resolve().parents[1]


def converted(family="llama", kv=2, selection="uniform", rank=24, rope_dim=8, eps=None, **options):
    extra = {} if eps is None else {"rms_norm_eps": eps}
    model = tiny_model(family, num_attention_heads=4, num_key_value_heads=kv, **extra)
    convert_to_mla(model, rank, rope_dim, rope_selection=selection, **options)
    model.generation_config.eos_token_id = None
    return model


def padded_batch(length=16):
    ids = torch.randint(3, 128, (2, length), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


def logits(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).logits


def relative(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def close(out, reference, tol=1e-4):
    return relative(out[0], reference[0]) <= tol and relative(out[1, 3:], reference[1, 3:]) <= tol


@pytest.mark.parametrize(
    "family,kv,selection,eps,pads",
    [
        ("llama", 4, "uniform", None, (None, None)),
        ("mistral", 1, "high", None, (None, None)),
        ("llama", 2, "high", 1e-5, (None, None)),  # residual stream rescaled by sqrt(0.1)
        ("llama", 2, "high", 1e-5, (40, 16)),  # zero latent channels, rope padded to head_dim
        ("mistral", 2, "uniform", 1e-6, (24, 12)),  # rope padded to a non-multiple
        ("llama", 2, "low", 1e-5, (None, 16)),  # low frequencies land on the ladder once padded to head_dim
    ],
)
def test_export_matches_the_converted_model(family, kv, selection, eps, pads):
    model = converted(family, kv, selection, eps=eps)
    ids, mask = padded_batch()
    reference = logits(model, ids, mask)
    exported, details = to_deepseek_v3(model, *pads)
    assert type(exported).__name__ == "DeepseekV3ForCausalLM"
    assert close(logits(exported, ids, mask), reference)
    config = exported.config
    assert (config.kv_lora_rank, config.qk_rope_head_dim) == (pads[0] or 24, pads[1] or 8)
    assert details["latent_rank"] == 24 and details["norm_relative_error_bound"] <= 2.0**-26
    assert config.rms_norm_eps == 1e-6 and config.q_lora_rank is None and config.rope_interleave
    assert not any(name.endswith(".bias") for name in exported.state_dict())
    if pads[0]:  # the padded latent channels are exact zeros: nothing reads them
        for layer in exported.model.layers:
            attn = layer.self_attn
            assert not attn.kv_a_proj_with_mqa.weight[24 : pads[0]].any()
            assert not attn.kv_b_proj.weight[:, 24:].any()


def test_interleaved_rows_match_transformers_own_interleaved_rope():
    """The stock model is the reference: a random rotate-half DeepseekV3 and the same weights with interleave_rope
    applied under ``rope_interleave: true`` compute the same logits (also with padded rope dims)."""
    torch.manual_seed(0)
    base = dict(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
        first_k_dense_replace=2, rope_parameters={"rope_type": "default", "rope_theta": 100.0},
        initializer_range=0.2,
    )  # fmt: skip
    half = DeepseekV3ForCausalLM(DeepseekV3Config(**base, rope_interleave=False)).eval()
    ids = torch.randint(0, 64, (1, 24), generator=torch.Generator().manual_seed(1))
    reference = logits(half, ids)
    for rope_dim in (8, 12):  # 12: theta' = 100^(12/8) keeps the 4 frequencies at the first slots
        theta = 100.0 ** (rope_dim / 8)
        config = {
            **base,
            "qk_rope_head_dim": rope_dim,
            "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        }
        inter = DeepseekV3ForCausalLM(DeepseekV3Config(**config, rope_interleave=True)).eval()
        state = half.state_dict()
        scale = ((8 + rope_dim) / 16) ** 0.5  # the softmax scale (d_nope + d_rope)^-0.5 changes with padding
        for idx in range(2):
            name = f"model.layers.{idx}.self_attn."
            q = state[name + "q_proj.weight"].view(4, 16, 32)
            q = torch.cat([q[:, :8], interleave_rope(q[:, 8:], rope_dim, 0)], dim=1) * scale
            state[name + "q_proj.weight"] = q.reshape(-1, 32)
            kv_a = state[name + "kv_a_proj_with_mqa.weight"]
            state[name + "kv_a_proj_with_mqa.weight"] = torch.cat(
                [kv_a[:16], interleave_rope(kv_a[16:], rope_dim, 0)]
            )
        inter.load_state_dict(state)
        assert relative(logits(inter, ids), reference) <= 1e-5


def run_fresh(tmp_path, folder, ids, mask):
    """Logits of ``folder`` in a fresh interpreter that never imports hf_attn_swap."""
    torch.save({"ids": ids, "mask": mask}, tmp_path / "inputs.pt")
    script = f"""
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(folder)!r}, attn_implementation="eager").eval()
inputs = torch.load({str(tmp_path / "inputs.pt")!r})
with torch.no_grad():
    out = model(input_ids=inputs["ids"], attention_mask=inputs["mask"]).logits
torch.save(out, {str(tmp_path / "out.pt")!r})
names = [n for n, _ in model.named_modules()]
assert "hf_attn_swap" not in sys.modules
print(type(model).__name__, any("experts" in n or "gate" == n.split(".")[-1] for n in names))
"""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["DeepseekV3ForCausalLM", "False"]  # dense MLPs only, no router
    return torch.load(tmp_path / "out.pt")


@pytest.mark.parametrize("pads", [(None, None), (40, 16)])
def test_exported_folder_loads_in_stock_transformers_without_the_plugin(tmp_path, pads):
    model = converted("llama", 2, "high", eps=1e-5)
    ids, mask = padded_batch()
    reference = logits(model, ids, mask)
    exported, _ = to_deepseek_v3(model, *pads)
    with atomic_output_dir(tmp_path / "model") as tmp:  # what convert_checkpoint saves through
        exported.save_pretrained(tmp)
    assert close(run_fresh(tmp_path, tmp_path / "model", ids, mask), reference)
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["first_k_dense_replace"] == 2
    assert config["num_nextn_predict_layers"] == 0 and config["rope_interleave"] is True
    assert config["q_lora_rank"] is None and config["routed_scaling_factor"] == 1.0
    assert config["tie_word_embeddings"] is False and config["rms_norm_eps"] == 1e-6
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 10000.0 ** ((pads[1] or 8) / 16)
    assert config["rope_parameters"]["rope_type"] == "default" and "rope_scaling" not in config
    assert not any(value is True for key, value in config.items() if "bias" in key)
    assert (config["kv_lora_rank"], config["qk_rope_head_dim"]) == (pads[0] or 24, pads[1] or 8)
    with safe_open(tmp_path / "model" / "model.safetensors", "pt") as f:
        names = set(f.keys())
    assert "lm_head.weight" in names and not any(name.endswith(".bias") for name in names)


def test_latent_sdpa_on_stock_deepseek_v3(tmp_path):
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

    stock_expand_kv = DeepseekV3Attention.expand_kv
    exported, _ = to_deepseek_v3(converted("llama", 2))
    exported.save_pretrained(tmp_path)
    stock = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    latent = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="latent_sdpa").eval()
    for model in (stock, latent):
        model.generation_config.eos_token_id = None
    ids, mask = padded_batch(12)
    expected = logits(stock, ids, mask)
    for _ in range(2):  # first call: expanded inputs; then the instance passes latents through
        assert close(logits(latent, ids, mask), expected, 1e-5)
    # decode with a LatentCache; kv_b_proj runs over the prompt once (expanded prefill), never over the cache
    calls = []
    for layer in latent.model.layers:
        layer.self_attn.kv_b_proj.register_forward_hook(lambda module, args, out: calls.append(args[0].shape))
    greedy = stock.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    cache = LatentCache(config=latent.config)
    assert torch.equal(
        latent.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, **cache_kwargs(cache)),
        greedy,
    )
    assert calls == [torch.Size([2, 1, 12, 24])] * 2  # one per layer, the 12 prompt tokens only
    assert cache.nbytes() == 2 * (12 + 5) * (24 + 8) * 2 * 4  # (r + d_rope) per token and layer
    # nothing global changed: the class is untouched and the sdpa model's modules were never switched
    assert DeepseekV3Attention.expand_kv is stock_expand_kv
    assert all("expand_kv" not in vars(layer.self_attn) for layer in stock.model.layers)
    assert all("expand_kv" in vars(layer.self_attn) for layer in latent.model.layers)
    assert measure_kv_cache_bytes_per_token(stock) == (24 + 8) * 2 * 4


def test_padded_cache_is_measured_as_the_formula(tmp_path):
    exported, _ = to_deepseek_v3(converted("llama", 2), 40, 16)
    assert measure_kv_cache_bytes_per_token(exported) == (40 + 16) * 2 * 4


def test_norm_error_bound_holds_and_is_tight():
    """The analytic bound, in float64 arithmetic (stock RMSNorm computes in float32, so it is replayed here):
    random RMSNorm outputs stay below it and the worst input reaches it; padding only lowers t."""
    model = converted("llama", 2)
    layer = model.model.layers[0]
    gamma = layer.input_layernorm.weight.detach().double()
    down = layer.self_attn.kv_a_proj_with_mqa.weight.detach().double()[:24]
    eps = 1e-6
    for dtype in (torch.float32, torch.bfloat16):
        for width in (24, 64):
            k = linear_regime(down, gamma, width, eps, dtype)

            def latent_error(x_hat, k=k, width=width):  # x_hat: RMSNorm outputs, |x_hat| <= sqrt(hidden)
                exact = (x_hat * gamma) @ down.T
                z = torch.cat([k.kappa * exact, exact.new_zeros(len(exact), width - 24)], 1)
                normed = z[:, :24] / (z.square().mean(-1, keepdim=True) + eps).sqrt() * k.norm_weight
                return ((normed - exact).norm(dim=-1) / exact.norm(dim=-1)).max().item()

            x_hat = torch.randn(2048, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
            x_hat = x_hat / x_hat.square().mean(-1, keepdim=True).sqrt()
            assert latent_error(x_hat) <= k.bound <= NORM_ERROR_TARGETS[dtype]
            assert k.bound > NORM_ERROR_TARGETS[dtype] / 8  # kappa is the largest power of two that fits
            _, _, right = torch.linalg.svd(down * gamma)
            worst = right[:1] * 64**0.5  # the direction that maximises |c|, at the largest possible norm
            assert latent_error(worst) == pytest.approx(k.bound, rel=1e-6)


def test_bfloat16_export_stays_at_the_dtypes_rounding_level():
    """bfloat16: the normed latent is within the bound plus a few rounding units of the exact one, and the export's
    logits are as close to the float32 model as the bfloat16 plugin model's (<= 3x its error)."""
    model = converted("llama", 2, "high", eps=1e-5)
    low = copy.deepcopy(model).to(torch.bfloat16)
    exported, details = to_deepseek_v3(low)
    eps = torch.finfo(torch.bfloat16).eps
    assert details["norm_relative_error_bound"] <= NORM_ERROR_TARGETS[torch.bfloat16] < eps / 4
    x_hat = torch.randn(1024, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x_hat = x_hat / x_hat.square().mean(-1, keepdim=True).sqrt()
    for idx, layer in enumerate(model.model.layers):
        x = x_hat * layer.input_layernorm.weight.double()
        exact = x @ layer.self_attn.kv_a_proj_with_mqa.weight.double()[:24].T
        attn = exported.model.layers[idx].self_attn
        with torch.no_grad():
            latent = attn.kv_a_layernorm(attn.kv_a_proj_with_mqa(x.to(torch.bfloat16))[:, :24]).double()
        error = ((latent - exact).norm(dim=-1) / exact.norm(dim=-1)).max().item()
        assert error <= details["norm_relative_error_bound"] + 4 * eps, (idx, error)
    ids, _ = padded_batch()
    reference = logits(model, ids)
    plugin_error = relative(logits(low, ids).float(), reference)
    export_error = relative(logits(exported, ids).float(), reference)
    assert export_error <= 3 * plugin_error + 1e-5, (export_error, plugin_error)


def test_float16_and_biased_models_are_refused():
    with pytest.raises(
        ValueError, match="cannot be float16.*--dtype bfloat16 or float32, or --format plugin"
    ):
        to_deepseek_v3(converted("llama", 2).half())
    zero_biases = converted("qwen2", 2)  # tiny_model initialises biases to zero: nothing to express
    assert close(
        logits(to_deepseek_v3(zero_biases)[0], *padded_batch()), logits(zero_biases, *padded_batch())
    )
    biased = tiny_model("qwen2", num_attention_heads=4, num_key_value_heads=2)
    with torch.no_grad():
        for layer in biased.model.layers:
            layer.self_attn.q_proj.bias.normal_()
    convert_to_mla(biased, 24, 8)
    with pytest.raises(ValueError, match="attention biases.*--format plugin"):
        to_deepseek_v3(biased)
    model = converted("llama", 2)
    with pytest.raises(ValueError, match="pad-kv-lora-rank 16 must be at least --kv-lora-rank 24"):
        to_deepseek_v3(model, 16)
    with pytest.raises(ValueError, match="must be even and at least --rope-dim 8"):
        to_deepseek_v3(model, None, 6)
    with pytest.raises(ValueError, match="--pad-rope-dim 16 or more.*--format plugin"):
        to_deepseek_v3(converted("llama", 2, "low"))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("src")
    for family in ("llama", "qwen2"):
        tiny_model(family, num_attention_heads=4, num_key_value_heads=2).save_pretrained(root / family)
    return root


@pytest.mark.parametrize(
    "family,extra,message",
    [
        ("qwen2", [], "the source has attention biases"),
        ("llama", ["--dtype", "float16"], "cannot be float16"),
        ("llama", ["--pad-kv-lora-rank", "16"], "--pad-kv-lora-rank 16 must be at least --kv-lora-rank 24"),
        ("llama", ["--pad-rope-dim", "9"], "--pad-rope-dim 9 must be even"),
        ("llama", ["--pad-rope-dim", "6"], "at least --rope-dim 8"),
        ("llama", ["--pad-rope-dim", "64", "--format", "plugin"], "only apply to --format deepseek_v3"),
        ("llama", ["--pad-kv-lora-rank", "x"], "invalid int value"),
        ("llama", ["--rope-selection", "low"], "pad the rope to --pad-rope-dim 16 or more"),
    ],
)
def test_cli_refusals_are_one_line_and_write_nothing(sources, tmp_path, capsys, family, extra, message):
    out = tmp_path / "out"
    argv = [
        "convert",
        str(sources / family),
        str(out),
        "--to",
        "mla",
        "--kv-lora-rank",
        "24",
        "--rope-dim",
        "8",
    ]
    with pytest.raises(SystemExit) if "invalid" in message else _no_exit() as raised:
        code = main([*argv, "--factorization", "svd", *extra])
    if raised is not None:  # argparse's own type error
        assert raised.value.code == 2
    else:
        assert code == 2
    err = capsys.readouterr().err.strip()
    assert message in err and (raised is not None or len(err.splitlines()) == 1), err
    assert list(tmp_path.iterdir()) == []


class _no_exit:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_cli_padded_export_reports_the_padded_cache(sources, tmp_path):
    out = tmp_path / "mla"
    argv = [
        "convert",
        str(sources / "llama"),
        str(out),
        "--to",
        "mla",
        "--kv-lora-rank",
        "24",
        "--rope-dim",
        "8",
    ]
    assert main([*argv, "--factorization", "svd", "--pad-kv-lora-rank", "32", "--pad-rope-dim", "16"]) == 0
    report = json.loads((out / "conversion.json").read_text())
    assert report["kv_bytes_per_token_after"] == (32 + 16) * 2 * 4
    assert report["after"]["kv_lora_rank"] == 32 and report["after"]["qk_rope_head_dim"] == 16
    assert report["details"]["deepseek_v3"]["latent_rank"] == 24
    assert report["details"]["options"]["pad_kv_lora_rank"] == 32
    model = AutoModelForCausalLM.from_pretrained(out)
    assert (model.config.kv_lora_rank, model.config.qk_rope_head_dim) == (32, 16)


def test_every_written_folder_has_the_legacy_rope_fields(sources, tmp_path):
    """transformers v5 writes only rope_parameters; mlx-lm and older readers need rope_theta (atomic_output_dir)."""
    from hf_attn_swap.pipeline.convert import convert_checkpoint

    convert_checkpoint(sources / "qwen2", tmp_path / "gqa", "gqa", num_key_value_heads=1)
    convert_checkpoint(
        sources / "qwen2", tmp_path / "plugin", "mla",
        mla={"kv_lora_rank": 24, "qk_rope_head_dim": 8, "factorization": "svd", "format": "plugin"},
    )  # fmt: skip
    for name in ("gqa", "plugin"):
        config = json.loads((tmp_path / name / "config.json").read_text())
        assert config["rope_theta"] == config["rope_parameters"]["rope_theta"], name
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / name).config
        assert reloaded.rope_parameters == config["rope_parameters"]
    # folders written before (e.g. a cached example-model): patched once, then left alone; a scaled rope also gets
    # the legacy rope_scaling (mlx-lm reads only that), and transformers v5 reads the patched file the same
    old = tmp_path / "old"
    old.mkdir()
    (old / "config.json").write_text(
        json.dumps({"rope_parameters": {"rope_theta": 5e5, "rope_type": "default"}})
    )
    assert add_legacy_rope_fields(old)
    assert json.loads((old / "config.json").read_text()) == {
        "rope_parameters": {"rope_theta": 5e5, "rope_type": "default"},
        "rope_theta": 5e5,
    }
    assert not add_legacy_rope_fields(old) and not add_legacy_rope_fields(tmp_path / "missing")
    llama3 = tiny_model("llama", rope_parameters=dict(LLAMA3_ROPE), max_position_embeddings=65536)
    llama3.save_pretrained(tmp_path / "llama3")
    assert add_legacy_rope_fields(tmp_path / "llama3")
    config = json.loads((tmp_path / "llama3" / "config.json").read_text())
    assert config["rope_theta"] == 5e5 and config["rope_scaling"] == {
        key: value for key, value in LLAMA3_ROPE.items() if key != "rope_theta"
    }
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "llama3").config
    assert reloaded.rope_parameters == llama3.config.rope_parameters


LLAMA3_ROPE = {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}  # fmt: skip


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_convert_and_export_a_model_on_the_gpu():
    """The float64 decompositions run on the model's device (CUDA has float64); the weights stay there."""
    from hf_attn_swap.methods.calibration import collect_attention_inputs

    cpu = tiny_model("llama", num_attention_heads=4, num_key_value_heads=2)
    gpu = copy.deepcopy(cpu).cuda()
    calibration = collect_attention_inputs(cpu, torch.arange(3, 99) % 128, window=48)
    convert_to_mla(cpu, 24, 8, rope_selection="uniform", calibration=calibration)
    convert_to_mla(gpu, 24, 8, rope_selection="uniform", calibration=[x.cuda() for x in calibration])
    assert next(gpu.parameters()).is_cuda
    ids, mask = padded_batch()
    reference = logits(cpu, ids, mask)
    on_gpu = logits(gpu, ids.cuda(), mask.cuda()).cpu()
    assert relative(on_gpu, reference) <= 1e-4
    for pads in ((None, None), (512, 64)):
        exported, _ = to_deepseek_v3(gpu, *pads)
        assert next(exported.parameters()).is_cuda
        assert close(logits(exported, ids.cuda(), mask.cuda()).cpu(), reference)


def test_inexpressible_models_are_refused():
    model = converted("llama", 2, rank=12, rope_dim=4, num_rope_key_heads=2)
    with pytest.raises(ValueError, match="2 rope keys per layer.*--format plugin"):
        to_deepseek_v3(model)
    model = tiny_model("llama", num_attention_heads=4, num_key_value_heads=2)
    with torch.no_grad():  # layer 1's K and V have rank 2: the energy allocation gives its rank to layer 0
        for proj in (model.model.layers[1].self_attn.k_proj, model.model.layers[1].self_attn.v_proj):
            proj.weight.copy_(proj.weight[:, :2] @ proj.weight[:2])
    report = convert_to_mla(model, 12, 4, rank_allocation="energy")
    assert report.details["ranks"][0] > report.details["ranks"][1]
    with pytest.raises(ValueError, match="per-layer kv_lora_rank"):
        to_deepseek_v3(model)


def test_per_layer_rope_frequencies_are_refused():
    model = converted("llama", 2, rank=12, rope_dim=4)
    model.config.rope_pairs = [[0, 4], [1, 4]]
    with pytest.raises(ValueError, match="different rotary frequencies per layer.*--format plugin"):
        to_deepseek_v3(model)
