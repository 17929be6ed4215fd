"""``GQA_METHODS``: the initialisation methods by name (``convert_to_gqa(..., method=NAME)``, ``GQAConversionConfig.method``,
``hf-attn-swap convert --method NAME``); ``register_gqa_method`` adds one."""

from __future__ import annotations

from .alignment import AlignedMean
from .base import GQAMethod
from .fit import ActivationFit
from .grouping import SimilarityGrouping
from .mean import MeanPooling

GQA_METHODS: dict[str, GQAMethod] = {}


def register_gqa_method(method: GQAMethod) -> GQAMethod:
    GQA_METHODS[method.name] = method
    return method


register_gqa_method(MeanPooling())
register_gqa_method(AlignedMean())
register_gqa_method(ActivationFit())
register_gqa_method(SimilarityGrouping("group", MeanPooling(), aligned=False))
register_gqa_method(SimilarityGrouping("group-align", AlignedMean(), aligned=True))
register_gqa_method(SimilarityGrouping("group-fit", ActivationFit(), aligned=True))
