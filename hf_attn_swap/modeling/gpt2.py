"""GPT-2 with grouped-query attention: ``c_attn`` (a ``Conv1D``, weight [hidden, out]) projects to
[q: H * d ; k: H_kv * d ; v: H_kv * d] and the cache holds H_kv heads. Everything else is stock GPT-2."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import GPT2Config
from transformers.models.gpt2.modeling_gpt2 import (
    GPT2Attention,
    GPT2LMHeadModel,
    GPT2Model,
    eager_attention_forward,
)

from .grouped import (
    GroupedAttentionMixin,
    GroupedConfigMixin,
    grouped_model_classes,
    repeat_kv,
    to_heads,
    with_repeated_kv,
)


@strict
class GroupedGPT2Config(GroupedConfigMixin, GPT2Config):
    model_type = "hf_attn_swap_gpt2"
    num_key_value_heads: int | None = None


class GroupedGPT2Attention(GroupedAttentionMixin, GPT2Attention):
    """GPT-2 self-attention with ``num_key_value_heads`` K/V heads (cross-attention is not supported)."""

    eager_attention = staticmethod(with_repeated_kv(eager_attention_forward))

    def grouped_projections(self, num_key_value_heads: int) -> dict[str, int]:
        return {"c_attn": (self.num_heads + 2 * num_key_value_heads) * self.head_dim}

    def project_qkv(self, hidden_states):
        q_size, kv_size = self.num_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        fused = self.c_attn(hidden_states)
        return tuple(to_heads(x, self.head_dim) for x in fused.split([q_size, kv_size, kv_size], dim=-1))

    def attention_options(self) -> dict:
        return {"dropout": self.attn_dropout.p if self.training else 0.0, "scaling": self.scaling}

    def attend(self, query, key, value, attention_mask, **kwargs):
        if self.config._attn_implementation == "eager" and self.reorder_and_upcast_attn:
            groups = self.num_key_value_groups
            return self._upcast_and_reordered_attn(
                query, repeat_kv(key, groups), repeat_kv(value, groups), attention_mask
            )
        return super().attend(query, key, value, attention_mask, **kwargs)

    def project_output(self, attn_output):
        return self.resid_dropout(self.c_proj(attn_output))


#: what ``import hf_attn_swap`` registers, and the ``auto_map`` a saved checkpoint gets
AUTO_CLASSES = grouped_model_classes(
    GroupedGPT2Config,
    GroupedGPT2Attention,
    {"AutoModel": GPT2Model, "AutoModelForCausalLM": GPT2LMHeadModel},
)
GroupedGPT2Model, GroupedGPT2LMHeadModel = AUTO_CLASSES.values()
