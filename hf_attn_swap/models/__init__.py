"""Plugin model classes with grouped-query attention for families whose stock code has none.

Importing this package (``import hf_attn_swap`` does) registers each family's plugin config with
``AutoConfig`` (``model_type`` ``hf_attn_swap_<family>``) and its model classes with the matching Auto classes,
so ``AutoModelForCausalLM.from_pretrained(converted_folder)`` works.
"""

from __future__ import annotations

import transformers

from . import bert, falcon, gpt2, gpt_neox, opt

FAMILIES = {"gpt2": gpt2, "gpt_neox": gpt_neox, "opt": opt, "falcon": falcon, "bert": bert}


def _register(family) -> None:
    config_class = next(iter(family.AUTO_CLASSES.values())).config_class
    transformers.AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    for auto, model_class in family.AUTO_CLASSES.items():
        getattr(transformers, auto).register(config_class, model_class, exist_ok=True)


for _family in FAMILIES.values():
    _register(_family)
