"""``ROPE_KEY_METHODS``: the rope-key methods by name (``MLAConversionConfig.rope_selection``, ``--rope-selection``);
``register_rope_key_method`` adds one."""

from __future__ import annotations

from ...adapters import AttentionLayout
from ..options import check_choice
from .freqfold import FreqFold
from .rope import RopeKeyMethod
from .selection import HighSelection, LowSelection, NormSelection, UniformSelection

ROPE_KEY_METHODS: dict[str, RopeKeyMethod] = {}


def register_rope_key_method(method: RopeKeyMethod) -> RopeKeyMethod:
    ROPE_KEY_METHODS[method.name] = method
    return method


for _method in (FreqFold(), UniformSelection(), HighSelection(), LowSelection(), NormSelection()):
    register_rope_key_method(_method)

#: the registered names, the default first
ROPE_SELECTIONS = tuple(ROPE_KEY_METHODS)
#: selections whose kept frequencies form a DeepSeek ladder (same pairs in every layer)
LADDER_SELECTIONS = tuple(name for name, method in ROPE_KEY_METHODS.items() if method.ladder)


def rope_key_method(name: str) -> RopeKeyMethod:
    """The registered method ``name``; ``ValueError`` listing the names."""
    return ROPE_KEY_METHODS[check_choice("rope selection", name, ROPE_KEY_METHODS)]


def select_rope_pairs(
    selection: str, layout: AttentionLayout, qk_rope_head_dim: int, q=None, k=None, inputs=None
) -> list[int]:
    """Sorted source pair indices the ``selection`` keeps rotary, m = d_rope / 2 of them (``freqfold``: the
    ladder its folded components turn at). q [H, D, hidden + 1], k [H_kv, D, hidden + 1], inputs
    [N, hidden + 1] (with a ones column): for ``norm`` only (weight norms without inputs)."""
    return rope_key_method(selection).select(layout, qk_rope_head_dim, q, k, inputs)
