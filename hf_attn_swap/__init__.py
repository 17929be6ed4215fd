"""hf_attn_swap: attention surgery for Hugging Face transformers.

``import hf_attn_swap`` checks the transformers version and registers the package's model classes (Auto classes),
the ``latent_sdpa`` attention implementation and its mask function. The package map is in the documentation
(docs/design/architecture.md); the names below are the public API.
"""

from .versions import check_transformers_version

check_transformers_version()  # before anything below touches transformers' moving parts

from .adapters import UnsupportedArchitectureError, get_adapter, supported_model_types
from .methods.gqa import convert_to_gqa
from .methods.mla import convert_to_mla
from .methods.report import ConversionReport
from .modeling import LatentCache, cache_kwargs, output_cache  # importing modeling registers everything
from .pipeline.convert import convert_checkpoint

__version__ = "0.1.0"

__all__ = [
    "ConversionReport",
    "LatentCache",
    "UnsupportedArchitectureError",
    "cache_kwargs",
    "convert_checkpoint",
    "convert_to_gqa",
    "convert_to_mla",
    "get_adapter",
    "output_cache",
    "supported_model_types",
]
