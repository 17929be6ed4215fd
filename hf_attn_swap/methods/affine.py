"""Affine projections ``y = W x + b`` as one augmented matrix ``[W | b]`` acting on ``[x; 1]``: how the GQA and
MLA methods carry biases through their linear algebra (float64), and the (key-weighted) second moments of such
rows that their statistics are made of."""

from __future__ import annotations

import torch


def with_bias(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """[..., out, hidden] + [..., out] -> [..., out, hidden+1] float64 (a zero column when there is no bias)."""
    bias = torch.zeros(weight.shape[:-1], dtype=weight.dtype, device=weight.device) if bias is None else bias
    return torch.cat([weight, bias.unsqueeze(-1)], dim=-1).to(torch.float64)


def split_bias(augmented: torch.Tensor, had_bias: bool, dtype: torch.dtype):
    """Inverse of ``with_bias``: (weight, bias or None) in ``dtype``."""
    weight, bias = augmented[..., :-1], augmented[..., -1]
    return weight.to(dtype), (bias.to(dtype) if had_bias else None)


def weighted_moment(rows: torch.Tensor, key_weights: torch.Tensor | None, power: float) -> torch.Tensor:
    """E[b^γ x x^T] / E[b^γ] of rows [N, D] (float64) weighted by key_weights [N] ** power; E[x x^T] when the
    weights are None or the power 0."""
    if key_weights is None or power == 0:
        return rows.T @ rows / len(rows)
    b = key_weights.to(device=rows.device, dtype=rows.dtype).clamp_min(0) ** power
    return (rows * (b / b.mean()).unsqueeze(1)).T @ rows / len(rows)
