"""MHA/GQA -> DeepSeek-style multi-head latent attention (MLA): ``convert_to_mla`` and its method units, with its
options in ``config.MLAConversionConfig``.

- rope keys (``rope``: the contract; ``freqfold``, ``selection``: the methods; ``registry.ROPE_KEY_METHODS``),
- the joint K/V latent (``factorize``: ``FACTORIZATIONS``) in attention-aware metrics (``weighting``),
- ranks per layer (``budget``), one layer's math and module (``layer``), the conversion itself (``convert``:
  ``MLAConversion``, a ``LayerConversion`` of ``hf_attn_swap.methods.layerwise``).
The model classes it produces live in ``hf_attn_swap.modeling.mla``.
"""

from ...versions import renamed_attributes
from .budget import RANK_ALLOCATIONS, allocate_ranks
from .config import FORMATS, MLAConversionConfig, check_deepseek_v3, deepseek_v3_problems
from .convert import MLA_FAMILIES, MLAConversion, convert_to_mla, max_kv_lora_rank, validate_mla_options
from .factorize import FACTORIZATIONS, JointKV, LatentFactorization, joint_kv
from .layer import LayerDecomposition, MLALayerWeights
from .registry import (
    LADDER_SELECTIONS,
    ROPE_KEY_METHODS,
    ROPE_SELECTIONS,
    register_rope_key_method,
    rope_key_method,
    select_rope_pairs,
)
from .rope import RopeKey, RopeKeyMethod, validate_rope_dim

__all__ = [
    "FACTORIZATIONS",
    "FORMATS",
    "LADDER_SELECTIONS",
    "MLA_FAMILIES",
    "RANK_ALLOCATIONS",
    "ROPE_KEY_METHODS",
    "ROPE_SELECTIONS",
    "JointKV",
    "LatentFactorization",
    "LayerDecomposition",
    "MLAConversion",
    "MLAConversionConfig",
    "MLALayerWeights",
    "RopeKey",
    "RopeKeyMethod",
    "allocate_ranks",
    "check_deepseek_v3",
    "convert_to_mla",
    "deepseek_v3_problems",
    "joint_kv",
    "max_kv_lora_rank",
    "register_rope_key_method",
    "rope_key_method",
    "select_rope_pairs",
    "validate_mla_options",
    "validate_rope_dim",
]

__getattr__ = renamed_attributes(globals())  # names of earlier releases (versions.RENAMED)
