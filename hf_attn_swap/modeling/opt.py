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

from .grouped import (
    GroupedAttentionMixin,
    GroupedConfigMixin,
    grouped_model_classes,
    to_heads,
    with_repeated_kv,
)


@strict
class GroupedOPTConfig(GroupedConfigMixin, OPTConfig):
    model_type = "hf_attn_swap_opt"
    num_key_value_heads: int | None = None


class GroupedOPTAttention(GroupedAttentionMixin, OPTAttention):
    eager_attention = staticmethod(with_repeated_kv(eager_attention_forward))

    def grouped_projections(self, num_key_value_heads: int) -> dict[str, int]:
        size = num_key_value_heads * self.head_dim
        return {"k_proj": size, "v_proj": size}

    def project_qkv(self, hidden_states):
        query = to_heads(self.q_proj(hidden_states) * self.scaling, self.head_dim)
        return (
            query,
            to_heads(self.k_proj(hidden_states), self.head_dim),
            to_heads(self.v_proj(hidden_states), self.head_dim),
        )

    def attention_options(self) -> dict:
        return {"dropout": 0.0 if not self.training else self.dropout, "scaling": 1.0}

    def project_output(self, attn_output):
        return self.out_proj(attn_output)


#: what ``import hf_attn_swap`` registers, and the ``auto_map`` a saved checkpoint gets
AUTO_CLASSES = grouped_model_classes(
    GroupedOPTConfig, GroupedOPTAttention, {"AutoModel": OPTModel, "AutoModelForCausalLM": OPTForCausalLM}
)
GroupedOPTModel, GroupedOPTForCausalLM = AUTO_CLASSES.values()
