"""``convert_to_gqa``: rewrite a loaded model's attention in place to fewer KV heads (MQA at 1)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ...adapters import AttentionLayout, get_adapter
from ..calibration import Calibration, CalibrationText
from ..device import math_device
from ..layerwise import convert_model_layerwise
from ..options import check_int
from ..report import ConversionReport, kv_bytes_per_token, model_dtype
from .base import GQAMethod, LayerContext
from .config import GQAConversionConfig
from .registry import GQA_METHODS


def validate_num_key_value_heads(layout: AttentionLayout, num_key_value_heads) -> int:
    """Check a target KV head count against a layout; returns it as int or raises ``ValueError``."""
    h, current = layout.num_attention_heads, layout.num_key_value_heads
    check_int("num_key_value_heads", num_key_value_heads)
    valid = [n for n in range(1, current + 1) if h % n == 0]
    if num_key_value_heads < 1 or num_key_value_heads > current or h % num_key_value_heads:
        reason = (
            "must be at least 1"
            if num_key_value_heads < 1
            else f"is larger than the current {current} KV heads (this converter only removes heads)"
            if num_key_value_heads > current
            else f"does not divide the {h} query heads"
        )
        raise ValueError(
            f"num_key_value_heads={num_key_value_heads} {reason}. Valid choices for this {layout.family} model "
            f"({h} query heads, {current} KV heads): {valid} (1 = MQA)."
        )
    return num_key_value_heads


def layer_context(
    attn: nn.Module,
    layer_idx: int,
    layout: AttentionLayout,
    num_key_value_heads: int,
    inputs: torch.Tensor | None = None,
    key_weights: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> LayerContext:
    """What a method sees of one attention module: target head count, calibration inputs, q/k norm weights
    (all on ``device``, where the method's math runs)."""

    def norm_weight(name):  # a per-head norm on q or k (Qwen3's ``q_norm``/``k_norm``), if any
        weight = getattr(getattr(attn, name, None), "weight", None)
        return None if weight is None else weight.detach().to(device=device, dtype=torch.float32)

    return LayerContext(
        layer_idx=layer_idx,
        layout=layout,
        num_key_value_heads=num_key_value_heads,
        inputs=None if inputs is None else inputs.to(device=device, dtype=torch.float32),
        key_weights=None if key_weights is None else key_weights.to(device=device, dtype=torch.float32),
        q_norm_weight=norm_weight("q_norm"),
        k_norm_weight=norm_weight("k_norm"),
    )


def gqa_report(
    layout: AttentionLayout, method: GQAMethod, num_key_value_heads: int, dtype
) -> ConversionReport:
    """The report of converting a model with ``layout`` to ``num_key_value_heads`` KV heads."""
    return ConversionReport.of(
        "gqa",
        method.name,
        layout,
        dtype,
        kv_bytes_per_token(layout, num_key_value_heads, dtype),
        after={"num_key_value_heads": num_key_value_heads},
        changed=num_key_value_heads != layout.num_key_value_heads,
    )


def gqa_method(num_key_value_heads, method) -> tuple[int, GQAMethod]:
    """(head count, method object) from ``convert_to_gqa``'s arguments (a ``GQAConversionConfig`` or the two values)."""
    if isinstance(num_key_value_heads, GQAConversionConfig):
        if method != GQAConversionConfig.method:
            raise ValueError("pass the method inside the GQAConversionConfig or as method=..., not both")
        num_key_value_heads, method = num_key_value_heads.num_key_value_heads, num_key_value_heads.method
    if isinstance(method, str):  # validates the name (and a non-int head count) before the model is read
        method = GQA_METHODS[GQAConversionConfig(num_key_value_heads, method).method]
    return num_key_value_heads, method


def convert_gqa_layer(
    adapter,
    attn: nn.Module,
    layer_idx: int,
    layout: AttentionLayout,
    num_key_value_heads: int,
    method: GQAMethod,
    inputs: torch.Tensor | None = None,
    key_weights: torch.Tensor | None = None,
):
    """One layer's new attention weights (read with ``adapter``; float32 math, cast back to the module's dtype)
    and the query-head order the method chose (or None): the per-layer step of ``convert_to_gqa`` and of the
    layer-by-layer pipeline (``hf_attn_swap.methods.layerwise``)."""
    weights = adapter.read(attn)
    dtype, device = weights.q.dtype, math_device(weights.q.device)
    weights = weights.to(torch.float32, device)  # write() puts them back on the module's device
    ctx = layer_context(attn, layer_idx, layout, num_key_value_heads, inputs, key_weights, device)
    return method.convert_layer(weights, ctx).to(dtype), ctx.cache.get("head_order")


class GQAConversion:
    """GQA/MQA of one source model with ``options``, one layer at a time (``convert_gqa_layer``): a
    ``LayerConversion`` (``hf_attn_swap.methods.layerwise``)."""

    def __init__(self, source_config, options: GQAConversionConfig):
        self.source_config = source_config
        self.adapter = get_adapter(source_config)
        self.layout = self.adapter.layout(source_config)
        self.num_key_value_heads, self.method = gqa_method(options.num_key_value_heads, options.method)
        validate_num_key_value_heads(self.layout, self.num_key_value_heads)
        self.needs_calibration = self.method.needs_calibration
        self.uses_key_weights = self.method.uses_key_weights
        self.output_correction = False  # measured harmful on GQA ``fit`` (README, MLA results)
        self.changed = self.num_key_value_heads != self.layout.num_key_value_heads
        self.head_order: dict[int, list[int]] = {}
        self.calibration_rows: int | None = None

    def convert(self, idx, layer, inputs, key_weights) -> nn.Module:
        if not self.changed:
            return layer
        if inputs is not None:
            self.calibration_rows = int(inputs.shape[0])
        attn = layer.self_attn
        weights, order = convert_gqa_layer(
            self.adapter, attn, idx, self.layout, self.num_key_value_heads, self.method, inputs, key_weights
        )
        self.adapter.write(attn, weights)
        if hasattr(attn, "num_key_value_heads"):
            attn.num_key_value_heads = self.num_key_value_heads
        if order is not None:
            self.head_order[idx] = order
        return layer

    def saved_config(self):
        """The source config with the new KV head count."""
        saved = copy.deepcopy(self.source_config)
        saved.num_key_value_heads = self.num_key_value_heads
        return saved

    def finish_model(self, model: nn.Module) -> None:
        """Set the new KV head count on ``model``'s config and attention modules."""
        if self.changed:
            self.adapter.set_num_key_value_heads(model, self.num_key_value_heads)

    def report(self, dtype: torch.dtype) -> ConversionReport:
        report = gqa_report(self.layout, self.method, self.num_key_value_heads, dtype)
        if self.changed and self.needs_calibration:
            report.details["calibration_tokens"] = self.calibration_rows
            report.details["key_weights"] = "attention received" if self.uses_key_weights else None
        if self.head_order:
            report.details["head_order"] = [self.head_order[i] for i in sorted(self.head_order)]
        return report

    def records(self) -> dict:
        return {"calibration_rows": self.calibration_rows, "head_order": self.head_order}

    def restore(self, records: dict) -> None:
        self.calibration_rows = records["calibration_rows"]
        self.head_order = {int(i): order for i, order in records["head_order"].items()}


def convert_to_gqa(
    model: nn.Module,
    num_key_value_heads: int | GQAConversionConfig,
    method: str | GQAMethod = GQAConversionConfig.method,
    calibration: Calibration | list[torch.Tensor] | None = None,
) -> ConversionReport:
    """Rewrite ``model`` in place so every attention layer has ``num_key_value_heads`` K/V heads.

    The options are ``num_key_value_heads`` and ``method`` (a name in ``GQA_METHODS`` or a ``GQAMethod``), or
    one ``hf_attn_swap.methods.gqa.GQAConversionConfig`` in place of both: ``convert_to_gqa(model, GQAConversionConfig(1, "fit"),
    calibration=...)``.

    Weights, biases, module attributes and ``model.config.num_key_value_heads`` are updated; for families
    with native GQA the result saves and loads with stock transformers. Arithmetic is done in float32 and
    cast back to the model's dtype. ``calibration``: ``hf_attn_swap.methods.calibration.Calibration`` (or just its
    per-layer attention inputs [N, hidden]) for methods with ``needs_calibration``; methods with
    ``uses_key_weights`` also use its ``key_weights`` when present.

    Raises ``ValueError`` (before touching the model) for a head count that is not in
    ``{n <= H_kv : H % n == 0}``, and ``UnsupportedArchitectureError`` for unknown families.
    """
    num_key_value_heads, method = gqa_method(num_key_value_heads, method)
    if isinstance(calibration, CalibrationText):  # layer by layer, as hf-attn-swap convert streams it
        conversion = GQAConversion(model.config, GQAConversionConfig(num_key_value_heads, method.name))
        return convert_model_layerwise(model, conversion, calibration)
    adapter = get_adapter(model)
    layout = adapter.layout(model.config, model)
    num_key_value_heads = validate_num_key_value_heads(layout, num_key_value_heads)
    report = gqa_report(layout, method, num_key_value_heads, model_dtype(model))
    if not report.changed:
        return report
    attention = adapter.attention_modules(model)
    if len(attention) != layout.num_layers:
        raise ValueError(
            f"found {len(attention)} {layout.family} attention modules but config says {layout.num_layers} layers"
        )
    if not isinstance(calibration, Calibration):
        calibration = None if calibration is None else Calibration(list(calibration))
    if method.needs_calibration and (calibration is None or len(calibration.inputs) != len(attention)):
        raise ValueError(
            f"method {method.name!r} needs calibration activations for each of the {len(attention)} layers: "
            "pass calibration=hf_attn_swap.methods.calibration.collect_calibration(model, token_ids) "
            "(CLI: --calibration-data FILE...)"
        )
    key_weights = None if calibration is None else calibration.key_weights
    if method.needs_calibration:
        report.details["calibration_tokens"] = int(calibration.inputs[0].shape[0])
        report.details["key_weights"] = (
            "attention received" if key_weights and method.uses_key_weights else None
        )
    # Compute every layer first, then write: a failing method leaves the model untouched.
    new_weights = []
    with torch.no_grad():
        for idx, attn in enumerate(attention):
            weights, order = convert_gqa_layer(
                adapter,
                attn,
                idx,
                layout,
                num_key_value_heads,
                method,
                None if calibration is None else calibration.inputs[idx],
                None if key_weights is None else key_weights[idx],
            )
            new_weights.append(weights)
            if order is not None:
                report.details.setdefault("head_order", []).append(order)
        for attn, weights in zip(attention, new_weights, strict=True):
            adapter.write(attn, weights)
    adapter.set_num_key_value_heads(model, num_key_value_heads)
    return report
