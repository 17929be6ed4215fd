"""``lora``: low-rank adapters (peft) on every linear layer of the converted attention, trained with
next-token cross-entropy and merged into the weights when the run finishes."""

from __future__ import annotations

from torch import nn

from .base import Objective, attention_modules
from .full import next_token_loss


def attention_linear_names(model: nn.Module) -> list[str]:
    """Full module names of the ``nn.Linear`` layers inside the attention modules (peft target_modules)."""
    inside = {id(m) for attn in attention_modules(model) for m in attn.modules() if isinstance(m, nn.Linear)}
    return [name for name, m in model.named_modules() if id(m) in inside]


class LoRA(Objective):
    name = "lora"
    default_trainable = "attention"
    default_learning_rate = 1e-3

    def prepare(self, model, config):
        from peft import LoraConfig, get_peft_model

        if config.lora_r < 1:
            raise ValueError(f"lora_r must be a positive rank, got {config.lora_r}")
        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=attention_linear_names(model),
            bias="none",
        )
        return get_peft_model(model, lora)

    def loss(self, model, input_ids, teacher, config):
        return next_token_loss(model, input_ids)

    def finalize(self, model):
        from peft import PeftModel

        return model.merge_and_unload() if isinstance(model, PeftModel) else model
