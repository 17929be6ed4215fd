"""One layer of an MLA conversion: the per-layer math (``decompose_layer``), cutting it at a rank
(``layer_weights``) and the attention module that holds the result (``build_attention``).

Per layer (math in float64 on the layer's math device, then cast to the model's dtype):
1. the rope key (``ROPE_KEY_METHODS[options.rope_selection]``): the rotary pairs that keep RoPE, shared across
   KV heads; the rest of every key becomes position-free (NoPE);
2. [K_nope ; V] factored into a latent (``factorize.joint_kv``) in the attention-aware metrics (``weighting``);
3. the change of softmax scale, head_dim^-0.5 -> (d_nope + d_rope)^-0.5, folded into q; the NoPE key bias dropped
   (it adds the same q.b to every key of a query, which softmax ignores) and the value bias folded into the o_proj
   bias (attention weights sum to 1) — or, for formats without biases, every other bias folded into the weights
   along the calibration inputs' constant direction (``biasfold``).
With every rotary pair kept, one rope key per KV head and full rank, the result equals the source exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...adapters import AttentionLayout, AttentionWeights
from ...modeling.mla import MLAAttention, MLAConfig
from ..affine import weighted_moment, with_bias
from ..gqa.base import per_query_head
from .biasfold import BiasFold, fold_column, fold_rope_key, value_bias
from .factorize import JointKV, LatentFactorization, joint_kv
from .registry import rope_key_method
from .rope import LayerStatistics
from .weighting import head_metrics


@dataclass
class LayerDecomposition:
    """One layer's MLA math before the latent is cut to a rank (bias as the last column, float64).

    q_nope [H, D, hidden + 1] and q_rope [H, d_rope, hidden + 1] (the softmax-scale fold applied), rope_key
    [n, d_rope, hidden + 1], kv: the full joint K/V basis, o [hidden, H, D], o_bias [hidden] or None, pairs: the
    source pair each rope pair turns at.
    """

    q_nope: torch.Tensor
    q_rope: torch.Tensor
    rope_key: torch.Tensor
    kv: JointKV
    o: torch.Tensor
    o_bias: torch.Tensor | None
    pairs: list[int]


@dataclass
class MLALayerWeights:
    """One converted layer in the math convention y = x W^T + b.

    q [H, d_nope + d_rope, hidden] (nope dims, then rope dims in rotate-half order), q_bias [H, d_nope + d_rope];
    kv_down [r, hidden] (latent c = kv_down x); rope_key [n, d_rope, hidden], rope_key_bias [n, d_rope];
    kv_up [H, d_nope + d_v, r] (W_UK rows, then W_UV rows); o [hidden, H, d_v], o_bias [hidden];
    rope_pairs: kept source rotary pairs.
    """

    q: torch.Tensor
    kv_down: torch.Tensor
    rope_key: torch.Tensor
    kv_up: torch.Tensor
    o: torch.Tensor
    rope_pairs: list[int]
    q_bias: torch.Tensor | None = None
    rope_key_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None


def decompose_layer(
    weights: AttentionWeights,
    layout: AttentionLayout,
    options,
    factorization: LatentFactorization,
    inputs: torch.Tensor | None = None,
    key_weights: torch.Tensor | None = None,
    scales: tuple[float, float] = (1.0, 1.0),
    fold: BiasFold | None = None,
) -> LayerDecomposition:
    """The MLA math of one layer (module docstring): a function of its weights (float64), its calibration
    inputs [N, hidden] (or None), the attention each input receives as a key [N] (or None) and ``options``
    (an ``MLAConversionConfig``). scales: (score fold (source scaling / new scaling), NoPE fold (the rotary
    ``attention_scaling`` squared, which the rope dims get from RoPE itself)); fold: the constant directions
    that take the q, rope-key, value and o biases into the weights (``biasfold``), or None to keep them."""
    h, kv_heads, d, hidden = (
        weights.num_attention_heads,
        weights.num_key_value_heads,
        layout.head_dim,
        layout.hidden_size,
    )
    q, k = with_bias(weights.q, weights.q_bias), with_bias(weights.k, weights.k_bias)
    v, v_bias, o_bias = weights.v, weights.v_bias, weights.o_bias
    if fold is not None:
        v_bias, o_bias = value_bias(v_bias, weights.o, o_bias, kv_heads), None
        q, v, v_bias = fold_column(q, fold.query), fold_column(with_bias(v, v_bias), fold.key)[..., :-1], None
    # calibration rows [x ; 1] and their second moment E[x x^T] (identity without calibration)
    rows = None
    if inputs is not None:
        inputs = inputs.to(device=q.device, dtype=q.dtype)
        rows = with_bias(inputs, torch.ones(len(inputs), dtype=q.dtype, device=q.device))
    moment = (
        torch.eye(hidden + 1, dtype=q.dtype, device=q.device) if rows is None else rows.T @ rows / len(rows)
    )
    # keys in proportion to the attention they receive (weighting.py): the rope key's and the latent's statistics
    keys = moment if rows is None else weighted_moment(rows, key_weights, options.key_weight_power)
    rope = rope_key_method(options.rope_selection).build(q, k, layout, options, LayerStatistics(rows, keys))
    rope_key = rope.key
    if fold is not None:  # the rope bias of fast components folded, of slow ones dropped (``biasfold``)
        rope_key = fold_rope_key(rope.key, fold, layout.rope.plain_frequencies(rope.pairs))
    kv = joint_kv(
        rope.k_nope[..., :hidden].reshape(kv_heads * d, hidden),
        v.reshape(kv_heads * d, hidden),
        factorization,
        keys[:hidden, :hidden],
        options.balance_kv,
        head_metrics(q, weights.o, moment, kv_heads, options.latent_metric_power),
    )
    if v_bias is not None:  # sum_s p_s (W_UV c_s + b_v) = W_UV sum_s p_s c_s + b_v
        folded = torch.einsum("ohd,hd->o", weights.o, per_query_head(v_bias, h))
        o_bias = folded if o_bias is None else o_bias + folded
    score_fold, nope_fold = scales
    return LayerDecomposition(
        q * score_fold * nope_fold, rope.q_rope * score_fold, rope_key, kv, weights.o, o_bias, rope.pairs
    )


def layer_weights(
    decomposition: LayerDecomposition, rank: int, head_dim: int, has_q_bias: bool
) -> MLALayerWeights:
    """The layer's weights with its latent cut at ``rank`` (decoders per query head)."""
    plan = decomposition
    down, up_k, up_v = plan.kv.factors(rank)
    heads = plan.q_nope.shape[0]
    kv_heads = up_k.shape[0] // head_dim
    up_k = per_query_head(up_k.view(kv_heads, head_dim, rank), heads)
    up_v = per_query_head(up_v.view(kv_heads, head_dim, rank), heads)
    q = torch.cat([plan.q_nope, plan.q_rope], dim=1)
    rope_bias = plan.rope_key[..., -1]
    return MLALayerWeights(
        q=q[..., :-1],
        q_bias=q[..., -1] if has_q_bias else None,
        kv_down=down,
        rope_key=plan.rope_key[..., :-1],
        rope_key_bias=rope_bias if bool(rope_bias.abs().max() > 0) else None,
        kv_up=torch.cat([up_k, up_v], dim=1),
        o=plan.o,
        o_bias=plan.o_bias,
        rope_pairs=plan.pairs,
    )


