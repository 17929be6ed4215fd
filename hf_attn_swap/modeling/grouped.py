"""Pieces shared by the grouped-query attention modules of families whose stock code has no GQA.

This file and the family files next to it import only torch and transformers (and each other, relatively):
``save_pretrained`` copies them into the checkpoint folder so it also loads with ``trust_remote_code=True``
where hf_attn_swap is not installed.

Conventions: query head j reads K/V head ``j // (H / H_kv)`` (``repeat_kv`` order). A fused projection in
the *grouped layout* holds, per K/V head, its ``g = H / H_kv`` query heads then the key then the value:
output rows ``[H_kv, g + 2, d]``. With ``H_kv = H`` that is GPT-NeoX's and Falcon's per-head ``[q, k, v]``;
with ``H_kv = 1`` it is Falcon's multi-query ``[q_1..q_H, k, v]``; otherwise Falcon-40B's layout.
"""

from __future__ import annotations

import sys

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.conversion_mapping import (
    get_checkpoint_conversion_mapping,
    register_checkpoint_conversion_mapping,
)
from transformers.integrations.sdpa_attention import repeat_kv
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.pytorch_utils import Conv1D

from .compat import check_cache_grew

#: stock model class -> plugin model class (filled as plugin classes are defined)
GROUPED_MODEL_CLASSES: dict[type, type] = {}


def with_repeated_kv(eager_attention):
    """Wrap a family's eager attention ``f(module, q [B,H,T,d], k, v, mask, **kw)`` so it accepts K/V with
    ``H_kv`` heads: each K/V head is repeated for the ``H / H_kv`` query heads that read it. sdpa and flash
    attention in transformers do the same from ``module.num_key_value_groups``."""

    def grouped_eager_attention(module, query, key, value, attention_mask, **kwargs):
        groups = query.shape[1] // key.shape[1]
        return eager_attention(
            module, query, repeat_kv(key, groups), repeat_kv(value, groups), attention_mask, **kwargs
        )

    grouped_eager_attention.__name__ = f"grouped_{getattr(eager_attention, '__name__', 'eager')}"
    return grouped_eager_attention


def attend(module: nn.Module, grouped_eager_attention, query, key, value, attention_mask, **kwargs):
    """Attention through the configured implementation (``ALL_ATTENTION_FUNCTIONS``: sdpa, flash, flex, or a
    registered one), or ``grouped_eager_attention`` for "eager". q [B, H, T, d], k/v [B, H_kv, S, d] ->
    (output [B, T, H, d], weights or None)."""
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(
        module.config._attn_implementation, grouped_eager_attention
    )
    return attention(module, query, key, value, attention_mask, **kwargs)


class GroupedConfigMixin:
    """Base for plugin configs ``@strict class GroupedXConfig(GroupedConfigMixin, XConfig)`` that declare
    ``num_key_value_heads: int | None = None`` (None: the stock model's K/V head count)."""

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.stock_num_key_value_heads()
        check_num_key_value_heads(self.num_attention_heads, self.num_key_value_heads)

    def stock_num_key_value_heads(self) -> int:
        return self.num_attention_heads


def split_grouped_qkv(fused: torch.Tensor, num_key_value_heads: int, head_dim: int):
    """[B, T, H_kv * (g + 2) * d] in the grouped layout -> q [B, H, T, d], k and v [B, H_kv, T, d]."""
    x = fused.view(*fused.shape[:-1], num_key_value_heads, -1, head_dim)
    query = x[..., :-2, :].flatten(-3, -2)
    return query.transpose(1, 2), x[..., -2, :].transpose(1, 2), x[..., -1, :].transpose(1, 2)


def resized_projection(old: nn.Module, out_features: int) -> nn.Module:
    """A new projection of ``old``'s class (``nn.Linear`` subclass or GPT-2's ``Conv1D``) with ``out_features``
    outputs, same input size, bias presence, device and dtype; weights are not copied."""
    weight = old.weight
    with torch.device(weight.device):
        if isinstance(old, Conv1D):  # weight [in, out]
            new = Conv1D(out_features, weight.shape[0])
        else:
            new = type(old)(weight.shape[1], out_features, bias=old.bias is not None)
    return new.to(weight.dtype)


