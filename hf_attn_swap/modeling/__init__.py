"""Every model class, attention and cache the project adds to transformers (imports only torch and transformers).

- ``compat``: the one place that knows how transformers names the KV cache (``cache`` / ``past_key_values``).
- ``grouped`` + one file per family (``gpt2``, ``gpt_neox``, ``opt``, ``falcon``, ``bert``): grouped-query attention
  for families whose stock code has none (saved next to checkpoints as remote code).
- ``mla``: the plugin MLA model (``hf_attn_swap_mla``); ``latent_cache``: ``LatentCache``; ``latent_attention``:
  the ``latent_sdpa`` attention implementation (absorbed decoding).

Importing this package (``import hf_attn_swap`` does) registers each plugin config with ``AutoConfig``, its model
classes with the matching Auto classes, and ``latent_sdpa`` with ``AttentionInterface`` / ``AttentionMaskInterface``.
"""

from __future__ import annotations

import transformers

from . import bert, falcon, gpt2, gpt_neox, opt
from .compat import CACHE_KWARG, CacheNotUpdatedError, cache_kwargs, output_cache, pop_cache
from .latent_attention import attention_for, register_latent_sdpa
from .latent_cache import LatentCache, LatentLayer
from .mla import LATENT_SDPA, MLA_MODEL_TYPE, MLAConfig, MLAForCausalLM, MLAModel, register_auto_classes

FAMILIES = {"gpt2": gpt2, "gpt_neox": gpt_neox, "opt": opt, "falcon": falcon, "bert": bert}


def _register(family) -> None:
    config_class = next(iter(family.AUTO_CLASSES.values())).config_class
    transformers.AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    for auto, model_class in family.AUTO_CLASSES.items():
        getattr(transformers, auto).register(config_class, model_class, exist_ok=True)


for _family in FAMILIES.values():
    _register(_family)
register_auto_classes()
register_latent_sdpa()

__all__ = [
    "CACHE_KWARG",
    "FAMILIES",
    "LATENT_SDPA",
    "MLA_MODEL_TYPE",
    "CacheNotUpdatedError",
    "LatentCache",
    "LatentLayer",
    "MLAConfig",
    "MLAForCausalLM",
    "MLAModel",
    "attention_for",
    "cache_kwargs",
    "output_cache",
    "pop_cache",
]
