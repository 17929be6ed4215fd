"""Exports of converted models to stock transformers formats that load with no plugin and no remote code."""

from .deepseek_v3 import (
    NORM_ERROR_TARGETS,
    check_deepseek_expressible,
    deepseek_v3_details,
    deepseek_v3_layer_state,
    deepseek_v3_model_config,
    dominant_channel,
    to_deepseek_v3,
)

__all__ = [
    "NORM_ERROR_TARGETS",
    "check_deepseek_expressible",
    "deepseek_v3_details",
    "deepseek_v3_layer_state",
    "deepseek_v3_model_config",
    "dominant_channel",
    "to_deepseek_v3",
]
