"""OPT: separate ``q_proj``/``k_proj``/``v_proj``/``out_proj`` with biases, queries scaled before the
product, learned absolute positions. Converted models use ``hf_attn_swap.modeling.opt``."""

from __future__ import annotations

from torch import nn

from ..modeling.opt import GroupedOPTAttention, GroupedOPTConfig
from .base import AttentionWeights
from .plugin import PluginAdapter, read_projections, write_projections


class OPTAdapter(PluginAdapter):
    family = "opt"
    model_types = ("opt", GroupedOPTConfig.model_type)
    config_class = GroupedOPTConfig
    grouped_attention = GroupedOPTAttention

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        return [layer.self_attn for layer in model.base_model.decoder.layers]

    def read(self, attn: nn.Module) -> AttentionWeights:
        return read_projections(attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj, attn.head_dim)

    def write(self, attn: nn.Module, weights: AttentionWeights) -> None:
        self.ensure_kv_heads(attn, weights.num_key_value_heads)
        write_projections(attn.q_proj, attn.k_proj, attn.v_proj, attn.out_proj, weights)
