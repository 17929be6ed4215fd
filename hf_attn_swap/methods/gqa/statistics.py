"""Calibration statistics in the form the activation-aware methods need: one moment matrix per layer.

Every quantity those methods use is a second moment of linear maps of the attention input x, so one matrix
``C = E[x~ x~^T]`` with ``x~ = [x; 1]`` (the 1 carries the biases) is all they keep from the calibration text:
for head projections A, B (rows over x~), ``E[(A x~)(B x~)^T] = A C B^T``.

Rotary pairs are handled as complex numbers: RoPE rotates the pair (a, b) of a head as
``x_a + i x_b -> (x_a + i x_b) e^{i pos theta}``, and the pair's share of a score is ``Re(conj(q) k)``, so a
transform of a pair that commutes with RoPE is exactly a multiplication by one complex number.
"""

from __future__ import annotations

import torch

from ...adapters import RopeInfo
from ..affine import weighted_moment
from .base import LayerContext


def input_moment(ctx: LayerContext) -> torch.Tensor:
    """[hidden+1, hidden+1] float64 ``E[x~ x~^T]`` of the layer's calibration inputs (cached on ``ctx``)."""
    if "moment" not in ctx.cache:
        x = _augmented_inputs(ctx)
        ctx.cache["moment"] = x.T @ x / x.shape[0]
    return ctx.cache["moment"]


def key_moment(ctx: LayerContext) -> torch.Tensor:
    """``E[b x~ x~^T] / E[b]`` with each row weighted by the attention b it receives as a key
    (``ctx.key_weights``): keys that are attended to count in proportion. ``input_moment`` without weights."""
    if ctx.key_weights is None:
        return input_moment(ctx)
    if "key_moment" not in ctx.cache:
        ctx.cache["key_moment"] = weighted_moment(_augmented_inputs(ctx), ctx.key_weights, 1.0)
    return ctx.cache["key_moment"]


def _augmented_inputs(ctx: LayerContext) -> torch.Tensor:
    """[N, hidden+1] float64: the calibration inputs with a column of ones."""
    if ctx.inputs is None:
        raise ValueError(
            f"layer {ctx.layer_idx}: this method needs calibration activations (CLI: --calibration-data FILE...)"
        )
    x = ctx.inputs.to(torch.float64)
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)], dim=1)


def rotary_pairs(rope: RopeInfo, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(pairs [P, 2], plain dims [head_dim - 2P]): dims rotated together by RoPE, and dims RoPE leaves alone."""
    pairs = rope.pair_indices() if rope.style != "none" and rope.rotary_dim > 0 else torch.empty(0, 2)
    pairs = pairs.long()
    rotated = set(pairs.flatten().tolist())
    plain = torch.tensor([i for i in range(head_dim) if i not in rotated], dtype=torch.long)
    return pairs, plain


def to_complex(rows: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """[..., d, D] real head rows -> [..., P, D] complex: row a + i row b for each rotary pair (a, b)."""
    return torch.complex(rows[..., pairs[:, 0], :], rows[..., pairs[:, 1], :])


def from_complex(rows: torch.Tensor, pairs: torch.Tensor, complex_rows: torch.Tensor) -> torch.Tensor:
    """Write [..., P, D] complex pair rows back into a copy of the real [..., d, D] ``rows``."""
    out = rows.clone()
    out[..., pairs[:, 0], :] = complex_rows.real.to(out.dtype)
    out[..., pairs[:, 1], :] = complex_rows.imag.to(out.dtype)
    return out


def gram(a: torch.Tensor, moment: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``conj(A) C B^T`` over the last two dims: [..., r, D] x [D, D] x [..., r', D] -> [..., r, r']."""
    b = a if b is None else b
    c = moment.to(torch.promote_types(a.dtype, b.dtype))
    return a.conj() @ c @ b.transpose(-1, -2)


def commuting_pairs(ctx: LayerContext, pairs: torch.Tensor) -> torch.Tensor:
    """[P] bool: rotary pairs whose rotation commutes with the layer's q/k norms (all pairs without norms).

    A per-head RMSNorm ``w * x / rms(x)`` commutes with a rotation of the pair (a, b) only when
    ``w[a] == w[b]`` (the rms is rotation invariant); scaling a pair never commutes with it.
    """
    ok = torch.ones(len(pairs), dtype=torch.bool)
    for weight in (ctx.q_norm_weight, ctx.k_norm_weight):
        if weight is None:
            continue
        if weight.numel() != ctx.layout.head_dim:
            raise ValueError(
                f"{ctx.layout.family}: q/k norm over {weight.numel()} features (not one head of "
                f"{ctx.layout.head_dim}) cannot be kept exact under per-head transforms; use --method mean"
            )
        ok = ok.to(weight.device) & (weight[pairs[:, 0]] == weight[pairs[:, 1]])
    return ok
