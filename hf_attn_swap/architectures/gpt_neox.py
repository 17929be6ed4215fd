"""GPT-NeoX / Pythia: fused ``query_key_value`` whose rows interleave heads ([H, 3, d]: q, k, v per head),
rotate-half RoPE on the first ``head_dim * partial_rotary_factor`` dims (Pythia: 25%), biases on the
projections. Converted models use ``hf_attn_swap.models.gpt_neox`` (rows [H_kv, g + 2, d])."""

from __future__ import annotations

from torch import nn

from ..models.gpt_neox import GroupedGPTNeoXAttention, GroupedGPTNeoXConfig
from .base import AttentionWeights, RopeInfo
from .llama import rope_info_from_config
from .plugin import PluginAdapter, copy_into, fuse_grouped_rows, split_grouped_rows


class GPTNeoXAdapter(PluginAdapter):
    family = "gpt_neox"
    model_types = ("gpt_neox", GroupedGPTNeoXConfig.model_type)
    config_class = GroupedGPTNeoXConfig
    grouped_attention = GroupedGPTNeoXAttention

    def rope_info(self, config, head_dim: int, model: nn.Module | None) -> RopeInfo:
        return rope_info_from_config(config, head_dim, model, self)

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        return [layer.attention for layer in model.base_model.layers]

    def read(self, attn: nn.Module) -> AttentionWeights:
        d, qkv, dense = attn.head_size, attn.query_key_value, attn.dense
        kv = self.module_num_key_value_heads(attn)
        q, k, v = split_grouped_rows(qkv.weight.detach(), kv, d)
        qb, kb, vb = split_grouped_rows(None if qkv.bias is None else qkv.bias.detach(), kv, d)
        return AttentionWeights(
            q=q,
            k=k,
            v=v,
            o=dense.weight.detach().reshape(dense.out_features, -1, d),
            q_bias=qb,
            k_bias=kb,
            v_bias=vb,
            o_bias=None if dense.bias is None else dense.bias.detach(),
        )

    def write(self, attn: nn.Module, weights: AttentionWeights) -> None:
        self.ensure_kv_heads(attn, weights.num_key_value_heads)
        weight = fuse_grouped_rows(weights.q, weights.k, weights.v)
        bias = fuse_grouped_rows(weights.q_bias, weights.k_bias, weights.v_bias)
        copy_into(attn.query_key_value, weight, bias)
        copy_into(attn.dense, weights.o.reshape(weights.o.shape[0], -1), weights.o_bias)
