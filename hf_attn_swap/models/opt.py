"""OPT with grouped-query attention: ``k_proj``/``v_proj`` project to H_kv heads and the cache holds H_kv
heads. Stock conventions kept: queries are scaled before the attention (``scaling=1.0`` inside), biases on
every projection, learned positions (from the attention mask) outside the attention."""

from __future__ import annotations

from collections.abc import Callable

from huggingface_hub.dataclasses import strict
from transformers import OPTConfig
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.opt.modeling_opt import (
    OPTAttention,
    OPTForCausalLM,
    OPTModel,
    eager_attention_forward,
)

from .grouped import (
    GroupedModelMixin,
    check_num_key_value_heads,
    resized_projection,
    save_code_with_checkpoints,
    set_grouping,
    with_repeated_kv,
)

grouped_eager_attention = with_repeated_kv(eager_attention_forward)


@strict
class GroupedOPTConfig(OPTConfig):
    model_type = "hf_attn_swap_opt"
    num_key_value_heads: int | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        check_num_key_value_heads(self.num_attention_heads, self.num_key_value_heads)


class GroupedOPTAttention(OPTAttention):
    stock_class = OPTAttention

    @classmethod
    def make_grouped(cls, attn: OPTAttention, num_key_value_heads: int) -> GroupedOPTAttention:
        """Turn ``attn`` into this class in place, with fresh (uninitialised) ``k_proj``/``v_proj``."""
        attn.__class__ = cls
        set_grouping(attn, attn.num_heads, num_key_value_heads)
        attn.k_proj = resized_projection(attn.k_proj, num_key_value_heads * attn.head_dim)
        attn.v_proj = resized_projection(attn.v_proj, num_key_value_heads * attn.head_dim)
        return attn

    def forward(
        self, hidden_states, past_key_values=None, attention_mask=None, output_attentions=False, **kwargs
    ):
        bsz, tgt_len, _ = hidden_states.size()
        query = (
            (self.q_proj(hidden_states) * self.scaling).view(bsz, tgt_len, -1, self.head_dim).transpose(1, 2)
        )
        key = self.k_proj(hidden_states).view(bsz, tgt_len, -1, self.head_dim).transpose(1, 2)
        value = self.v_proj(hidden_states).view(bsz, tgt_len, -1, self.head_dim).transpose(1, 2)
        if past_key_values is not None:
            key, value = past_key_values.update(key, value, self.layer_idx)

        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, grouped_eager_attention
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            key,
            value,
            attention_mask,
            dropout=0.0 if not self.training else self.dropout,
            scaling=1.0,
            **kwargs,
        )
        attn_output = attn_output.reshape(bsz, tgt_len, -1).contiguous()
        return self.out_proj(attn_output), attn_weights


class GroupedOPTModel(GroupedModelMixin, OPTModel):
    config_class = GroupedOPTConfig
    grouped_attention = GroupedOPTAttention


class GroupedOPTForCausalLM(GroupedModelMixin, OPTForCausalLM):
    config_class = GroupedOPTConfig
    grouped_attention = GroupedOPTAttention


#: what ``import hf_attn_swap`` registers, and the ``auto_map`` a saved checkpoint gets
AUTO_CLASSES = {"AutoModel": GroupedOPTModel, "AutoModelForCausalLM": GroupedOPTForCausalLM}
save_code_with_checkpoints(AUTO_CLASSES)
