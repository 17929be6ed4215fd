"""``ConversionJob``: one checked folder-to-folder conversion, ready to run (``pipeline.convert.run_job``).

Everything that can be checked from the source's config is checked while the job is made (``GQAJob.plan`` /
``MLAJob.plan``), before any weight is loaded. A job knows its method only through a few hooks — the
layer-by-layer conversion it runs (``layer_conversion``), the in-memory conversion (``convert_model``) and
whether the whole model must be loaded (``streaming_refusal``) — and its output format through its ``sink``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ..adapters import get_adapter, sliding_window_layers
from ..export.deepseek_v3 import deepseek_v3_layout
from ..io.checkpoints import load_causal_lm, load_tokenizer
from ..io.folders import parse_dtype
from ..io.text import default_train_files, load_token_ids
from ..methods.calibration import (
    CalibrationConfig,
    CalibrationText,
    collect_calibration_from_files,
    require_calibration_files,
)
from ..methods.gqa import (
    GQA_METHODS,
    GQAConversion,
    GQAConversionConfig,
    convert_to_gqa,
    validate_num_key_value_heads,
)
from ..methods.layerwise import LAYERWISE_FAMILIES, LayerConversion
from ..methods.mla import (
    MLAConversion,
    MLAConversionConfig,
    check_deepseek_v3,
    convert_to_mla,
    rope_key_method,
)
from ..methods.mla.convert import resolve_kv_budget, validate_mla_options
from ..methods.report import ConversionReport
from ..modeling.mla import MLAConfig
from .sinks import DeepseekV3Sink, PluginSink, Sink


@dataclass
class ConversionJob:
    """What the pipeline runs: ``src`` -> ``out`` with ``options``, in ``dtype`` on ``device``, written by ``sink``.

    files / tokenizer: the calibration text (None: data-free); calibration: how much of it and how it is cut;
    max_shard_size / progress: the layer-by-layer writer's shard size and progress bar."""

    src: Path
    out: Path
    config: object
    options: object
    calibration: CalibrationConfig
    dtype: torch.dtype | str
    device: str
    overwrite: bool
    max_shard_size: str | int
    progress: bool
    sink: Sink
    files: list | None = None
    tokenizer: object = None

    #: the in-memory path collects the attention each calibration token receives as a key
    key_weights: bool = False
    #: conversion.json names the calibration fields (None) even for a data-free conversion
    always_records_text = False

    def layer_conversion(self, calibrated: bool, rotary: nn.Module) -> LayerConversion:
        raise NotImplementedError

    def convert_model(self, model: nn.Module, activations) -> ConversionReport:
        raise NotImplementedError

    def method_refusal(self) -> str | None:
        """Why this method's options need the whole model in memory, or None."""
        return None

    def streaming_refusal(self) -> str | None:
        """Why ``src`` cannot be converted layer by layer (then it is loaded whole), or None."""
        family = get_adapter(self.config).family
        if family not in LAYERWISE_FAMILIES:
            return f"{family} decoder layers are not run one at a time here ({', '.join(LAYERWISE_FAMILIES)} are)"
        if sliding_window_layers(self.config):
            return "sliding-window attention"
        if not any(self.src.glob("*.safetensors")):
            return "the checkpoint has no safetensors files"
        return self.method_refusal()

    def text(self) -> CalibrationText | None:
        """The calibration text as token ids, or None for a data-free conversion."""
        if self.tokenizer is None:
            return None
        ids = load_token_ids(self.tokenizer, self.files, self.calibration.calibration_tokens)
        return CalibrationText(ids, self.calibration.calibration_window, self.calibration.calibration_mode)

    def load_model(self) -> nn.Module:
        return load_causal_lm(self.src, dtype=self.dtype).to(self.device)

    def collect_activations(self, model: nn.Module):
        """Calibration activations of the original model (the in-memory path), or None without text."""
        if self.tokenizer is None:
            return None
        return collect_calibration_from_files(
            model, self.tokenizer, self.files, self.calibration.calibration_tokens,
            self.calibration.calibration_window, key_weights=self.key_weights,
        )  # fmt: skip

    def record(self, report: ConversionReport, mode: str | None) -> None:
        """Put the source, the options and the calibration text (read in ``mode``) into ``report.details``."""
        given = self.tokenizer is not None
        report.details.update(source=str(self.src), options=asdict(self.options))
        if given or self.always_records_text:
            report.details.update(
                calibration_data=[str(f) for f in self.files] if given else None,
                calibration_window=self.calibration.calibration_window if given else None,
                calibration_mode=mode if given else None,
            )


