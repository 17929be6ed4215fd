"""``GQAConversionConfig``: the options of a GQA/MQA conversion, validated on construction.

One set of defaults for ``convert_to_gqa``, ``convert_checkpoint(..., to="gqa")``, ``hf-attn-swap convert --to
gqa`` and the recipes' ``convert:`` sections; ``convert_checkpoint`` saves it in ``conversion.json``
(``details["options"]``). What the text for the calibrated methods is lives in
``hf_attn_swap.methods.calibration.CalibrationConfig``.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..options import check_int, option
from .registry import GQA_METHODS


@dataclass
class GQAConversionConfig:
    """num_key_value_heads: KV heads after conversion (1 = MQA); it must divide the query heads and be at most
    the current KV heads, which ``convert_to_gqa`` checks against the model. method: a name in ``GQA_METHODS``."""

    num_key_value_heads: int | None = option(
        None, "KV heads after conversion (1 = MQA); must divide the query heads"
    )
    method: str = option(
        "mean",
        "initialisation method: mean, group, align, fit, group-align, group-fit (all but mean need calibration text)",
    )

    def __post_init__(self):
        check_int("num_key_value_heads", self.num_key_value_heads, optional=True)
        if self.method not in GQA_METHODS:
            raise ValueError(f"unknown GQA method {self.method!r}; choose one of {sorted(GQA_METHODS)}")

    @property
    def needs_calibration(self) -> bool:
        return GQA_METHODS[self.method].needs_calibration
