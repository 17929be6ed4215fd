"""GPT-NeoX / Pythia: fused ``query_key_value`` whose rows interleave heads ([H, 3, d]: q, k, v per head),
rotate-half RoPE on the first ``head_dim * partial_rotary_factor`` dims (Pythia: 25%), biases on the
projections. Converted models use ``hf_attn_swap.modeling.gpt_neox`` (rows [H_kv, g + 2, d])."""

from __future__ import annotations

from torch import nn

from ..modeling.gpt_neox import GroupedGPTNeoXAttention, GroupedGPTNeoXConfig
from .base import AttentionWeights, RopeInfo
from .llama import rope_info_from_config
from .plugin import PluginAdapter, read_fused_grouped, write_fused_grouped


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
        return read_fused_grouped(
            attn.query_key_value, attn.dense, self.module_num_key_value_heads(attn), attn.head_size
        )

    def write(self, attn: nn.Module, weights: AttentionWeights) -> None:
        self.ensure_kv_heads(attn, weights.num_key_value_heads)
        write_fused_grouped(attn.query_key_value, attn.dense, weights)
