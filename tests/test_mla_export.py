"""Stock deepseek_v3 export: function-preserving (incl. kv_a_layernorm), loads without the plugin, latent_sdpa."""

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from hf_attn_swap import LatentCache, convert_to_mla
from hf_attn_swap.evaluate.metrics import measure_kv_cache_bytes_per_token
from hf_attn_swap.export.deepseek_v3 import NORM_ERROR_TARGETS, dominant_channel, to_deepseek_v3
from hf_attn_swap.modeling.compat import cache_kwargs
from hf_attn_swap.testing import tiny_model

REPO = Path(__file__).resolve().parents[1]


def converted(family="qwen2", kv=2, selection="uniform", rank=24, rope_dim=8, **options):
    model = tiny_model(family, num_attention_heads=4, num_key_value_heads=kv)
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


@pytest.mark.parametrize("family,kv", [("llama", 4), ("qwen2", 2), ("mistral", 1)])
@pytest.mark.parametrize("selection", ["uniform", "high", "low"])
def test_export_matches_the_converted_model(family, kv, selection):
    model = converted(family, kv, selection)
    ids, mask = padded_batch()
    reference = logits(model, ids, mask)
    exported, details = to_deepseek_v3(model)
    assert type(exported).__name__ == "DeepseekV3ForCausalLM"
    out = logits(exported, ids, mask)
    assert relative(out[0], reference[0]) <= 1e-4 and relative(out[1, 3:], reference[1, 3:]) <= 1e-4
    assert details["kv_lora_rank"] == 25 and details["norm_relative_error_bound"] <= 2.0**-26
    assert (details["q_lora_rank"] is not None) == (family == "qwen2")  # q biases go through the q-LoRA path


