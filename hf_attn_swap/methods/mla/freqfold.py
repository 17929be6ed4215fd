"""``freqfold``: the rope key as principal components of neighbouring rotary frequencies across KV heads.

Complex view of rotate-half RoPE: pair p of head g is the complex number k_{g,p}(x) = W_{g,p} [x ; 1] with complex
rows W_{g,p} = W_first + i W_second, and RoPE multiplies it by e^{i n theta_p}; a query head h of KV head g adds
Re(conj(q_{h,p}) k_{g,p} e^{i (n - m) theta_p}) to the score of key n.

Uniform DeepSeek ladder: the m = d_rope / 2 kept frequencies are source pairs 0, s, 2s, ... (s = P / m, P source
pairs), so the export keeps the source's rope_theta. The P pairs are cut into windows of F = ``fold`` neighbours
(F a multiple of s; default s: window i is pairs i s .. i s + s - 1, turned at pair i s's frequency), each window holding c = F / s ladder frequencies. In a window the slots (g, p) (H_kv F of them
per rope key) form one complex vector k(x); with C = E[k k^H] (calibration moment of the inputs, identity without),
its top-c eigenvectors u_1..u_c give the rope components k'_t = u_t^H k, which rotate at ladder frequency t of the
window (components ordered by their energy-weighted mean pair index, so the slower mixtures get the slower ladder
frequency). The approximation k_s ~ sum_t u_{t,s} k'_t turns the window's part of the score into

    sum_s Re(conj(q_s) k_s e^{i dn theta_s}) ~ sum_t Re(conj(q'_t) k'_t e^{i dn theta_t}),  q'_t = sum_s conj(u_{t,s}) q_s

(exact for the slots at the ladder frequency, approximate in angle for their neighbours: TransMLA's FreqFold,
Meng et al. 2025, folds neighbours because close frequencies rotate alike). The residual k_s - sum_t u_{t,s} k'_t
stays in head g's NoPE key (position-free), paired with the unchanged query dims. F = s, c = 1 and one KV head:
k' is the ladder pair itself (times a unit complex number), which is exactly the ``uniform`` selection.

Complex u (a rotation and scale per slot) commutes with RoPE just like the real mixing of RoRoPE, and keeps at least
as much energy. Plugin and ``deepseek_v3`` formats: the ladder is the same in every layer.
"""

from __future__ import annotations

import torch

from ...adapters import AttentionLayout
from .rope import LayerStatistics, RopeKey, RopeKeyMethod, ladder_pairs, ladder_span


def fold_ladder(
    layout: AttentionLayout, qk_rope_head_dim: int, fold: int | None
) -> tuple[list[int], int, int]:
    """The kept ladder pairs (uniform: 0, s, 2s, ...), the fold (None: s) and the components per window c;
    ``ValueError`` naming the valid folds when ``fold`` is not a multiple of s dividing the source's pairs."""
    pairs, kept = ladder_span(layout, qk_rope_head_dim), qk_rope_head_dim // 2
    if pairs % kept or not pairs:
        raise ValueError(
            f"rope_selection='freqfold' keeps a uniform ladder: qk_rope_head_dim={qk_rope_head_dim} must divide "
            f"the {layout.rope.rotary_dim} rotary dims evenly"
        )
    step = pairs // kept
    fold = step if fold is None else fold
    valid = [f for f in range(step, pairs + 1, step) if pairs % f == 0]
    if fold not in valid:
        raise ValueError(
            f"rope_fold={fold} is not valid with qk_rope_head_dim={qk_rope_head_dim}: choose one of {valid} "
            f"(a multiple of {step} that divides the {pairs} rotary pairs)"
        )
    return ladder_pairs(layout, qk_rope_head_dim), fold, fold // step


class FreqFold(RopeKeyMethod):
    """The ``freqfold`` rope key (module docstring); options ``rope_fold`` and ``rope_fold_ladder``."""

    name = "freqfold"
    evenly_spaced = True

    def check(self, layout: AttentionLayout, options) -> None:
        super().check(layout, options)
        fold_ladder(layout, options.qk_rope_head_dim, options.rope_fold)

    def pairs(self, layout: AttentionLayout, options) -> list[int]:
        """The ladder, or each window's first pair repeated (``rope_fold_ladder=False``)."""
        return fold_pairs(layout, options.qk_rope_head_dim, options.rope_fold, options.rope_fold_ladder)

    def build(self, q, k, layout, options, stats: LayerStatistics) -> RopeKey:
        q_rope, key, k_nope, pairs = freqfold(
            q, k, layout, options.qk_rope_head_dim, options.rope_fold, stats.keys, options.num_rope_key_heads,
            options.rope_fold_ladder,
        )  # fmt: skip
        return RopeKey(q_rope, key, k_nope, pairs)


