"""Activation-aware merge: the shared K and V of each group fitted to calibration activations.

What a merged head must preserve is not its own K/V but what the group's query heads do with it:

* scores: query head j scores key n with ``q_j(x_m) . k_j(x_n)``; with a shared key ``k`` and a re-fitted
  query ``q'_j`` the error summed over m, n, j is ``sum_j ||Q_j K_j^T - Q'_j K^T||^2``;
* outputs: head j adds ``O_j v_j(x)`` to the residual stream; with a shared ``v`` and re-fitted ``O'_j`` the
  error is ``sum_j ||V_j O_j^T - V O'_j^T||^2``.

Both have the same closed form. For a shared factor ``A = X W^T`` (r columns) and partners P_j (the queries
Q_j, or the output weights O_j) with Grams ``G_j = P_j^H P_j``, the best column space of A is the top-r left
singular space of ``[A_1 G_1^{1/2}, ..., A_s G_s^{1/2}]`` (``A_j = X W_j^T``): a query-weighted (for K) or
o_proj-weighted (for V) PCA of the group's heads. Each partner is then refitted by least squares,
``P'_j = P_j A_j^H A (A^H A)^{-1}``, which is exactly what a query or o_proj can absorb.

RoPE: each rotary pair is its own complex 1-dim problem (``score = Re(conj(q) k e^{i pos theta})``), solved
over the complex numbers, so the refitted query is the old one times one complex number per pair (a rotation
and scale that commutes with RoPE): the converted model stays a stock model. Non-rotary dims (partial rotary)
are one real r-dim problem. With per-head q/k norms (Qwen3), q cannot be rescaled per pair and k is
renormalised anyway, so K falls back to the alignment (``align``) and mean; V is fitted as usual.

Which tokens count: queries (the partner Grams of K) are weighted uniformly; keys and values by the attention
they receive in the original model when ``Calibration.key_weights`` is given (``statistics.key_moment``), so
errors on the keys that attention actually lands on (e.g. attention sinks) cost more (measured in the README);
uniform weighting is used without them.

Norm restoration: of all bases of the fitted space, the shared head is the group's mean head projected onto it
(its polar factor if that projection is degenerate), rescaled so its activations carry the heads' mean energy
(averaging misaligned heads shrinks it); the partners absorb the choice exactly. Identical heads come back as
they were, with identity partner maps.
"""

from __future__ import annotations

import torch

from ...adapters import AttentionWeights
from ..affine import split_bias, with_bias
from .alignment import align_heads, polar
from .base import GQAMethod, LayerContext, expand_to_query_heads, grouped, with_new_heads
from .mean import mean_pool
from .statistics import (
    from_complex,
    gram,
    input_moment,
    key_moment,
    rotary_pairs,
    to_complex,
)


def psd_sqrt(m: torch.Tensor) -> torch.Tensor:
    """Square root of Hermitian positive semi-definite matrices [..., r, r]."""
    evals, evecs = torch.linalg.eigh(m)
    return (evecs * evals.clamp_min(0).sqrt().unsqueeze(-2).to(evecs.dtype)) @ evecs.conj().transpose(-1, -2)


