"""The rope key of an MLA layer: the contract every rope-key method fulfils, and what they share.

Source layout (rotate-half): rotary pair p turns head dims (p, p + head_dim/2) at angular frequency inv_freq[p].
MLA keeps RoPE on m = d_rope / 2 pairs, in rope keys shared by query heads; every other dim becomes position-free
("NoPE") and is compressed into the latent with V. A rope-key method (``RopeKeyMethod``; registered by name in
``registry.ROPE_KEY_METHODS``) turns one layer's q/k projections into a ``RopeKey``: the query's rope rows, the
shared rope keys, and the keys with the rope part taken out.

Methods (MHA2MLA, Ji et al. 2025, section 3.1; TransMLA, Meng et al. 2025):
    freqfold the uniform ladder, each kept frequency carrying the principal components of its neighbouring
             frequencies across KV heads (``freqfold``; TransMLA's RoRoPE + FreqFold). Default.
    uniform  pairs 0, s, 2s, ... (s = head_dim / d_rope): frequencies 1/θ^(2i/d_rope), DeepSeek's own ladder.
    high     the m highest frequencies (pairs 0..m-1): DeepSeek ladder with θ' = θ^(d_rope/head_dim).
    low      the m lowest frequencies: DeepSeek ladder with θ' and linear scaling.
    norm     per layer, the pairs with the largest sum_h E[|q_h,p| |k_g(h),p|] on calibration text (2-norm
             contribution to q.k); from weight norms without calibration. Plugin format only.
(uniform / high / low / norm: ``selection``, one shared key per group of KV heads by RoRoPE mixing.)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...adapters import AttentionLayout
from ..options import check_int


@dataclass(frozen=True)
class RopeKey:
    """One layer's rope part, float64, projections with their bias as the last column (``affine.with_bias``).

    q_rope [H, d_rope, hidden + 1] and key [n, d_rope, hidden + 1] (n rope keys; rotate-half order: the m first
    dims of each pair, then the m second dims); k_nope [H_kv, D, hidden + 1]: the source keys minus what the rope
    key carries; pairs: the source pair each of the m rope pairs turns at.
    """

    q_rope: torch.Tensor
    key: torch.Tensor
    k_nope: torch.Tensor
    pairs: list[int]


@dataclass(frozen=True)
class LayerStatistics:
    """What a rope-key method may look at of one layer's calibration text.

    rows [N, hidden + 1]: attention inputs with a ones column, or None without calibration; keys
    [hidden + 1, hidden + 1]: their second moment, each row weighted by the attention it receives as a key
    (``weighting``; the identity without calibration)."""

    rows: torch.Tensor | None
    keys: torch.Tensor


class RopeKeyMethod:
    """Turns one layer's q [H, D, hidden + 1] and k [H_kv, D, hidden + 1] into a :class:`RopeKey`.

    ``ladder``: the kept frequencies are the same DeepSeek ladder in every layer, each once (what the stock
    ``deepseek_v3`` export can write). ``pairs`` is what the config alone fixes (None: chosen per layer).
    """

    name: str = ""
    ladder: bool = True
    #: the kept pairs are evenly spaced over all rotary pairs (d_rope / 2 must divide them)
    evenly_spaced: bool = False

    def valid_rope_dims(self, layout: AttentionLayout) -> list[int]:
        """The d_rope values this method accepts for ``layout`` (evenly spaced: m = d_rope / 2 divides the rotary
        pairs, or under a rope scaling m is at most the pairs it leaves unscaled: ``ladder_span``)."""
        pairs, plain = layout.rope.rotary_dim // 2, layout.rope.plain_pairs
        if not self.evenly_spaced:
            return [2 * m for m in range(1, pairs + 1)]
        return [2 * m for m in range(1, plain + 1) if plain < pairs or pairs % m == 0]

    def check(self, layout: AttentionLayout, options) -> None:
        """``ValueError`` naming the valid values when ``options`` (an ``MLAConversionConfig``) does not fit."""
        validate_rope_dim(layout, options.qk_rope_head_dim, self)

    def select(self, layout: AttentionLayout, qk_rope_head_dim: int, q=None, k=None, rows=None) -> list[int]:
        """The source pairs the rope key turns at (q, k, rows: the layer's projections and calibration rows, for
        data-dependent selections); DeepSeek's uniform ladder unless a method says otherwise."""
        return ladder_pairs(layout, qk_rope_head_dim)

    def pairs(self, layout: AttentionLayout, options) -> list[int] | None:
        """The kept pairs as the config alone fixes them, the same in every layer (None: chosen per layer)."""
        return self.select(layout, options.qk_rope_head_dim) if self.ladder else None

    def build(
        self, q: torch.Tensor, k: torch.Tensor, layout: AttentionLayout, options, stats: LayerStatistics
    ) -> RopeKey:
        raise NotImplementedError


def validate_rope_dim(layout: AttentionLayout, qk_rope_head_dim, method: RopeKeyMethod) -> int:
    """Check d_rope against the source's rotary dims; returns it or raises ``ValueError`` naming valid values."""
    rotary_dim = layout.rope.rotary_dim
    valid = method.valid_rope_dims(layout)
    check_int("qk_rope_head_dim", qk_rope_head_dim)
    if qk_rope_head_dim not in valid:
        reason = (
            "must be even (rotary dims come in pairs)"
            if qk_rope_head_dim % 2
            else f"is larger than the {rotary_dim} rotary dims per head"
            if qk_rope_head_dim > rotary_dim
            else "must be at least 2"
            if qk_rope_head_dim < 2
            else f"keeps more frequencies than the {layout.rope.plain_pairs} pairs the source's "
            f"{layout.rope.rope_type} rope scaling leaves unchanged (the {method.name} ladder of the deepseek_v3 "
            "format; --format plugin keeps scaled ones)"
            if layout.rope.plain_pairs < rotary_dim // 2
            else f"must divide the {rotary_dim} rotary dims evenly for the {method.name} selection"
        )
        raise ValueError(
            f"qk_rope_head_dim={qk_rope_head_dim} {reason}. Valid values for this {layout.family} model "
            f"(head_dim {layout.head_dim}, selection {method.name!r}): {valid}."
        )
    return qk_rope_head_dim


def pair_dims(layout: AttentionLayout, pairs: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Head dims (first, second) of each kept pair, each [m]."""
    index = layout.rope.pair_indices()[torch.tensor(pairs)]
    return index[:, 0], index[:, 1]


def ladder_span(layout: AttentionLayout, qk_rope_head_dim: int) -> int:
    """P': the leading source pairs a ladder of m = d_rope / 2 frequencies spreads over: all rotary pairs, or under
    a rope scaling the largest multiple of m among the pairs it leaves unscaled (``RopeInfo.plain_pairs``), so
    that every kept frequency is one the scaling leaves unchanged and the stock export stays exact."""
    pairs, plain, kept = layout.rope.rotary_dim // 2, layout.rope.plain_pairs, qk_rope_head_dim // 2
    return pairs if plain == pairs else kept * (plain // kept)


def ladder_pairs(layout: AttentionLayout, qk_rope_head_dim: int) -> list[int]:
    """DeepSeek's uniform ladder in source pairs: 0, s, 2s, ... with s = P' / (d_rope / 2) (``ladder_span``)."""
    span = ladder_span(layout, qk_rope_head_dim)
    return list(range(0, span, span // (qk_rope_head_dim // 2)))