def fold_pairs(
    layout: AttentionLayout, qk_rope_head_dim: int, fold: int | None, ladder_frequencies: bool
) -> list[int]:
    """The source pair each rope pair turns at: the ladder, or with ``ladder_frequencies=False`` each window's
    first pair for all c components of the window (TransMLA's FreqFold: repeated frequencies)."""
    ladder, fold, comps = fold_ladder(layout, qk_rope_head_dim, fold)
    return ladder if ladder_frequencies else [fold * (slot // comps) for slot in range(len(ladder))]


def _complex_rows(w: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """[..., D, cols] real -> [..., P, cols] complex rows W_first + i W_second."""
    return torch.complex(w[..., first, :], w[..., second, :])


def freqfold(
    q: torch.Tensor,
    k: torch.Tensor,
    layout: AttentionLayout,
    qk_rope_head_dim: int,
    fold: int | None,
    moment: torch.Tensor,
    num_rope_key_heads: int = 1,
    ladder_frequencies: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Fold rotary frequencies into one shared rope key per group of KV heads (module docstring).

    q [H, D, hidden + 1], k [H_kv, D, hidden + 1] (bias last column, float64); moment [hidden + 1, hidden + 1] =
    E[x x^T] of inputs with a ones entry. Returns q_rope [H, d_rope, hidden + 1], rope_key [n, d_rope, hidden + 1]
    (rotate-half order: the m real parts, then the m imaginary parts), k_nope [H_kv, D, hidden + 1] (k with the
    folded components removed from the rotary dims) and the source pair each rope pair turns at: the ladder, or
    with ``ladder_frequencies=False`` the first pair of its window for all c components of a window (TransMLA's
    FreqFold; repeated frequencies, plugin format only).
    """
    ladder, fold, comps = fold_ladder(layout, qk_rope_head_dim, fold)
    index = layout.rope.pair_indices()
    first, second = index[:, 0], index[:, 1]
    heads, kv_heads = q.shape[0], k.shape[0]
    group, per_query = kv_heads // num_rope_key_heads, heads // kv_heads
    m, windows = len(ladder), ladder_span(layout, qk_rope_head_dim) // fold  # pairs past the span stay NoPE
    wq, wk = _complex_rows(q, first, second), _complex_rows(k, first, second)  # [H, P, cols], [H_kv, P, cols]
    sigma = moment.to(wk.dtype)
    rep = fold_pairs(layout, qk_rope_head_dim, fold, ladder_frequencies)
    device = k.device
    rope_key = torch.zeros(num_rope_key_heads, m, k.shape[-1], dtype=wk.dtype, device=device)
    q_rope = torch.zeros(heads, m, q.shape[-1], dtype=wq.dtype, device=device)
    residual = wk.clone()
    for rope_head in range(num_rope_key_heads):
        kv_of = torch.arange(rope_head * group, (rope_head + 1) * group, device=device)
        for window in range(windows):
            span = torch.arange(window * fold, (window + 1) * fold, device=device)
            rows = wk[kv_of][:, span].reshape(group * fold, -1)  # slots (g, p), g-major
            cov = rows @ sigma @ rows.conj().T  # C = E[k k^H]
            values, vectors = torch.linalg.eigh(cov)
            u = vectors[:, -comps:].flip(1).T  # [c, slots], descending energy
            # deterministic phase: the largest entry of each component is real positive
            top = u.abs().argmax(-1, keepdim=True)
            phase = u.gather(-1, top)
            u = u * (phase.conj() / phase.abs().clamp_min(1e-300))
            weight = u.abs().square().view(comps, group, fold).sum(1)  # [c, F]
            centroid = (weight * span.to(weight.dtype)).sum(-1)
            u = u[centroid.argsort()]
            keys = u.conj() @ rows  # k'_t rows [c, cols]
            slots = window * comps + torch.arange(comps, device=device)
            rope_key[rope_head, slots] = keys
            u_g = u.view(comps, group, fold)
            for local, g in enumerate(kv_of.tolist()):
                residual[g, span] -= u_g[:, local].T @ keys  # k_s - sum_t u_{t,s} k'_t
                for h in range(g * per_query, (g + 1) * per_query):
                    q_rope[h, slots] = u_g[:, local].conj() @ wq[h, span]  # q'_t = sum_s conj(u_{t,s}) q_s
    k_nope = k.clone()
    k_nope[:, first], k_nope[:, second] = residual.real, residual.imag
    real = lambda z: torch.cat([z.real, z.imag], dim=1)  # noqa: E731
    return real(q_rope), real(rope_key), k_nope, rep