def fit_shared_projection(
    rows: torch.Tensor, partner_grams: torch.Tensor, moment: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit one shared projection for s heads (see the module docstring); batched over leading dims.

    rows: [..., s, r, D] head projections W_j (real or complex); partner_grams: [..., s, r, r] Hermitian G_j;
    moment: [D, D] ``E[x x^T]``. Returns (shared [..., r, D], maps [..., s, r, r]) with partner_j' =
    partner_j @ maps_j in sample space (queries: ``W_q' = maps_j^T W_q``; output: ``O_j' = O_j maps_j``).
    """
    *batch, s, r, dim = rows.shape
    basis = (rows.transpose(-1, -2) @ psd_sqrt(partner_grams).to(rows.dtype)).transpose(-3, -2)
    basis = basis.reshape(*batch, dim, s * r)  # [W_1^T G_1^1/2, ..., W_s^T G_s^1/2]
    evals, evecs = torch.linalg.eigh(gram(basis.transpose(-1, -2), moment))
    sig2 = evals[..., -r:]
    floor = (1e-12 * evals[..., -1:]).clamp_min(torch.finfo(torch.float64).tiny)
    shared = (basis @ evecs[..., -r:] / sig2.clamp_min(floor).sqrt().to(basis.dtype).unsqueeze(-2)).mT
    # the mean head projected onto the fitted space (its rotation only, if that projection is degenerate) ...
    projection = gram(shared, moment, rows.mean(-3))  # A^H A_mean: shared is orthonormal in sample space
    singular = torch.linalg.svdvals(projection)
    degenerate = (singular[..., -1] <= 1e-3 * singular[..., 0]).unsqueeze(-1).unsqueeze(-1)
    shared = torch.where(degenerate, polar(projection), projection).transpose(-1, -2) @ shared
    # ... with the energy of the group's heads restored (averaging misaligned heads shrinks it)
    energy = gram(rows, moment).diagonal(dim1=-2, dim2=-1).real.sum(-1).mean(-1)  # [...]
    now = gram(shared, moment).diagonal(dim1=-2, dim2=-1).real.sum(-1)
    shared = (
        shared * (energy / now.clamp_min(torch.finfo(now.dtype).tiny)).sqrt().to(rows.dtype)[..., None, None]
    )
    maps = gram(rows, moment, shared.unsqueeze(-3)) @ torch.linalg.pinv(gram(shared, moment)).unsqueeze(-3)
    return shared, maps


def fit_heads(weights: AttentionWeights, ctx: LayerContext) -> AttentionWeights:
    """Merge each contiguous group of ``H / ctx.num_key_value_heads`` query heads' K/V into one fitted head.

    weights: one K/V head per query head (``expand_to_query_heads``). Returns weights with
    ``ctx.num_key_value_heads`` K/V heads and refitted q (per rotary pair: one complex factor) and o columns.
    """
    h, d = weights.num_attention_heads, weights.q.shape[1]
    if weights.num_key_value_heads != h:
        raise ValueError("fit_heads needs one K/V head per query head: call expand_to_query_heads first")
    n_groups, dtype, moment, kv_moment = (
        ctx.num_key_value_heads,
        weights.q.dtype,
        input_moment(ctx),
        key_moment(ctx),
    )
    s = h // n_groups
    if ctx.has_qk_norm:  # q can only rotate, k is renormalised: align (where exact), then mean-pool K
        aligned = align_heads(weights, ctx)
        q, q_bias = aligned.q, aligned.q_bias
        k, k_bias = mean_pool(aligned.k, h, n_groups), mean_pool(aligned.k_bias, h, n_groups)
    else:
        q, q_bias, k, k_bias = _fit_keys(weights, ctx, moment, kv_moment)

    v_rows = grouped(with_bias(weights.v, weights.v_bias), n_groups)  # [G, s, d, D]
    o = weights.o.to(torch.float64).reshape(weights.o.shape[0], n_groups, s, d)
    o_grams = torch.einsum("hgsd,hgse->gsde", o, o)  # O_j^T O_j
    v_shared, v_maps = fit_shared_projection(v_rows, o_grams, kv_moment)
    o = torch.einsum("hgsd,gsde->hgse", o, v_maps)
    v, v_bias = split_bias(v_shared, weights.v_bias is not None, dtype)
    return with_new_heads(weights, o, dtype, q=q, k=k, v=v, q_bias=q_bias, k_bias=k_bias, v_bias=v_bias)


def _fit_keys(weights: AttentionWeights, ctx: LayerContext, moment: torch.Tensor, keys_moment: torch.Tensor):
    """Query-weighted fit of the shared keys: (q, q_bias, k [G, d, hidden], k_bias)."""
    h, d = weights.num_attention_heads, weights.q.shape[1]
    n_groups, dtype = ctx.num_key_value_heads, weights.q.dtype
    q = grouped(with_bias(weights.q, weights.q_bias), n_groups)  # [G, s, d, D]
    k = grouped(with_bias(weights.k, weights.k_bias), n_groups)
    k_new = k.mean(1)  # [G, d, D]; every dim is overwritten below
    pairs, plain = rotary_pairs(ctx.layout.rope, d)
    if len(pairs):
        qc, kc = to_complex(q, pairs).transpose(1, 2), to_complex(k, pairs).transpose(1, 2)  # [G, P, s, D]
        energy = gram(qc.unsqueeze(-2), moment).real  # [G, P, s, 1, 1]
        shared, maps = fit_shared_projection(kc.unsqueeze(-2), energy, keys_moment)  # [G,P,1,D], [G,P,s,1,1]
        k_new = from_complex(k_new, pairs, shared.squeeze(-2))
        q = from_complex(q, pairs, (qc * maps[..., 0]).transpose(1, 2))
    if len(plain):
        q_plain = q[:, :, plain]
        shared, maps = fit_shared_projection(k[:, :, plain], gram(q_plain, moment), keys_moment)
        k_new[:, plain] = shared
        q[:, :, plain] = maps.transpose(-1, -2) @ q_plain
    q_w, q_b = split_bias(q.reshape(h, d, -1), weights.q_bias is not None, dtype)
    k_w, k_b = split_bias(k_new, weights.k_bias is not None, dtype)
    return q_w, q_b, k_w, k_b


class ActivationFit(GQAMethod):
    """``fit``: per group, the query-weighted shared K and o_proj-weighted shared V (see module docstring)."""

    name = "fit"
    needs_calibration = True
    uses_key_weights = True

    def convert_layer(self, weights: AttentionWeights, ctx: LayerContext) -> AttentionWeights:
        return fit_heads(expand_to_query_heads(weights), ctx)
