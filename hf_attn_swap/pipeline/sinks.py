"""How a converted model is written, one sink per output format: ``PluginSink`` (the layers as the conversion
built them: GQA, MLA ``--format plugin``) and ``DeepseekV3Sink`` (stock ``deepseek_v3``, ``hf_attn_swap.export``).

A sink serves both ways of converting (``pipeline.convert``): layer by layer (``layer_tensors`` per converted
decoder layer, ``outer_tensors`` for the embeddings, final norm and head, ``config`` at the end; ``records`` /
``restore`` carry what it learnt across a resumed run) and a whole model in memory (``save_model``).
"""

from __future__ import annotations

import copy
from dataclasses import astuple
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from ..export.deepseek_v3 import (
    DeepseekV3Layout,
    LatentNorm,
    deepseek_v3_details,
    deepseek_v3_layer_state,
    deepseek_v3_outer_scale,
    record_deepseek_v3,
    to_deepseek_v3,
)
from ..methods.report import ConversionReport


class Sink(Protocol):
    def layer_tensors(self, idx: int, layer: nn.Module) -> dict[str, torch.Tensor]:
        """The state-dict entries ``model.layers.<idx>.*`` written for converted decoder layer ``idx``."""

    def outer_tensors(self, names: list[str], embedding: str) -> dict[str, tuple[str, float]]:
        """Output name -> (source tensor, factor) for the tensors outside the decoder layers (``names``;
        ``embedding``: the source's input embedding, for a head the format writes untied)."""

    def config(self, conversion, report: ConversionReport, dtype: torch.dtype):
        """The config saved once every layer is written (and the format's details put into ``report``)."""

    def save_model(self, model: nn.Module, folder: Path, report: ConversionReport) -> None:
        """Save a converted in-memory ``model`` (weights and config) into ``folder``."""

    def records(self) -> dict:
        """What a resumed run needs back (JSON)."""

    def restore(self, records: dict) -> None: ...


class PluginSink:
    """The converted layers as they are (GQA checkpoints load in stock transformers; MLA plugin folders with
    ``import hf_attn_swap``)."""

    def layer_tensors(self, idx, layer):
        return {f"model.layers.{idx}.{k}": v for k, v in layer.state_dict().items()}

    def outer_tensors(self, names, embedding):
        return {name: (name, 1.0) for name in names}

    def config(self, conversion, report, dtype):
        return conversion.saved_config()

    def save_model(self, model, folder, report):
        model.save_pretrained(folder)

    def records(self):
        return {}

    def restore(self, records):
        pass


class DeepseekV3Sink:
    """Stock ``deepseek_v3`` (``hf_attn_swap.export``) with the ``layout`` planned before converting (written sizes,
    rope ladder, residual scale); records every layer's latent norm for ``conversion.json``."""

    def __init__(self, layout: DeepseekV3Layout, pad_kv_lora_rank: int | None, pad_rope_dim: int | None):
        self.layout = layout
        self.pads = (pad_kv_lora_rank, pad_rope_dim)
        self.norms: dict[int, LatentNorm] = {}

    def layer_tensors(self, idx, layer):
        state, self.norms[idx] = deepseek_v3_layer_state(layer, idx, self.layout)
        return state

    def outer_tensors(self, names, embedding):
        outer = {name: (name, deepseek_v3_outer_scale(name, self.layout)) for name in names}
        outer.setdefault(
            "lm_head.weight", (embedding, 1.0)
        )  # stock deepseek_v3 is untied: write the tied head
        return outer

    def config(self, conversion, report, dtype):
        details = deepseek_v3_details(self.layout, [self.norms[i] for i in sorted(self.norms)])
        record_deepseek_v3(report, details, len(self.norms), dtype)
        config = self.layout.config
        config.architectures = ["DeepseekV3ForCausalLM"]
        return config

    def save_model(self, model, folder, report):
        exported, details = to_deepseek_v3(model, *self.pads)
        exported.generation_config = copy.deepcopy(model.generation_config)
        record_deepseek_v3(report, details, model.config.num_hidden_layers, next(model.parameters()).dtype)
        exported.save_pretrained(folder)

    def records(self):
        return {str(i): list(astuple(norm)) for i, norm in self.norms.items()}

    def restore(self, records):
        self.norms = {int(i): LatentNorm(*values) for i, values in records.items()}
