"""Export a converted MLA model to stock ``deepseek_v3`` (loads with plain ``AutoModelForCausalLM``, no plugin).

DeepSeek-V3 attention differs from the plugin format in three ways, each handled without approximation beyond a
proven bound:

1. ``kv_a_layernorm``: an RMSNorm on the latent before ``kv_b_proj``. We append one constant channel a (made by
   the ``kv_a_proj_with_mqa`` bias; its weight row is 0) and scale the real latent by kappa, so the norm sees
   z = [kappa c ; a]. With rho(z) = sqrt((|kappa c|^2 + a^2) / (r + 1) + eps) and norm weight rho(0) / kappa on
   the latent channels (0 on the constant one), the layer outputs
       c * rho(0) / rho(z) = c / sqrt(1 + t),   t = kappa^2 |c|^2 / (a^2 + (r + 1) eps),
   a per-token scalar factor on the latent (so on k_nope and v) with relative error 1 - 1/sqrt(1 + t) <= t / 2.
   The attention input is the layer's RMSNorm output x = g * x_hat with |x_hat| <= sqrt(hidden), so
   |c| <= C = ||W_DKV diag(g)||_2 sqrt(hidden) for every input; choosing kappa = sqrt(2 delta) a / C bounds the
   error by delta for all inputs: 2^-26 in float32, 2^-12 in bfloat16, 2^-14 in float16 (below each dtype's
   rounding unit; 2^-40 in float64). The constant costs one cached value per token and layer.
2. ``q_proj`` has no bias when ``q_lora_rank`` is None. Sources with q biases (Qwen2) go through the q-LoRA path:
   q_a_proj = [kappa_q I ; 0] with bias [0 ; a], q_a_layernorm as above (the constant channel's weight makes it
   exactly rho(0)/rho(z)), q_b_proj = [W_q | b_q]; so q = (W_q x + b_q) rho(0) / rho(z), same bound with
   C_q = max|g| sqrt(hidden).
3. Everything else maps one to one: ``attention_bias=True`` (the constant needs the ``kv_a_proj_with_mqa`` bias;
   o_proj gets the source's o bias plus the folded v bias, or zeros), ``rope_interleave=False`` (the plugin uses
   rotate-half), one rope key, dense MLPs everywhere (``first_k_dense_replace = num_hidden_layers``), no MTP.
   The kept rotary frequencies must be a DeepSeek ladder: ``uniform`` keeps the source theta; ``high``/``low``
   become theta' (and linear scaling).
"""

from __future__ import annotations

import math

import torch
from torch import nn

#: worst-case relative error delta of the constant-channel trick, per dtype (see the module docstring)
NORM_ERROR_TARGETS = {
    torch.float64: 2.0**-40,
    torch.float32: 2.0**-26,
    torch.bfloat16: 2.0**-12,
    torch.float16: 2.0**-14,
}
#: value of the constant channel (a power of two: exact in every dtype, a^2 far inside float16's range)
CONSTANT = 256.0


def check_deepseek_expressible(config) -> None:
    """Raise ``ValueError`` naming ``--format plugin`` when ``config`` (an ``MLAConfig``) has no deepseek_v3 form."""
    problems = []
    if config.num_rope_key_heads != 1:
        problems.append(
            f"{config.num_rope_key_heads} rope keys per layer (deepseek_v3 has one shared rope key)"
        )
    if isinstance(config.kv_lora_rank, list) and len(set(config.kv_lora_rank)) > 1:
        problems.append("per-layer kv_lora_rank (deepseek_v3 has one rank for all layers)")
    pairs = [config.layer_rope_pairs(i) for i in range(config.num_hidden_layers)]
    if any(p != pairs[0] for p in pairs):
        problems.append("different rotary frequencies per layer (deepseek_v3 has one rope for all layers)")
    if getattr(config, "mlp_bias", False):
        problems.append("MLP biases (DeepseekV3MLP has none)")
    if problems:
        raise ValueError(
            "this MLA model cannot be written as stock deepseek_v3: "
            + "; ".join(problems)
            + ". Use --format plugin (rope selection uniform/high/low, rank allocation uniform and one rope key "
            "export to deepseek_v3)."
        )


