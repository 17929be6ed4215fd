"""Export a converted MLA model to stock ``deepseek_v3``: one folder that transformers, vLLM, SGLang, llama.cpp and
mlx-lm read the same way (no plugin, no remote code, no bias tensors, interleaved RoPE).

The plugin model (``hf_attn_swap.modeling.mla``) and DeepSeek-V3 differ in four ways; each is mapped exactly or
within a proven bound:

1. ``kv_a_layernorm`` (RMSNorm on the latent c before ``kv_b_proj``), linear regime. The latent rows of
   ``kv_a_proj_with_mqa`` are scaled by a small kappa (a power of two: exact in every dtype) and the norm weight is
   sqrt(eps) / kappa, so for z = kappa c (r' = kv_lora_rank channels, padding included)
       out = (sqrt(eps)/kappa) z / sqrt(|z|^2/r' + eps) = c / sqrt(1 + t),   t = kappa^2 |c|^2 / (r' eps):
   a per-token scalar on the latent (so on k_nope and v) with relative error 1 - 1/sqrt(1 + t) <= t/2. The
   attention input is the layer's RMSNorm output g * x_hat with |x_hat| <= sqrt(hidden), so |c| <= C =
   ||W_DKV diag(g)||_2 sqrt(hidden) for every input, and kappa <= sqrt(2 delta r' eps) / C bounds the error by
   delta for all inputs. Proven worst case per dtype (``NORM_ERROR_TARGETS``, below the dtype's rounding unit):
   float32 2^-26, bfloat16 2^-12 (float64 2^-40). float16 is refused: z = kappa c is ~1e-8 |c|, under float16's
   smallest subnormal (6e-8), so the latent would round to zero (export bfloat16/float32, or ``--format plugin``).
   Quantised copies must keep ``kv_a_proj_with_mqa`` in float32/bfloat16 (an int8/int4 grid scaled to rows of
   size ~kappa is fine per row, but activation quantisation of z or an fp16 matmul is not).
2. One epsilon for every norm. transformers builds ``kv_a_layernorm`` with its default eps 1e-6
   (``DeepseekV3RMSNorm(kv_lora_rank)``), vLLM / SGLang / llama.cpp / mlx-lm with ``rms_norm_eps`` (mlx-lm: 1e-6),
   so the export writes ``rms_norm_eps = 1e-6`` and keeps every other norm unchanged by rescaling the residual
   stream by s = sqrt(1e-6 / eps_src): embeddings, ``o_proj`` and ``down_proj`` times s, since
   RMSNorm(s x; s^2 eps) = RMSNorm(x; eps) with the same weight. The final norm's output is unchanged, so
   ``lm_head`` is written untied and unscaled (s = 1, i.e. eps_src = 1e-6, changes nothing).
3. RoPE, interleaved (the layout vLLM, llama.cpp and mlx-lm hard-code; ``rope_interleave: true`` for transformers
   and SGLang). The plugin's rope dims are rotate-half: kept pair i turns dims (i, i + m), m = d_rope/2. The
   export puts them at rows (2(j0+i), 2(j0+i)+1) of q_proj (per head) and of the rope key, on DeepSeek's ladder
   inv_freq_j = theta'^(-2j/d') with d' = the (padded) rope dims: the kept frequencies f_i = f_0 rho^i need
   theta' = rho^(-d'/2) and f_0 = rho^j0 for an integer j0 >= 0 with j0 + m <= d'/2. ``high``/``uniform`` give
   j0 = 0 for any d'; ``low`` gives j0 = head_dim/2 - m, so it needs ``pad_rope_dim >= head_dim`` (no linear
   scaling is ever written: plain ``rope_type: default``). Unused ladder slots get zero q and k rows. A rotary
   ``attention_scaling`` of the source folds into the q rope rows.
4. Softmax scale: DeepSeek uses (d_nope + d')^-0.5; the factor sqrt((d_nope + d') / (d_nope + d_rope)) is folded
   into q_proj. Zero latent channels (``pad_kv_lora_rank``) have zero rows in ``kv_a_proj_with_mqa`` and zero
   columns in ``kv_b_proj``: both paddings add exact zeros (only the cache grows), to fit kernels such as vLLM's
   FlashMLA / CPU_MLA (latent 512 + rope 64).

Everything else maps one to one: no attention biases (a source with q/k/v/o biases, e.g. Qwen2, is refused in
favour of ``--format plugin``; the rule of what deepseek_v3 expresses is ``methods.mla.deepseek_v3_problems``), dense MLPs in every layer (``first_k_dense_replace = num_hidden_layers``), no MTP
layer, ``q_lora_rank: null``, ``routed_scaling_factor: 1``, top-level ``rope_theta`` next to ``rope_parameters``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from ..adapters import unscaled_pairs
from ..methods.mla import check_deepseek_v3, deepseek_v3_problems
from ..methods.mla.config import check_padding
from ..methods.report import mla_kv_bytes_per_token
from ..modeling.mla import DECODER_FIELDS, MLAConfig

#: worst-case relative error delta of the linear-regime latent norm, per dtype (see the module docstring)
NORM_ERROR_TARGETS = {
    torch.float64: 2.0**-40,
    torch.float32: 2.0**-26,
    torch.bfloat16: 2.0**-12,
}
#: the epsilon every norm of the export uses (transformers' default for ``kv_a_layernorm``)
DEEPSEEK_EPS = 1e-6
#: config fields written although transformers' DeepseekV3Config does not define them (other loaders read them)
EXTRA_CONFIG_FIELDS = {"moe_layer_freq": 1, "topk_method": "noaux_tc", "scoring_func": "sigmoid"}


@dataclass(frozen=True)
class RopeLadder:
    """Where the kept frequencies sit on DeepSeek's plain ladder inv_freq_j = rope_theta^(-2j/d') (item 3):
    kept pair i at slot offset + i; attention_scaling: the source rotary's factor on cos/sin (folded into q)."""

    rope_theta: float
    offset: int
    attention_scaling: float


