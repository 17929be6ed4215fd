"""Perplexity, KL to a reference model and measured KV-cache bytes.

Perplexity protocol (``evaluate_models``): the data files are read in order and joined by blank lines, tokenised
once without special tokens (no BOS), truncated to the first ``max_tokens`` tokens and cut into consecutive
non-overlapping windows of ``window`` tokens (a last window shorter than 2 tokens is dropped). Each window is
scored on its own, with no context carried over: every token after the first in a window is predicted from the
tokens before it in that window. ``perplexity = exp(total NLL / predicted tokens)``. ``kl_to_reference`` is the
mean over the same predicted positions of KL(p_reference || p_model) of the next-token distributions, in nats;
``top1_agreement`` is the fraction of those positions where both models' arg-max tokens agree.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..io.text import windows
from ..modeling.compat import output_cache


def cache_nbytes(cache) -> int:
    """Bytes of cached states in a transformers ``Cache`` (``cache.nbytes()`` when the class defines it).

    Otherwise sums every tensor of >= 2 dims held by ``cache.layers[*]`` (K/V blocks, latents); 0/1-dim
    bookkeeping tensors (lengths, positions) are not cache payload and are skipped."""
    if hasattr(cache, "nbytes") and callable(cache.nbytes):
        return int(cache.nbytes())
    total = 0
    for layer in getattr(cache, "layers", []):
        for value in vars(layer).values():
            if isinstance(value, torch.Tensor) and value.dim() >= 2:
                total += value.numel() * value.element_size()
    return total


@torch.inference_mode()
def measure_kv_cache_bytes_per_token(
    model: nn.Module, input_ids: torch.Tensor | None = None, tokens: int = 16
):
    """Run one forward with ``use_cache=True`` and divide the returned cache's bytes by batch x tokens.

    Returns None for models that return no cache (encoders).
    """
    if input_ids is None:
        vocab = model.config.vocab_size
        input_ids = torch.arange(3, 3 + tokens).remainder(vocab).unsqueeze(0)
    input_ids = input_ids.to(model.device)
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    out = model(input_ids=input_ids, use_cache=True)
    cache = output_cache(out)
    if cache is None:
        return None
    return cache_nbytes(cache) / input_ids.numel()


@torch.inference_mode()
def evaluate_models(
    models: Mapping[str, nn.Module],
    token_ids: torch.Tensor,
    window: int = 1024,
    reference: nn.Module | None = None,
    batch_size: int = 1,
    progress: bool = True,
) -> dict[str, dict]:
    """Score several models on the same windows, running the reference only once per window.

    models: name -> causal LM. token_ids: [N]. Returns name -> metrics (see the module docstring). A model that
    *is* the reference reuses its logits.
    """
    chunks = windows(token_ids, window)
    totals = {name: {"nll": 0.0, "kl": 0.0, "agree": 0, "tokens": 0, "seconds": 0.0} for name in models}
    batches = [chunks[i : i + batch_size] for i in range(0, len(chunks), batch_size)]
    bar = tqdm(total=len(chunks) * (len(models) + (reference is not None)), desc="eval", disable=not progress)
    for batch in batches:
        lengths = {c.numel() for c in batch}
        groups = [batch] if len(lengths) == 1 else [[c] for c in batch]
        for group in groups:
            ids = torch.stack(group)
            targets = ids[:, 1:]
            ref_logp, ref_seconds = None, 0.0
            if reference is not None:
                start = time.perf_counter()
                ref_logp = _log_probs(reference, ids)
                ref_seconds = time.perf_counter() - start
                bar.update(len(group))
            for name, model in models.items():
                start = time.perf_counter()
                logp = ref_logp if model is reference else _log_probs(model, ids)
                t = totals[name]
                t["seconds"] += time.perf_counter() - start + (ref_seconds if model is reference else 0.0)
                t["nll"] -= logp.gather(-1, targets.to(logp.device).unsqueeze(-1)).sum().item()
                t["tokens"] += targets.numel()
                if ref_logp is not None:
                    kl = (ref_logp.exp() * (ref_logp - logp)).sum(-1)
                    t["kl"] += kl.sum().item()
                    t["agree"] += (ref_logp.argmax(-1) == logp.argmax(-1)).sum().item()
                bar.update(len(group))
    bar.close()
    results = {}
    for name, t in totals.items():
        n = t["tokens"]
        results[name] = {
            "perplexity": math.exp(t["nll"] / n),
            "nll": t["nll"] / n,
            "tokens": n,
            "windows": len(chunks),
            "window": window,
            "kl_to_reference": t["kl"] / n if reference is not None else None,
            "top1_agreement": t["agree"] / n if reference is not None else None,
            "forward_seconds": round(t["seconds"], 3),
        }
    return results


def _log_probs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """[B, T] -> [B, T-1, V] float32 log-probabilities of the next token at each position but the last."""
    logits = model(input_ids=ids.to(model.device), use_cache=False).logits[:, :-1]
    return F.log_softmax(logits.float(), dim=-1).cpu()