@dataclass
class GQAJob(ConversionJob):
    """MHA/GQA -> GQA/MQA (``GQAConversionConfig``); ``activations``: a given ``Calibration`` of the source."""

    activations: object = None

    @classmethod
    def plan(cls, config, options: GQAConversionConfig, calibration: CalibrationConfig, activations, **job):
        """The checked job (``job``: ``ConversionJob``'s other fields, ``sink`` excepted); activations: a
        ``Calibration`` of the source to use instead of calibration text, or None."""
        if options.num_key_value_heads is None:
            raise ValueError("--to gqa needs --num-kv-heads N (1 = MQA)")
        validate_num_key_value_heads(get_adapter(config).layout(config), options.num_key_value_heads)
        method = GQA_METHODS[options.method]
        needs_text = method.needs_calibration and activations is None
        files = tokenizer = None
        if needs_text:  # before any weight is loaded
            require_calibration_files(calibration.calibration_data, f"method {options.method!r}")
            files = calibration.calibration_data
            tokenizer = load_tokenizer(
                job["src"], f"method {options.method!r} calibrates on text", "use --method mean"
            )
        return cls(
            config=config, options=options, calibration=calibration, sink=PluginSink(), files=files,
            tokenizer=tokenizer, key_weights=method.uses_key_weights, activations=activations, **job,
        )  # fmt: skip

    def method_refusal(self):
        return "calibration activations were given" if self.activations is not None else None

    def layer_conversion(self, calibrated, rotary):
        return GQAConversion(self.config, self.options)

    def load_model(self):
        if get_adapter(self.config).layout(self.config).causal:
            return super().load_model()
        from transformers import AutoModel

        # encoders (BERT): the checkpoint's own class, e.g. BertModel for sentence-transformers
        return AutoModel.from_pretrained(str(self.src), dtype=self.dtype).eval()

    def collect_activations(self, model):
        return self.activations if self.activations is not None else super().collect_activations(model)

    def convert_model(self, model, activations):
        method = GQA_METHODS[self.options.method]
        return convert_to_gqa(model, self.options.num_key_value_heads, method=method, calibration=activations)


@dataclass
class MLAJob(ConversionJob):
    """MHA/GQA -> MLA (``MLAConversionConfig``, ``kv_budget`` already split), plugin or stock ``deepseek_v3``."""

    @classmethod
    def plan(cls, config, options: MLAConversionConfig, calibration: CalibrationConfig, activations, **job):
        """The checked job (``job``: ``ConversionJob``'s other fields, ``sink`` excepted)."""
        if activations is not None:  # never dropped silently
            raise ValueError(
                "calibration_inputs applies to to='gqa'; MLA calibrates on calibration_data (use "
                "hf_attn_swap.convert_to_mla(model, ..., calibration=...) for precomputed activations)"
            )
        opts = resolve_kv_budget(config, options)
        if opts.kv_lora_rank is None or opts.qk_rope_head_dim is None:
            raise ValueError(
                "--to mla needs --kv-budget FRACTION|VALUES, or --kv-lora-rank R and --rope-dim D (KV cache: R + D "
                "values per token and layer)"
            )
        # the pipeline always has calibration text (the library reference by default): an unset factorization is pca
        opts = replace(opts, factorization=opts.resolved_factorization(calibrated=True))
        layout = validate_mla_options(config, opts)
        reads_text = (
            bool(calibration.calibration_data) or opts.factorization == "pca" or opts.rope_selection == "norm"
        )
        sink = PluginSink()
        if opts.format == "deepseek_v3":
            planned = _planned_layout(config, opts, layout, job["dtype"], reads_text)
            sink = DeepseekV3Sink(planned, opts.pad_kv_lora_rank, opts.pad_rope_dim)
        files, tokenizer = _mla_text(job["src"], opts, calibration) if reads_text else (None, None)
        return cls(
            config=config, options=opts, calibration=calibration, sink=sink, files=files, tokenizer=tokenizer,
            key_weights=opts.key_weight_power > 0, **job,
        )  # fmt: skip

    def method_refusal(self):
        return self.options.layer_by_layer_refusal()

    def layer_conversion(self, calibrated, rotary):
        return MLAConversion(self.config, self.options, calibrated, rotary, layer_by_layer=True)

    def convert_model(self, model, activations):
        return convert_to_mla(model, self.options, calibration=activations)

    always_records_text = True

    def record(self, report, mode):
        super().record(report, mode)
        given = (
            self.tokenizer is not None
        )  # (GQA's calibration_tokens: the rows the method saw, GQAConversion)
        report.details.update(
            format=self.options.format,
            calibration_tokens=self.calibration.calibration_tokens if given else None,
        )


def _planned_layout(config, opts: MLAConversionConfig, layout, dtype, calibrated: bool):
    """The deepseek_v3 layout of the conversion ``opts`` will make, from the config alone: refused (one line,
    naming the fix) before any layer is converted when the stock format cannot express it (``calibrated``: the
    attention biases are folded into the weights)."""
    check_deepseek_v3(opts.deepseek_v3_problems(layout, getattr(config, "mlp_bias", False), calibrated))
    saved = dtype if isinstance(dtype, torch.dtype) else parse_dtype(getattr(config, "dtype", None))
    saved = saved if isinstance(saved, torch.dtype) else torch.float32  # auto: the checkpoint's
    pairs = rope_key_method(opts.rope_selection).pairs(layout, opts)
    planned = MLAConfig.from_source(
        config, opts.kv_lora_rank, opts.qk_rope_head_dim, 1, [pairs] * layout.num_layers
    )
    return deepseek_v3_layout(planned, saved, opts.pad_kv_lora_rank, opts.pad_rope_dim)


def _mla_text(src: Path, opts: MLAConversionConfig, calibration: CalibrationConfig):
    """(files, tokenizer) of the calibration text MLA reads (loaded before any weight)."""
    given = calibration.calibration_data
    why = [f"--factorization {opts.factorization}"] if opts.factorization == "pca" else []
    why += ["--rope-selection norm"] if opts.rope_selection == "norm" else []
    why += ["--calibration-data"] if given else []
    tokenizer = load_tokenizer(
        src,
        f"{' and '.join(why)} calibrate{'s' if len(why) == 1 else ''} on text",
        "use --factorization svd"
        + (" and another --rope-selection" if opts.rope_selection == "norm" else "")
        + (" without --calibration-data" if given else ""),
    )
    return given or default_train_files(), tokenizer
