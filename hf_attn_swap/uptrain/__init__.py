"""Uptraining a converted checkpoint on local text: ``uptrain(UptrainConfig(...))``.

Modes (one small file each): ``full`` (next-token loss), ``lora`` (peft adapters on the converted attention,
merged on save), ``distill`` (KL to the original model's logits), ``layerwise`` (each converted attention
layer regresses the original layer's attention output on the original model's activations).
"""

from .base import Objective, attention_modules, set_trainable
from .config import UptrainConfig
from .run import MODES, uptrain

__all__ = ["MODES", "Objective", "UptrainConfig", "attention_modules", "set_trainable", "uptrain"]
