"""Exports of converted models to stock transformers formats that load with no plugin and no remote code."""

from .deepseek_v3 import (
    NORM_ERROR_TARGETS,
    check_deepseek_dtype,
    check_deepseek_expressible,
    linear_regime,
    to_deepseek_v3,
)

__all__ = [
    "NORM_ERROR_TARGETS",
    "check_deepseek_dtype",
    "check_deepseek_expressible",
    "linear_regime",
    "to_deepseek_v3",
]
