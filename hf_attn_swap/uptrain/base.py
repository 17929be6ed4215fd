"""The contract of an uptraining mode (what it trains, which loss) and helpers the modes share."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..adapters import UnsupportedArchitectureError, get_adapter
from ..io.shards import CheckpointReader

#: a ``kv_a_layernorm`` weight (median of its magnitudes) above this is the stock ``deepseek_v3`` export's
#: linear-regime norm, sqrt(eps) / kappa (measured 4e3 to 7e4 on SmolLM2 / Qwen2.5 exports); a trained
#: RMSNorm's weights are O(1)
LINEAR_REGIME_NORM_WEIGHT = 100.0


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """The attention module of every decoder layer, in order, for any converted format.

    Uses the family's adapter when one is registered, else every module's ``self_attn`` child (the
    transformers convention, e.g. a stock ``deepseek_v3`` export of an MLA conversion).
    """
    try:
        return get_adapter(model).attention_modules(model)
    except UnsupportedArchitectureError:
        found = [m.self_attn for m in model.modules() if isinstance(getattr(m, "self_attn", None), nn.Module)]
        if not found:
            raise
        return found


def set_trainable(model: nn.Module, which: str) -> int:
    """``which="all"``: every parameter; ``"attention"``: only the attention modules'. Returns the count."""
    if which not in ("all", "attention"):
        raise ValueError(f"trainable must be 'attention' or 'all', got {which!r}")
    for p in model.parameters():
        p.requires_grad_(which == "all")
    if which == "attention":
        for attn in attention_modules(model):
            for p in attn.parameters():
                p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def freeze_matching(model: nn.Module, patterns: list[str] | None) -> list[str]:
    """Freeze every parameter whose name contains one of ``patterns``; returns the frozen names.

    For parametrisations where Adam's ~lr-sized steps are huge relative to a weight, e.g. the latent rows of
    ``kv_a_proj_with_mqa`` in a stock ``deepseek_v3`` MLA export (scaled down to neutralise
    ``kv_a_layernorm``): ``freeze=["kv_a_proj_with_mqa"]``.
    """
    if not patterns:
        return []
    frozen = [n for n, p in model.named_parameters() if any(pattern in n for pattern in patterns)]
    if not frozen:
        raise ValueError(f"freeze patterns {patterns} match no parameter of the model")
    for name, p in model.named_parameters():
        if name in frozen:
            p.requires_grad_(False)
    return frozen


def exposed_scaled_latents(folder: str | Path, freeze: list[str] | None) -> list[str]:
    """The ``kv_a_proj_with_mqa`` modules of the safetensors checkpoint in ``folder`` that training would move
    although they must stay fixed: their layer's ``kv_a_layernorm`` runs in the linear regime of a stock
    ``deepseek_v3`` export (``LINEAR_REGIME_NORM_WEIGHT``; latent rows scaled by kappa ~1e-8, so any Adam step
    swamps them) and no ``freeze`` pattern is a substring of the module's name (the name every parameter of it,
    LoRA's included, contains). Every mode trains them otherwise. [] for other checkpoints."""
    try:
        reader = CheckpointReader(folder)
    except FileNotFoundError:
        return []
    suffix = ".kv_a_layernorm.weight"
    norms = [name for name in reader.keys() if name.endswith(suffix)]
    if not norms:
        return []
    patterns = freeze or []
    exposed = []
    for name, weight in reader.read(norms).items():
        module = name[: -len(suffix)] + ".kv_a_proj_with_mqa"
        scaled = float(weight.float().abs().median()) > LINEAR_REGIME_NORM_WEIGHT
        if scaled and not any(pattern in module for pattern in patterns):
            exposed.append(module)
    return exposed


def unwrap(model: nn.Module) -> nn.Module:
    """The model under DDP/accelerate wrappers (hooks go on its modules)."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    return model


class Objective:
    """An uptraining mode.

    ``prepare`` freezes / wraps the loaded converted model, ``loss`` maps a batch of token blocks
    ``input_ids`` [B, T] to a scalar, ``finalize`` turns what was trained back into a plain model of the
    converted format (e.g. merges LoRA).
    """

    name: str = ""
    needs_teacher: bool = False
    default_trainable: str = "all"
    default_learning_rate: float = 1e-4

    def learning_rate_for(self, model_config: dict) -> float:
        """The default learning rate for a model with this ``config.json`` (the class default unless measured
        otherwise for a format)."""
        return self.default_learning_rate

    def bind(self, model: nn.Module, teacher: nn.Module | None) -> None:
        """Measure what the loss needs from the loaded (unwrapped, unsharded) model and teacher; default none."""

    def prepare(self, model: nn.Module, config) -> nn.Module:
        set_trainable(model, config.trainable or self.default_trainable)
        return model

    def loss(
        self, model: nn.Module, input_ids: torch.Tensor, teacher: nn.Module | None, config
    ) -> torch.Tensor:
        raise NotImplementedError

    def finalize(self, model: nn.Module) -> nn.Module:
        return model
