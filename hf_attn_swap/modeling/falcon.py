"""Falcon (rotary variants) with grouped-query attention: ``query_key_value`` in the grouped layout (rows
[H_kv, g + 2, d], which is exactly stock Falcon's layout for all three variants: per-head [q, k, v] without
multi-query, [q_1..q_H, k, v] with multi_query, Falcon-40B's groups with new_decoder_architecture) and a cache
of H_kv heads. ALiBi variants are not supported.

transformers 5.25 rewrote stock rotary Falcon's attention; the grouped module follows the installed version's
stock attention (``STOCK_ATTENTION_INTERFACE``), so a conversion that keeps every head reproduces it exactly."""

from __future__ import annotations

import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from transformers import FalconConfig
from transformers.models.falcon import modeling_falcon
from transformers.models.falcon.modeling_falcon import (
    FalconAttention,
    FalconForCausalLM,
    FalconModel,
    apply_rotary_pos_emb,
)

from .grouped import (
    GroupedAttentionMixin,
    GroupedConfigMixin,
    grouped_model_classes,
    split_grouped_qkv,
    with_repeated_kv,
)


def stock_num_key_value_heads(config) -> int:
    """K/V heads of a stock Falcon config: ``num_kv_heads`` (new_decoder_architecture), 1 (multi_query), or H."""
    if config.new_decoder_architecture:
        return config.num_kv_heads
    return 1 if config.multi_query else config.num_attention_heads


#: The one place that knows which stock rotary Falcon attention the installed transformers has.
#: transformers 5.25 (the same refactor dropped ``FalconAttention._split_heads``, ``FalconFlashAttention2`` and the
#: ``alibi`` argument) attends through the attention interfaces: Llama's ``eager_attention_forward`` (softmax in
#: float32, K/V repeated from ``module.num_key_value_groups``), ``config.attention_dropout`` while training, and a
#: cache of the variant's K/V heads. Before, ``FalconAttention.forward`` softmaxed in the input dtype, never
#: dropped out on rotary models, and with new_decoder_architecture broadcast K/V to all H query heads before
#: caching them (a stock Falcon-40B cache holds H heads, not ``num_kv_heads``).
STOCK_ATTENTION_INTERFACE: bool = not hasattr(FalconAttention, "_split_heads")


def legacy_eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Stock rotary Falcon's eager attention before transformers 5.25: softmax(q kᵀ · scaling + mask) v, softmax
    in the input dtype."""
    scores = (query @ key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = F.softmax(scores, dim=-1, dtype=query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    return (probs @ value).transpose(1, 2).contiguous(), probs


#: the installed version's stock eager attention, taking K/V with H_kv heads (5.25's repeats them itself)
eager_attention_forward = (
    modeling_falcon.eager_attention_forward
    if STOCK_ATTENTION_INTERFACE
    else with_repeated_kv(legacy_eager_attention_forward)
)


def stock_cached_kv_heads(config) -> int:
    """K/V heads per layer that a stock (rotary) Falcon's cache holds: its K/V heads, except Falcon-40B style
    (new_decoder_architecture) before transformers 5.25, which cached them repeated for all H query heads."""
    if config.new_decoder_architecture and not STOCK_ATTENTION_INTERFACE:
        return config.num_attention_heads
    return stock_num_key_value_heads(config)


@strict
class GroupedFalconConfig(GroupedConfigMixin, FalconConfig):
    model_type = "hf_attn_swap_falcon"
    num_key_value_heads: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.alibi:
            raise ValueError("hf_attn_swap's grouped Falcon supports rotary Falcon only (alibi=False)")

    def stock_num_key_value_heads(self) -> int:
        return stock_num_key_value_heads(self)


class GroupedFalconAttention(GroupedAttentionMixin, FalconAttention):
    eager_attention = staticmethod(eager_attention_forward)
    rotary = staticmethod(apply_rotary_pos_emb)

    @classmethod
    def make_grouped(cls, attn: FalconAttention, num_key_value_heads: int) -> GroupedFalconAttention:
        attn = super().make_grouped(attn, num_key_value_heads)
        attn.num_kv_heads = num_key_value_heads  # stock Falcon's name for it
        return attn

    def grouped_projections(self, num_key_value_heads: int) -> dict[str, int]:
        return {"query_key_value": (self.num_heads + 2 * num_key_value_heads) * self.head_dim}

    def forward(self, hidden_states, alibi=None, attention_mask=None, output_attentions=False, **kwargs):
        # transformers < 5.25 passes alibi (by keyword, None for rotary Falcon); 5.25 dropped the argument
        if alibi is not None:
            raise ValueError("hf_attn_swap's grouped Falcon supports rotary Falcon only (alibi=False)")
        attn_output, attn_weights = super().forward(hidden_states, attention_mask, **kwargs)
        return attn_output, (attn_weights if output_attentions else None)

    def project_qkv(self, hidden_states):
        return split_grouped_qkv(self.query_key_value(hidden_states), self.num_key_value_heads, self.head_dim)

    def attention_options(self) -> dict:
        # stock rotary Falcon: attention dropout while training from transformers 5.25 (a float there), none before
        dropout = self.attention_dropout if STOCK_ATTENTION_INTERFACE and self.training else 0.0
        return {"dropout": dropout, "scaling": self.inv_norm_factor}

    def project_output(self, attn_output):
        return self.dense(attn_output)


#: what ``import hf_attn_swap`` registers, and the ``auto_map`` a saved checkpoint gets
AUTO_CLASSES = grouped_model_classes(
    GroupedFalconConfig,
    GroupedFalconAttention,
    {"AutoModel": FalconModel, "AutoModelForCausalLM": FalconForCausalLM},
)
GroupedFalconModel, GroupedFalconForCausalLM = AUTO_CLASSES.values()
