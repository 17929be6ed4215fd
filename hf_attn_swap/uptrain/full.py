"""``full``: plain next-token cross-entropy on the training text (all weights, or ``trainable=attention``)."""

from __future__ import annotations

from .base import Objective


def next_token_loss(model, input_ids):
    """Mean cross-entropy of predicting ``input_ids[:, 1:]`` from the prefix (the model shifts labels)."""
    return model(input_ids=input_ids, labels=input_ids, use_cache=False).loss


class FullFineTune(Objective):
    name = "full"
    default_trainable = "all"
    default_learning_rate = 1e-4

    def loss(self, model, input_ids, teacher, config):
        return next_token_loss(model, input_ids)
