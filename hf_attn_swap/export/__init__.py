"""Exports of converted models to stock transformers formats that load with no plugin and no remote code."""

from ..versions import renamed_attributes
from .deepseek_v3 import (
    NORM_ERROR_TARGETS,
    DeepseekV3Export,
    DeepseekV3Layout,
    LatentNorm,
    LayerExport,
    RopeLadder,
    check_deepseek_dtype,
    check_deepseek_expressible,
    deepseek_v3_details,
    deepseek_v3_layer_state,
    deepseek_v3_layout,
    deepseek_v3_outer_scale,
    linear_regime,
    to_deepseek_v3,
)

__all__ = [
    "NORM_ERROR_TARGETS",
    "DeepseekV3Export",
    "DeepseekV3Layout",
    "LatentNorm",
    "LayerExport",
    "RopeLadder",
    "check_deepseek_dtype",
    "check_deepseek_expressible",
    "deepseek_v3_details",
    "deepseek_v3_layer_state",
    "deepseek_v3_layout",
    "deepseek_v3_outer_scale",
    "linear_regime",
    "to_deepseek_v3",
]

__getattr__ = renamed_attributes(globals())  # names of earlier releases (versions.RENAMED)
