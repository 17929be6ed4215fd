"""Affine projections ``y = W x + b`` as one augmented matrix ``[W | b]`` acting on ``[x; 1]``: how the GQA and
MLA methods carry biases through their linear algebra (float64)."""

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
