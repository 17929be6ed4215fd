"""MHA/GQA -> DeepSeek-style multi-head latent attention (MLA): ``convert_to_mla`` and the plugin format."""

from .budget import RANK_ALLOCATIONS, allocate_ranks
from .convert import MLA_FAMILIES, MLALayerWeights, convert_to_mla, max_kv_lora_rank, validate_mla_options
from .factorize import FACTORIZATIONS, JointKV, joint_kv
from .modeling import (
    LATENT_SDPA,
    MLA_MODEL_TYPE,
    MLAAttention,
    MLAConfig,
    MLAForCausalLM,
    MLAModel,
    register_auto_classes,
)
from .rope import LADDER_SELECTIONS, ROPE_SELECTIONS, select_rope_pairs, validate_rope_dim

register_auto_classes()

__all__ = [
    "FACTORIZATIONS",
    "LADDER_SELECTIONS",
    "LATENT_SDPA",
    "MLA_FAMILIES",
    "MLA_MODEL_TYPE",
    "RANK_ALLOCATIONS",
    "ROPE_SELECTIONS",
    "JointKV",
    "MLAAttention",
    "MLAConfig",
    "MLAForCausalLM",
    "MLALayerWeights",
    "MLAModel",
    "allocate_ranks",
    "convert_to_mla",
    "joint_kv",
    "max_kv_lora_rank",
    "register_auto_classes",
    "select_rope_pairs",
    "validate_mla_options",
    "validate_rope_dim",
]
