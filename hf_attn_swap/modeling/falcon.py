"""Falcon (rotary variants) with grouped-query attention: ``query_key_value`` in the grouped layout (rows
[H_kv, g + 2, d], which is exactly stock Falcon's layout for all three variants: per-head [q, k, v] without
multi-query, [q_1..q_H, k, v] with multi_query, Falcon-40B's groups with new_decoder_architecture) and a cache
of H_kv heads (stock Falcon-40B repeats K/V to H heads before caching). ALiBi variants are not supported."""

from __future__ import annotations

import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from transformers import FalconConfig
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


def eager_attention_forward(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Stock Falcon's rotary eager attention: softmax(q kᵀ · scaling + mask) v, softmax in the input dtype."""
    scores = (query @ key.transpose(-1, -2)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    probs = F.softmax(scores, dim=-1, dtype=query.dtype)
    probs = F.dropout(probs, p=dropout, training=module.training)
    return (probs @ value).transpose(1, 2).contiguous(), probs


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
    eager_attention = staticmethod(with_repeated_kv(eager_attention_forward))
    rotary = staticmethod(apply_rotary_pos_emb)

    @classmethod
    def make_grouped(cls, attn: FalconAttention, num_key_value_heads: int) -> GroupedFalconAttention:
        attn = super().make_grouped(attn, num_key_value_heads)
        attn.num_kv_heads = num_key_value_heads  # stock Falcon's name for it
        return attn

    def grouped_projections(self, num_key_value_heads: int) -> dict[str, int]:
        return {"query_key_value": (self.num_heads + 2 * num_key_value_heads) * self.head_dim}

    def forward(self, hidden_states, alibi, attention_mask, output_attentions=False, **kwargs):
        if alibi is not None:
            raise ValueError("hf_attn_swap's grouped Falcon supports rotary Falcon only (alibi=False)")
        attn_output, attn_weights = super().forward(hidden_states, attention_mask, **kwargs)
        return attn_output, (attn_weights if output_attentions else None)

    def project_qkv(self, hidden_states):
        return split_grouped_qkv(self.query_key_value(hidden_states), self.num_key_value_heads, self.head_dim)

    def attention_options(self) -> dict:
        return {"dropout": 0.0, "scaling": self.inv_norm_factor}  # stock rotary Falcon: no attention dropout

    def project_output(self, attn_output):
        return self.dense(attn_output)


#: what ``import hf_attn_swap`` registers, and the ``auto_map`` a saved checkpoint gets
AUTO_CLASSES = grouped_model_classes(
    GroupedFalconConfig,
    GroupedFalconAttention,
    {"AutoModel": FalconModel, "AutoModelForCausalLM": FalconForCausalLM},
)
GroupedFalconModel, GroupedFalconForCausalLM = AUTO_CLASSES.values()
