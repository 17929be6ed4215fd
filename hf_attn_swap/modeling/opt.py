"""OPT with grouped-query attention: ``k_proj``/``v_proj`` project to H_kv heads and the cache holds H_kv
heads. Stock conventions kept: queries are scaled before the attention (``scaling=1.0`` inside), biases on
every projection, learned positions (from the attention mask) outside the attention."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import OPTConfig
from transformers.models.opt.modeling_opt import (
    OPTAttention,
    OPTForCausalLM,
    OPTModel,
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
    with_repeated_kv,
)

grouped_eager_attention = with_repeated_kv(eager_attention_forward)


@strict
class GroupedOPTConfig(GroupedConfigMixin, OPTConfig):
    model_type = "hf_attn_swap_opt"
    num_key_value_heads: int | None = None


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

    def forward(self, hidden_states, attention_mask=None, output_attentions=False, **kwargs):
        heads = (*hidden_states.shape[:-1], -1, self.head_dim)
        query = (self.q_proj(hidden_states) * self.scaling).view(heads).transpose(1, 2)
        key = self.k_proj(hidden_states).view(heads).transpose(1, 2)
        value = self.v_proj(hidden_states).view(heads).transpose(1, 2)
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
            dropout=0.0 if not self.training else self.dropout,
            scaling=1.0,
            **kwargs,
        )
        attn_output = attn_output.reshape(*hidden_states.shape[:-1], -1).contiguous()
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
