"""One adapter per model family. ``get_adapter(model_or_config)`` picks it from ``config.model_type``."""

from __future__ import annotations

from .base import (
    ArchitectureAdapter,
    AttentionLayout,
    AttentionWeights,
    RopeInfo,
    check_full_attention,
    new_linear,
    sliding_window_layers,
    unscaled_pairs,
)
from .bert import BertAdapter
from .falcon import FalconAdapter
from .gpt2 import GPT2Adapter
from .gpt_neox import GPTNeoXAdapter
from .llama import (
    Gemma2Adapter,
    GemmaAdapter,
    LlamaAdapter,
    LlamaLikeAdapter,
    MistralAdapter,
    Qwen2Adapter,
    Qwen3Adapter,
)
from .opt import OPTAdapter
from .phi3 import Phi3Adapter

ADAPTERS: dict[str, ArchitectureAdapter] = {}


class UnsupportedArchitectureError(ValueError):
    """The model family has no adapter (the message lists the supported ones)."""


def register_adapter(adapter: ArchitectureAdapter) -> ArchitectureAdapter:
    """Make ``adapter`` handle every ``model_type`` it lists (later registrations win)."""
    for model_type in adapter.model_types:
        ADAPTERS[model_type] = adapter
    return adapter


for _cls in (
    LlamaAdapter,
    MistralAdapter,
    Qwen2Adapter,
    Qwen3Adapter,
    GemmaAdapter,
    Gemma2Adapter,
    Phi3Adapter,
    GPT2Adapter,
    GPTNeoXAdapter,
    OPTAdapter,
    FalconAdapter,
    BertAdapter,
):
    register_adapter(_cls())


def supported_model_types() -> list[str]:
    return sorted(ADAPTERS)


def get_adapter(model_or_config) -> ArchitectureAdapter:
    """The adapter for a model, config or ``model_type`` string; raises ``UnsupportedArchitectureError``."""
    if isinstance(model_or_config, str):
        model_type = model_or_config
    else:
        config = getattr(model_or_config, "config", model_or_config)
        model_type = getattr(config, "model_type", None)
    try:
        return ADAPTERS[model_type]
    except KeyError:
        raise UnsupportedArchitectureError(
            f"hf_attn_swap has no adapter for model_type={model_type!r}. Supported families: "
            f"{', '.join(supported_model_types())}. To add one, subclass "
            "hf_attn_swap.adapters.ArchitectureAdapter and call register_adapter()."
        ) from None


__all__ = [
    "ADAPTERS",
    "ArchitectureAdapter",
    "AttentionLayout",
    "AttentionWeights",
    "LlamaLikeAdapter",
    "RopeInfo",
    "UnsupportedArchitectureError",
    "check_full_attention",
    "get_adapter",
    "new_linear",
    "register_adapter",
    "sliding_window_layers",
    "supported_model_types",
    "unscaled_pairs",
]
