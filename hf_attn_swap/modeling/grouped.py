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

from .compat import check_cache_grew, register_output_capture, update_layer_cache

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


class GroupedConfigMixin:
    """Base for plugin configs ``@strict class GroupedXConfig(GroupedConfigMixin, XConfig)`` that declare
    ``num_key_value_heads: int | None = None`` (None: the stock model's K/V head count).

    The requested value is read before the stock ``__post_init__`` runs and restored after it: a stock config may
    derive its own ``num_key_value_heads`` there (transformers 5.25's ``FalconConfig`` sets the stock variant's
    count), which would otherwise replace the grouped one and size the projections for the stock heads."""

    def __post_init__(self, **kwargs):
        requested = self.num_key_value_heads
        super().__post_init__(**kwargs)
        self.num_key_value_heads = self.stock_num_key_value_heads() if requested is None else requested
        check_num_key_value_heads(self.num_attention_heads, self.num_key_value_heads)

    def stock_num_key_value_heads(self) -> int:
        return self.num_attention_heads


def split_grouped_qkv(fused: torch.Tensor, num_key_value_heads: int, head_dim: int):
    """[B, T, H_kv * (g + 2) * d] in the grouped layout -> q [B, H, T, d], k and v [B, H_kv, T, d]."""
    x = fused.view(*fused.shape[:-1], num_key_value_heads, -1, head_dim)
    query = x[..., :-2, :].flatten(-3, -2)
    return query.transpose(1, 2), x[..., -2, :].transpose(1, 2), x[..., -1, :].transpose(1, 2)


def to_heads(projected: torch.Tensor, head_dim: int) -> torch.Tensor:
    """[B, T, n * d] -> [B, n, T, d]."""
    return projected.view(*projected.shape[:-1], -1, head_dim).transpose(1, 2)


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


class GroupedAttentionMixin:
    """Base for plugin attention classes ``class GroupedXAttention(GroupedAttentionMixin, XAttention)``: the
    stock module with ``num_key_value_heads`` K/V heads and a cache of H_kv heads (self-attention only).

    ``forward`` is shared: project q/k/v, rotate (rotary families), update the cache, attend, project out.
    A family supplies what differs from its stock code:

    - ``eager_attention``: its stock eager function wrapped by :func:`with_repeated_kv` (a staticmethod);
    - ``grouped_projections(n)``: the projections ``make_grouped`` replaces and their new output sizes;
    - ``project_qkv(hidden_states)``: q [B, H, T, d], k and v [B, H_kv, T, d] (its projection layout / split);
    - ``attention_options()``: the ``dropout`` / ``scaling`` its stock attention passes;
    - ``project_output(attn_output [B, T, H * d])``: its output projection;
    - ``rotary``: its ``apply_rotary_pos_emb`` (a staticmethod), for rotary families.
    """

    stock_class: type  # the stock attention class this one extends (set for each subclass)
    eager_attention = None
    rotary = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        cls.stock_class = next(
            base
            for base in cls.__mro__[1:]
            if issubclass(base, nn.Module) and not issubclass(base, GroupedAttentionMixin)
        )

    @classmethod
    def make_grouped(cls, attn: nn.Module, num_key_value_heads: int) -> nn.Module:
        """Turn the stock module ``attn`` into this class in place, with fresh (uninitialised) projections of
        the new sizes."""
        attn.__class__ = cls
        set_grouping(attn, attn.config.num_attention_heads, num_key_value_heads)
        for name, out_features in attn.grouped_projections(num_key_value_heads).items():
            setattr(attn, name, resized_projection(getattr(attn, name), out_features))
        return attn

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        position_embeddings=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        output_attentions=False,
        **kwargs,
    ):
        if encoder_hidden_states is not None:
            raise ValueError(
                f"hf_attn_swap's {type(self).__name__} is self-attention only (cross-attention is not supported)"
            )
        query, key, value = self.project_qkv(hidden_states)
        if self.rotary is not None:
            query, key = self.rotary(query, key, *position_embeddings)
        key, value = update_layer_cache(kwargs, key, value, self.layer_idx)
        attn_output, attn_weights = self.attend(
            query, key, value, attention_mask, **self.attention_options(), **kwargs
        )
        attn_output = attn_output.reshape(*hidden_states.shape[:-1], -1).contiguous()
        return self.project_output(attn_output), attn_weights

    def attend(self, query, key, value, attention_mask, **kwargs):
        """Attention through the configured implementation (``ALL_ATTENTION_FUNCTIONS``: sdpa, flash, flex, or a
        registered one), or the family's ``eager_attention`` for "eager". q [B, H, T, d], k/v [B, H_kv, S, d]
        -> (output [B, T, H, d], weights or None)."""
        attention = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, self.eager_attention
        )
        return attention(self, query, key, value, attention_mask, **kwargs)


class GroupedModelMixin:
    """Base for plugin model classes ``class GroupedXModel(GroupedModelMixin, XModel)`` (a family makes them with
    :func:`grouped_model_classes`).

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
            register_output_capture(module)


def grouped_model_classes(
    config_class: type, grouped_attention: type, stock_classes: dict[str, type]
) -> dict[str, type]:
    """The family's plugin model classes, ``{Auto class name: Grouped<Stock>}`` for ``{Auto class name:
    stock model class}``: each is ``class Grouped<Stock>(GroupedModelMixin, Stock)`` with ``config_class`` and
    ``grouped_attention`` set, defined in the family's module (assign each to its name there: remote code is
    loaded by class name). ``save_pretrained`` copies the family's code next to the weights (transformers'
    ``register_for_auto_class``), so checkpoints also load with ``trust_remote_code=True``."""
    classes = {}
    for auto, stock in stock_classes.items():
        name = f"Grouped{stock.__name__}"
        namespace = {
            "__module__": config_class.__module__,
            "__qualname__": name,
            "__doc__": f"``{stock.__name__}`` with ``{grouped_attention.__name__}``.",
            "config_class": config_class,
            "grouped_attention": grouped_attention,
        }
        classes[auto] = cls = type(name, (GroupedModelMixin, stock), namespace)
        cls.register_for_auto_class(auto)
    config_class.register_for_auto_class("AutoConfig")
    return classes