def deepseek_rope_parameters(config) -> dict:
    """DeepSeek rope parameters whose frequencies equal the kept source ones (``MLAConfig``), or ``ValueError``."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    d_rope = config.qk_rope_head_dim
    inv_freq = LlamaRotaryEmbedding(config).inv_freq  # float32, as the plugin model computes it
    target = inv_freq.double()[torch.tensor(config.layer_rope_pairs(0))]
    candidates = [dict(config.rope_parameters)]
    if config.rope_parameters.get("rope_type", "default") == "default" and target.numel() > 1:
        kept = target.numel()
        theta = float((target[0] / target[1]) ** kept)
        ladder = {"rope_type": "default", "rope_theta": theta}
        if not math.isclose(float(target[0]), 1.0, rel_tol=1e-9):
            ladder = {"rope_type": "linear", "rope_theta": theta, "factor": float(1.0 / target[0])}
        candidates.append(ladder)
    for params in candidates:
        probe = DeepseekV3Config(
            hidden_size=8, num_attention_heads=1, qk_rope_head_dim=d_rope, rope_parameters=dict(params)
        )
        rotary = DeepseekV3RotaryEmbedding(probe)
        if rotary.attention_scaling == 1.0 and torch.allclose(rotary.inv_freq.double(), target, rtol=1e-5):
            return probe.rope_parameters
    raise ValueError(
        f"the kept rotary frequencies {target.tolist()} are not a DeepSeek ladder 1/theta^(2i/{d_rope}) for any "
        "theta: export with --format plugin, or convert with --rope-selection uniform"
    )


def dominant_channel(weight: torch.Tensor, gamma: torch.Tensor, eps: float, dtype: torch.dtype) -> dict:
    """Constants of the constant-channel trick for latent rows ``weight`` [r, hidden] fed by ``gamma * x_hat``.

    Returns kappa (latent scale), constant a, norm weight rho(0)/kappa, the input bound C and the proven worst-case
    relative error ``bound`` (<= the dtype's target).
    """
    target = NORM_ERROR_TARGETS.get(dtype)
    if target is None:
        raise ValueError(f"deepseek_v3 export supports float32, bfloat16, float16 and float64, not {dtype}")
    rank, hidden = weight.shape
    bound_c = float(
        torch.linalg.matrix_norm(weight.detach().double().cpu() * gamma.detach().double().cpu(), ord=2)
    ) * math.sqrt(hidden)
    bound_c = max(bound_c, 1e-30)
    kappa = math.sqrt(2 * target) * CONSTANT / bound_c
    rho0 = math.sqrt(CONSTANT**2 / (rank + 1) + eps)
    t_max = kappa**2 * bound_c**2 / (CONSTANT**2 + (rank + 1) * eps)
    return {
        "kappa": kappa,
        "constant": CONSTANT,
        "norm_weight": rho0 / kappa,
        "constant_weight": rho0 / CONSTANT,
        "input_bound": bound_c,
        "bound": 1 - 1 / math.sqrt(1 + t_max),
    }


def deepseek_v3_config(config, rope_parameters: dict, q_lora: bool, dtype: torch.dtype):
    from transformers import DeepseekV3Config

    from ..methods.mla.convert import DECODER_FIELDS

    return DeepseekV3Config(
        **{name: getattr(config, name) for name in DECODER_FIELDS},
        moe_intermediate_size=config.intermediate_size,  # unused: every layer is dense
        num_key_value_heads=config.num_attention_heads,
        kv_lora_rank=config.layer_kv_lora_rank(0) + 1,
        q_lora_rank=config.hidden_size + 1 if q_lora else None,
        qk_rope_head_dim=config.qk_rope_head_dim,
        qk_nope_head_dim=config.qk_nope_head_dim,
        v_head_dim=config.v_head_dim,
        first_k_dense_replace=config.num_hidden_layers,
        num_nextn_predict_layers=0,
        rope_parameters=rope_parameters,
        rope_interleave=False,
        attention_bias=True,
        dtype=dtype,
    )


def deepseek_v3_model_config(config, dtype: torch.dtype):
    """(``DeepseekV3Config``, rope parameters) of the stock model equal to the plugin ``config`` (an ``MLAConfig``)."""
    check_deepseek_expressible(config)
    rope = deepseek_rope_parameters(config)
    return deepseek_v3_config(config, rope, bool(config.q_proj_bias), dtype), rope


@torch.no_grad()
def deepseek_v3_layer_state(layer: nn.Module, idx: int, ds_config) -> tuple[dict, list[float]]:
    """The state-dict entries (``model.layers.<idx>.*``, float64 for the rebuilt attention tensors) of stock
    decoder layer ``idx`` equal to the plugin ``MLADecoderLayer`` ``layer``, and the norm-trick error bounds.
    One layer at a time: ``to_deepseek_v3`` and the layer-by-layer ``convert`` both call it."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

    with torch.device("meta"):  # only its norms' epsilons are read
        ds_attn = DeepseekV3Attention(ds_config, idx)
    prefix = f"model.layers.{idx}."
    state = {
        f"{prefix}{name}.weight": getattr(layer, name).weight
        for name in ("input_layernorm", "post_attention_layernorm")
    }
    for name in ("gate_proj", "up_proj", "down_proj"):
        state[f"{prefix}mlp.{name}.weight"] = getattr(layer.mlp, name).weight
    bounds: list[float] = []
    state.update(_attention_state(layer.self_attn, layer.input_layernorm.weight, ds_attn, prefix, bounds))
    return state, bounds


def deepseek_v3_details(ds_config, rope: dict, bounds: list[float]) -> dict:
    """What ``conversion.json`` records of the export (``details["deepseek_v3"]``)."""
    return {
        "kv_a_layernorm": "constant latent channel (see hf_attn_swap.export)",
        "kv_lora_rank": ds_config.kv_lora_rank,
        "latent_rank": ds_config.kv_lora_rank - 1,
        "q_lora_rank": ds_config.q_lora_rank,
        "norm_relative_error_bound": max(bounds),
        "rope_parameters": rope,
    }


@torch.no_grad()
def to_deepseek_v3(model: nn.Module):
    """A ``DeepseekV3ForCausalLM`` (same dtype and device) computing what the plugin MLA ``model`` computes.

    Returns (deepseek model, details) where details records the per-layer error bounds of the norm trick.
    """
    from transformers import DeepseekV3ForCausalLM

    from ..modeling.mla import MLAConfig

    config = model.config
    if not isinstance(config, MLAConfig):
        raise ValueError(
            f"to_deepseek_v3 needs a converted MLA model (hf_attn_swap.convert_to_mla), got {config.model_type!r}"
        )
    ref = model.lm_head.weight
    dtype = ref.dtype
    ds_config, rope = deepseek_v3_model_config(config, dtype)
    ds = DeepseekV3ForCausalLM(ds_config).to(device=ref.device, dtype=dtype).eval()

    state = {
        "model.embed_tokens.weight": model.model.embed_tokens.weight,
        "model.norm.weight": model.model.norm.weight,
    }
    state["lm_head.weight"] = model.lm_head.weight
    bounds = []
    for idx, layer in enumerate(model.model.layers):
        layer_state, layer_bounds = deepseek_v3_layer_state(layer, idx, ds_config)
        state.update(layer_state)
        bounds += layer_bounds
    ds.load_state_dict({k: v.detach().to(dtype) for k, v in state.items()}, strict=True)
    ds.config._attn_implementation = (
        "sdpa" if config._attn_implementation == "latent_sdpa" else config._attn_implementation
    )
    return ds, deepseek_v3_details(ds_config, rope, bounds)


def _attention_state(attn, gamma, ds_attn, prefix: str, bounds: list) -> dict:
    """State-dict entries of one DeepseekV3Attention equal to the plugin ``attn`` (module docstring).

    Built in float64 on the CPU; ``load_state_dict`` copies them to the model's device and dtype.
    """
    dtype = attn.q_proj.weight.dtype
    rank, hidden = attn.kv_lora_rank, attn.q_proj.weight.shape[1]
    kv_a = attn.kv_a_proj_with_mqa.weight.double().cpu()
    kv_a_bias = attn.kv_a_proj_with_mqa.bias
    kv_a_bias = kv_a.new_zeros(kv_a.shape[0]) if kv_a_bias is None else kv_a_bias.double().cpu()
    if kv_a_bias[:rank].abs().max() > 0:
        raise ValueError("the latent has a bias; deepseek_v3 export expects a bias-free latent")
    eps = ds_attn.kv_a_layernorm.variance_epsilon
    kv = dominant_channel(kv_a[:rank], gamma, eps, dtype)
    bounds.append(kv["bound"])
    zero_row = kv_a.new_zeros(1, hidden)
    state = {
        f"{prefix}self_attn.kv_a_proj_with_mqa.weight": torch.cat(
            [kv["kappa"] * kv_a[:rank], zero_row, kv_a[rank:]]
        ),
        f"{prefix}self_attn.kv_a_proj_with_mqa.bias": torch.cat(
            [kv_a_bias[:rank], kv_a_bias.new_tensor([kv["constant"]]), kv_a_bias[rank:]]
        ),
        f"{prefix}self_attn.kv_a_layernorm.weight": torch.cat(
            [torch.full((rank,), kv["norm_weight"], dtype=torch.float64), kv_a.new_zeros(1)]
        ),
        f"{prefix}self_attn.kv_b_proj.weight": torch.cat(
            [attn.kv_b_proj.weight.double().cpu(), kv_a.new_zeros(attn.kv_b_proj.weight.shape[0], 1)], dim=1
        ),
        f"{prefix}self_attn.o_proj.weight": attn.o_proj.weight,
        f"{prefix}self_attn.o_proj.bias": (
            attn.o_proj.bias if attn.o_proj.bias is not None else attn.o_proj.weight.new_zeros(hidden)
        ),
    }
    if attn.q_proj.bias is None:
        state[f"{prefix}self_attn.q_proj.weight"] = attn.q_proj.weight
        return state
    q = dominant_channel(
        torch.eye(hidden, dtype=torch.float64), gamma, ds_attn.q_a_layernorm.variance_epsilon, dtype
    )
    bounds.append(q["bound"])
    state.update(
        {
            f"{prefix}self_attn.q_a_proj.weight": torch.cat(
                [q["kappa"] * torch.eye(hidden, dtype=torch.float64), zero_row]
            ),
            f"{prefix}self_attn.q_a_proj.bias": torch.cat(
                [torch.zeros(hidden, dtype=torch.float64), torch.tensor([q["constant"]], dtype=torch.float64)]
            ),
            f"{prefix}self_attn.q_a_layernorm.weight": torch.cat(
                [
                    torch.full((hidden,), q["norm_weight"], dtype=torch.float64),
                    torch.tensor([q["constant_weight"]], dtype=torch.float64),
                ]
            ),
            f"{prefix}self_attn.q_b_proj.weight": torch.cat(
                [attn.q_proj.weight.double().cpu(), attn.q_proj.bias.double().cpu()[:, None]], dim=1
            ),
        }
    )
    return state
