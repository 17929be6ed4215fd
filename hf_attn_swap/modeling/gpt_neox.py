"""GPT-NeoX / Pythia with grouped-query attention: ``query_key_value`` in the grouped layout
(rows [H_kv, g + 2, d]: per K/V head its g query heads, then k, then v; at H_kv = H this is the stock per-head
[q, k, v] interleave), partial rotary on the first ``rotary_ndims`` dims, and a cache of H_kv heads."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import GPTNeoXConfig
from transformers.models.gpt_neox.modeling_gpt_neox import (
    GPTNeoXAttention,
    GPTNeoXForCausalLM,
    GPTNeoXModel,
    apply_rotary_pos_emb,
    eager_attention_forward,
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

grouped_eager_attention = with_repeated_kv(eager_attention_forward)


@strict
class GroupedGPTNeoXConfig(GroupedConfigMixin, GPTNeoXConfig):
    model_type = "hf_attn_swap_gpt_neox"
    num_key_value_heads: int | None = None


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

    def forward(self, hidden_states, attention_mask, position_embeddings=None, **kwargs):
        fused = self.query_key_value(hidden_states)
        query, key, value = split_grouped_qkv(fused, self.num_key_value_heads, self.head_size)
        query, key = apply_rotary_pos_emb(query, key, *position_embeddings)
        key, value = update_layer_cache(
            pop_cache(kwargs), key, value, self.layer_idx, kwargs.get("use_cache")
        )
        attn_output, attn_weights = attend(
            self,
            grouped_eager_attention,
            query,
            key,
            value,
            attention_mask,
            scaling=self.scaling,
            dropout=0.0 if not self.training else self.attention_dropout,
            **kwargs,
        )
        attn_output = attn_output.reshape(*hidden_states.shape[:-1], -1).contiguous()
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
