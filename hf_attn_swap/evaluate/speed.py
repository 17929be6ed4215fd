"""Decode speed: the one definition of decode tokens/s, used by ``bench``, ``eval --decode-contexts`` (through
``evaluate_suite``) and ``scripts/bench_decode.py``.

The first ``context`` prompt tokens are prefilled once, in one forward, into the chosen cache (timed:
``prefill_seconds``); ``generate()`` then continues greedily from that cache for ``new_tokens`` tokens, which is
exactly ``new_tokens`` cached single-token forwards (the first of them feeds the token the prefill predicted).

    decode tokens/s = batch x new_tokens / median time of that continuation     (batch sequences decoded at once)

The continuation is timed by ``torch.utils.benchmark.Timer.blocked_autorange`` (its block-size estimate is the
warm-up; it synchronises the accelerator around each block): every run first crops the cache back to the prompt
(``Cache.crop``, a slice), so all runs decode the same positions, and the cache ends holding context + new_tokens
tokens. A cache that cannot be cropped back (sliding-window layers, quantized caches) gets one timed run without
warm-up. The prefill is timed once with ``torch.utils.benchmark.timer`` (the synchronising clock), not by
``Timer``: it fills the cache, and ``Timer``'s warm-up runs would triple a prefill that takes minutes at 8K tokens
(``scripts/bench_decode.py``: 284 s for stock deepseek_v3).

Not used, for a measured reason: timing whole ``generate()`` calls and subtracting a 1-token run (this module's
earlier definition). The prefill dominates those timings (SmolLM2 at 8K: 30.5 s prefill vs 2.9 s for 16 tokens),
so their difference is mostly prefill noise: SmolLM2, 1 thread, 16 tokens after 1024, three interleaved rounds
on a shared 2-core CPU gave 9.7-13.9 tokens/s that way, 9.1-10.6 this way and 10.2-10.4 with a bare loop of
forward calls (the ``bench`` command's earlier definition, which ``generate`` replaces here at no visible cost).

Peak memory: the process's peak RSS (``peak_rss_mib``; run one configuration per process, as ``bench`` does,
for it to belong to that configuration) and, on CUDA, ``torch.cuda.max_memory_allocated`` over the prefill and
decode (``peak_cuda_memory_mib``).
"""

from __future__ import annotations

import os
import resource

import torch
from torch import nn
from torch.utils import benchmark

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


def pad_token_id(generation_config) -> int:
    """The pad id ``generate`` needs for batch-1 greedy decoding: pad, else (the first) eos, else 0."""
    for candidate in (generation_config.pad_token_id, generation_config.eos_token_id):
        if isinstance(candidate, (list, tuple)):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return int(candidate)
    return 0


def _croppable(cache) -> bool:
    """Whether ``crop`` puts ``cache`` back exactly (no sliding-window layer that may have evicted tokens)."""
    layers = getattr(cache, "layers", None) or []
    return bool(layers) and all(_layer_croppable(layer) for layer in layers)


def _layer_croppable(layer) -> bool:
    # transformers >= 5.24 says so per layer (``is_croppable``); before, any non-sliding layer with ``crop`` is
    if hasattr(layer, "is_croppable"):
        return bool(layer.is_croppable) and not getattr(layer, "is_sliding", False)
    return hasattr(layer, "crop") and not getattr(layer, "is_sliding", False)


@torch.inference_mode()
def measure_decode_speed(
    model: nn.Module,
    context: int,
    new_tokens: int = 16,
    prompt=None,
    cache: str = "auto",
    min_run_time: float = 0.5,
    check_positions: bool = True,
    batch: int = 1,
) -> dict:
    """Greedy decode speed of ``model`` after ``context`` prompt tokens (see the module docstring), ``batch``
    sequences at once (decode tokens/s counts the tokens of all of them).

    prompt: token ids [N >= context] (real text; every sequence gets it); default: seeded random ids, one row per
    sequence. cache: ``CACHES``.
    min_run_time: seconds of timed decoding to collect (at least one run). check_positions: refuse
    context + new_tokens beyond the model's ``max_position_embeddings`` (the ``bench`` command does not: a RoPE
    model runs past its trained positions, which does not change its speed). Returns context, new_tokens,
    prefill_seconds, decode_seconds (median run), decode_tokens_per_second, median_step_ms, decode_runs, the
    cache class and bytes (total and per cached token), peak memory, and what the timing depends on.
    """
    if new_tokens < 1:
        raise ValueError(f"--new-tokens must be at least 1, got {new_tokens}")
    if context < 1:
        raise ValueError(f"--context must be at least 1, got {context}")
    if batch < 1:
        raise ValueError(f"--batch must be at least 1, got {batch}")
    limit = getattr(model.config, "max_position_embeddings", None)
    if check_positions and limit is not None and context + new_tokens > limit:
        raise ValueError(
            f"context {context} + {new_tokens} new tokens exceeds the model's {limit} positions: use a shorter context"
        )
    if prompt is not None and len(prompt) >= context:
        ids = torch.as_tensor(prompt[:context]).view(1, -1).repeat(batch, 1)
    else:
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(3, model.config.vocab_size, (batch, context), generator=generator)
    device = model.device
    ids = ids.to(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    start = benchmark.timer()
    out = model(input_ids=ids, **cache_kwargs(make_cache(model, cache)), use_cache=True, logits_to_keep=1)
    prefill = benchmark.timer() - start
    past = output_cache(out)
    if past is None:
        raise ValueError(
            f"{model.config.model_type} returned no cache: decode speed needs a causal LM with a cache"
        )
    # the prompt and the token the prefill predicted: generate() feeds only what the cache does not hold yet
    ids = torch.cat([ids, out.logits[:, -1:].argmax(-1).to(ids.dtype)], dim=-1)
    options = dict(
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=pad_token_id(model.generation_config),
    )

    def decode():
        excess = past.get_seq_length() - context
        if excess > 0:
            past.crop(-excess)
        model.generate(input_ids=ids, **cache_kwargs(past), **options)

    if _croppable(past):
        timer = benchmark.Timer(
            stmt="decode()",
            globals={"decode": decode},
            num_threads=torch.get_num_threads(),  # Timer's default (1 thread) would change what is measured
        )
        measurement = timer.blocked_autorange(min_run_time=min_run_time)
        seconds, runs = measurement.median, measurement.number_per_run * len(measurement.times)
    else:
        start = benchmark.timer()
        decode()
        seconds, runs = benchmark.timer() - start, 1

    cached = context + new_tokens
    result = {
        "context": context,
        "new_tokens": new_tokens,
        "prefill_seconds": round(prefill, 4),
        "decode_seconds": round(seconds, 4),
        "decode_tokens_per_second": batch * new_tokens / seconds,
        "batch": batch,
        "median_step_ms": round(1000 * seconds / new_tokens, 3),
        "decode_runs": runs,
        "cache_class": type(past).__name__,
        "cache_bytes": cache_nbytes(past),
        "cache_bytes_per_token": cache_nbytes(past) / (cached * batch),
        "peak_rss_mib": round(peak_rss_mib(), 1),
    }
    if device.type == "cuda":
        result["peak_cuda_memory_mib"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return {
        **result,
        "attn_implementation": model.config._attn_implementation,
        "model_type": model.config.model_type,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": round(os.getloadavg()[0], 2),  # other processes sharing the CPU
    }
