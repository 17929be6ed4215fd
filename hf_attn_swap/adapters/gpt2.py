"""GPT-2: fused ``c_attn`` (``Conv1D``: weight [hidden, out], ``y = x W + b``) projecting to [q ; k ; v],
``c_proj`` out, learned absolute positions, biases everywhere. Converted models use
``hf_attn_swap.modeling.gpt2`` (``c_attn`` out = (H + 2 H_kv) d)."""

from __future__ import annotations

import torch
from torch import nn

from ..modeling.gpt2 import GroupedGPT2Attention, GroupedGPT2Config
from .base import AttentionWeights, flat
from .plugin import PluginAdapter, copy_into, unsupported


class GPT2Adapter(PluginAdapter):
    family = "gpt2"
    model_types = ("gpt2", GroupedGPT2Config.model_type)
    config_class = GroupedGPT2Config
    grouped_attention = GroupedGPT2Attention

    def check_supported(self, config) -> None:
        if config.add_cross_attention:
            raise unsupported(
                "GPT-2 with cross-attention (add_cross_attention=True) is not supported: hf_attn_swap converts "
                "decoder-only GPT-2 (GPT2Model, GPT2LMHeadModel)"
            )

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        return [block.attn for block in model.base_model.h]

    def read(self, attn: nn.Module) -> AttentionWeights:
        h, d, kv = attn.num_heads, attn.head_dim, self.module_num_key_value_heads(attn)
        sizes = [h * d, kv * d, kv * d]
        q, k, v = torch.split(attn.c_attn.weight.detach().T, sizes)
        qb, kb, vb = torch.split(attn.c_attn.bias.detach(), sizes)
        return AttentionWeights(
            q=q.reshape(h, d, -1),
            k=k.reshape(kv, d, -1),
            v=v.reshape(kv, d, -1),
            o=attn.c_proj.weight.detach().T.reshape(-1, h, d),
            q_bias=qb.view(h, d),
            k_bias=kb.view(kv, d),
            v_bias=vb.view(kv, d),
            o_bias=attn.c_proj.bias.detach(),
        )

    def write(self, attn: nn.Module, weights: AttentionWeights) -> None:
        self.ensure_kv_heads(attn, weights.num_key_value_heads)
        hidden = weights.q.shape[-1]
        fused = torch.cat([w.reshape(-1, hidden) for w in (weights.q, weights.k, weights.v)])
        fused_bias = torch.cat([flat(b) for b in (weights.q_bias, weights.k_bias, weights.v_bias)])
        copy_into(attn.c_attn, fused.T, fused_bias)
        copy_into(attn.c_proj, weights.o.reshape(hidden, -1).T, weights.o_bias)
