"""The contract every GQA/MQA initialisation method fulfils, and the head-group bookkeeping they share."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch

from ...adapters import AttentionLayout, AttentionWeights


@dataclass
class LayerContext:
    """What a method may look at while converting one layer.

    inputs: [N, hidden] calibration hidden states entering this layer's attention (after its input norm),
            or None for data-free methods.
    key_weights: [N] attention each calibration row receives as a key (``Calibration.key_weights``), or None.
    q_norm_weight / k_norm_weight: [d] weights of a per-head RMSNorm applied to q / k before RoPE (Qwen3's
            ``q_norm``/``k_norm``), or None. Transforms of q/k must commute with them to be exact.
    cache: per-layer scratch shared by the steps of one method (e.g. the input moment matrix).
    """

    layer_idx: int
    layout: AttentionLayout
    num_key_value_heads: int
    inputs: torch.Tensor | None = None
    key_weights: torch.Tensor | None = None
    q_norm_weight: torch.Tensor | None = None
    k_norm_weight: torch.Tensor | None = None
    cache: dict = field(default_factory=dict)

    @property
    def has_qk_norm(self) -> bool:
        return self.q_norm_weight is not None or self.k_norm_weight is not None


class GQAMethod:
    """Maps one layer's weights with ``H_kv`` KV heads to weights with ``ctx.num_key_value_heads``.

    A method may also permute query heads (and the matching ``o`` columns) or apply function-preserving
    transforms to q/o, as long as the layer still computes attention the stock way (query head j uses KV head
    ``j // (H / H_kv_new)``).
    """

    name: str = ""
    needs_calibration: bool = False
    #: also uses ``LayerContext.key_weights`` (collect with ``collect_calibration(..., key_weights=True)``)
    uses_key_weights: bool = False

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


def expand_to_query_heads(weights: AttentionWeights) -> AttentionWeights:
    """The same layer with one K/V head per query head (H KV heads, each a copy of the one it read).

    Computes exactly the same function; every per-query-head method starts here, so a query head can be moved
    to another group together with its own K/V.
    """
    h = weights.num_attention_heads
    kv = ("k", "v", "k_bias", "v_bias")
    return replace(weights, **{n: _map(getattr(weights, n), lambda t: per_query_head(t, h)) for n in kv})


def permute_query_heads(weights: AttentionWeights, order) -> AttentionWeights:
    """Reorder the heads of a layer with one K/V head per query head (see ``expand_to_query_heads``).

    order: new head i is old head ``order[i]``. q/k/v rows and the matching ``o`` columns move together, so
    the layer computes the same function (the output sums over heads).
    """
    if weights.num_key_value_heads != weights.num_attention_heads:
        raise ValueError(
            "permute_query_heads needs one K/V head per query head: call expand_to_query_heads first"
        )
    order = torch.as_tensor(order, dtype=torch.long)
    if sorted(order.tolist()) != list(range(weights.num_attention_heads)):
        raise ValueError(
            f"order must be a permutation of range({weights.num_attention_heads}), got {order.tolist()}"
        )
    heads = ("q", "k", "v", "q_bias", "k_bias", "v_bias")
    moved = {n: _map(getattr(weights, n), lambda t: t[order]) for n in heads}
    return replace(weights, o=weights.o[:, order], **moved)


def with_new_heads(
    weights: AttentionWeights, o: torch.Tensor, dtype: torch.dtype, **heads
) -> AttentionWeights:
    """``weights`` with the new projections ``heads`` (q, k, v and their biases) and o (any grouping of its head
    axis, e.g. [hidden, G, s, d]) back in the source's [hidden, H, d] shape, o in ``dtype``."""
    return replace(weights, o=o.reshape(weights.o.shape).to(dtype), **heads)


def _map(tensor: torch.Tensor | None, fn):
    return None if tensor is None else fn(tensor)
