"""Phi-3: one fused ``qkv_proj`` [(H + 2 H_kv) * d, hidden] laid out as [q heads ; k heads ; v heads],
no biases, rotate-half RoPE (optionally partial). The module slices with ``self.num_key_value_heads``."""

from __future__ import annotations

import torch
from torch import nn

from .base import AttentionWeights, new_linear
from .llama import LlamaLikeAdapter


class Phi3Adapter(LlamaLikeAdapter):
    family = "phi3"
    model_types = ("phi3",)
    attention_class_names = ("Phi3Attention",)

    def read(self, attn: nn.Module) -> AttentionWeights:
        d = attn.head_dim
        n_q, n_kv = attn.config.num_attention_heads, attn.num_key_value_heads
        w = attn.qkv_proj.weight.detach()
        q, k, v = torch.split(w, [n_q * d, n_kv * d, n_kv * d], dim=0)
        o = attn.o_proj
        return AttentionWeights(
            q=q.view(n_q, d, -1),
            k=k.view(n_kv, d, -1),
            v=v.view(n_kv, d, -1),
            o=o.weight.detach().view(o.out_features, n_q, d),
            o_bias=None if o.bias is None else o.bias.detach(),
        )

    def write(self, attn: nn.Module, weights: AttentionWeights) -> None:
        if any(b is not None for b in (weights.q_bias, weights.k_bias, weights.v_bias)):
            raise ValueError("Phi-3's fused qkv_proj has no bias; this conversion produced q/k/v biases")
        hidden = weights.q.shape[-1]
        fused = torch.cat([w.reshape(-1, hidden) for w in (weights.q, weights.k, weights.v)], dim=0)
        attn.qkv_proj = new_linear(fused, None, attn.qkv_proj)
        attn.o_proj = new_linear(weights.o.reshape(weights.o.shape[0], -1), weights.o_bias, attn.o_proj)
        attn.num_key_value_heads = weights.num_key_value_heads
        attn.num_key_value_groups = weights.num_attention_heads // weights.num_key_value_heads
