"""Mean pooling (Ainslie et al. 2023, "GQA", section 2.1): each new K/V head is the mean of the old heads
its query heads read. With H_kv_new dividing H_kv this is the paper's mean of contiguous KV heads; otherwise
each old head is weighted by how many of the group's query heads it served."""

from __future__ import annotations

from dataclasses import replace

from ...adapters import AttentionWeights
from .base import GQAMethod, LayerContext, grouped, per_query_head


def mean_pool(kv, num_attention_heads: int, num_key_value_heads: int):
    """[H_kv, ...] -> [H_kv_new, ...]."""
    if kv is None:
        return None
    return grouped(per_query_head(kv, num_attention_heads), num_key_value_heads).mean(dim=1)


class MeanPooling(GQAMethod):
    name = "mean"

    def convert_layer(self, weights: AttentionWeights, ctx: LayerContext) -> AttentionWeights:
        h, g = weights.num_attention_heads, ctx.num_key_value_heads
        return replace(
            weights,
            k=mean_pool(weights.k, h, g),
            v=mean_pool(weights.v, h, g),
            k_bias=mean_pool(weights.k_bias, h, g),
            v_bias=mean_pool(weights.v_bias, h, g),
        )
