"""Head grouping by similarity of K/V activations, then any merge (mean, align, fit) on the new groups.

Stock GQA shares KV head ``i`` among the contiguous query heads ``i*s .. i*s+s-1``; which query heads end up
sharing is free, because the heads of a layer can be permuted. Every query head brings its own K/V along
(``expand_to_query_heads``), the heads are partitioned into ``H_kv_new`` groups of ``s = H / H_kv_new``
whose K and V activations on the calibration text are most alike, and the heads are reordered (q rows, K/V
rows and ``o`` columns together) so each group is contiguous. The result is an ordinary GQA layer.

Distance between query heads a and b (both K and V, each relative to the layer's mean head energy):
``E||k_a - k_b||^2 + E||v_a - v_b||^2``, or, when the merge aligns first, the distance left after the best
function-preserving alignment (per rotary pair ``|k_a|^2 + |k_b|^2 - 2|<k_a, k_b>|``, otherwise
``||A||^2 + ||B||^2 - 2 ||A^T B||_*``). Partition: pairwise swaps that lower the total within-group distance,
starting from the stock grouping (so the result is never worse than it by this measure).
"""

from __future__ import annotations

import torch

from ...adapters import AttentionWeights
from ..affine import with_bias
from .base import GQAMethod, LayerContext, expand_to_query_heads, permute_query_heads
from .statistics import commuting_pairs, gram, input_moment, rotary_pairs, to_complex


def _rotation_free_distances(rows: torch.Tensor, moment: torch.Tensor, aligned: bool) -> torch.Tensor:
    """rows [H, r, D] -> [H, H] ``E||A_a x - A_b x||^2``, minimised over an orthogonal map when ``aligned``."""
    cross = gram(rows.unsqueeze(1), moment, rows.unsqueeze(0))  # [H, H, r, r]
    energy = cross.diagonal(dim1=0, dim2=1).diagonal(dim1=0, dim2=1).real.sum(-1)  # [H]
    overlap = (
        torch.linalg.matrix_norm(cross, ord="nuc")
        if aligned
        else cross.diagonal(dim1=-2, dim2=-1).sum(-1).real
    )
    return energy[:, None] + energy[None, :] - 2 * overlap


def head_distances(weights: AttentionWeights, ctx: LayerContext, aligned: bool) -> torch.Tensor:
    """[H, H] K distance / mean K energy + V distance / mean V energy between the query heads' own K/V."""
    moment = input_moment(ctx)
    d = weights.k.shape[1]
    k = with_bias(weights.k, weights.k_bias)
    v = with_bias(weights.v, weights.v_bias)
    pairs, plain = rotary_pairs(ctx.layout.rope, d)
    k_dist = torch.zeros(
        weights.num_key_value_heads, weights.num_key_value_heads, dtype=torch.float64, device=k.device
    )
    if len(pairs):
        rotatable = commuting_pairs(ctx, pairs) if aligned else torch.zeros(len(pairs), dtype=torch.bool)
        rotatable = rotatable.to(k.device)
        kc = to_complex(k, pairs).transpose(0, 1).unsqueeze(-2)  # [P, H, 1, D]
        cross = gram(kc.unsqueeze(2), moment, kc.unsqueeze(1))[..., 0, 0]  # [P, H, H]
        energy = cross.diagonal(dim1=-2, dim2=-1).real
        overlap = torch.where(rotatable[:, None, None], cross.abs(), cross.real)
        k_dist += (energy[:, :, None] + energy[:, None, :] - 2 * overlap).sum(0)
    if len(plain):
        k_dist += _rotation_free_distances(k[:, plain], moment, aligned and not ctx.has_qk_norm)
    v_dist = _rotation_free_distances(v, moment, aligned)
    k_scale = gram(k, moment).diagonal(dim1=-2, dim2=-1).real.sum(-1).mean().clamp_min(1e-30)
    v_scale = gram(v, moment).diagonal(dim1=-2, dim2=-1).real.sum(-1).mean().clamp_min(1e-30)
    return (k_dist / k_scale + v_dist / v_scale).clamp_min(0)


def balanced_partition(distances: torch.Tensor, num_groups: int, max_swaps: int = 10_000) -> list[list[int]]:
    """Split range(H) into ``num_groups`` groups of equal size with a small total within-group distance.

    Starts from the contiguous groups and applies the best improving swap of two heads until none improves.
    """
    h = distances.shape[0]
    size = h // num_groups
    dist = distances.to(torch.float64).clone()
    dist.fill_diagonal_(0)
    label = torch.arange(h) // size
    for _ in range(max_swaps):
        member = torch.nn.functional.one_hot(label, num_groups).to(dist.dtype)  # [H, G]
        to_group = dist @ member  # [H, G]: distance of head a to every member of group g
        own = to_group.gather(1, label[:, None])  # [H, 1]
        # swapping a (group ga) with b (group gb): a leaves ga for gb, b leaves gb for ga
        cross_a = to_group[:, label]  # [a, b] = dist(a, group of b)
        gain = own + own.T - cross_a - cross_a.T + 2 * dist
        gain[label[:, None] == label[None, :]] = 0
        best = gain.argmax()
        if gain.flatten()[best] <= 1e-12 * dist.abs().max().clamp_min(1e-30):
            break
        a, b = divmod(best.item(), h)
        label[a], label[b] = label[b].clone(), label[a].clone()
    groups = [sorted(torch.nonzero(label == g).flatten().tolist()) for g in range(num_groups)]
    return sorted(groups)


class SimilarityGrouping(GQAMethod):
    """Regroup query heads by K/V similarity, then merge each group with ``merge`` (default: mean pooling).

    ``aligned``: measure similarity after the best function-preserving alignment (use with ``align``/``fit``).
    """

    needs_calibration = True

    def __init__(self, name: str, merge: GQAMethod, aligned: bool):
        self.name, self.merge, self.aligned = name, merge, aligned
        self.uses_key_weights = merge.uses_key_weights

    def head_order(self, weights: AttentionWeights, ctx: LayerContext) -> list[int]:
        """The permutation of the query heads (expanded weights) that makes the similarity groups contiguous."""
        groups = balanced_partition(head_distances(weights, ctx, self.aligned), ctx.num_key_value_heads)
        return [head for group in groups for head in group]

    def convert_layer(self, weights: AttentionWeights, ctx: LayerContext) -> AttentionWeights:
        expanded = expand_to_query_heads(weights)
        if ctx.num_key_value_heads == 1:  # MQA: one group, nothing to choose
            return self.merge.convert_layer(expanded, ctx)
        order = self.head_order(expanded, ctx)
        ctx.cache["head_order"] = order
        return self.merge.convert_layer(permute_query_heads(expanded, order), ctx)
