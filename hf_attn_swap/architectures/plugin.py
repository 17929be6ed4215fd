"""Shared base of the adapters for families whose stock code has no GQA (GPT-2, GPT-NeoX, OPT, Falcon, BERT).

``write`` keeps the stock module while the K/V head count still fits it, and otherwise turns it in place into
the family's grouped plugin module (``hf_attn_swap.models.<family>``); ``set_num_key_value_heads`` then
switches the config and model classes to the plugin ones (``model_type`` ``hf_attn_swap_<family>``), which
``import hf_attn_swap`` registers with the Auto classes.
"""

from __future__ import annotations

import torch
from torch import nn

from ..models.grouped import use_grouped_model_classes
from .base import ArchitectureAdapter


def copy_into(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Copy ``weight``/``bias`` into ``module``'s parameters (shapes must match; bias presence too)."""
    if (bias is None) != (module.bias is None):
        have = "has" if module.bias is not None else "has no"
        raise ValueError(f"{type(module).__name__} {have} a bias but the converted weights disagree")
    with torch.no_grad():
        module.weight.copy_(weight)
        if bias is not None:
            module.bias.copy_(bias)


def flat(bias: torch.Tensor | None) -> torch.Tensor | None:
    return None if bias is None else bias.reshape(-1)


class PluginAdapter(ArchitectureAdapter):
    """Adapters whose converted models use ``hf_attn_swap.models`` plugin classes."""

    native_gqa = False
    #: the family's plugin config class (``model_type`` ``hf_attn_swap_<family>``)
    config_class: type = None

    def supported_model_classes(self) -> list[str]:
        from ..models.grouped import GROUPED_MODEL_CLASSES

        return sorted(
            stock.__name__
            for stock, plugin in GROUPED_MODEL_CLASSES.items()
            if plugin.config_class is self.config_class
        )

    def check_model_class(self, model: nn.Module | None) -> None:
        """Refuse (before anything changes) a model class that has no plugin class to save and load it as."""
        if model is None:
            return
        from ..models.grouped import GROUPED_MODEL_CLASSES

        known = set(GROUPED_MODEL_CLASSES) | set(GROUPED_MODEL_CLASSES.values())
        if type(model) not in known:
            from . import UnsupportedArchitectureError

            raise UnsupportedArchitectureError(
                f"{type(model).__name__} has no hf_attn_swap grouped-attention class; supported {self.family} "
                f"classes: {', '.join(self.supported_model_classes())}"
            )

    def set_num_key_value_heads(self, model: nn.Module, num_key_value_heads: int) -> None:
        config = model.config
        if not isinstance(config, self.config_class):
            config.__class__ = self.config_class
        config.num_key_value_heads = num_key_value_heads
        use_grouped_model_classes(model)
