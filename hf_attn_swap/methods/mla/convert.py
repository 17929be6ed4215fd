"""``convert_to_mla``: rewrite a loaded Llama-family model's attention in place into multi-head latent attention.

``MLAConversion`` is the method's ``LayerConversion`` (``hf_attn_swap.methods.layerwise``): per layer it
decomposes the source attention (``layer.decompose_layer``: rope key, joint K/V latent, folds) and rewrites the
decoder layer into an ``MLADecoderLayer`` at its rank; it also serves ``convert_to_mla`` on a loaded model
calibrated on the original activations, where every layer is decomposed first (``rank_allocation="energy"``
spends one total rank where the layers' spectra keep the most).

The model becomes an :class:`~hf_attn_swap.modeling.mla.MLAForCausalLM` (plugin format, saves and loads with
``import hf_attn_swap``); ``hf_attn_swap.export.to_deepseek_v3`` turns the DeepSeek-expressible subset into stock
``deepseek_v3``.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from ...adapters import AttentionLayout, UnsupportedArchitectureError, check_full_attention, get_adapter
from ...modeling.compat import register_output_capture
from ...modeling.mla import MLAConfig, MLADecoderLayer, MLAForCausalLM, MLAModel
from ..calibration import Calibration, CalibrationText
from ..device import math_device
from ..layerwise import convert_model_layerwise
from ..options import check_int
from ..report import ConversionReport, mla_kv_bytes_per_token, model_dtype
from .biasfold import fit_bias_fold
from .budget import allocate_ranks
from .config import MLAConversionConfig
from .factorize import factorization_named
from .freqfold import fold_ladder
from .layer import LayerDecomposition, build_attention, decompose_layer, layer_weights
from .registry import rope_key_method

#: source families with Llama's decoder (RMSNorm, gated MLP, rotate-half RoPE, separate q/k/v/o)
MLA_FAMILIES = ("llama", "mistral", "qwen2")


def max_kv_lora_rank(layout: AttentionLayout) -> int:
    """The rank of [K ; V] is at most min(hidden, 2 H_kv head_dim): larger latents cannot hold more."""
    return min(layout.hidden_size, 2 * layout.num_key_value_heads * layout.head_dim)


def resolve_kv_budget(config, options: MLAConversionConfig) -> MLAConversionConfig:
    """``options`` with a ``kv_budget`` split into kv_lora_rank + qk_rope_head_dim for this source model."""
    if options.kv_budget is None:
        return options
    return options.resolved_split(get_adapter(config).layout(config))


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
    layout = options.rope_layout(adapter.layout(config))
    if layout.rope.style != "half" or layout.rope.rotary_dim != layout.head_dim:
        raise UnsupportedArchitectureError(
            f"MLA conversion needs rotate-half RoPE on all {layout.head_dim} head dims; this model rotates "
            f"{layout.rope.rotary_dim} ({layout.rope.style})"
        )
    check_full_attention(config, "MLA conversion")
    if getattr(config, "mlp_bias", False) and config.model_type != "llama":
        raise UnsupportedArchitectureError("MLP biases are only supported for Llama sources")
    max_rank = max_kv_lora_rank(layout)
    rank = check_int("kv_lora_rank", options.kv_lora_rank)
    if not 1 <= rank <= max_rank:
        raise ValueError(
            f"kv_lora_rank={rank} is out of range: it must be between 1 and {max_rank} = min(hidden_size "
            f"{layout.hidden_size}, 2 x {layout.num_key_value_heads} KV heads x head_dim {layout.head_dim}) for "
            f"this {layout.family} model"
        )
    rope_key_method(options.rope_selection).check(layout, options)
    rope_heads, kv = options.num_rope_key_heads, layout.num_key_value_heads
    if rope_heads < 1 or kv % rope_heads:
        raise ValueError(
            f"num_rope_key_heads={rope_heads} must divide the {kv} KV heads: choose one of "
            f"{[n for n in range(1, kv + 1) if kv % n == 0]} (1 = DeepSeek's single shared rope key)"
        )
    return layout


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


def attention_scaling(rotary: nn.Module | None) -> float:
    """The rotary embedding's ``attention_scaling`` (YaRN's mscale; 1 without), which RoPE puts on q.k."""
    return float(getattr(rotary, "attention_scaling", 1.0) or 1.0)


class MLAConversion:
    """The MLA conversion of one source model with ``options`` (a ``LayerConversion``, see
    ``hf_attn_swap.methods.layerwise``), and the record of the layers converted so far.

    ``decompose(l, attn, inputs, key_weights)`` does the per-layer math (``layer.decompose_layer``; float64 on the
    layer's device, or the CPU where it has no float64: ``methods.device.math_device``); ``build(l, layer,
    decomposition, rank)`` rewrites decoder ``layer`` in place into an ``MLADecoderLayer`` (dtype and device kept);
    ``convert`` is both at the uniform rank. ``model_config()`` / ``report()`` describe the layers built.

    Args:
        source_config: the source model's config.
        options: the validated options (a ``kv_budget`` already split: ``resolve_kv_budget``).
        calibrated: whether calibration inputs come with each layer (they choose ``pca`` and the attention-aware
            statistics).
        rotary: the source's rotary embedding module (its ``attention_scaling``), or None.
        layer_by_layer: converted by ``methods.layerwise.convert_layers`` (the uniform rank allocation, and the
            output correction where calibrated); else every layer is decomposed before any is built.
    """

    def __init__(
        self,
        source_config,
        options: MLAConversionConfig,
        calibrated: bool,
        rotary: nn.Module | None,
        layer_by_layer: bool = False,
    ):
        refusal = options.layer_by_layer_refusal()
        if layer_by_layer and refusal is not None:
            raise ValueError(
                f"{refusal}, so it cannot run layer by layer: use --rank-allocation uniform, or convert_to_mla on "
                "a loaded model with calibration=collect_attention_inputs(model, token_ids)"
            )
        self.source_config = source_config
        self.options = options
        self.layout = validate_mla_options(source_config, options)
        self.adapter = get_adapter(source_config)
        self.factorization = factorization_named(options.resolved_factorization(calibrated=calibrated))
        self.needs_calibration = self.factorization.needs_calibration
        #: the attention each calibration token receives as a key (one eager forward of the source layer)
        self.uses_key_weights = calibrated and options.key_weight_power > 0
        #: o_proj refitted to the source layer's attention outputs (``layerwise.refit_output_projection``)
        self.output_correction = calibrated and layer_by_layer and options.output_correction
        #: the deepseek_v3 format has no biases: fold them into the weights along the calibration inputs
        self.folds_biases = calibrated and options.format == "deepseek_v3" and bool(self.layout.biases)
        self.fold_residuals: dict[int, tuple[float, float]] = {}
        self.rotary_scale = attention_scaling(rotary)
        self.new_scale = (self.layout.head_dim + options.qk_rope_head_dim) ** -0.5
        self.biases: tuple[bool, bool, bool] | None = None  # (q, rope key, o): read from the first layer
        self.ranks: dict[int, int] = {}
        self.rope_pairs: dict[int, list[int]] = {}
        self.retained: dict[int, float] = {}
        self.calibration_rows: int | None = None
        self.key_weighted = False  # whether the calibration came with key weights (``decompose``)

    def decompose(
        self, idx: int, attn: nn.Module, inputs: torch.Tensor | None, key_weights: torch.Tensor | None = None
    ) -> LayerDecomposition:
        """Layer ``idx``'s decomposition from its source attention module, calibration inputs [N, hidden] (or None)
        and the attention each input row receives as a key [N] (or None: every row alike; ``weighting``)."""
        if self.needs_calibration and inputs is None:
            raise ValueError(
                f"layer {idx}: factorization {self.factorization.name!r} needs calibration inputs"
            )
        weights = self.adapter.read(attn)
        weights = weights.to(torch.float64, math_device(weights.q.device))
        if self.biases is None:
            kept = not self.folds_biases
            self.biases = (
                kept and weights.q_bias is not None,
                kept and weights.k_bias is not None,
                kept and (weights.o_bias is not None or weights.v_bias is not None),
            )
        if inputs is not None:
            self.calibration_rows = int(inputs.shape[0])
            self.key_weighted = key_weights is not None and self.options.key_weight_power > 0
        scales = (float(attn.scaling) / self.new_scale, self.rotary_scale**2)
        with torch.no_grad(), _lapack_threads(1):
            fold = None
            if self.folds_biases:
                rows = inputs.to(device=weights.q.device, dtype=torch.float64)
                fold = fit_bias_fold(rows, key_weights, self.options.key_weight_power)
                self.fold_residuals[idx] = tuple(round(r, 6) for r in fold.residual)
            return decompose_layer(
                weights, self.layout, self.options, self.factorization, inputs, key_weights, scales, fold
            )

    @torch.no_grad()
    def build(self, idx: int, layer: nn.Module, decomposition: LayerDecomposition, rank: int) -> nn.Module:
        """Rewrite decoder ``layer`` in place into an ``MLADecoderLayer`` holding ``decomposition`` cut at ``rank``."""
        weights = layer_weights(decomposition, rank, self.layout.head_dim, self.biases[0])
        n = self.layout.num_layers
        config = self._config([rank] * n, [list(weights.rope_pairs)] * n)  # enough to build layer idx
        config._attn_implementation = layer.self_attn.config._attn_implementation
        layer.self_attn = build_attention(config, idx, weights, layer.self_attn)
        layer.__class__ = MLADecoderLayer
        self.ranks[idx], self.rope_pairs[idx] = rank, weights.rope_pairs
        self.retained[idx] = round(decomposition.kv.retained(rank), 6)
        return layer

    def convert(self, idx: int, layer: nn.Module, inputs, key_weights) -> nn.Module:
        """``decompose`` then ``build`` at ``kv_lora_rank`` (layer by layer: the uniform rank allocation)."""
        return self.build(
            idx, layer, self.decompose(idx, layer.self_attn, inputs, key_weights), self.options.kv_lora_rank
        )

    def _config(self, ranks: list[int], rope_pairs: list[list[int]] | None) -> MLAConfig:
        opts = self.options
        return MLAConfig.from_source(
            self.source_config, ranks, opts.qk_rope_head_dim, opts.num_rope_key_heads, rope_pairs, self.biases
        )

    def model_config(self) -> MLAConfig:
        """The plugin config of the whole converted model (every layer built)."""
        n = self.layout.num_layers
        if sorted(self.ranks) != list(range(n)):
            raise ValueError(f"layers {sorted(set(range(n)) - set(self.ranks))} are not converted yet")
        ranks, rope_pairs = [self.ranks[i] for i in range(n)], [self.rope_pairs[i] for i in range(n)]
        ladder = self._config(ranks, None).layer_rope_pairs(0)  # what the config means without rope_pairs
        return self._config(ranks, None if all(p == ladder for p in rope_pairs) else rope_pairs)

    def saved_config(self) -> MLAConfig:
        """What a plugin-format folder of the converted model saves as its config."""
        config = self.model_config()
        config.architectures = ["MLAForCausalLM"]
        return config

    def finish_model(self, model: nn.Module) -> None:
        """Switch ``model``, whose decoder layers were all rebuilt, to the plugin classes (``finish_mla_model``)."""
        finish_mla_model(model, self.model_config())

    def report(self, dtype: torch.dtype) -> ConversionReport:
        """What the conversion did: KV bytes per token before/after for ``dtype``, and its options and records."""
        opts, layout = self.options, self.layout
        config = self.model_config()
        ranks = [self.ranks[i] for i in range(layout.num_layers)]
        method = f"{opts.rope_selection}+{self.factorization.name}"
        kv_after = mla_kv_bytes_per_token(ranks, opts.qk_rope_head_dim, opts.num_rope_key_heads, dtype)
        return ConversionReport.of(
            "mla",
            method + ("+energy-ranks" if opts.rank_allocation == "energy" else ""),
            layout,
            dtype,
            kv_after,
            after={
                "kv_lora_rank": config.kv_lora_rank,
                "qk_rope_head_dim": opts.qk_rope_head_dim,
                "num_rope_key_heads": opts.num_rope_key_heads,
            },
            details=self._details(ranks),
        )

    def _details(self, ranks: list[int]) -> dict:
        opts, n = self.options, self.layout.num_layers
        return {
            "rope_selection": opts.rope_selection,
            "factorization": self.factorization.name,
            "rank_allocation": opts.rank_allocation,
            "balance_kv": opts.balance_kv,
            "key_weight_power": opts.key_weight_power if self.key_weighted else 0.0,
            "latent_metric_power": opts.latent_metric_power,
            "output_correction": self.output_correction,
            "rope_fold": fold_ladder(self.layout, opts.qk_rope_head_dim, opts.rope_fold)[1]
            if opts.rope_selection == "freqfold"
            else None,
            "calibration_rows": self.calibration_rows,
            "ranks": ranks,
            "rope_pairs": [self.rope_pairs[i] for i in range(n)],
            "kv_energy_retained": [self.retained[i] for i in range(n)],
            "bias_fold_residual": [list(self.fold_residuals[i]) for i in range(n)]
            if self.folds_biases
            else None,
        }

    def records(self) -> dict:
        """The per-layer records so far, as JSON (what a resumed layer-by-layer conversion ``restore``s)."""
        return {
            "biases": self.biases,
            "calibration_rows": self.calibration_rows,
            "key_weighted": self.key_weighted,
            "layers": {i: [self.ranks[i], self.rope_pairs[i], self.retained[i]] for i in self.ranks},
            "bias_fold_residual": {i: list(r) for i, r in self.fold_residuals.items()},
        }

    def restore(self, records: dict) -> None:
        self.biases = None if records["biases"] is None else tuple(records["biases"])
        self.calibration_rows = records["calibration_rows"]
        self.key_weighted = records["key_weighted"]
        for i, (rank, pairs, retained) in records["layers"].items():
            self.ranks[int(i)], self.rope_pairs[int(i)], self.retained[int(i)] = rank, pairs, retained
        self.fold_residuals = {int(i): tuple(r) for i, r in records["bias_fold_residual"].items()}


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
    one, with a latent of exactly ``kv_lora_rank``). KV cache per token and layer afterwards: r_l +
    num_rope_key_heads * qk_rope_head_dim values.

    Args:
        kv_lora_rank: latent rank r (the per-layer average under ``rank_allocation="energy"``), 1..min(hidden,
            2 H_kv head_dim); or the whole ``MLAConversionConfig``.
        qk_rope_head_dim: rotary dims kept per rope key (even, <= head_dim).
        rope_selection: a name in ``ROPE_KEY_METHODS``: ``freqfold`` (default) | ``uniform`` | ``high`` | ``low``
            | ``norm`` (``hf_attn_swap.methods.mla.rope``); rope_fold: freqfold's window.
        factorization: ``svd`` (weights) | ``pca`` (activation-aware; needs ``calibration``); default: ``pca``
            when ``calibration`` is given, else ``svd``.
        calibration: per-layer attention inputs [N, hidden] of the original model
            (``methods.calibration.collect_attention_inputs``), or a ``Calibration`` with key weights
            (``collect_calibration(model, token_ids, key_weights=True)``), or a ``CalibrationText`` (token ids;
            run layer by layer as ``hf-attn-swap convert`` streams a checkpoint: its ``mode`` ``sequential``
            calibrates layer l on the outputs of the converted layers 0..l-1, and the attention each token
            receives as a key is measured on the way).
        key_weight_power, latent_metric_power: the attention-aware statistics (``weighting``).
        output_correction: with a ``CalibrationText``, refit each converted layer's o_proj so that its attention
            reproduces the source layer's on the same inputs (``layerwise.refit_output_projection``).
        num_rope_key_heads: rope keys per layer (1 = DeepSeek's shared key; H_kv keeps RoPE exact).

    Returns:
        The ``ConversionReport`` (KV bytes per token before and after, ranks, kept pairs, options).

    Raises:
        ValueError / UnsupportedArchitectureError: before the model is touched.
    """
    options = mla_options(
        kv_lora_rank, qk_rope_head_dim=qk_rope_head_dim, rope_selection=rope_selection, factorization=factorization,
        num_rope_key_heads=num_rope_key_heads, rank_allocation=rank_allocation, balance_kv=balance_kv,
        rope_fold=rope_fold, key_weight_power=key_weight_power, latent_metric_power=latent_metric_power,
        output_correction=output_correction,
    )  # fmt: skip
    options = resolve_kv_budget(model.config, options)
    rotary = get_adapter(model).rotary_embedding(model)
    if isinstance(calibration, CalibrationText):  # layer by layer, as hf-attn-swap convert streams it
        conversion = MLAConversion(model.config, options, True, rotary, layer_by_layer=True)
        return convert_model_layerwise(model, conversion, calibration)
    conversion = MLAConversion(model.config, options, calibration is not None, rotary)
    return _convert_all_layers(model, conversion, calibration)


