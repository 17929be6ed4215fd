"""``convert_to_mla``: rewrite a loaded Llama-family model's attention in place into multi-head latent attention.

Per layer (math in float64, then cast to the model's dtype):
1. choose the rotary pairs that keep RoPE (``rope.select_rope_pairs``) and mix each group of KV heads into one
   shared rope key per pair (``rope.rope_key_mixing``); the rest of every key becomes position-free (NoPE);
2. factor [K_nope ; V] into a rank-r latent (``factorize.joint_kv``), r per layer from ``budget.allocate_ranks``;
3. fold the change of softmax scale, head_dim^-0.5 -> (d_nope + d_rope)^-0.5, into q_proj; drop the NoPE key
   bias (it adds the same q.b to every key of a query, which softmax ignores) and fold the value bias into the
   o_proj bias (attention weights sum to 1).
With every rotary pair kept, one rope key per KV head and full rank, the result equals the source exactly.

The model becomes an :class:`~hf_attn_swap.modeling.mla.MLAForCausalLM` (plugin format, saves and loads with
``import hf_attn_swap``); ``hf_attn_swap.export.to_deepseek_v3`` turns the DeepSeek-expressible subset into stock
``deepseek_v3``.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from ...adapters import AttentionLayout, UnsupportedArchitectureError, get_adapter
from ...modeling.mla import MLAAttention, MLAConfig, MLADecoderLayer, MLAForCausalLM, MLAModel
from ..affine import weighted_moment, with_bias
from ..calibration import Calibration, CalibrationText
from ..device import math_device
from ..gqa.base import per_query_head
from ..layerwise import ModelLayers, convert_layers
from ..report import ConversionReport, kv_bytes_per_token, model_dtype
from .budget import allocate_ranks
from .config import MLAConversionConfig
from .factorize import JointKV, joint_kv
from .freqfold import fold_ladder, freqfold
from .rope import pair_dims, rope_key_mixing, select_rope_pairs, validate_rope_dim
from .weighting import head_metrics

#: config fields of the Llama-style decoder that every format carries over unchanged
DECODER_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "use_cache",
                  "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "attention_dropout")  # fmt: skip
#: source families with Llama's decoder (RMSNorm, gated MLP, rotate-half RoPE, separate q/k/v/o)
MLA_FAMILIES = ("llama", "mistral", "qwen2")


@dataclass
class MLALayerWeights:
    """One converted layer in the math convention y = x W^T + b.

    q [H, d_nope + d_rope, hidden] (nope dims, then rope dims in rotate-half order), q_bias [H, d_nope + d_rope];
    kv_down [r, hidden] (latent c = kv_down x); rope_key [n, d_rope, hidden], rope_key_bias [n, d_rope];
    kv_up [H, d_nope + d_v, r] (W_UK rows, then W_UV rows); o [hidden, H, d_v], o_bias [hidden];
    rope_pairs: kept source rotary pairs.
    """

    q: torch.Tensor
    kv_down: torch.Tensor
    rope_key: torch.Tensor
    kv_up: torch.Tensor
    o: torch.Tensor
    rope_pairs: list[int]
    q_bias: torch.Tensor | None = None
    rope_key_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None


def max_kv_lora_rank(layout: AttentionLayout) -> int:
    """The rank of [K ; V] is at most min(hidden, 2 H_kv head_dim): larger latents cannot hold more."""
    return min(layout.hidden_size, 2 * layout.num_key_value_heads * layout.head_dim)


def mla_kv_bytes_per_token(ranks: list[int], qk_rope_head_dim: int, num_rope_key_heads: int, dtype) -> int:
    """sum over layers of (r_l + n * d_rope) * bytes."""
    element = torch.empty((), dtype=dtype).element_size()
    return sum(r + num_rope_key_heads * qk_rope_head_dim for r in ranks) * element


def _check_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    return value


def resolve_kv_budget(config, options: MLAConversionConfig) -> MLAConversionConfig:
    """``options`` with a ``kv_budget`` split into kv_lora_rank + qk_rope_head_dim for this source model."""
    if options.kv_budget is None:
        return options
    layout = get_adapter(config).layout(config)
    return options.resolved_split(layout.rope.rotary_dim, 2 * layout.num_key_value_heads * layout.head_dim)


def validate_mla_options(config, options: MLAConversionConfig) -> AttentionLayout:
    """What needs the source ``config`` (family, rank and rope-dim ranges, rope keys dividing the KV heads);
    ``options`` checked itself on construction. Raises ``ValueError`` / ``UnsupportedArchitectureError``."""
    adapter = get_adapter(config)
    if adapter.family not in MLA_FAMILIES:
        raise UnsupportedArchitectureError(
            f"MLA conversion supports the Llama-style families {', '.join(MLA_FAMILIES)}; got "
            f"{config.model_type!r}. (Its decoder must be Llama's: RMSNorm, gated MLP, rotate-half RoPE, "
            "separate q/k/v/o.)"
        )
    layout = adapter.layout(config)
    if layout.rope.style != "half" or layout.rope.rotary_dim != layout.head_dim:
        raise UnsupportedArchitectureError(
            f"MLA conversion needs rotate-half RoPE on all {layout.head_dim} head dims; this model rotates "
            f"{layout.rope.rotary_dim} ({layout.rope.style})"
        )
    layer_types = getattr(config, "layer_types", None) or []
    sliding = any(t != "full_attention" for t in layer_types) or (
        config.model_type == "mistral" and getattr(config, "sliding_window", None) is not None
    )
    if sliding:
        raise ValueError(
            "MLA conversion does not support sliding-window attention layers: set sliding_window=None "
            "(or use_sliding_window=False) in the source config if the model is used within its window"
        )
    if getattr(config, "mlp_bias", False) and config.model_type != "llama":
        raise UnsupportedArchitectureError("MLP biases are only supported for Llama sources")
    max_rank = max_kv_lora_rank(layout)
    rank = _check_int("kv_lora_rank", options.kv_lora_rank)
    if not 1 <= rank <= max_rank:
        raise ValueError(
            f"kv_lora_rank={rank} is out of range: it must be between 1 and {max_rank} = min(hidden_size "
            f"{layout.hidden_size}, 2 x {layout.num_key_value_heads} KV heads x head_dim {layout.head_dim}) for "
            f"this {layout.family} model"
        )
    validate_rope_dim(layout, options.qk_rope_head_dim, options.rope_selection)
    if options.rope_selection == "freqfold":
        fold_ladder(layout, options.qk_rope_head_dim, options.rope_fold)
    rope_heads = options.num_rope_key_heads
    kv = layout.num_key_value_heads
    if rope_heads < 1 or kv % rope_heads:
        raise ValueError(
            f"num_rope_key_heads={rope_heads} must divide the {kv} KV heads: choose one of "
            f"{[n for n in range(1, kv + 1) if kv % n == 0]} (1 = DeepSeek's single shared rope key)"
        )
    return layout


def needs_calibration(factorization: str) -> bool:
    """``pca`` needs activations (the ``norm`` selection and the rope-key mixing use them when given)."""
    return factorization == "pca"


@contextmanager
def _lapack_threads(count: int):
    """Run the (small, float64) decompositions on ``count`` threads: multi-threaded LAPACK on a busy machine
    can take 100x longer on these 400 x 600 matrices than one thread."""
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


@dataclass
class _LayerPlan:
    q_nope: torch.Tensor  # [H, D, hidden + 1]
    q_rope: torch.Tensor  # [H, d_rope, hidden + 1]
    rope_key: torch.Tensor  # [n, d_rope, hidden + 1]
    kv: JointKV
    o: torch.Tensor
    o_bias: torch.Tensor | None
    pairs: list[int]


def _plan_layer(
    weights, layout, qk_rope_head_dim, rope_selection, factorization, inputs, rope_heads, balance, scales,
    fold=None, fold_ladder=True, key_weights=None, key_weight_power=0.0, metric_power=0.0,
):  # fmt: skip
    h, kv_heads, d = weights.num_attention_heads, weights.num_key_value_heads, layout.head_dim
    hidden = layout.hidden_size
    q = with_bias(weights.q, weights.q_bias)
    k = with_bias(weights.k, weights.k_bias)
    # calibration rows [x ; 1] and their second moment E[x x^T] (identity without calibration)
    if inputs is not None:
        inputs = inputs.to(device=q.device, dtype=q.dtype)
    x = None if inputs is None else with_bias(inputs, torch.ones(len(inputs), dtype=q.dtype, device=q.device))
    moment = torch.eye(hidden + 1, dtype=q.dtype, device=q.device) if x is None else x.T @ x / len(x)
    # keys in proportion to the attention they receive (weighting.py): the rope key's and the latent's statistics
    keys = moment if x is None else weighted_moment(x, key_weights, key_weight_power)
    if rope_selection == "freqfold":
        q_rope, rope_key, k_nope, pairs = freqfold(
            q, k, layout, qk_rope_head_dim, fold, keys, rope_heads, fold_ladder
        )
    else:
        pairs = select_rope_pairs(rope_selection, layout, qk_rope_head_dim, q, k, x)
        first, second = pair_dims(layout, pairs)
        m, group = len(pairs), kv_heads // rope_heads
        u = rope_key_mixing(k, first, second, keys, rope_heads)  # [H_kv, m]
        rope_of_kv = torch.arange(kv_heads, device=q.device) // group
        shared = torch.stack([k[:, first], k[:, second]], dim=1) * u[:, None, :, None]  # [H_kv, 2, m, hidden+1]
        rope_key = shared.view(rope_heads, group, 2 * m, -1).sum(1)  # [n, d_rope, hidden+1]
        k_nope = k.clone()
        k_nope[:, first] -= u[..., None] * rope_key[rope_of_kv, :m]
        k_nope[:, second] -= u[..., None] * rope_key[rope_of_kv, m:]
        u_q = per_query_head(u, h)
        q_rope = torch.cat([q[:, first] * u_q[..., None], q[:, second] * u_q[..., None]], dim=1)

    score_fold, nope_fold = scales
    kv = joint_kv(
        k_nope[..., :hidden].reshape(kv_heads * d, hidden),
        weights.v.reshape(kv_heads * d, hidden),
        factorization,
        keys[:hidden, :hidden],
        balance,
        head_metrics(q, weights.o, moment, kv_heads, metric_power),
    )
    o_bias = weights.o_bias
    if weights.v_bias is not None:  # sum_s p_s (W_UV c_s + b_v) = W_UV sum_s p_s c_s + b_v
        folded = torch.einsum("ohd,hd->o", weights.o, per_query_head(weights.v_bias, h))
        o_bias = folded if o_bias is None else o_bias + folded
    return _LayerPlan(q * score_fold * nope_fold, q_rope * score_fold, rope_key, kv, weights.o, o_bias, pairs)


def _layer_weights(plan: _LayerPlan, rank: int, num_attention_heads: int, head_dim: int, has_q_bias: bool):
    down, up_k, up_v = plan.kv.factors(rank)
    kv_heads = up_k.shape[0] // head_dim
    up_k = per_query_head(up_k.view(kv_heads, head_dim, rank), num_attention_heads)
    up_v = per_query_head(up_v.view(kv_heads, head_dim, rank), num_attention_heads)
    q = torch.cat([plan.q_nope, plan.q_rope], dim=1)
    rope_bias = plan.rope_key[..., -1]
    return MLALayerWeights(
        q=q[..., :-1],
        q_bias=q[..., -1] if has_q_bias else None,
        kv_down=down,
        rope_key=plan.rope_key[..., :-1],
        rope_key_bias=rope_bias if bool(rope_bias.abs().max() > 0) else None,
        kv_up=torch.cat([up_k, up_v], dim=1),
        o=plan.o,
        o_bias=plan.o_bias,
        rope_pairs=plan.pairs,
    )


def mla_config(source_config, ranks, qk_rope_head_dim, num_rope_key_heads, rope_pairs, biases) -> MLAConfig:
    """The plugin config: the source's Llama fields plus the MLA fields.

    rope_pairs: per-layer kept pairs, or None for DeepSeek's uniform ladder. biases: (q, rope key, o).
    """
    shared = (*DECODER_FIELDS, "rope_parameters", "mlp_bias", "head_dim")
    fields = {name: getattr(source_config, name) for name in shared if hasattr(source_config, name)}
    fields["head_dim"] = (
        fields.get("head_dim") or source_config.hidden_size // source_config.num_attention_heads
    )
    return MLAConfig(
        **fields,
        num_key_value_heads=source_config.num_attention_heads,
        kv_lora_rank=ranks[0] if len(set(ranks)) == 1 else list(ranks),
        qk_rope_head_dim=qk_rope_head_dim,
        qk_nope_head_dim=fields["head_dim"],
        v_head_dim=fields["head_dim"],
        num_rope_key_heads=num_rope_key_heads,
        rope_pairs=rope_pairs,
        q_proj_bias=biases[0],
        kv_a_proj_bias=biases[1],
        o_proj_bias=biases[2],
        source_model_type=source_config.model_type,
        dtype=getattr(source_config, "dtype", None),
    )


def build_attention(
    config: MLAConfig, layer_idx: int, weights: MLALayerWeights, like: nn.Module
) -> MLAAttention:
    """An :class:`MLAAttention` holding ``weights``, on ``like``'s device and dtype."""
    ref = next(like.parameters())
    attn = MLAAttention(config, layer_idx).to(device=ref.device, dtype=ref.dtype)
    hidden = weights.q.shape[-1]
    rope_bias = weights.rope_key_bias
    if rope_bias is None:
        rope_bias = weights.rope_key.new_zeros(weights.rope_key.shape[:-1])
    pairs = [
        (attn.q_proj.weight, weights.q.reshape(-1, hidden)),
        (attn.q_proj.bias, weights.q_bias),
        (attn.kv_a_proj_with_mqa.weight, torch.cat([weights.kv_down, weights.rope_key.reshape(-1, hidden)])),
        (
            attn.kv_a_proj_with_mqa.bias,
            torch.cat([weights.kv_down.new_zeros(len(weights.kv_down)), rope_bias.flatten()]),
        ),
        (attn.kv_b_proj.weight, weights.kv_up.reshape(-1, weights.kv_up.shape[-1])),
        (attn.o_proj.weight, weights.o.reshape(weights.o.shape[0], -1)),
        (attn.o_proj.bias, weights.o_bias),
    ]
    with torch.no_grad():
        for param, value in pairs:
            if param is not None:
                param.copy_(value.reshape(param.shape) if value is not None else torch.zeros_like(param))
    attn.train(like.training)
    return attn


