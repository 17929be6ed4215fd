"""MHA/GQA -> DeepSeek-style multi-head latent attention (MLA): ``convert_to_mla`` and its steps (one module each:
``rope`` selection, ``factorize`` the joint K/V latent, ``budget`` ranks per layer, ``convert`` the layers), with its
options in ``config.MLAConversionConfig``. The model classes it produces live in ``hf_attn_swap.modeling.mla``."""

from .budget import RANK_ALLOCATIONS, allocate_ranks
from .config import FORMATS, MLAConversionConfig
from .convert import (
    MLA_FAMILIES,
    MLALayerConverter,
    MLALayers,
    MLALayerWeights,
    convert_to_mla,
    max_kv_lora_rank,
    validate_mla_options,
)
from .factorize import FACTORIZATIONS, JointKV, joint_kv
from .rope import LADDER_SELECTIONS, ROPE_SELECTIONS, select_rope_pairs, validate_rope_dim

__all__ = [
    "FACTORIZATIONS",
    "FORMATS",
    "LADDER_SELECTIONS",
    "MLA_FAMILIES",
    "RANK_ALLOCATIONS",
    "ROPE_SELECTIONS",
    "JointKV",
    "MLAConversionConfig",
    "MLALayerConverter",
    "MLALayerWeights",
    "MLALayers",
    "allocate_ranks",
    "convert_to_mla",
    "joint_kv",
    "max_kv_lora_rank",
    "select_rope_pairs",
    "validate_mla_options",
    "validate_rope_dim",
]
