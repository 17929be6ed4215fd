"""Attention biases into weights, for the formats that have none (stock ``deepseek_v3``: no engine applies a
``q_proj`` bias, and vLLM / SGLang drop the others silently while llama.cpp and mlx-lm refuse them).

Exact: the NoPE part of a key bias adds q.b_k to every score of one query, which softmax ignores (dropped in every
format, ``layer``). The rest is folded with the layer's calibration inputs x (the attention's RMSNorm outputs):
a bias b of a projection W x + b becomes (W + b u^T) x, with u the direction in which the inputs are most nearly
constant,

    u = argmin_u  E_w[(u.x - 1)^2] + lambda |u|^2     (ridge least squares, lambda = ``ridge`` x mean E_w[x_i^2]),

so the error on a token is b (u.x - 1). The query bias weighs every calibration row alike (every token is a
query); the rope key's bias and the value bias weigh rows by the attention they receive as keys (``weighting``).

The rope key's bias b_t of a component turning at frequency w adds q.R(n - m) b_t to the scores: on a slow
component (wavelength 2 pi / w long against the distances attention spans) that is nearly the same for every key
of a query, which softmax ignores, so it is dropped; on a fast one it is a positional pattern the model relies on
(previous-token heads), so it is folded. Measured on Qwen2.5-Coder-0.5B (theta 1e6, head_dim 64: 96 % of its key
bias sits on the 8 slowest of 32 pairs), source model with only its key bias handled, 2048 tutorial tokens:
folding every pair 135.1 (original 12.34), folding pairs 0-7 / 0-11 / 0-15 / 0-19 / 0-23 and dropping the rest
31.30 / 14.61 / 12.86 / 13.12 / 13.78 — the cut between pairs 15 and 16 (wavelengths 4314 and 6283 tokens) is
``ROPE_BIAS_WAVELENGTH``. On the whole converted model (``scripts/compare_peers.py --model qwen2.5-coder``, 4096
tokens each of the tutorial and GPL-3) the default export at -50 % KV went from 29.70 / 53.56 (every rope-key
bias folded) to 14.27 / 19.68; the plugin format, which keeps every bias, reaches 13.40 / 17.79.
An o_proj bias b_o is first moved into the value bias: o_proj(v + e) = o_proj(v) + b_o for e = argmin
|W_O R e - b_o| (R repeats each KV head for its query heads), since the attention weights of a query sum to 1.
The output correction (``layerwise.refit_output_projection``) then refits o_proj to the source's biased outputs.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..affine import weighted_moment
from ..gqa.base import per_query_head

#: ridge on the constant-direction fit, relative to the mean squared input
FOLD_RIDGE = 1e-6
#: rope-key components with a longer wavelength (tokens per turn) drop their bias, shorter ones fold it
ROPE_BIAS_WAVELENGTH = 5000.0


@dataclass(frozen=True)
class BiasFold:
    """One layer's constant directions u [hidden] (float64): ``query`` (rows alike) and ``key`` (rows weighted by
    the attention they receive); ``residual``: the RMS of u.x - 1 over the calibration rows for each."""

    query: torch.Tensor
    key: torch.Tensor
    residual: tuple[float, float]


def constant_direction(
    inputs: torch.Tensor, weights: torch.Tensor | None, power: float
) -> tuple[torch.Tensor, float]:
    """(u, RMS of u.x - 1) for inputs [N, hidden] float64, rows weighted by ``weights`` [N] ** ``power`` (module
    docstring)."""
    moment = weighted_moment(inputs, weights, power)  # E_w[x x^T]
    if weights is None or power == 0:
        mean = inputs.mean(0)
        b = torch.ones(len(inputs), dtype=inputs.dtype, device=inputs.device)
    else:
        b = weights.to(device=inputs.device, dtype=inputs.dtype).clamp_min(0) ** power
        b = b / b.mean()
        mean = (inputs * b[:, None]).mean(0)  # E_w[x]
    ridge = FOLD_RIDGE * moment.diagonal().mean()
    u = torch.linalg.solve(
        moment + ridge * torch.eye(len(moment), dtype=moment.dtype, device=moment.device), mean
    )
    error = ((inputs @ u - 1).square() * b).mean().sqrt()
    return u, float(error)


def fit_bias_fold(
    inputs: torch.Tensor, key_weights: torch.Tensor | None, key_weight_power: float
) -> BiasFold:
    """The layer's ``BiasFold`` from its calibration inputs [N, hidden] (float64) and key weights [N] (or None)."""
    query, query_error = constant_direction(inputs, None, 0.0)
    key, key_error = constant_direction(
        inputs, key_weights, key_weight_power if key_weights is not None else 0.0
    )
    return BiasFold(query, key, (query_error, key_error))


def fold_column(augmented: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Rows [..., hidden + 1] with the bias as last column -> the same rows with the bias folded into the weights
    along u (a zero bias column)."""
    folded = augmented.clone()
    folded[..., :-1] += augmented[..., -1:] * u
    folded[..., -1] = 0
    return folded


def fold_rope_key(key: torch.Tensor, fold: BiasFold, frequencies: torch.Tensor) -> torch.Tensor:
    """Rope keys [n, d_rope, hidden + 1] (rotate-half order: component t at dims t and t + d_rope / 2) whose
    components turn at ``frequencies`` [d_rope / 2] (radians per token), with a zero bias column: the bias of the
    fast components folded along ``fold.key``, of the slow ones dropped (module docstring)."""
    slow = (2 * torch.pi / frequencies.double()) >= ROPE_BIAS_WAVELENGTH
    rows = torch.cat([slow, slow]).to(key.device)
    folded = fold_column(key, fold.key)
    folded[:, rows, :-1] = key[:, rows, :-1]  # slow components: the weights unchanged, the bias dropped
    return folded


def value_bias(v_bias: torch.Tensor | None, o: torch.Tensor, o_bias: torch.Tensor | None, kv_heads: int):
    """The value bias [H_kv, d] that also carries an o_proj bias (module docstring), or None when there is neither.
    o [hidden, H, d]."""
    if o_bias is None:
        return v_bias
    hidden, heads, d = o.shape
    repeat = per_query_head(
        torch.eye(kv_heads * d, dtype=o.dtype, device=o.device).view(kv_heads, d, -1), heads
    )
    through_o = o.reshape(hidden, heads * d) @ repeat.reshape(heads * d, -1)  # W_O R [hidden, H_kv d]
    moved = torch.linalg.lstsq(through_o, o_bias[:, None]).solution.view(kv_heads, d)
    return moved if v_bias is None else v_bias + moved
