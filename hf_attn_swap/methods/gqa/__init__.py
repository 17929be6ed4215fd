"""MHA/GQA -> GQA/MQA: pool K/V heads per group (``convert_to_gqa``), one module per initialisation method.

Options: ``GQAConversionConfig`` (``config``). ``GQAConversion`` is the method's ``LayerConversion`` (one layer at a
time, ``hf_attn_swap.methods.layerwise``). Methods (``GQA_METHODS`` in ``registry``, ``convert_to_gqa(..., method=NAME)``):
``mean`` (data-free), and with calibration activations ``group`` (similarity grouping + mean), ``align``
(Procrustes alignment + mean), ``fit`` (query/o_proj-weighted activation fit), ``group-align``, ``group-fit``. They
work on any family whose adapter can read and write its attention (``hf_attn_swap.adapters``).
"""

from ...versions import renamed_attributes
from .alignment import AlignedMean, align_heads
from .base import GQAMethod, LayerContext, expand_to_query_heads, permute_query_heads
from .config import GQAConversionConfig
from .convert import (
    GQAConversion,
    convert_gqa_layer,
    convert_to_gqa,
    gqa_method,
    gqa_report,
    kv_bytes_per_token,
    layer_context,
    validate_num_key_value_heads,
)
from .fit import ActivationFit, fit_heads, fit_shared_projection
from .grouping import SimilarityGrouping, balanced_partition, head_distances
from .mean import MeanPooling
from .registry import GQA_METHODS, register_gqa_method

__all__ = [
    "GQA_METHODS",
    "ActivationFit",
    "AlignedMean",
    "GQAConversionConfig",
    "GQAConversion",
    "GQAMethod",
    "LayerContext",
    "MeanPooling",
    "SimilarityGrouping",
    "align_heads",
    "balanced_partition",
    "convert_gqa_layer",
    "convert_to_gqa",
    "expand_to_query_heads",
    "fit_heads",
    "fit_shared_projection",
    "gqa_method",
    "gqa_report",
    "head_distances",
    "kv_bytes_per_token",
    "layer_context",
    "permute_query_heads",
    "register_gqa_method",
    "validate_num_key_value_heads",
]

__getattr__ = renamed_attributes(globals())  # names of earlier releases (versions.RENAMED)
