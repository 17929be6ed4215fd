"""Rope keys from a selection of source rotary pairs (``uniform``, ``high``, ``low``, ``norm``), shared across KV
heads by RoRoPE mixing.

Shared rope key (TransMLA's RoRoPE, Meng et al. 2025): RoPE turns the 2-d slice of every KV head at pair p by
the same angle, so any orthonormal mix across KV heads commutes with it. Per group of G KV heads and kept pair p
we take the unit u maximising E|sum_g u_g k_g,p|^2 (top eigenvector of the G x G Gram matrix); the group's rope
key is k'_p = sum_g u_g k_g,p and query head h (KV head g) gets q_rope,h,p = u_g q_h,p. The residual
k_g,p - u_g k'_p stays in head g's NoPE key, so q_h . k_g is unchanged except that the residual loses rotation:
exact when G = 1 (one rope key per KV head) or when the KV heads are proportional at p.
"""

from __future__ import annotations

import torch

from ..gqa.base import per_query_head
from .rope import LayerStatistics, RopeKey, RopeKeyMethod, pair_dims


class PairSelection(RopeKeyMethod):
    """Keep RoPE on the m = d_rope / 2 source pairs ``select`` returns (sorted), one RoRoPE key per group of KV
    heads."""

    def build(self, q, k, layout, options, stats: LayerStatistics) -> RopeKey:
        pairs = self.select(layout, options.qk_rope_head_dim, q, k, stats.rows)
        first, second = pair_dims(layout, pairs)
        heads, kv_heads, rope_heads = q.shape[0], k.shape[0], options.num_rope_key_heads
        m, group = len(pairs), kv_heads // rope_heads
        u = rope_key_mixing(k, first, second, stats.keys, rope_heads)  # [H_kv, m]
        rope_of_kv = torch.arange(kv_heads, device=q.device) // group
        shared = (
            torch.stack([k[:, first], k[:, second]], dim=1) * u[:, None, :, None]
        )  # [H_kv, 2, m, hidden+1]
        key = shared.view(rope_heads, group, 2 * m, -1).sum(1)  # [n, d_rope, hidden+1]
        k_nope = k.clone()
        k_nope[:, first] -= u[..., None] * key[rope_of_kv, :m]
        k_nope[:, second] -= u[..., None] * key[rope_of_kv, m:]
        u_q = per_query_head(u, heads)[..., None]
        q_rope = torch.cat([q[:, first] * u_q, q[:, second] * u_q], dim=1)
        return RopeKey(q_rope, key, k_nope, pairs)


class UniformSelection(PairSelection):
    """DeepSeek's own ladder: pairs 0, s, 2s, ... (frequencies 1/θ^(2i/d_rope); ``RopeKeyMethod.select``)."""

    name = "uniform"
    evenly_spaced = True


class HighSelection(PairSelection):
    """The m highest frequencies (pairs 0..m-1)."""

    name = "high"

    def select(self, layout, qk_rope_head_dim, q=None, k=None, rows=None):
        return list(range(qk_rope_head_dim // 2))


class LowSelection(PairSelection):
    """The m lowest frequencies."""

    name = "low"

    def select(self, layout, qk_rope_head_dim, q=None, k=None, rows=None):
        pairs = layout.rope.rotary_dim // 2
        return list(range(pairs - qk_rope_head_dim // 2, pairs))


class NormSelection(PairSelection):
    """Per layer, the pairs contributing most to |q.k| on calibration text (weight norms without it)."""

    name = "norm"
    ladder = False

    def select(self, layout, qk_rope_head_dim, q=None, k=None, rows=None):
        if q is None:
            raise ValueError("the norm selection chooses pairs per layer from the layer's weights")
        first, second = pair_dims(layout, list(range(layout.rope.rotary_dim // 2)))
        group = q.shape[0] // k.shape[0]
        if rows is None:
            q_norm = (q[:, first].square().sum(-1) + q[:, second].square().sum(-1)).sqrt()  # [H, pairs]
            k_norm = (k[:, first].square().sum(-1) + k[:, second].square().sum(-1)).sqrt()
            score = (q_norm * k_norm.repeat_interleave(group, dim=0)).sum(0)
        else:
            qx, kx = torch.einsum("hdi,ni->nhd", q, rows), torch.einsum("gdi,ni->ngd", k, rows)
            q_norm = (qx[..., first].square() + qx[..., second].square()).sqrt()  # [N, H, pairs]
            k_norm = (kx[..., first].square() + kx[..., second].square()).sqrt()
            score = (q_norm * k_norm.repeat_interleave(group, dim=1)).mean(0).sum(0)
        return sorted(score.topk(qk_rope_head_dim // 2).indices.tolist())


def rope_key_mixing(
    k: torch.Tensor, first: torch.Tensor, second: torch.Tensor, moment: torch.Tensor, num_rope_key_heads: int
) -> torch.Tensor:
    """Weight u of each KV head in its group's shared rope key, per kept pair: [H_kv, m], unit norm per group.

    k [H_kv, D, hidden + 1] (bias last); moment [hidden + 1, hidden + 1] = E[x x^T] of inputs with a ones entry.
    """
    heads, m = k.shape[0], first.numel()
    group = heads // num_rope_key_heads
    if group == 1:
        return torch.ones(heads, m, dtype=k.dtype, device=k.device)
    slices = torch.stack([k[:, first], k[:, second]], dim=2)  # [H_kv, m, 2, hidden + 1]
    slices = slices.view(num_rope_key_heads, group, m, 2, -1)
    gram = torch.einsum("rgmdi,ij,rhmdj->rmgh", slices, moment, slices)  # [n, m, G, G]
    _, vectors = torch.linalg.eigh(gram)
    u = vectors[..., -1]  # [n, m, G] top eigenvector
    u = u * torch.where(u.sum(-1, keepdim=True) < 0, -1.0, 1.0).to(u.dtype)  # deterministic sign
    return u.permute(0, 2, 1).reshape(heads, m)
