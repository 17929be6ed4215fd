"""Which rotary frequencies keep RoPE, and one shared rope key per group of KV heads (RoRoPE-style).

Source layout (rotate-half): rotary pair p turns head dims (p, p + head_dim/2) at angular frequency inv_freq[p].
MLA keeps RoPE on m = d_rope / 2 pairs, in rope keys shared by query heads; every other dim becomes position-free
("NoPE") and is compressed into the latent with V.

Selection strategies (MHA2MLA, Ji et al. 2025, section 3.1; ours choose per layer, since the key is shared by heads):
    freqfold the uniform ladder, each kept frequency carrying the principal components of its neighbouring
             frequencies across KV heads (``freqfold`` module; TransMLA's RoRoPE + FreqFold).
    uniform  pairs 0, s, 2s, ... (s = head_dim / d_rope): frequencies 1/θ^(2i/d_rope), DeepSeek's own ladder.
    high     the m highest frequencies (pairs 0..m-1): DeepSeek ladder with θ' = θ^(d_rope/head_dim).
    low      the m lowest frequencies: DeepSeek ladder with θ' and linear scaling.
    norm     per layer, the pairs with the largest sum_h E[|q_h,p| |k_g(h),p|] on calibration text (2-norm
             contribution to q.k); from weight norms without calibration. Plugin format only.

Shared rope key (TransMLA's RoRoPE, Meng et al. 2025): RoPE turns the 2-d slice of every KV head at pair p by
the same angle, so any orthonormal mix across KV heads commutes with it. Per group of G KV heads and kept pair p
we take the unit u maximising E|sum_g u_g k_g,p|^2 (top eigenvector of the G x G Gram matrix); the group's rope
key is k'_p = sum_g u_g k_g,p and query head h (KV head g) gets q_rope,h,p = u_g q_h,p. The residual
k_g,p - u_g k'_p stays in head g's NoPE key, so q_h . k_g is unchanged except that the residual loses rotation:
exact when G = 1 (one rope key per KV head) or when the KV heads are proportional at p.
"""

from __future__ import annotations

import torch

from ...adapters import AttentionLayout

ROPE_SELECTIONS = ("freqfold", "uniform", "high", "low", "norm")
#: selections whose kept frequencies form a DeepSeek ladder (same pairs in every layer)
LADDER_SELECTIONS = ("freqfold", "uniform", "high", "low")


def validate_rope_dim(layout: AttentionLayout, qk_rope_head_dim, selection: str = "uniform") -> int:
    """Check d_rope against the source's rotary dims; returns it or raises ``ValueError`` naming valid values."""
    rotary_dim = layout.rope.rotary_dim
    pairs = rotary_dim // 2
    ladder = selection in ("uniform", "freqfold")
    valid = [2 * m for m in range(1, pairs + 1) if not ladder or pairs % m == 0]
    if isinstance(qk_rope_head_dim, bool) or not isinstance(qk_rope_head_dim, int):
        raise ValueError(f"qk_rope_head_dim must be an int, got {qk_rope_head_dim!r}")
    if selection not in ROPE_SELECTIONS:
        raise ValueError(f"unknown rope selection {selection!r}; choose one of {', '.join(ROPE_SELECTIONS)}")
    if qk_rope_head_dim not in valid:
        reason = (
            "must be even (rotary dims come in pairs)"
            if qk_rope_head_dim % 2
            else f"is larger than the {rotary_dim} rotary dims per head"
            if qk_rope_head_dim > rotary_dim
            else "must be at least 2"
            if qk_rope_head_dim < 2
            else f"must divide the {rotary_dim} rotary dims evenly for the {selection} selection"
        )
        raise ValueError(
            f"qk_rope_head_dim={qk_rope_head_dim} {reason}. Valid values for this {layout.family} model "
            f"(head_dim {layout.head_dim}, selection {selection!r}): {valid}."
        )
    return qk_rope_head_dim


def pair_dims(layout: AttentionLayout, pairs: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Head dims (first, second) of each kept pair, each [m]."""
    index = layout.rope.pair_indices()[torch.tensor(pairs)]
    return index[:, 0], index[:, 1]


def select_rope_pairs(
    selection: str,
    layout: AttentionLayout,
    qk_rope_head_dim: int,
    q: torch.Tensor | None = None,
    k: torch.Tensor | None = None,
    inputs: torch.Tensor | None = None,
) -> list[int]:
    """Sorted source pair indices to keep rotary, m = d_rope / 2 of them.

    q [H, D, hidden + 1], k [H_kv, D, hidden + 1]: projections with the bias as last column (``norm`` only).
    inputs [N, hidden + 1]: calibration attention inputs with a ones column, or None (weight norms).
    """
    pairs, kept = layout.rope.rotary_dim // 2, qk_rope_head_dim // 2
    if selection in ("uniform", "freqfold"):  # freqfold: the ladder its folded components rotate at
        return list(range(0, pairs, pairs // kept))
    if selection == "high":
        return list(range(kept))
    if selection == "low":
        return list(range(pairs - kept, pairs))
    if selection != "norm":
        raise ValueError(f"unknown rope selection {selection!r}; choose one of {', '.join(ROPE_SELECTIONS)}")
    first, second = pair_dims(layout, list(range(pairs)))
    group = q.shape[0] // k.shape[0]
    if inputs is None:
        q_norm = (q[:, first].square().sum(-1) + q[:, second].square().sum(-1)).sqrt()  # [H, pairs]
        k_norm = (k[:, first].square().sum(-1) + k[:, second].square().sum(-1)).sqrt()
        score = (q_norm * k_norm.repeat_interleave(group, dim=0)).sum(0)
    else:
        qx, kx = torch.einsum("hdi,ni->nhd", q, inputs), torch.einsum("gdi,ni->ngd", k, inputs)
        q_norm = (qx[..., first].square() + qx[..., second].square()).sqrt()  # [N, H, pairs]
        k_norm = (kx[..., first].square() + kx[..., second].square()).sqrt()
        score = (q_norm * k_norm.repeat_interleave(group, dim=1)).mean(0).sum(0)
    return sorted(score.topk(kept).indices.tolist())


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