@dataclass(frozen=True)
class LatentNorm:
    """The linear-regime ``kv_a_layernorm`` of one layer (item 1): latent rows times kappa (a power of two), norm
    weight sqrt(eps)/kappa, the bound C on |c| over all inputs and the proven worst-case relative error."""

    kappa: float
    norm_weight: float
    input_bound: float
    bound: float


@dataclass(frozen=True)
class DeepseekV3Layout:
    """What the export fixes once for all layers of one plugin model: the stock config, the written latent and
    rope sizes (padding included), the rope ladder, the latent norm's eps and the residual-stream scale s."""

    config: object
    rank: int
    rope_dim: int
    ladder: RopeLadder
    eps: float
    residual: float
    source_rms_norm_eps: float
    latent_rank: int
    rope_dims_used: int

    @property
    def q_rope_scale(self) -> float:
        """RoPE's attention_scaling on q.k (cos and sin of both sides), folded into the q rope rows."""
        return self.ladder.attention_scaling**2


class LayerExport(NamedTuple):
    """One stock decoder layer: its state-dict entries and its latent norm."""

    state: dict
    norm: LatentNorm


class DeepseekV3Export(NamedTuple):
    """``to_deepseek_v3``'s result: the stock model and what ``conversion.json`` records of the export."""

    model: nn.Module
    details: dict


def check_deepseek_dtype(dtype: torch.dtype) -> None:
    """Raise a one-line ``ValueError`` for a dtype the linear-regime norm cannot hold (float16, ...)."""
    if dtype == torch.float16:
        raise ValueError(
            "the deepseek_v3 export cannot be float16 (its scaled latent falls into float16 subnormals): use "
            "--dtype bfloat16 or float32, or --format plugin"
        )
    if dtype not in NORM_ERROR_TARGETS:
        raise ValueError(f"the deepseek_v3 export supports float32, bfloat16 and float64, not {dtype}")


def attention_bias_names(model: nn.Module) -> list[str]:
    """Names of the non-zero attention biases of the plugin ``model`` (DeepSeek-V3 has none)."""
    names = []
    for name, param in model.named_parameters():
        if name.endswith(".bias") and ".self_attn." in name and bool(param.detach().abs().max() > 0):
            names.append(name)
    return names


def check_deepseek_expressible(config: MLAConfig, model: nn.Module | None = None) -> None:
    """Raise ``ValueError`` naming ``--format plugin`` when the plugin ``config`` (and the non-zero attention biases
    of ``model``, when given) has no deepseek_v3 form (``methods.mla.deepseek_v3_problems``)."""
    check_deepseek_v3(_model_problems(config, [] if model is None else attention_bias_names(model)))


