"""GPT-NeoX / Pythia with grouped-query attention: ``query_key_value`` in the grouped layout
(rows [H_kv, g + 2, d]: per K/V head its g query heads, then k, then v; at H_kv = H this is the stock per-head
[q, k, v] interleave), partial rotary on the first ``rotary_ndims`` dims, and a cache of H_kv heads."""

from __future__ import annotations

from collections.abc import Callable

from huggingface_hub.dataclasses import strict
from transformers import GPTNeoXConfig
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.gpt_neox.modeling_gpt_neox import (
    GPTNeoXAttention,
    GPTNeoXForCausalLM,
    GPTNeoXModel,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from .grouped import (
    GroupedModelMixin,
    check_num_key_value_heads,
    resized_projection,
    save_code_with_checkpoints,
    set_grouping,
    split_grouped_qkv,
    with_repeated_kv,
)

grouped_eager_attention = with_repeated_kv(eager_attention_forward)


@strict
class GroupedGPTNeoXConfig(GPTNeoXConfig):
    model_type = "hf_attn_swap_gpt_neox"
    num_key_value_heads: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        check_num_key_value_heads(self.num_attention_heads, self.num_key_value_heads)


class GroupedGPTNeoXAttention(GPTNeoXAttention):
    stock_class = GPTNeoXAttention

    @classmethod
    def make_grouped(cls, attn: GPTNeoXAttention, num_key_value_heads: int) -> GroupedGPTNeoXAttention:
        """Turn ``attn`` into this class in place, with a fresh (uninitialised) ``query_key_value``."""
        heads = attn.config.num_attention_heads
        attn.__class__ = cls
        set_grouping(attn, heads, num_key_value_heads)
        size = (heads + 2 * num_key_value_heads) * attn.head_size
        attn.query_key_value = resized_projection(attn.query_key_value, size)
        return attn

    def forward(self, hidden_states, attention_mask, layer_past=None, position_embeddings=None, **kwargs):
        input_shape = hidden_states.shape[:-1]
        query, key, value = split_grouped_qkv(
            self.query_key_value(hidden_states), self.num_key_value_heads, self.head_size
        )
        cos, sin = position_embeddings
        query, key = apply_rotary_pos_emb(query, key, cos, sin)
        if layer_past is not None:
            key, value = layer_past.update(key, value, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, grouped_eager_attention
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            scaling=self.scaling,
            dropout=0.0 if not self.training else self.attention_dropout,
            **kwargs,
        )
        attn_output = attn_output.reshape(*input_shape, -1).contiguous()
        return self.dense(attn_output), attn_weights


class GroupedGPTNeoXModel(GroupedModelMixin, GPTNeoXModel):
    config_class = GroupedGPTNeoXConfig
    grouped_attention = GroupedGPTNeoXAttention


class GroupedGPTNeoXForCausalLM(GroupedModelMixin, GPTNeoXForCausalLM):
    config_class = GroupedGPTNeoXConfig
    grouped_attention = GroupedGPTNeoXAttention


#: what ``import hf_attn_swap`` registers, and the ``auto_map`` a saved checkpoint gets
AUTO_CLASSES = {"AutoModel": GroupedGPTNeoXModel, "AutoModelForCausalLM": GroupedGPTNeoXForCausalLM}
save_code_with_checkpoints(AUTO_CLASSES)
