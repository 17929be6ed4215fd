"""Falcon with rotary positions: one fused ``query_key_value`` whose rows are [H_kv, g + 2, d] (per K/V
head its g query heads, then k, then v) in all three variants, ``dense`` out, rotate-half RoPE on every dim.
K/V heads of the stock variants: ``num_kv_heads`` (new_decoder_architecture, Falcon-40B/180B), 1 (multi_query,
Falcon-7B: already MQA) or H. ALiBi variants (e.g. Falcon-RW) are refused. Converted models use
``hf_attn_swap.models.falcon``."""

from __future__ import annotations

from torch import nn

from ..models.falcon import GroupedFalconAttention, GroupedFalconConfig, stock_num_key_value_heads
from .base import AttentionWeights, RopeInfo
from .llama import rope_info_from_config
from .plugin import PluginAdapter, copy_into, fuse_grouped_rows, split_grouped_rows, unsupported

SUPPORTED_VARIANTS = (
    "rotary Falcon (alibi=False) in any of its layouts: new_decoder_architecture=True (Falcon-40B/180B style "
    "GQA with num_kv_heads), multi_query=True (Falcon-7B style, already MQA: only 1 KV head is valid), or "
    "multi-head (multi_query=False)"
)


class FalconAdapter(PluginAdapter):
    family = "falcon"
    model_types = ("falcon", GroupedFalconConfig.model_type)
    config_class = GroupedFalconConfig
    grouped_attention = GroupedFalconAttention

    def check_supported(self, config) -> None:
        if config.alibi:
            raise unsupported(
                "Falcon with ALiBi position biases (alibi=True, e.g. Falcon-RW) is not supported. "
                f"Supported: {SUPPORTED_VARIANTS}."
            )

    def stock_num_key_value_heads(self, config) -> int:
        return stock_num_key_value_heads(config)

    def rope_info(self, config, head_dim: int, model: nn.Module | None) -> RopeInfo:
        return rope_info_from_config(config, head_dim, model, self)

    def module_num_key_value_heads(self, attn: nn.Module) -> int:
        if isinstance(attn, GroupedFalconAttention):
            return attn.num_key_value_heads
        return stock_num_key_value_heads(attn.config)

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        return [layer.self_attention for layer in model.base_model.h]

    def read(self, attn: nn.Module) -> AttentionWeights:
        d, qkv, dense = attn.head_dim, attn.query_key_value, attn.dense
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
