"""BERT with grouped-query attention: ``key``/``value`` project to H_kv heads (and a decoder's cache holds
H_kv heads); everything else is stock BERT. The Auto classes of a BERT checkpoint (``AutoModel`` for
sentence-transformers encoders such as all-MiniLM-L6-v2, masked LM, causal LM, sequence classification) are
registered."""

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
class GroupedBertConfig(GroupedConfigMixin, BertConfig):
    model_type = "hf_attn_swap_bert"
    num_key_value_heads: int | None = None


class GroupedBertSelfAttention(BertSelfAttention):
    stock_class = BertSelfAttention

    @classmethod
    def make_grouped(cls, attn: BertSelfAttention, num_key_value_heads: int) -> GroupedBertSelfAttention:
        """Turn ``attn`` into this class in place, with fresh (uninitialised) ``key``/``value``."""
        attn.__class__ = cls
        set_grouping(attn, attn.num_attention_heads, num_key_value_heads)
        attn.key = resized_projection(attn.key, num_key_value_heads * attn.attention_head_size)
        attn.value = resized_projection(attn.value, num_key_value_heads * attn.attention_head_size)
        return attn

    def forward(self, hidden_states, attention_mask=None, **kwargs):
        heads = (*hidden_states.shape[:-1], -1, self.attention_head_size)
        query = self.query(hidden_states).view(heads).transpose(1, 2)
        key = self.key(hidden_states).view(heads).transpose(1, 2)
        value = self.value(hidden_states).view(heads).transpose(1, 2)
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
            dropout=0.0 if not self.training else self.dropout.p,
            scaling=self.scaling,
            **kwargs,
        )
        return attn_output.reshape(*hidden_states.shape[:-1], -1).contiguous(), attn_weights


class GroupedBertModel(GroupedModelMixin, BertModel):
    config_class = GroupedBertConfig
    grouped_attention = GroupedBertSelfAttention


class GroupedBertForMaskedLM(GroupedModelMixin, BertForMaskedLM):
    config_class = GroupedBertConfig
    grouped_attention = GroupedBertSelfAttention


class GroupedBertLMHeadModel(GroupedModelMixin, BertLMHeadModel):
    config_class = GroupedBertConfig
    grouped_attention = GroupedBertSelfAttention


class GroupedBertForSequenceClassification(GroupedModelMixin, BertForSequenceClassification):
    config_class = GroupedBertConfig
    grouped_attention = GroupedBertSelfAttention


#: what ``import hf_attn_swap`` registers, and the ``auto_map`` a saved checkpoint gets
AUTO_CLASSES = {
    "AutoModel": GroupedBertModel,
    "AutoModelForMaskedLM": GroupedBertForMaskedLM,
    "AutoModelForCausalLM": GroupedBertLMHeadModel,
    "AutoModelForSequenceClassification": GroupedBertForSequenceClassification,
}
save_code_with_checkpoints(AUTO_CLASSES)
