"""Align heads before merging them (Jin et al. 2024, "Align attention heads before merging them"), then mean-pool.

Heads that compute similar functions can still disagree in their coordinates, and the mean of two rotated copies
of one head is a worse head. Before pooling, each query head's own K/V (see ``expand_to_query_heads``) is moved
by a transform that leaves the layer's function unchanged, chosen by generalised Procrustes analysis on the
calibration activations so the heads of a group agree as much as possible:

* V: any orthogonal ``R`` (``v -> R v``), undone in ``o`` (``O_j -> O_j R^T``);
* K, rotary pairs: one unit complex number per pair (a 2x2 rotation, the only orthogonal maps that commute with
  RoPE), applied to the same pair of q; non-rotary dims (partial rotary): any orthogonal map, applied to q too;
* with per-head q/k norms (Qwen3) only the pairs whose norm weights are equal within the pair may rotate, and
  non-rotary dims stay put; everything else is left as is, so the transform stays exact.

Procrustes works on Gram matrices ``E[(A_j x)(A_k x)^T] = A_j C A_k^T`` only (``statistics.gram``).
"""

from __future__ import annotations

import torch

from ...adapters import AttentionWeights
from ..affine import split_bias, with_bias
from .base import GQAMethod, LayerContext, expand_to_query_heads, with_new_heads
from .mean import MeanPooling
from .statistics import (
    commuting_pairs,
    from_complex,
    gram,
    input_moment,
    rotary_pairs,
    to_complex,
)


def unit_phase(z: torch.Tensor) -> torch.Tensor:
    """z / |z| elementwise (1 where z is 0)."""
    size = z.abs()
    return torch.where(size > 1e-300, z / size.clamp_min(1e-300), torch.ones_like(z))


def polar(z: torch.Tensor) -> torch.Tensor:
    """The orthogonal (unitary) factor ``U V^H`` of ``z = U S V^H``: the rotation closest to ``z``."""
    u, _, vh = torch.linalg.svd(z)
    return u @ vh


def synchronise_phases(grams: torch.Tensor, iterations: int = 50) -> torch.Tensor:
    """Unit complex u [..., s] maximising ``|sum_j u_j kappa_j|^2 = u^H G u`` for grams [..., s, s] Hermitian.

    Block-coordinate ascent (each u_j aligned to the sum of the others), started from the phases of G's top
    eigenvector; head 0 keeps its phase.
    """
    u = unit_phase(torch.linalg.eigh(grams)[1][..., -1])
    s = grams.shape[-1]
    for _ in range(iterations):
        before = u.clone()
        for j in range(s):
            others = (grams[..., j, :] * u).sum(-1) - grams[..., j, j] * u[..., j]
            u[..., j] = unit_phase(others)
        if torch.allclose(u, before, atol=1e-12):
            break
    return u * unit_phase(u[..., :1]).conj()


def _procrustes_objective(blocks: torch.Tensor, rotations_t: torch.Tensor) -> torch.Tensor:
    """``sum_jk tr(R_j A_j^T A_k R_k^T)`` summed over the batch."""
    return (rotations_t.unsqueeze(-3) * (blocks @ rotations_t.unsqueeze(-4))).sum()


def procrustes_rotations(blocks: torch.Tensor, iterations: int = 30, tol: float = 1e-5) -> torch.Tensor:
    """Orthogonal R [..., s, r, r] maximising ``||sum_j A_j R_j^T||^2`` for cross-Grams
    blocks [..., s, s, r, r] = ``A_j^T A_k``. Heads are first aligned to head 0, then each in turn to the sum of
    the others (generalised Procrustes analysis) until the objective stops growing; head 0's frame is kept."""
    s = blocks.shape[-3]
    rotations_t = polar(blocks[..., :, 0, :, :]).clone()  # R_j^T: head j onto head 0
    objective = _procrustes_objective(blocks, rotations_t)
    for _ in range(iterations):
        for j in range(s):
            others = (blocks[..., j, :, :, :] @ rotations_t).sum(-3) - blocks[..., j, j, :, :] @ rotations_t[
                ..., j, :, :
            ]
            rotations_t[..., j, :, :] = polar(others)
        previous, objective = objective, _procrustes_objective(blocks, rotations_t)
        if objective - previous <= tol * objective.abs():
            break
    return rotations_t[..., :1, :, :] @ rotations_t.transpose(-1, -2)  # R_0^T R_j: head 0 stays put