class MLALayerConverter:
    """The per-layer MLA conversion, shared by ``convert_to_mla`` (a loaded model) and the layer-by-layer
    pipeline (``hf_attn_swap.methods.layerwise``, one decoder layer in memory at a time).

    Per layer: ``plan(idx, attn, inputs)`` (the pure per-layer math, ``_plan_layer``: a function of the layer's
    weights, its calibration inputs [N, hidden] and the options only; float64 on the layer's device, or on the
    CPU where that device has no float64: ``methods.device.math_device``), then
    ``build(idx, layer, plan, rank)`` rewrites that decoder layer in place into an ``MLADecoderLayer`` (its
    dtype and device kept). ``config()`` and ``report()`` describe the layers built so far.
    """

    def __init__(self, source_config, options: MLAConversionConfig, factorization: str, rotary_scale: float):
        self.source_config = source_config
        self.options = options
        self.factorization = factorization
        self.layout = validate_mla_options(source_config, options)
        self.adapter = get_adapter(source_config)
        self.rotary_scale = rotary_scale
        self.new_scale = (self.layout.head_dim + options.qk_rope_head_dim) ** -0.5
        self.biases: tuple[bool, bool, bool] | None = None  # (q, rope key, o): read from the first layer
        self.ranks: dict[int, int] = {}
        self.rope_pairs: dict[int, list[int]] = {}
        self.retained: dict[int, float] = {}
        self.calibration_rows: int | None = None
        self.key_weighted = False  # whether the calibration came with key weights (``plan``)
        self.output_corrected = False  # whether o_proj is refitted after each layer (``MLALayers``)

    def plan(
        self, idx: int, attn: nn.Module, inputs: torch.Tensor | None, key_weights: torch.Tensor | None = None
    ) -> _LayerPlan:
        """The layer's MLA plan from its source attention module, calibration inputs [N, hidden] (or None) and
        the attention each input row receives as a key [N] (or None: every row alike; ``weighting``)."""
        if needs_calibration(self.factorization) and inputs is None:
            raise ValueError(f"layer {idx}: factorization {self.factorization!r} needs calibration inputs")
        opts = self.options
        weights = self.adapter.read(attn)
        weights = weights.to(torch.float64, math_device(weights.q.device))
        if self.biases is None:
            self.biases = (
                weights.q_bias is not None,
                weights.k_bias is not None,
                weights.o_bias is not None or weights.v_bias is not None,
            )
        if inputs is not None:
            self.calibration_rows = int(inputs.shape[0])
            self.key_weighted = key_weights is not None and opts.key_weight_power > 0
        score_fold = float(attn.scaling) / self.new_scale
        with torch.no_grad(), _lapack_threads(1):
            return _plan_layer(
                weights,
                self.layout,
                opts.qk_rope_head_dim,
                opts.rope_selection,
                self.factorization,
                inputs,
                opts.num_rope_key_heads,
                opts.balance_kv,
                (score_fold, self.rotary_scale**2),
                opts.rope_fold,
                opts.rope_fold_ladder,
                key_weights,
                opts.key_weight_power,
                opts.latent_metric_power,
            )  # fmt: skip

    def layer_config(self, idx: int, rank: int, pairs: list[int]) -> MLAConfig:
        """A config whose layer ``idx`` has ``rank`` and ``pairs`` (enough to build that one layer)."""
        n = self.layout.num_layers
        return mla_config(
            self.source_config, [rank] * n, self.options.qk_rope_head_dim, self.options.num_rope_key_heads,
            [list(pairs)] * n, self.biases,
        )  # fmt: skip

    @torch.no_grad()
    def build(self, idx: int, layer: nn.Module, plan: _LayerPlan, rank: int) -> nn.Module:
        """Rewrite decoder ``layer`` in place into an ``MLADecoderLayer`` holding ``plan`` cut at ``rank``."""
        weights = _layer_weights(
            plan, rank, self.layout.num_attention_heads, self.layout.head_dim, self.biases[0]
        )
        config = self.layer_config(idx, rank, weights.rope_pairs)
        config._attn_implementation = layer.self_attn.config._attn_implementation
        layer.self_attn = build_attention(config, idx, weights, layer.self_attn)
        layer.__class__ = MLADecoderLayer
        self.ranks[idx], self.rope_pairs[idx] = rank, weights.rope_pairs
        self.retained[idx] = round(plan.kv.retained(rank), 6)
        return layer

    def config(self) -> MLAConfig:
        """The plugin config of the whole converted model (every layer built)."""
        n = self.layout.num_layers
        if sorted(self.ranks) != list(range(n)):
            raise ValueError(f"layers {sorted(set(range(n)) - set(self.ranks))} are not converted yet")
        ranks = [self.ranks[i] for i in range(n)]
        rope_pairs = [self.rope_pairs[i] for i in range(n)]
        uniform = select_rope_pairs("uniform", self.layout, self.options.qk_rope_head_dim)
        return mla_config(
            self.source_config, ranks, self.options.qk_rope_head_dim, self.options.num_rope_key_heads,
            None if all(p == uniform for p in rope_pairs) else rope_pairs, self.biases,
        )  # fmt: skip

    def report(self, dtype: torch.dtype) -> ConversionReport:
        opts, layout = self.options, self.layout
        config = self.config()
        ranks = [self.ranks[i] for i in range(layout.num_layers)]
        return ConversionReport(
            target="mla",
            method=f"{opts.rope_selection}+{self.factorization}"
            + ("+energy-ranks" if opts.rank_allocation == "energy" else ""),
            family=layout.family,
            num_layers=layout.num_layers,
            num_attention_heads=layout.num_attention_heads,
            head_dim=layout.head_dim,
            dtype=str(dtype).removeprefix("torch."),
            kv_bytes_per_token_before=kv_bytes_per_token(layout, layout.num_key_value_heads, dtype),
            kv_bytes_per_token_after=mla_kv_bytes_per_token(
                ranks, opts.qk_rope_head_dim, opts.num_rope_key_heads, dtype
            ),
            before={"num_key_value_heads": layout.num_key_value_heads},
            after={
                "kv_lora_rank": config.kv_lora_rank,
                "qk_rope_head_dim": opts.qk_rope_head_dim,
                "num_rope_key_heads": opts.num_rope_key_heads,
            },
            details={
                "rope_selection": opts.rope_selection,
                "factorization": self.factorization,
                "rank_allocation": opts.rank_allocation,
                "balance_kv": opts.balance_kv,
                "key_weight_power": opts.key_weight_power if self.key_weighted else 0.0,
                "latent_metric_power": opts.latent_metric_power,
                "output_correction": self.output_corrected,
                "rope_fold": fold_ladder(self.layout, opts.qk_rope_head_dim, opts.rope_fold)[1]
                if opts.rope_selection == "freqfold"
                else None,
                "calibration_rows": self.calibration_rows,
                "ranks": ranks,
                "rope_pairs": [self.rope_pairs[i] for i in range(layout.num_layers)],
                "kv_energy_retained": [self.retained[i] for i in range(layout.num_layers)],
            },
        )


