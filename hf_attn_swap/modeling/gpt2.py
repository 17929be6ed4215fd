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

from .compat import pop_cache, update_layer_cache
from .grouped import (
    GroupedConfigMixin,
    GroupedModelMixin,
    attend,
    repeat_kv,
    resized_projection,
    save_code_with_checkpoints,
    set_grouping,
    with_repeated_kv,
)

grouped_eager_attention = with_repeated_kv(eager_attention_forward)


@strict
class GroupedGPT2Config(GroupedConfigMixin, GPT2Config):
    model_type = "hf_attn_swap_gpt2"
    num_key_value_heads: int | None = None


class GroupedGPT2Attention(GPT2Attention):
    """GPT-2 self-attention with ``num_key_value_heads`` K/V heads (cross-attention is not supported)."""

    stock_class = GPT2Attention

    @classmethod
    def make_grouped(cls, attn: GPT2Attention, num_key_value_heads: int) -> GroupedGPT2Attention:
        """Turn ``attn`` into this class in place, with a fresh (uninitialised) ``c_attn`` of the new size."""
        attn.__class__ = cls
        set_grouping(attn, attn.num_heads, num_key_value_heads)
        attn.c_attn = resized_projection(
            attn.c_attn, (attn.num_heads + 2 * num_key_value_heads) * attn.head_dim
        )
        return attn

    def forward(
        self,
        hidden_states,
        attention_mask=None,
        encoder_hidden_states=None,
        encoder_attention_mask=None,
        output_attentions=False,
        **kwargs,
    ):
        if encoder_hidden_states is not None:
            raise ValueError("hf_attn_swap's grouped GPT-2 attention does not support cross-attention")
        q_size, kv_size = self.num_heads * self.head_dim, self.num_key_value_heads * self.head_dim
        query, key, value = self.c_attn(hidden_states).split([q_size, kv_size, kv_size], dim=-1)
        heads = (*hidden_states.shape[:-1], -1, self.head_dim)
        query, key, value = (x.view(heads).transpose(1, 2) for x in (query, key, value))
        key, value = update_layer_cache(
            pop_cache(kwargs), key, value, self.layer_idx, kwargs.get("use_cache")
        )

        if self.config._attn_implementation == "eager" and self.reorder_and_upcast_attn:
            groups = self.num_key_value_groups
            attn_output, attn_weights = self._upcast_and_reordered_attn(
                query, repeat_kv(key, groups), repeat_kv(value, groups), attention_mask
            )
        else:
            attn_output, attn_weights = attend(
                self,
                grouped_eager_attention,
                query,
                key,
                value,
                attention_mask,
                dropout=self.attn_dropout.p if self.training else 0.0,
                scaling=self.scaling,
                **kwargs,
            )
        attn_output = attn_output.reshape(*attn_output.shape[:-2], -1).contiguous()
        return self.resid_dropout(self.c_proj(attn_output)), attn_weights


class GroupedGPT2Model(GroupedModelMixin, GPT2Model):
    config_class = GroupedGPT2Config
    grouped_attention = GroupedGPT2Attention


class GroupedGPT2LMHeadModel(GroupedModelMixin, GPT2LMHeadModel):
    config_class = GroupedGPT2Config
    grouped_attention = GroupedGPT2Attention


#: what ``import hf_attn_swap`` registers, and the ``auto_map`` a saved checkpoint gets
AUTO_CLASSES = {"AutoModel": GroupedGPT2Model, "AutoModelForCausalLM": GroupedGPT2LMHeadModel}
save_code_with_checkpoints(AUTO_CLASSES)
