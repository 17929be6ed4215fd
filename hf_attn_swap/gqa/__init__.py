"""MHA/GQA -> GQA/MQA: pool K/V heads per group (``convert_to_gqa``), one module per initialisation method."""

from .base import GQAMethod, LayerContext
from .convert import (
    GQA_METHODS,
    convert_to_gqa,
    kv_bytes_per_token,
    register_gqa_method,
    validate_num_key_value_heads,
)
from .mean import MeanPooling

__all__ = [
    "GQA_METHODS",
    "GQAMethod",
    "LayerContext",
    "MeanPooling",
    "convert_to_gqa",
    "kv_bytes_per_token",
    "register_gqa_method",
    "validate_num_key_value_heads",
]