class MLALayers:
    """MLA per layer (``MLALayerConverter``) at the uniform rank ``kv_lora_rank``."""

    def __init__(self, source_config, options: MLAConversionConfig, calibrated: bool, rotary: nn.Module):
        if options.rank_allocation != "uniform":
            raise ValueError(
                "rank_allocation 'energy' needs every layer's K/V spectrum before the first layer is cut, so it "
                "cannot run layer by layer: use --rank-allocation uniform, or convert_to_mla on a loaded model "
                "with calibration=collect_attention_inputs(model, token_ids)"
            )
        self.options = options
        self.factorization = options.resolved_factorization(calibrated=calibrated)
        scale = float(getattr(rotary, "attention_scaling", 1.0) or 1.0)
        self.converter = MLALayerConverter(source_config, options, self.factorization, scale)
        self.needs_calibration = needs_calibration(self.factorization)
        #: the attention each calibration token receives as a key (one eager forward of the source layer)
        self.uses_key_weights = calibrated and options.key_weight_power > 0
        #: o_proj refitted to the source layer's attention outputs (``layerwise.refit_output_projection``)
        self.output_correction = calibrated and options.output_correction
        self.converter.output_corrected = self.output_correction

    def convert(self, idx, layer, inputs, key_weights) -> nn.Module:
        plan = self.converter.plan(idx, layer.self_attn, inputs, key_weights)
        return self.converter.build(idx, layer, plan, self.options.kv_lora_rank)

    def records(self) -> dict:
        c = self.converter
        return {
            "biases": c.biases,
            "calibration_rows": c.calibration_rows,
            "key_weighted": c.key_weighted,
            "layers": {i: [c.ranks[i], c.rope_pairs[i], c.retained[i]] for i in c.ranks},
        }

    def restore(self, records: dict) -> None:
        c = self.converter
        c.biases = None if records["biases"] is None else tuple(records["biases"])
        c.calibration_rows = records["calibration_rows"]
        c.key_weighted = records["key_weighted"]
        for i, (rank, pairs, retained) in records["layers"].items():
            c.ranks[int(i)], c.rope_pairs[int(i)], c.retained[int(i)] = rank, pairs, retained