def _model_problems(config: MLAConfig, attention_biases: list[str]) -> list[str]:
    return deepseek_v3_problems(
        num_rope_key_heads=config.num_rope_key_heads,
        uniform_rank=config.uniform_rank,
        rope_pairs=[config.layer_rope_pairs(i) for i in range(config.num_hidden_layers)],
        mlp_bias=getattr(config, "mlp_bias", False),
        attention_biases=attention_biases,
    )


def rope_ladder(config: MLAConfig, rope_dim: int) -> RopeLadder:
    """Where the kept frequencies of ``config`` sit on a plain DeepSeek ladder of ``rope_dim`` dims (module
    docstring, item 3), or ``ValueError`` naming the fix."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    source = LlamaRotaryEmbedding(config)  # what the plugin model computes (float32)
    pairs = config.layer_rope_pairs(0)
    target = source.inv_freq.double()[torch.tensor(pairs)]
    params = config.rope_parameters
    plain = unscaled_pairs(config, config.head_dim)
    if plain is None or max(pairs) < plain:  # frequencies no rope scaling touches, in float64: a clean theta'
        exponents = torch.tensor(pairs, dtype=torch.float64) / config.head_dim
        target = float(params["rope_theta"]) ** (-2 * exponents)
    kept = target.numel()
    first = float(target[0])
    if kept > 1:
        step = float(target[1] / target[0])
        offset = math.log(first) / math.log(step)
        theta = step ** (-rope_dim / 2)
    else:  # one frequency: at slot 0 when it is 1, else at slot 1 of a ladder through it
        offset = 0.0 if math.isclose(first, 1.0, rel_tol=1e-6) else 1.0
        theta = float(params.get("rope_theta", 10000.0)) if offset == 0 else first ** (-rope_dim / 2)
    j0, theta = round(offset), float(f"{theta:.12g}")
    if abs(offset - j0) < 1e-4 and j0 + kept <= rope_dim // 2 and _on_ladder(target, theta, rope_dim, j0):
        return RopeLadder(theta, j0, float(source.attention_scaling))
    if plain is not None and max(pairs) >= plain:  # e.g. llama3 / yarn: rescaled frequencies
        fix = (
            f"this source's rope scaling ({params['rope_type']}) rescales some of the kept frequencies (only the "
            f"{plain} fastest rotary pairs keep theta^(-2i/{config.head_dim})): convert with --rope-selection "
            f"freqfold, uniform or high and --rope-dim {2 * plain} or less, or use --format plugin"
        )
    else:
        fix = "convert with --rope-selection high or uniform"
        if abs(offset - j0) < 1e-4 and j0 >= 0 and 2 * (j0 + kept) > rope_dim:
            fix += f", pad the rope to --pad-rope-dim {2 * (j0 + kept)} or more (puts them on the ladder)"
        fix += ", or use --format plugin"
    raise ValueError(
        f"the kept rotary frequencies are not on a plain DeepSeek ladder 1/theta^(2j/{rope_dim}) (no rope scaling "
        f"is written, stock runtimes read it differently): {fix}"
    )


def _on_ladder(target: torch.Tensor, theta: float, rope_dim: int, offset: int) -> bool:
    """Whether DeepSeek's ladder of ``rope_dim`` dims at ``theta`` (as transformers computes it) holds ``target``
    [m] at slots offset..offset + m - 1."""
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding

    probe = DeepseekV3Config(
        hidden_size=8,
        num_attention_heads=1,
        qk_rope_head_dim=rope_dim,
        rope_parameters={"rope_type": "default", "rope_theta": theta},
    )
    ladder = DeepseekV3RotaryEmbedding(probe).inv_freq.double()[offset : offset + target.numel()]
    return torch.allclose(ladder, target, rtol=1e-5)


def linear_regime(
    weight: torch.Tensor, gamma: torch.Tensor, width: int, eps: float, dtype: torch.dtype
) -> LatentNorm:
    """The linear-regime latent norm for latent rows ``weight`` [r, hidden] fed by ``gamma * x_hat`` (item 1).

    width: channels the norm averages over (r' >= r). kappa is the largest power of two whose proven worst-case
    relative error stays within the dtype's target (``NORM_ERROR_TARGETS``).
    """
    check_deepseek_dtype(dtype)
    target = NORM_ERROR_TARGETS[dtype]
    hidden = weight.shape[1]
    bound_c = float(
        torch.linalg.matrix_norm(weight.detach().double().cpu() * gamma.detach().double().cpu(), ord=2)
    ) * math.sqrt(hidden)
    bound_c = max(bound_c, 1e-30)
    kappa = 2.0 ** math.floor(math.log2(math.sqrt(2 * target * width * eps) / bound_c))
    t_max = kappa**2 * bound_c**2 / (width * eps)
    return LatentNorm(kappa, math.sqrt(eps) / kappa, bound_c, 1 - 1 / math.sqrt(1 + t_max))


def deepseek_v3_config(config: MLAConfig, rank: int, rope_dim: int, rope_theta: float, dtype: torch.dtype):
    """The stock config: every field a loader reads written explicitly (dense layers, no q-LoRA, no bias)."""
    from transformers import DeepseekV3Config

    fields = {name: getattr(config, name) for name in DECODER_FIELDS}
    fields.update(rms_norm_eps=DEEPSEEK_EPS, tie_word_embeddings=False)
    ds_config = DeepseekV3Config(
        **fields,
        moe_intermediate_size=config.intermediate_size,  # unused: every layer is dense
        num_key_value_heads=config.num_attention_heads,
        kv_lora_rank=rank,
        q_lora_rank=None,
        qk_rope_head_dim=rope_dim,
        qk_nope_head_dim=config.qk_nope_head_dim,
        v_head_dim=config.v_head_dim,
        first_k_dense_replace=config.num_hidden_layers,
        num_nextn_predict_layers=0,
        routed_scaling_factor=1.0,
        rope_parameters={"rope_type": "default", "rope_theta": rope_theta},
        rope_interleave=True,
        attention_bias=False,
        dtype=dtype,
        **EXTRA_CONFIG_FIELDS,
    )
    ds_config.rope_theta = rope_theta  # top level too: mlx-lm and transformers < 5 read it there
    return ds_config


def deepseek_v3_layout(
    config: MLAConfig,
    dtype: torch.dtype,
    pad_kv_lora_rank: int | None = None,
    pad_rope_dim: int | None = None,
    attention_biases: Sequence[str] = (),
) -> DeepseekV3Layout:
    """Check that the plugin ``config`` (with these non-zero ``attention_biases``) has a stock form in ``dtype``
    and fix its layout; one-line ``ValueError`` naming the fix otherwise. Used by ``to_deepseek_v3``, by the
    layer-by-layer ``convert`` and, on the planned config, before any layer is converted."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention

    check_deepseek_dtype(dtype)
    check_deepseek_v3(_model_problems(config, list(attention_biases)))
    latent, rope = config.layer_kv_lora_rank(0), config.qk_rope_head_dim
    padding_problem = check_padding(latent, rope, pad_kv_lora_rank, pad_rope_dim)
    if padding_problem:
        raise ValueError(padding_problem)
    rank, rope_dim = pad_kv_lora_rank or latent, pad_rope_dim or rope
    ladder = rope_ladder(config, rope_dim)
    ds_config = deepseek_v3_config(config, rank, rope_dim, ladder.rope_theta, dtype)
    with torch.device("meta"):  # only the latent norm's epsilon is read
        eps = DeepseekV3Attention(ds_config, 0).kv_a_layernorm.variance_epsilon
    if eps != DEEPSEEK_EPS:
        raise ValueError(f"this transformers builds kv_a_layernorm with eps {eps}, not {DEEPSEEK_EPS}")
    return DeepseekV3Layout(
        config=ds_config,
        rank=rank,
        rope_dim=rope_dim,
        ladder=ladder,
        eps=eps,
        residual=math.sqrt(DEEPSEEK_EPS / config.rms_norm_eps),  # s: RMSNorm(s x; s^2 eps) = RMSNorm(x; eps)
        source_rms_norm_eps=config.rms_norm_eps,
        latent_rank=latent,
        rope_dims_used=rope,
    )


def deepseek_v3_outer_scale(name: str, layout: DeepseekV3Layout) -> float:
    """Factor on a tensor outside the decoder layers: the embeddings write the residual stream (times s); the
    final norm and ``lm_head`` read its normalised output (unchanged). ``lm_head.weight`` is always written
    (untied), from the unscaled embeddings when the source ties them."""
    return layout.residual if name == "model.embed_tokens.weight" else 1.0


@torch.no_grad()
def deepseek_v3_layer_state(layer: nn.Module, idx: int, layout: DeepseekV3Layout) -> LayerExport:
    """Stock decoder layer ``idx`` equal to the plugin ``MLADecoderLayer`` ``layer``: its state-dict entries
    ``model.layers.<idx>.*`` (float64 where rebuilt) and latent norm. One layer at a time: ``to_deepseek_v3`` and
    the layer-by-layer ``convert`` both call it."""
    prefix = f"model.layers.{idx}."
    state = {}
    for name in ("input_layernorm", "post_attention_layernorm"):
        state[f"{prefix}{name}.weight"] = getattr(layer, name).weight
    for name in ("gate_proj", "up_proj"):
        state[f"{prefix}mlp.{name}.weight"] = getattr(layer.mlp, name).weight
    state[f"{prefix}mlp.down_proj.weight"] = layout.residual * layer.mlp.down_proj.weight.double()
    attention, norm = attention_state(layer.self_attn, layer.input_layernorm.weight, prefix, layout)
    state.update(attention)
    return LayerExport(state, norm)


def deepseek_v3_details(layout: DeepseekV3Layout, norms: list[LatentNorm]) -> dict:
    """What ``conversion.json`` records of the export (``details["deepseek_v3"]``), from every layer's norm."""
    kappas = [norm.kappa for norm in norms]
    return {
        "kv_a_layernorm": "linear regime: latent rows x kappa, norm weight sqrt(eps)/kappa (see hf_attn_swap.export)",
        "kv_lora_rank": layout.rank,
        "latent_rank": layout.latent_rank,
        "qk_rope_head_dim": layout.rope_dim,
        "rope_dims_used": layout.rope_dims_used,
        "rope_ladder_offset": layout.ladder.offset,
        "rope_theta": layout.config.rope_theta,
        "rms_norm_eps": DEEPSEEK_EPS,
        "source_rms_norm_eps": layout.source_rms_norm_eps,
        "residual_scale": layout.residual,
        "norm_relative_error_bound": max(norm.bound for norm in norms),
        "kappa_range": [min(kappas), max(kappas)],
    }


def record_deepseek_v3(report, details: dict, num_layers: int, dtype: torch.dtype) -> None:
    """Put the export's ``details`` into a conversion ``report``: the written (padded) latent and rope sizes and the
    KV bytes per token they cache. One place for the in-memory and the layer-by-layer ``convert``."""
    report.details["deepseek_v3"] = details
    report.after.update(kv_lora_rank=details["kv_lora_rank"], qk_rope_head_dim=details["qk_rope_head_dim"])
    report.kv_bytes_per_token_after = mla_kv_bytes_per_token(
        [details["kv_lora_rank"]] * num_layers, details["qk_rope_head_dim"], 1, dtype
    )


@torch.no_grad()
def to_deepseek_v3(
    model: nn.Module, pad_kv_lora_rank: int | None = None, pad_rope_dim: int | None = None
) -> DeepseekV3Export:
    """A ``DeepseekV3ForCausalLM`` (same dtype and device) computing what the plugin MLA ``model`` computes.

    Args:
        model: a converted plugin model (``hf_attn_swap.convert_to_mla``).
        pad_kv_lora_rank, pad_rope_dim: write a latent of that many channels / that many rope dims (>= the real
            sizes), the extra ones exact zeros (e.g. 512 and 64 for vLLM's FlashMLA and CPU_MLA kernels).

    Returns:
        ``DeepseekV3Export(model, details)`` (a named tuple: ``ds, details = to_deepseek_v3(model)``); details
        records the latent norm's error bound and the layout.
    """
    from transformers import DeepseekV3ForCausalLM

    config = model.config
    if not isinstance(config, MLAConfig):
        raise ValueError(
            f"to_deepseek_v3 needs a converted MLA model (hf_attn_swap.convert_to_mla), got {config.model_type!r}"
        )
    dtype = model.lm_head.weight.dtype
    layout = deepseek_v3_layout(config, dtype, pad_kv_lora_rank, pad_rope_dim, attention_bias_names(model))
    ds = DeepseekV3ForCausalLM(layout.config).to(device=model.lm_head.weight.device, dtype=dtype).eval()
    outer = {
        "model.embed_tokens.weight": model.model.embed_tokens.weight,
        "model.norm.weight": model.model.norm.weight,
        "lm_head.weight": model.lm_head.weight,
    }
    state = {name: deepseek_v3_outer_scale(name, layout) * t.double() for name, t in outer.items()}
    layers = [deepseek_v3_layer_state(layer, idx, layout) for idx, layer in enumerate(model.model.layers)]
    for layer in layers:
        state.update(layer.state)
    ds.load_state_dict({k: v.detach().to(dtype) for k, v in state.items()}, strict=True)
    ds.config._attn_implementation = (
        "sdpa" if config._attn_implementation == "latent_sdpa" else config._attn_implementation
    )
    ds.generation_config = type(model.generation_config).from_dict(model.generation_config.to_dict())
    return DeepseekV3Export(ds, deepseek_v3_details(layout, [layer.norm for layer in layers]))


def interleave_rope(rows: torch.Tensor, rope_dim: int, offset: int) -> torch.Tensor:
    """Rotate-half rope rows [..., d, hidden] (pair i = rows i, i + d/2) -> interleaved rows [..., rope_dim, hidden]
    with pair i at rows 2(offset + i), 2(offset + i) + 1 and zeros elsewhere."""
    half = rows.shape[-2] // 2
    out = rows.new_zeros(*rows.shape[:-2], rope_dim, rows.shape[-1])
    slots = 2 * (offset + torch.arange(half))
    out[..., slots, :] = rows[..., :half, :]
    out[..., slots + 1, :] = rows[..., half:, :]
    return out


def attention_state(attn, gamma, prefix: str, layout: DeepseekV3Layout) -> tuple[dict, LatentNorm]:
    """State-dict entries of one DeepseekV3Attention equal to the plugin ``attn`` (module docstring), and its
    latent norm. Built in float64 on the CPU; ``load_state_dict`` copies them to the model's device and dtype."""
    dtype = attn.q_proj.weight.dtype
    rank, rope_dim, offset = layout.rank, layout.rope_dim, layout.ladder.offset
    r, d_rope, d_nope, heads = attn.kv_lora_rank, attn.qk_rope_head_dim, attn.qk_nope_head_dim, attn.num_heads
    hidden = attn.q_proj.weight.shape[1]
    kv_a = attn.kv_a_proj_with_mqa.weight.double().cpu()
    norm = linear_regime(kv_a[:r], gamma, rank, layout.eps, dtype)
    # q: per head [nope ; rope] -> [nope ; interleaved, padded rope], times the softmax-scale fold
    q = attn.q_proj.weight.double().cpu().view(heads, d_nope + d_rope, hidden)
    q_rope = interleave_rope(q[:, d_nope:], rope_dim, offset) * layout.q_rope_scale
    fold = math.sqrt((d_nope + rope_dim) / (d_nope + d_rope))
    q = torch.cat([q[:, :d_nope], q_rope], dim=1) * fold
    kv_b = attn.kv_b_proj.weight.double().cpu()
    kv_a_rows = [
        norm.kappa * kv_a[:r],
        kv_a.new_zeros(rank - r, hidden),
        interleave_rope(kv_a[r:], rope_dim, offset),
    ]
    state = {
        f"{prefix}self_attn.q_proj.weight": q.reshape(-1, hidden),
        f"{prefix}self_attn.kv_a_proj_with_mqa.weight": torch.cat(kv_a_rows),
        f"{prefix}self_attn.kv_a_layernorm.weight": torch.full(
            (rank,), norm.norm_weight, dtype=torch.float64
        ),
        f"{prefix}self_attn.kv_b_proj.weight": torch.cat(
            [kv_b, kv_b.new_zeros(kv_b.shape[0], rank - r)], dim=1
        ),
        f"{prefix}self_attn.o_proj.weight": layout.residual * attn.o_proj.weight.double(),
    }
    return state, norm
