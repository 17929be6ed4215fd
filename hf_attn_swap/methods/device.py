"""Where a layer's decompositions run: float64 on the layer's own device when that device computes in float64
(CPU, CUDA), on the CPU otherwise (e.g. Apple MPS has no float64)."""

from __future__ import annotations

from functools import cache

import torch


@cache
def _has_float64(device: str) -> bool:
    try:
        probe = torch.ones(2, 2, dtype=torch.float64, device=device)
        torch.linalg.eigh(probe @ probe.T)
    except (TypeError, RuntimeError, NotImplementedError):
        return False
    return True


def math_device(device: str | torch.device) -> torch.device:
    """``device`` when it computes float64 eigendecompositions, else the CPU."""
    device = torch.device(device)
    if device.type == "cpu" or _has_float64(str(device)):
        return device
    return torch.device("cpu")