def mla_options(kv_lora_rank, **loose) -> MLAConversionConfig:
    """One ``MLAConversionConfig`` from ``convert_to_mla``'s arguments (a config, or a rank and loose options)."""
    if isinstance(kv_lora_rank, MLAConversionConfig):
        given = [k for k, v in loose.items() if v != getattr(MLAConversionConfig, k, None)]
        if given:
            raise ValueError(
                f"pass {', '.join(given)} inside the MLAConversionConfig or as arguments, not both"
            )
        return kv_lora_rank
    return MLAConversionConfig(kv_lora_rank=kv_lora_rank, **loose)


def convert_to_mla(
    model: nn.Module,
    kv_lora_rank: int | MLAConversionConfig,
    qk_rope_head_dim: int | None = None,
    rope_selection: str = MLAConversionConfig.rope_selection,
    factorization: str | None = MLAConversionConfig.factorization,
    calibration=None,
    num_rope_key_heads: int = MLAConversionConfig.num_rope_key_heads,
    rank_allocation: str = MLAConversionConfig.rank_allocation,
    balance_kv: bool = MLAConversionConfig.balance_kv,
    rope_fold: int | None = MLAConversionConfig.rope_fold,
    key_weight_power: float = MLAConversionConfig.key_weight_power,
    latent_metric_power: float = MLAConversionConfig.latent_metric_power,
    output_correction: bool = MLAConversionConfig.output_correction,
) -> ConversionReport:
    """Rewrite ``model`` (Llama / Mistral / Qwen2) in place into MLA; returns a report with KV bytes/token.

    The options (``hf_attn_swap.methods.mla.MLAConversionConfig``, whose defaults these are) come as arguments or
    as one config in place of ``kv_lora_rank``: ``convert_to_mla(model, MLAConversionConfig(72, 48),
    calibration=...)`` (its ``format`` is ``convert_checkpoint``'s business: the model built here is the plugin
    one, with a latent of exactly ``kv_lora_rank``).

    kv_lora_rank: latent rank r (the per-layer average under ``rank_allocation="energy"``), 1..min(hidden,
        2 H_kv head_dim). qk_rope_head_dim: rotary dims kept per rope key (even, <= head_dim).
    rope_selection: ``freqfold`` (default: best training-free on SmolLM2; ``freqfold`` module) | ``uniform`` |
        ``high`` | ``low`` | ``norm`` (see ``hf_attn_swap.methods.mla.rope``); rope_fold: freqfold's window.
    factorization: ``svd`` (weights) | ``pca`` (activation-aware; needs ``calibration``); default: ``pca`` when
        ``calibration`` is given, else ``svd``.
    calibration: either per-layer attention inputs [N, hidden] collected from the original model
        (``hf_attn_swap.methods.calibration.collect_attention_inputs``: every layer calibrated on the original
        model's activations), or a ``hf_attn_swap.methods.calibration.CalibrationText`` (token ids; its ``mode``
        ``sequential`` calibrates layer l on the outputs of the already-converted layers 0..l-1, run layer by
        layer exactly as ``hf-attn-swap convert`` streams a checkpoint; the attention each token receives as a
        key is measured on the way), or a ``Calibration`` with key weights (``collect_calibration(model,
        token_ids, key_weights=True)``). Also used, when given, by the ``norm`` selection and the rope key.
    key_weight_power, latent_metric_power: the attention-aware statistics (``weighting``): calibration tokens
        weighted by (attention received)^γ; K/V rows measured in the query / o_proj metrics to the power p.
    output_correction: with a ``CalibrationText``, refit each converted layer's o_proj so that its attention
        reproduces the source layer's on the same inputs (``layerwise.refit_output_projection``).
    num_rope_key_heads: rope keys per layer (1 = DeepSeek's shared key; H_kv keeps RoPE exact).
    KV cache per token and layer afterwards: r_l + num_rope_key_heads * qk_rope_head_dim values.

    Raises ``ValueError`` / ``UnsupportedArchitectureError`` before the model is touched.
    """
    options = mla_options(
        kv_lora_rank,
        qk_rope_head_dim=qk_rope_head_dim,
        rope_selection=rope_selection,
        factorization=factorization,
        num_rope_key_heads=num_rope_key_heads,
        rank_allocation=rank_allocation,
        balance_kv=balance_kv,
        rope_fold=rope_fold,
        key_weight_power=key_weight_power,
        latent_metric_power=latent_metric_power,
        output_correction=output_correction,
    )
    options = resolve_kv_budget(model.config, options)
    if isinstance(calibration, CalibrationText):  # layer by layer, as hf-attn-swap convert streams it
        source = ModelLayers(model)
        layers = MLALayers(model.config, options, True, source.rotary)
        with torch.no_grad():
            convert_layers(source, layers, calibration, lambda idx, layer, following: None)
        finish_mla_model(model, layers.converter.config())
        report = layers.converter.report(model_dtype(model))
        report.details["calibration_mode"] = calibration.mode
        return report
    adapter = get_adapter(model)
    layout = validate_mla_options(model.config, options)
    factorization = options.resolved_factorization(calibrated=calibration is not None)
    attention = adapter.attention_modules(model)
    if len(attention) != layout.num_layers:
        raise ValueError(
            f"found {len(attention)} attention modules but config says {layout.num_layers} layers"
        )
    key_weights = None
    if isinstance(calibration, Calibration):  # collect_calibration(model, ids, key_weights=True)
        calibration, key_weights = calibration.inputs, calibration.key_weights
    if needs_calibration(factorization) and (calibration is None or len(calibration) != len(attention)):
        raise ValueError(
            f"factorization {factorization!r} needs calibration activations for each of the {len(attention)} "
            "layers: pass calibration=hf_attn_swap.methods.calibration.collect_attention_inputs(model, token_ids) "
            "(CLI: --calibration-data FILE...)"
        )
    rotary = adapter.rotary_embedding(model)
    converter = MLALayerConverter(
        model.config, options, factorization, float(getattr(rotary, "attention_scaling", 1.0) or 1.0)
    )
    plans = [
        converter.plan(
            idx,
            attn,
            None if calibration is None else calibration[idx],
            None if key_weights is None else key_weights[idx],
        )
        for idx, attn in enumerate(attention)
    ]
    ranks = layer_ranks(options, layout, [p.kv.energy for p in plans])
    # every layer is computed: now swap modules, config and classes (Llama/Mistral/Qwen2 share Llama's forward)
    for idx, (layer, plan, rank) in enumerate(zip(model.model.layers, plans, ranks, strict=True)):
        converter.build(idx, layer, plan, rank)
    finish_mla_model(model, converter.config())
    return converter.report(model_dtype(model))


