"""Attention-aware statistics for the rope key and the K/V latent: weigh what the model computes, not the raw
K/V activations (the lesson of GQA's ``fit``).

Plain ``pca`` keeps the latent subspace with the most K/V activation energy, E_x |M x|^2 over the calibration
inputs. What matters is the scores q·k and the outputs W_O v, over the keys in proportion to the attention they get:

- **key weights** (``key_weight_power`` γ): each calibration token counts b^γ times in the moment,
  Σ_b = E[b^γ x x^T] / E[b^γ] (``methods.affine.weighted_moment``), b = the attention it receives as a key (summed over the queries of its window,
  averaged over heads; one eager forward of the source layer, ``layerwise.capture_attention_inputs``). Used by
  the rope key (which keys keep their rotation) and by the latent's PCA. γ = 0: every token alike.
- **score / output metrics** (``latent_metric_power`` p): the K_nope rows of KV head g are multiplied by
  S_g = Ĝ_g^(p/2), Ĝ_g = Σ_{h∈g} E[q_h q_h^T] (the query heads reading it) scaled to mean eigenvalue 1, + ε I;
  the V rows by T_g = Ô_g^(p/2), Ô_g = Σ_{h∈g} W_O,h^T W_O,h. The PCA then runs on [α S K_nope ; T V], and
  W_UK = S^-1 U_K / α, W_UV = T^-1 U_V: for a fixed latent these decoders are the least-squares ones under any
  invertible metric, so only the choice of subspace changes. p = 1 minimises E|q·Δk|² + E|W_O Δv|² (up to the
  K/V balance α); p = 0 is plain PCA.
"""

from __future__ import annotations

import torch

#: ridge on the normalised Grams (mean eigenvalue 1): keeps S^-1 bounded where queries never look
METRIC_RIDGE = 1e-2


def _power(gram: torch.Tensor, power: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A^(p/2), A^(-p/2)) of Grams [G, d, d] scaled to mean eigenvalue 1 plus ``METRIC_RIDGE`` I."""
    d = gram.shape[-1]
    scale = gram.diagonal(dim1=-2, dim2=-1).sum(-1).clamp_min(torch.finfo(gram.dtype).tiny) / d
    eye = torch.eye(d, dtype=gram.dtype, device=gram.device)
    values, vectors = torch.linalg.eigh(gram / scale[:, None, None] + METRIC_RIDGE * eye)
    values = values.clamp_min(METRIC_RIDGE)

    def apply(exponent):
        return vectors @ torch.diag_embed(values**exponent) @ vectors.mT

    return apply(power / 2), apply(-power / 2)


def head_metrics(
    q: torch.Tensor, o: torch.Tensor, moment: torch.Tensor, num_key_value_heads: int, power: float
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None:
    """((S, S^-1), (T, T^-1)), block-diagonal [H_kv d, H_kv d] (module docstring), or None at power 0.

    q [H, d, D] query rows (bias column included when ``moment`` [D, D] has one), o [hidden, H, d] o_proj."""
    if power == 0:
        return None
    h, d = q.shape[0], q.shape[1]
    group = h // num_key_value_heads
    queries = torch.einsum("hdi,ij,hej->hde", q, moment.to(q.dtype), q)
    outputs = torch.einsum("ohd,ohe->hde", o, o)
    metrics = []
    for gram in (queries, outputs):
        forward, inverse = _power(gram.reshape(num_key_value_heads, group, d, d).sum(1), power)
        metrics.append((torch.block_diag(*forward), torch.block_diag(*inverse)))
    return metrics[0], metrics[1]
