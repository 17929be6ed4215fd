"""Decode speed: tokens/s of greedy ``generate()`` after a prompt of a given context length.

decode tokens/s = (M - 1) / (t(M new tokens) - t(1 new token)): both runs prefill the same prompt, so the
difference is the time of M - 1 cached decode steps, whatever cache class the model's ``generate`` uses
(DynamicCache, a latent cache, ...). Each time is the best of ``repeats`` runs.
"""

from __future__ import annotations

import time

import torch

from ..modeling.compat import output_cache
from .metrics import cache_nbytes


def pad_token_id(generation_config) -> int:
    """The pad id ``generate`` needs for batch-1 greedy decoding: pad, else (the first) eos, else 0."""
    for candidate in (generation_config.pad_token_id, generation_config.eos_token_id):
        if isinstance(candidate, (list, tuple)):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return int(candidate)
    return 0


def _timed_generate(model, ids, new_tokens: int, repeats: int) -> tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            return_dict_in_generate=True,
            pad_token_id=pad_token_id(model.generation_config),
        )
        best = min(best, time.perf_counter() - start)
    return best, out


@torch.inference_mode()
def measure_decode_speed(model, context: int, new_tokens: int = 32, repeats: int = 2, prompt=None) -> dict:
    """Greedy decode speed of ``model`` (batch 1) after ``context`` prompt tokens.

    prompt: optional token ids [N] (real text); default: seeded random ids. Returns context, new_tokens,
    prefill_seconds, decode_tokens_per_second and the cache bytes per token after generation.
    """
    if new_tokens < 2:
        raise ValueError(f"new_tokens must be at least 2, got {new_tokens}")
    limit = getattr(model.config, "max_position_embeddings", None)
    if limit is not None and context + new_tokens > limit:
        raise ValueError(
            f"context {context} + {new_tokens} new tokens exceeds the model's {limit} positions: use a shorter context"
        )
    if prompt is not None and len(prompt) >= context:
        ids = torch.as_tensor(prompt[:context]).unsqueeze(0)
    else:
        generator = torch.Generator().manual_seed(0)
        ids = torch.randint(3, model.config.vocab_size, (1, context), generator=generator)
    ids = ids.to(model.device)
    _timed_generate(model, ids[:, : min(context, 16)], 2, 1)  # warm-up
    prefill, _ = _timed_generate(model, ids, 1, repeats)
    total, out = _timed_generate(model, ids, new_tokens, repeats)
    cache = output_cache(out)
    decode = max(total - prefill, 1e-9)
    return {
        "context": context,
        "new_tokens": new_tokens,
        "prefill_seconds": round(prefill, 4),
        "decode_seconds": round(decode, 4),
        "decode_tokens_per_second": (new_tokens - 1) / decode,
        "cache_bytes_per_token": None if cache is None else cache_nbytes(cache) / (context + new_tokens - 1),
    }