def layer_ranks(options: MLAConversionConfig, layout: AttentionLayout, energies=None) -> list[int]:
    """The latent rank of every layer: ``kv_lora_rank`` each (uniform), or ``allocate_ranks`` over the layers'
    K/V spectra ``energies`` (energy: needs every layer planned first)."""
    n = layout.num_layers
    if options.rank_allocation == "uniform":
        return [options.kv_lora_rank] * n
    if energies is None:
        raise ValueError("rank_allocation 'energy' needs every layer's spectrum")
    return allocate_ranks(energies, options.kv_lora_rank * n, [max_kv_lora_rank(layout)] * n)


def finish_mla_model(model: nn.Module, config: MLAConfig) -> None:
    """Switch a model whose decoder layers were all rebuilt by ``MLALayerConverter.build`` to the plugin classes
    with ``config`` (shared by every attention module)."""
    config._attn_implementation = model.config._attn_implementation
    rotary = get_adapter(model).rotary_embedding(model)
    for layer in model.model.layers:
        layer.self_attn.config = config
    model.config = model.model.config = config
    if rotary is not None:
        rotary.config = config
    model.model.__class__ = MLAModel
    model.__class__ = MLAForCausalLM
    _register_output_capture(model)


def _register_output_capture(model: nn.Module) -> None:
    """What ``PreTrainedModel.__init__`` does for a new class: let ``output_hidden_states`` / ``output_attentions``
    find the MLA decoder layers and attention modules of a model whose class was switched in place."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # older/newer transformers: capturing keeps working for models loaded from disk
        return
    for module in (model, model.model):
        _CAN_RECORD_REGISTRY[module] = module._can_record_outputs
