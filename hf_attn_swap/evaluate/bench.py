"""Decode speed at a given context: prefill N tokens, then time M greedy single-token steps with the cache.

``decode_benchmark`` reports tokens/s over the M decode steps (prefill timed separately), the cache's bytes
(``evaluation.cache_nbytes``) and the process's peak RSS. Run one configuration per process (the ``bench`` CLI
command; ``scripts/bench_decode.py`` compares several) so peak RSS belongs to that configuration alone.
"""

from __future__ import annotations

import os
import resource
import statistics
import time

import torch
from torch import nn

from ..modeling.compat import cache_kwargs, output_cache
from .metrics import cache_nbytes

CACHES = ("auto", "latent", "dynamic")


def make_cache(model: nn.Module, kind: str):
    """``auto``: what ``forward`` creates by default (None); ``latent``: LatentCache; ``dynamic``: DynamicCache."""
    if kind not in CACHES:
        raise ValueError(f"unknown cache {kind!r}; choose one of {', '.join(CACHES)}")
    if kind == "latent":
        from ..modeling.latent_cache import LatentCache

        return LatentCache(config=model.config)
    if kind == "dynamic":
        from transformers import DynamicCache

        return DynamicCache(config=model.config)
    return None


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@torch.inference_mode()
def decode_benchmark(model: nn.Module, prompt: torch.Tensor, new_tokens: int, cache: str = "auto") -> dict:
    """prompt [N] token ids. Returns timings, tokens/s, cache bytes and peak RSS (MiB)."""
    if new_tokens < 1:
        raise ValueError(f"--new-tokens must be at least 1, got {new_tokens}")
    ids = prompt.view(1, -1).to(model.device)
    start = time.perf_counter()
    out = model(input_ids=ids, **cache_kwargs(make_cache(model, cache)), use_cache=True, logits_to_keep=1)
    prefill = time.perf_counter() - start
    past = output_cache(out)
    token = out.logits[:, -1:].argmax(-1)
    steps = []
    for _ in range(new_tokens):
        start = time.perf_counter()
        out = model(input_ids=token, **cache_kwargs(past), use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        steps.append(time.perf_counter() - start)
    total = ids.shape[1] + new_tokens
    return {
        "context": ids.shape[1],
        "new_tokens": new_tokens,
        "prefill_seconds": round(prefill, 4),
        "decode_seconds": round(sum(steps), 4),
        "decode_tokens_per_second": new_tokens / sum(steps),
        "median_step_ms": round(1000 * statistics.median(steps), 3),
        "cache_class": type(past).__name__,
        "cache_bytes": cache_nbytes(past),
        "cache_bytes_per_token": cache_nbytes(past) / total,
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "attn_implementation": model.config._attn_implementation,
        "model_type": model.config.model_type,
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2),  # other processes sharing the CPU
    }