def _convert_all_layers(model: nn.Module, conversion: MLAConversion, calibration) -> ConversionReport:
    """Every layer decomposed on the original model's activations first, then ranked and built."""
    attention = get_adapter(model).attention_modules(model)
    layout = conversion.layout
    if len(attention) != layout.num_layers:
        raise ValueError(
            f"found {len(attention)} attention modules but config says {layout.num_layers} layers"
        )
    key_weights = None
    if isinstance(calibration, Calibration):  # collect_calibration(model, ids, key_weights=True)
        calibration, key_weights = calibration.inputs, calibration.key_weights
    if conversion.needs_calibration and (calibration is None or len(calibration) != len(attention)):
        raise ValueError(
            f"factorization {conversion.factorization.name!r} needs calibration activations for each of the "
            f"{len(attention)} layers: pass calibration=hf_attn_swap.methods.calibration.collect_attention_inputs("
            "model, token_ids) (CLI: --calibration-data FILE...)"
        )
    decompositions = [
        conversion.decompose(
            idx,
            attn,
            None if calibration is None else calibration[idx],
            None if key_weights is None else key_weights[idx],
        )
        for idx, attn in enumerate(attention)
    ]
    ranks = layer_ranks(conversion.options, layout, [d.kv.energy for d in decompositions])
    # every layer is computed: now swap modules, config and classes (Llama/Mistral/Qwen2 share Llama's forward)
    for idx, (layer, decomposition, rank) in enumerate(
        zip(model.model.layers, decompositions, ranks, strict=True)
    ):
        conversion.build(idx, layer, decomposition, rank)
    conversion.finish_model(model)
    return conversion.report(model_dtype(model))


def layer_ranks(options: MLAConversionConfig, layout: AttentionLayout, energies=None) -> list[int]:
    """The latent rank of every layer: ``kv_lora_rank`` each (uniform), or ``allocate_ranks`` over the layers'
    K/V spectra ``energies`` (energy: needs every layer decomposed first)."""
    n = layout.num_layers
    if options.rank_allocation == "uniform":
        return [options.kv_lora_rank] * n
    if energies is None:
        raise ValueError("rank_allocation 'energy' needs every layer's spectrum")
    return allocate_ranks(energies, options.kv_lora_rank * n, [max_kv_lora_rank(layout)] * n)


def finish_mla_model(model: nn.Module, config: MLAConfig) -> None:
    """Switch a model whose decoder layers were all rebuilt by ``MLAConversion.build`` to the plugin classes
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
    for module in (model, model.model):
        register_output_capture(module)
