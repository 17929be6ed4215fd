"""hf_attn_swap: attention surgery for Hugging Face transformers.

``import hf_attn_swap`` registers the package's attention implementations, mask functions and Auto classes.
"""

from .versions import check_transformers_version

check_transformers_version()  # before anything below touches transformers' moving parts

from . import models  # noqa: F401  registers the plugin Auto classes (GPT-2, GPT-NeoX, OPT, Falcon, BERT)
from .architectures import UnsupportedArchitectureError, get_adapter, supported_model_types
from .attention import register_latent_sdpa
from .cache import LatentCache
from .gqa import convert_to_gqa
from .mla import convert_to_mla
from .report import ConversionReport

register_latent_sdpa()

__version__ = "0.1.0"

__all__ = [
    "ConversionReport",
    "LatentCache",
    "UnsupportedArchitectureError",
    "convert_to_gqa",
    "convert_to_mla",
    "get_adapter",
    "supported_model_types",
]
