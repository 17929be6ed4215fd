"""The contract every GQA/MQA initialisation method fulfils, and the head-group bookkeeping they share."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..architectures import AttentionLayout, AttentionWeights


@dataclass
class LayerContext:
    """What a method may look at while converting one layer.

    inputs: [N, hidden] calibration hidden states entering this layer's attention (after its input norm),
            or None for data-free methods.
    """

    layer_idx: int
    layout: AttentionLayout
    num_key_value_heads: int
    inputs: torch.Tensor | None = None


class GQAMethod:
    """Maps one layer's weights with ``H_kv`` KV heads to weights with ``ctx.num_key_value_heads``.

    A method may also permute query heads (and the matching ``o`` columns) or apply function-preserving
    transforms to q/o, as long as the layer still computes attention the stock way (query head j uses KV head
    ``j // (H / H_kv_new)``).
    """

    name: str = ""
    needs_calibration: bool = False

    def convert_layer(self, weights: AttentionWeights, ctx: LayerContext) -> AttentionWeights:
        raise NotImplementedError


def per_query_head(kv: torch.Tensor, num_attention_heads: int) -> torch.Tensor:
    """[H_kv, ...] -> [H, ...]: the K or V head each query head reads (``repeat_kv`` order)."""
    return kv.repeat_interleave(num_attention_heads // kv.shape[0], dim=0)


def grouped(per_head: torch.Tensor, num_key_value_heads: int) -> torch.Tensor:
    """[H, ...] -> [H_kv_new, H / H_kv_new, ...]: query heads bundled by the new KV head they will share."""
    return per_head.reshape(
        num_key_value_heads, per_head.shape[0] // num_key_value_heads, *per_head.shape[1:]
    )
