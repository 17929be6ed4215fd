"""``distill``: match the original (teacher) model's next-token distributions.

loss = T^2 * mean over positions of KL(softmax(z_teacher / T) || softmax(z_student / T))
       + ce_weight * cross-entropy(student, next token)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .base import Objective


def distillation_kl(student_logits, teacher_logits, temperature: float = 1.0) -> torch.Tensor:
    """[B, T, V] x2 -> scalar: temperature-scaled KL(teacher || student), mean over the B*T positions."""
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, log_target=True, reduction="none").sum(-1)
    return kl.mean() * t * t


class Distill(Objective):
    name = "distill"
    needs_teacher = True
    default_trainable = "all"
    default_learning_rate = 1e-4

    def loss(self, model, input_ids, teacher, config):
        with torch.no_grad():
            teacher_logits = teacher(input_ids=input_ids, use_cache=False).logits
        student_logits = model(input_ids=input_ids, use_cache=False).logits
        loss = distillation_kl(student_logits, teacher_logits, config.kl_temperature)
        if config.ce_weight:
            ce = F.cross_entropy(student_logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())
            loss = loss + config.ce_weight * ce
        return loss
