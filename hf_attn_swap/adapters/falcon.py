"""Falcon with rotary positions: one fused ``query_key_value`` whose rows are [H_kv, g + 2, d] (per K/V
head its g query heads, then k, then v) in all three variants, ``dense`` out, rotate-half RoPE on every dim.
K/V heads of the stock variants: ``num_kv_heads`` (new_decoder_architecture, Falcon-40B/180B), 1 (multi_query,
Falcon-7B: already MQA) or H. ALiBi variants (e.g. Falcon-RW) are refused. Converted models use
``hf_attn_swap.modeling.falcon``."""

from __future__ import annotations

from torch import nn

from ..modeling.falcon import GroupedFalconAttention, GroupedFalconConfig, stock_num_key_value_heads
from .base import AttentionWeights, RopeInfo
from .llama import rope_info_from_config
from .plugin import PluginAdapter, read_fused_grouped, unsupported, write_fused_grouped

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
        return read_fused_grouped(
            attn.query_key_value, attn.dense, self.module_num_key_value_heads(attn), attn.head_dim
        )

    def write(self, attn: nn.Module, weights: AttentionWeights) -> None:
        self.ensure_kv_heads(attn, weights.num_key_value_heads)
        write_fused_grouped(attn.query_key_value, attn.dense, weights)