def _blocks(rows: torch.Tensor, moment: torch.Tensor) -> torch.Tensor:
    """rows [G, s, r, D] -> cross-Grams [G, s, s, r, r] (``A_j^T A_k`` in sample space)."""
    return gram(rows.unsqueeze(-3), moment, rows.unsqueeze(-4))


def align_heads(weights: AttentionWeights, ctx: LayerContext) -> AttentionWeights:
    """Function-preserving alignment of the heads inside each target group.

    weights: one K/V head per query head (``expand_to_query_heads``); groups are the contiguous blocks of
    ``H / ctx.num_key_value_heads`` query heads. Returns weights of the same shapes.
    """
    h, d = weights.num_attention_heads, weights.q.shape[1]
    if weights.num_key_value_heads != h:
        raise ValueError("align_heads needs one K/V head per query head: call expand_to_query_heads first")
    n_groups = ctx.num_key_value_heads
    moment = input_moment(ctx)
    dtype = weights.q.dtype
    q = with_bias(weights.q, weights.q_bias).reshape(n_groups, h // n_groups, d, -1)
    k = with_bias(weights.k, weights.k_bias).reshape(n_groups, h // n_groups, d, -1)
    v = with_bias(weights.v, weights.v_bias).reshape(n_groups, h // n_groups, d, -1)
    o = weights.o.to(torch.float64).reshape(weights.o.shape[0], n_groups, h // n_groups, d)

    pairs, plain = rotary_pairs(ctx.layout.rope, d)
    if len(pairs):
        kc, qc = to_complex(k, pairs), to_complex(q, pairs)  # [G, s, P, D]
        pair_grams = gram(kc.transpose(1, 2), moment)  # [G, P, s, s]
        phases = synchronise_phases(pair_grams).transpose(1, 2)  # [G, s, P]
        phases = torch.where(commuting_pairs(ctx, pairs).to(phases.device), phases, torch.ones_like(phases))
        k = from_complex(k, pairs, kc * phases.unsqueeze(-1))
        q = from_complex(q, pairs, qc * phases.unsqueeze(-1))
    if len(plain) and not ctx.has_qk_norm:
        rot = procrustes_rotations(_blocks(k[:, :, plain], moment))  # [G, s, r, r]
        k[:, :, plain] = rot @ k[:, :, plain]
        q[:, :, plain] = rot @ q[:, :, plain]
    rot = procrustes_rotations(_blocks(v, moment))
    v = rot @ v
    o = torch.einsum("hgsd,gsed->hgse", o, rot)  # O_j R_j^T

    (q_w, q_b), (k_w, k_b), (v_w, v_b) = (
        split_bias(t.reshape(h, d, -1), b is not None, dtype)
        for t, b in ((q, weights.q_bias), (k, weights.k_bias), (v, weights.v_bias))
    )
    return with_new_heads(weights, o, dtype, q=q_w, k=k_w, v=v_w, q_bias=q_b, k_bias=k_b, v_bias=v_b)


class AlignedMean(GQAMethod):
    """``align``: Procrustes-align the heads of each group on calibration activations, then mean-pool."""

    name = "align"
    needs_calibration = True

    def convert_layer(self, weights: AttentionWeights, ctx: LayerContext) -> AttentionWeights:
        return MeanPooling().convert_layer(align_heads(expand_to_query_heads(weights), ctx), ctx)
