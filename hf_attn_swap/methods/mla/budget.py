"""Per-layer latent ranks under one total KV budget.

``uniform`` gives every layer the same rank. ``energy`` spends the same total rank (so the same KV bytes) where
it keeps the most: each layer's spectrum is normalised to sum 1, and ranks go to the largest normalised
eigenvalues across all layers. Spectra are sorted, so this greedy choice maximises the sum over layers of the
fraction of K/V energy kept (a sum of concave functions), subject to min_rank <= r_l <= max_rank_l.
"""

from __future__ import annotations

import torch

RANK_ALLOCATIONS = ("uniform", "energy")


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
        energy = energy.double().clamp_min(0)
        total = float(energy.sum()) or 1.0
        gains = torch.zeros(cap, dtype=torch.float64)
        gains[: min(cap, energy.numel())] = energy[:cap] / total
        candidates += [(float(g), layer) for g in gains[min_rank:cap]]
    candidates.sort(key=lambda item: -item[0])  # stable: ties keep layer order
    for _, layer in candidates[: total_rank - min_rank * layers]:
        ranks[layer] += 1
    return ranks