def check_num_key_value_heads(num_attention_heads: int, num_key_value_heads: int) -> None:
    if num_key_value_heads < 1 or num_attention_heads % num_key_value_heads:
        raise ValueError(
            f"num_key_value_heads={num_key_value_heads} must be a positive divisor of "
            f"num_attention_heads={num_attention_heads}"
        )


def set_grouping(attn: nn.Module, num_attention_heads: int, num_key_value_heads: int) -> None:
    """Record the head counts the attention interfaces read (``num_key_value_groups``)."""
    check_num_key_value_heads(num_attention_heads, num_key_value_heads)
    attn.num_key_value_heads = num_key_value_heads
    attn.num_key_value_groups = num_attention_heads // num_key_value_heads


class GroupedModelMixin:
    """Base for plugin model classes ``class GroupedXModel(GroupedModelMixin, XModel)``.

    The stock ``__init__`` builds the model with stock attention; every self-attention module is then turned
    into the family's grouped module (``grouped_attention.make_grouped``) and nested stock models into their
    plugin classes, and only the new projections are initialised. ``config.num_key_value_heads`` sets H_kv.
    """

    grouped_attention: type  # the family's plugin attention class (has stock_class and make_grouped)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        stock = next(
            base
            for base in cls.__mro__[1:]
            if issubclass(base, PreTrainedModel) and not issubclass(base, GroupedModelMixin)
        )
        GROUPED_MODEL_CLASSES[stock] = cls
        # Load and save with the stock class's checkpoint key renames (e.g. GPT-NeoX's embed_out -> lm_head):
        # transformers applies them to custom classes only when registered under the class name.
        renames = get_checkpoint_conversion_mapping(stock.__name__) or get_checkpoint_conversion_mapping(
            stock.config_class.model_type
        )
        if renames:
            register_checkpoint_conversion_mapping(cls.__name__, renames, overwrite=True)
        if "forward" not in cls.__dict__:
            cls.forward = check_cache_grew(stock.forward)

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        use_grouped_attention(self, config.num_key_value_heads, self.grouped_attention)
        self.init_weights()  # initialises only the new projections (the rest is flagged as initialised)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """Also writes ``config.auto_map`` for every Auto class of the family (``AUTO_CLASSES`` in its file);
        transformers copies the family file and this one next to the weights."""
        family = sys.modules[type(self).__module__]
        name = family.__name__.rsplit(".", 1)[-1]
        self.config.auto_map = {
            "AutoConfig": f"{name}.{type(self.config).__name__}",
            **{auto: f"{name}.{cls.__name__}" for auto, cls in family.AUTO_CLASSES.items()},
        }
        return super().save_pretrained(save_directory, *args, **kwargs)


def use_grouped_attention(model: nn.Module, num_key_value_heads: int, grouped_attention: type) -> None:
    """Turn ``model``'s stock self-attention modules into ``grouped_attention`` modules with
    ``num_key_value_heads`` (fresh, uninitialised projections) and its stock model classes into plugin ones."""
    for module in list(model.modules()):
        if type(module) is not grouped_attention and isinstance(module, grouped_attention.stock_class):
            if not getattr(module, "is_cross_attention", False):
                grouped_attention.make_grouped(module, num_key_value_heads)
    use_grouped_model_classes(model)


def use_grouped_model_classes(model: nn.Module) -> None:
    """Switch ``model`` and the stock models nested in it to their plugin classes, in place."""
    for module in model.modules():
        if type(module) in GROUPED_MODEL_CLASSES:
            module.__class__ = GROUPED_MODEL_CLASSES[type(module)]


def save_code_with_checkpoints(auto_classes: dict[str, type]) -> None:
    """Make ``save_pretrained`` copy the family's code next to the weights (transformers'
    ``register_for_auto_class``), so checkpoints also load with ``trust_remote_code=True``."""
    for auto, cls in auto_classes.items():
        cls.register_for_auto_class(auto)
        cls.config_class.register_for_auto_class("AutoConfig")