def test_exported_folder_loads_in_stock_transformers_without_the_plugin(tmp_path):
    model = converted("qwen2", 2)
    ids, mask = padded_batch()
    reference = logits(model, ids, mask)
    exported, _ = to_deepseek_v3(model)
    exported.save_pretrained(tmp_path / "model")
    torch.save({"ids": ids, "mask": mask}, tmp_path / "inputs.pt")
    script = f"""
import sys, torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained({str(tmp_path / "model")!r}, attn_implementation="eager").eval()
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
    out = torch.load(tmp_path / "out.pt")
    assert relative(out[0], reference[0]) <= 1e-4 and relative(out[1, 3:], reference[1, 3:]) <= 1e-4
    config = json.loads((tmp_path / "model" / "config.json").read_text())
    assert config["model_type"] == "deepseek_v3" and config["first_k_dense_replace"] == 2
    assert config["num_nextn_predict_layers"] == 0 and config["rope_interleave"] is False


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
        out = logits(latent, ids, mask)
        assert relative(out[0], expected[0]) <= 1e-5 and relative(out[1, 3:], expected[1, 3:]) <= 1e-5
    # decode with a LatentCache; kv_b_proj is never run over the cache
    calls = []
    for layer in latent.model.layers:
        layer.self_attn.kv_b_proj.register_forward_hook(lambda *args: calls.append(1))
    greedy = stock.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    cache = LatentCache(config=latent.config)
    assert torch.equal(
        latent.generate(ids, attention_mask=mask, max_new_tokens=6, do_sample=False, **cache_kwargs(cache)),
        greedy,
    )
    assert calls == []
    assert cache.nbytes() == 2 * (12 + 5) * (25 + 8) * 2 * 4  # (r + 1 + d_rope) per token and layer
    # nothing global changed: the class is untouched and the sdpa model's modules were never switched
    assert DeepseekV3Attention.expand_kv is stock_expand_kv
    assert all("expand_kv" not in vars(layer.self_attn) for layer in stock.model.layers)
    assert all("expand_kv" in vars(layer.self_attn) for layer in latent.model.layers)
    assert measure_kv_cache_bytes_per_token(stock) == (25 + 8) * 2 * 4


def test_norm_trick_error_bound_holds_and_is_tight():
    """The analytic bound, in float64 arithmetic (stock RMSNorm computes in float32, so it is replayed here):
    random RMSNorm outputs stay below it and the worst input reaches it."""
    model = converted("llama", 2)
    layer = model.model.layers[0]
    gamma = layer.input_layernorm.weight.detach().double()
    down = layer.self_attn.kv_a_proj_with_mqa.weight.detach().double()[:24]
    eps = 1e-6
    for dtype in (torch.float32, torch.bfloat16):
        k = dominant_channel(down, gamma, eps, dtype)

        def latent_error(x_hat, k=k):  # x_hat: RMSNorm outputs, |x_hat| <= sqrt(hidden)
            exact = (x_hat * gamma) @ down.T
            z = torch.cat(
                [k["kappa"] * exact, torch.full((len(exact), 1), k["constant"], dtype=torch.float64)], 1
            )
            normed = z[:, :24] / (z.square().mean(-1, keepdim=True) + eps).sqrt() * k["norm_weight"]
            return ((normed - exact).norm(dim=-1) / exact.norm(dim=-1)).max().item()

        x_hat = torch.randn(2048, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
        x_hat = x_hat / x_hat.square().mean(-1, keepdim=True).sqrt()
        assert latent_error(x_hat) <= k["bound"] <= NORM_ERROR_TARGETS[dtype]
        _, _, right = torch.linalg.svd(down * gamma)
        worst = right[:1] * 64**0.5  # the direction that maximises |c|, at the largest possible norm
        assert latent_error(worst) == pytest.approx(k["bound"], rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_export_stays_at_the_dtypes_rounding_level(dtype):
    """In each dtype the normed latent differs from the exact one by the bound plus a few rounding units."""
    model = converted("qwen2", 2)
    low = copy.deepcopy(model).to(dtype)
    exported, details = to_deepseek_v3(low)
    eps = torch.finfo(dtype).eps
    assert details["norm_relative_error_bound"] <= NORM_ERROR_TARGETS[dtype] < eps / 4
    x_hat = torch.randn(1024, 64, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x_hat = x_hat / x_hat.square().mean(-1, keepdim=True).sqrt()
    for idx, layer in enumerate(model.model.layers):
        x = x_hat * layer.input_layernorm.weight.double()
        exact = x @ layer.self_attn.kv_a_proj_with_mqa.weight.double()[:24].T
        attn = exported.model.layers[idx].self_attn
        with torch.no_grad():
            latent = attn.kv_a_layernorm(attn.kv_a_proj_with_mqa(x.to(dtype))[:, :25])[:, :24].double()
        error = ((latent - exact).norm(dim=-1) / exact.norm(dim=-1)).max().item()
        assert error <= details["norm_relative_error_bound"] + 4 * eps, (idx, error)
    # end to end: the export in this dtype is about as close to the fp32 model as the plugin in this dtype
    ids, _ = padded_batch()
    reference = logits(model, ids)
    plugin_error = relative(logits(low, ids).float(), reference)
    export_error = relative(logits(exported, ids).float(), reference)
    assert export_error <= 3 * plugin_error + 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_convert_and_export_a_model_on_the_gpu():
    """The float64 decompositions run on the CPU whatever the model's device; the results go back to it."""
    from hf_attn_swap.methods.calibration import collect_attention_inputs

    cpu = tiny_model("qwen2", num_attention_heads=4, num_key_value_heads=2)
    gpu = copy.deepcopy(cpu).cuda()
    calibration = collect_attention_inputs(cpu, torch.arange(3, 99) % 128, window=48)
    convert_to_mla(cpu, 24, 8, rope_selection="uniform", calibration=calibration)
    convert_to_mla(gpu, 24, 8, rope_selection="uniform", calibration=[x.cuda() for x in calibration])
    assert next(gpu.parameters()).is_cuda
    ids, mask = padded_batch()
    reference = logits(cpu, ids, mask)
    on_gpu = logits(gpu, ids.cuda(), mask.cuda()).cpu()
    assert relative(on_gpu, reference) <= 1e-4
    exported, _ = to_deepseek_v3(gpu)
    assert next(exported.parameters()).is_cuda
    out = logits(exported, ids.cuda(), mask.cuda()).cpu()
    assert relative(out[0], reference[0]) <= 1e-4 and relative(out[1, 3:], reference[1, 3:]) <= 1e-4


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
