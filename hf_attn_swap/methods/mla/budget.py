"""KV budgets: the split of a budget into latent rank + rope dims, and per-layer latent ranks under one total.

``split_kv_budget``: a budget of B values per token and layer (or a fraction of the source's 2 H_kv head_dim) is
spent as d_rope rope dims + r = B - d_rope latent dims, with d_rope the uniform-ladder size (rotary_dim / d_rope
an integer; under a rope scaling, d_rope / 2 at most the pairs it leaves unscaled) closest to B / 4 (ties: the
larger). Measured on SmolLM2 (README, MLA results): at 120 values the
split 88 + 32 beats 72 + 48 and 56 + 64; at 48, 32 + 16.

``uniform`` gives every layer the same rank. ``energy`` spends the same total rank (so the same KV bytes) where
it keeps the most: each layer's spectrum is normalised to sum 1, and ranks go to the largest normalised
eigenvalues across all layers. Spectra are sorted, so this greedy choice maximises the sum over layers of the
fraction of K/V energy kept (a sum of concave functions), subject to min_rank <= r_l <= max_rank_l.
"""

from __future__ import annotations

import math

import torch

RANK_ALLOCATIONS = ("uniform", "energy")


def parse_kv_budget(text: str) -> float | int:
    """``"0.3125"`` -> a fraction in (0, 1); ``"120"`` -> a number of values (>= 2). ``ValueError`` otherwise."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = None
    if value is not None and not math.isfinite(value):
        value = None
    if value is not None and 0 < value < 1:
        return value
    if value is not None and value >= 2 and value == int(value):
        return int(value)
    raise ValueError(
        f"kv_budget={text!r} is neither a fraction of the source's KV cache in (0, 1) (e.g. 0.3125 for -68.75%) "
        "nor a whole number of values per token and layer >= 2 (e.g. 120)"
    )


def split_kv_budget(text: str, rope_dims: list[int], source_values: int) -> tuple[int, int, int]:
    """(values, kv_lora_rank, qk_rope_head_dim) for a budget (module docstring). rope_dims: the ladder sizes the
    source allows (``RopeKeyMethod.valid_rope_dims`` of ``uniform``); source_values: 2 H_kv head_dim."""
    budget = parse_kv_budget(text)
    values = round(budget * source_values) if isinstance(budget, float) else budget
    if not 2 < values < source_values:
        raise ValueError(
            f"kv_budget={text} is {values} values per token and layer; it must be between 3 and "
            f"{source_values - 1} (the source caches {source_values})"
        )
    rope = min((d for d in rope_dims if d < values), key=lambda d: (abs(d - values / 4), -d))
    return values, values - rope, rope


def allocate_ranks(
    spectra: list[torch.Tensor], total_rank: int, max_ranks: list[int], min_rank: int = 1
) -> list[int]:
    """spectra: per layer, energies sorted descending. Returns ranks summing to ``total_rank``."""
    layers = len(spectra)
    if not min_rank * layers <= total_rank <= sum(max_ranks):
        raise ValueError(
            f"a total rank of {total_rank} cannot be split over {layers} layers with {min_rank} <= rank <= "
            f"{max(max_ranks)} each"
        )
    ranks = [min_rank] * layers
    candidates = []
    for layer, (energy, cap) in enumerate(zip(spectra, max_ranks, strict=True)):
        energy = energy.double().cpu().clamp_min(0)
        total = float(energy.sum()) or 1.0
        gains = torch.zeros(cap, dtype=torch.float64)
        gains[: min(cap, energy.numel())] = energy[:cap] / total
        candidates += [(float(g), layer) for g in gains[min_rank:cap]]
    candidates.sort(key=lambda item: -item[0])  # stable: ties keep layer order
    for _, layer in candidates[: total_rank - min_rank * layers]:
        ranks[layer] += 1
    return ranks