def build_attention(
    config: MLAConfig, layer_idx: int, weights: MLALayerWeights, like: nn.Module
) -> MLAAttention:
    """An :class:`MLAAttention` holding ``weights``, on ``like``'s device and dtype (and in its train mode)."""
    ref = next(like.parameters())
    attn = MLAAttention(config, layer_idx).to(device=ref.device, dtype=ref.dtype)
    hidden = weights.q.shape[-1]
    rope_bias = weights.rope_key_bias
    if rope_bias is None:
        rope_bias = weights.rope_key.new_zeros(weights.rope_key.shape[:-1])
    pairs = [
        (attn.q_proj.weight, weights.q.reshape(-1, hidden)),
        (attn.q_proj.bias, weights.q_bias),
        (attn.kv_a_proj_with_mqa.weight, torch.cat([weights.kv_down, weights.rope_key.reshape(-1, hidden)])),
        (
            attn.kv_a_proj_with_mqa.bias,
            torch.cat([weights.kv_down.new_zeros(len(weights.kv_down)), rope_bias.flatten()]),
        ),
        (attn.kv_b_proj.weight, weights.kv_up.reshape(-1, weights.kv_up.shape[-1])),
        (attn.o_proj.weight, weights.o.reshape(weights.o.shape[0], -1)),
        (attn.o_proj.bias, weights.o_bias),
    ]
    with torch.no_grad():
        for param, value in pairs:
            if param is not None:
                param.copy_(value.reshape(param.shape) if value is not None else torch.zeros_like(param))
    attn.train(like.training)
    return attn
