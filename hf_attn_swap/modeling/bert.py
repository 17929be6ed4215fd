"""BERT with grouped-query attention: ``key``/``value`` project to H_kv heads (and a decoder's cache holds
H_kv heads); everything else is stock BERT (the output projection is ``BertSelfOutput``, outside this module).
The Auto classes of a BERT checkpoint (``AutoModel`` for sentence-transformers encoders such as
all-MiniLM-L6-v2, masked LM, causal LM, sequence classification) are registered."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import BertConfig
from transformers.models.bert.modeling_bert import (
    BertForMaskedLM,
    BertForSequenceClassification,
    BertLMHeadModel,
    BertModel,
    BertSelfAttention,
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
class GroupedBertConfig(GroupedConfigMixin, BertConfig):
    model_type = "hf_attn_swap_bert"
    num_key_value_heads: int | None = None


class GroupedBertSelfAttention(GroupedAttentionMixin, BertSelfAttention):
    eager_attention = staticmethod(with_repeated_kv(eager_attention_forward))

    def grouped_projections(self, num_key_value_heads: int) -> dict[str, int]:
        size = num_key_value_heads * self.attention_head_size
        return {"key": size, "value": size}

    def project_qkv(self, hidden_states):
        d = self.attention_head_size
        return tuple(to_heads(proj(hidden_states), d) for proj in (self.query, self.key, self.value))

    def attention_options(self) -> dict:
        return {"dropout": 0.0 if not self.training else self.dropout.p, "scaling": self.scaling}

    def project_output(self, attn_output):
        return attn_output


#: what ``import hf_attn_swap`` registers, and the ``auto_map`` a saved checkpoint gets
AUTO_CLASSES = grouped_model_classes(
    GroupedBertConfig,
    GroupedBertSelfAttention,
    {
        "AutoModel": BertModel,
        "AutoModelForMaskedLM": BertForMaskedLM,
        "AutoModelForCausalLM": BertLMHeadModel,
        "AutoModelForSequenceClassification": BertForSequenceClassification,
    },
)
GroupedBertModel, GroupedBertForMaskedLM, GroupedBertLMHeadModel, GroupedBertForSequenceClassification = (
    AUTO_CLASSES.values()
)
