"""The one place that knows how transformers names the KV cache.

transformers 5.24 renamed the cache argument of every model, decoder layer and attention forward, and the cache
field of every model output, from ``past_key_values`` to ``cache`` (GPT-NeoX and Falcon attentions say
``layer_past``). Every plugin attention, plugin model forward and ``generate()`` hook of hf_attn_swap reads and
passes the cache through the functions below, so the package works on both sides of the rename and never calls
transformers with a deprecated name.

This file imports only torch and transformers: ``save_pretrained`` copies it (with the family files that import
it relatively) next to grouped checkpoints, so ``trust_remote_code=True`` loads get the same logic.
"""

from __future__ import annotations

import dataclasses
import functools

import transformers
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.utils import ModelOutput

#: the keyword transformers' models and ``generate()`` use for the cache in the installed version
CACHE_KWARG: str = (
    "cache"
    if "cache" in {field.name for field in dataclasses.fields(BaseModelOutputWithPast)}
    else "past_key_values"
)
#: every keyword a cache may arrive under (current first): 5.24+ ``cache``, before ``past_key_values``,
#: GPT-NeoX / Falcon attention ``layer_past``
CACHE_KWARGS: tuple[str, ...] = ("cache", "past_key_values", "layer_past")


class CacheNotUpdatedError(RuntimeError):
    """A plugin attention decoded without its cache: outputs would be silently wrong."""

    def __init__(self, what: str):
        super().__init__(
            f"{what} (transformers {transformers.__version__}). This transformers version passes the cache in a way "
            "this hf_attn_swap does not handle: upgrade hf_attn_swap, or install a transformers version inside the "
            "range its pyproject declares."
        )


def pop_cache(kwargs: dict, *explicit):
    """Remove the cache from ``kwargs`` under whichever name it came (plus any ``explicit`` values a signature
    already captured) and return it, or None. Two different caches raise ``ValueError``."""
    found = [value for value in explicit if value is not None]
    found += [value for value in (kwargs.pop(name, None) for name in CACHE_KWARGS) if value is not None]
    if any(value is not found[0] for value in found[1:]):
        raise ValueError(
            f"two different caches passed (as {' and '.join(CACHE_KWARGS)}); pass one, as {CACHE_KWARG}"
        )
    return found[0] if found else None


def cache_kwargs(cache) -> dict:
    """``{name: cache}`` to call a transformers model with, under the installed version's name."""
    return {CACHE_KWARG: cache}


def output_cache(outputs):
    """The cache a model returned (``outputs.cache`` from 5.24, ``outputs.past_key_values`` before), or None,
    without tripping transformers' deprecation warning. Also finds the cache in a forward's keyword arguments."""
    if isinstance(outputs, dict):
        # a model output knows only the installed version's name (the other one warns); kwargs may hold either
        names = (CACHE_KWARG,) if isinstance(outputs, ModelOutput) else CACHE_KWARGS[:2]
        for name in names:
            if outputs.get(name) is not None:
                return outputs[name]
    return None


def update_layer_cache(kwargs: dict, key, value, layer_idx: int):
    """Take the cache out of an attention forward's ``kwargs`` (``pop_cache``), append this step's K/V (or MLA
    latent / rope key) for ``layer_idx`` and return everything cached; with no cache, return the inputs.
    ``use_cache=True`` in ``kwargs`` without a cache raises :class:`CacheNotUpdatedError` instead of decoding
    without one. An encoder-decoder cache gives its self-attention part."""
    cache = pop_cache(kwargs)
    if cache is None:
        if kwargs.get("use_cache"):
            raise CacheNotUpdatedError(f"layer {layer_idx}: called with use_cache=True but received no cache")
        return key, value
    self_attention_cache = getattr(cache, "self_attention_cache", None)
    if self_attention_cache is not None:  # EncoderDecoderCache
        cache = self_attention_cache
    return cache.update(key, value, layer_idx)


def check_cache_grew(forward):
    """Wrap a model ``forward`` (keeping its signature): when it returns a cache that did not grow although tokens
    went in, raise :class:`CacheNotUpdatedError` (the attention layers never saw it)."""

    @functools.wraps(forward)
    def checked_forward(self, *args, **kwargs):
        given = output_cache(kwargs)
        # int(): a StaticCache reports its length as a tensor that its update then grows in place
        before = int(given.get_seq_length()) if given is not None else 0
        outputs = forward(self, *args, **kwargs)
        cache = output_cache(outputs)
        # training with gradient checkpointing: transformers drops the cache on purpose (use_cache -> False)
        checkpointing = self.training and getattr(self, "gradient_checkpointing", False)
        if cache is not None and hasattr(cache, "get_seq_length") and not checkpointing:
            tokens = _input_length(args, kwargs)
            after = int(cache.get_seq_length())
            if tokens and after <= before:
                raise CacheNotUpdatedError(
                    f"{type(self).__name__}: {tokens} tokens went in with a cache of {before}, and the cache "
                    f"returned holds {after}"
                )
        return outputs

    return checked_forward


def _input_length(args, kwargs) -> int:
    for name in ("input_ids", "inputs_embeds"):
        value = kwargs.get(name)
        if value is not None:
            return int(value.shape[1])
    if args and hasattr(args[0], "shape") and args[0].dim() >= 2:
        return int(args[0].shape[1])
    return 0


def register_output_capture(module) -> None:
    """What ``PreTrainedModel.__init__`` does for a new class: ``output_attentions`` / ``output_hidden_states``
    find the submodules to record through a registry of ``_can_record_outputs`` keyed by the model's class name,
    so a model whose class was switched in place would return ``attentions=None`` without this. transformers
    < 5.2x keys a plain dict by ``str(cls)``; later ones key by the model and store ``str(cls)`` themselves."""
    try:
        from transformers.utils.output_capturing import _CAN_RECORD_REGISTRY
    except ImportError:  # a transformers without the registry records outputs another way
        return
    key = str(module.__class__) if type(_CAN_RECORD_REGISTRY) is dict else module
    _CAN_RECORD_REGISTRY[key] = module._can_record_outputs
