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

from .grouped import (
    GroupedAttentionMixin,
    GroupedConfigMixin,
    grouped_model_classes,
    split_grouped_qkv,
    with_repeated_kv,
)


@strict
class GroupedGPTNeoXConfig(GroupedConfigMixin, GPTNeoXConfig):
    model_type = "hf_attn_swap_gpt_neox"
    num_key_value_heads: int | None = None


class GroupedGPTNeoXAttention(GroupedAttentionMixin, GPTNeoXAttention):
    eager_attention = staticmethod(with_repeated_kv(eager_attention_forward))
    rotary = staticmethod(apply_rotary_pos_emb)

    def grouped_projections(self, num_key_value_heads: int) -> dict[str, int]:
        heads = self.config.num_attention_heads
        return {"query_key_value": (heads + 2 * num_key_value_heads) * self.head_size}

    def project_qkv(self, hidden_states):
        return split_grouped_qkv(
            self.query_key_value(hidden_states), self.num_key_value_heads, self.head_size
        )

    def attention_options(self) -> dict:
        return {"scaling": self.scaling, "dropout": 0.0 if not self.training else self.attention_dropout}

    def project_output(self, attn_output):
        return self.dense(attn_output)


#: what ``import hf_attn_swap`` registers, and the ``auto_map`` a saved checkpoint gets
AUTO_CLASSES = grouped_model_classes(
    GroupedGPTNeoXConfig,
    GroupedGPTNeoXAttention,
    {"AutoModel": GPTNeoXModel, "AutoModelForCausalLM": GPTNeoXForCausalLM},
)
GroupedGPTNeoXModel, GroupedGPTNeoXForCausalLM = AUTO_CLASSES.values()
