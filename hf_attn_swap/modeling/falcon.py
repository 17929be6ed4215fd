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

from .compat import pop_cache, update_layer_cache
from .grouped import (
    GroupedConfigMixin,
    GroupedModelMixin,
    attend,
    resized_projection,
    save_code_with_checkpoints,
    set_grouping,
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


grouped_eager_attention = with_repeated_kv(eager_attention_forward)


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


class GroupedFalconAttention(FalconAttention):
    stock_class = FalconAttention

    @classmethod
    def make_grouped(cls, attn: FalconAttention, num_key_value_heads: int) -> GroupedFalconAttention:
        """Turn ``attn`` into this class in place, with a fresh (uninitialised) ``query_key_value``."""
        attn.__class__ = cls
        set_grouping(attn, attn.num_heads, num_key_value_heads)
        attn.num_kv_heads = num_key_value_heads
        size = (attn.num_heads + 2 * num_key_value_heads) * attn.head_dim
        attn.query_key_value = resized_projection(attn.query_key_value, size)
        return attn

    def forward(
        self,
        hidden_states,
        alibi,
        attention_mask,
        position_ids=None,
        use_cache=False,
        output_attentions=False,
        position_embeddings=None,
        **kwargs,
    ):
        if alibi is not None:
            raise ValueError("hf_attn_swap's grouped Falcon supports rotary Falcon only (alibi=False)")
        batch_size, query_length, _ = hidden_states.shape
        query, key, value = split_grouped_qkv(
            self.query_key_value(hidden_states), self.num_key_value_heads, self.head_dim
        )
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        key, value = update_layer_cache(pop_cache(kwargs), key, value, self.layer_idx, use_cache)
        attn_output, attn_weights = attend(
            self,
            grouped_eager_attention,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0,  # stock rotary Falcon applies no attention dropout
            scaling=self.inv_norm_factor,
            position_ids=position_ids,
            **kwargs,
        )
        attn_output = attn_output.reshape(batch_size, query_length, self.num_heads * self.head_dim)
        return self.dense(attn_output), (attn_weights if output_attentions else None)


class GroupedFalconModel(GroupedModelMixin, FalconModel):
    config_class = GroupedFalconConfig
    grouped_attention = GroupedFalconAttention


class GroupedFalconForCausalLM(GroupedModelMixin, FalconForCausalLM):
    config_class = GroupedFalconConfig
    grouped_attention = GroupedFalconAttention


#: what ``import hf_attn_swap`` registers, and the ``auto_map`` a saved checkpoint gets
AUTO_CLASSES = {"AutoModel": GroupedFalconModel, "AutoModelForCausalLM": GroupedFalconForCausalLM}
save_code_with_checkpoints(AUTO_CLASSES)
