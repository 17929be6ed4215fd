"""``layerwise``: each converted attention layer learns to reproduce the ORIGINAL model's attention output.

Per batch, the original (teacher) model runs once without gradients while hooks record, for every layer l,
the hidden states entering its attention x_l [B, T, hidden] (after the layer's input norm) and the attention
output y_l [B, T, hidden]. The converted model then runs with each attention module's input replaced by the
teacher's x_l, so every layer is trained on the original model's activations, independently of the errors of
the layers below (and in one backward pass for all layers):

    loss = mean_l  ||attn_l(x_l) - y_l||^2 / ||y_l||^2

Only attention parameters train; the student's own rotary embeddings and mask are used, so the converted
attention may have any form (fewer KV heads, MLA). Its MLPs are skipped (their output is unused).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from .base import Objective, attention_modules, unwrap


class _Zero(nn.Module):
    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states)


@contextmanager
def mlps_skipped(model: nn.Module):
    """Temporarily replace every decoder layer's ``mlp`` by zeros (only attention outputs are needed)."""
    layers = [m for m in model.modules() if isinstance(getattr(m, "self_attn", None), nn.Module)]
    saved = [(layer, layer.mlp) for layer in layers if isinstance(getattr(layer, "mlp", None), nn.Module)]
    try:
        for layer, _ in saved:
            layer.mlp = _Zero()
        yield
    finally:
        for layer, mlp in saved:
            layer.mlp = mlp


def _hidden_states(args, kwargs):
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


@contextmanager
def _hooks(modules, pre=None, post=None):
    with ExitStack() as stack:
        for idx, module in enumerate(modules):
            if pre is not None:
                h = module.register_forward_pre_hook(pre(idx), with_kwargs=True)
                stack.callback(h.remove)
            if post is not None:
                h = module.register_forward_hook(post(idx))
                stack.callback(h.remove)
        yield


@torch.no_grad()
def capture_attention(model: nn.Module, input_ids: torch.Tensor):
    """Per layer, (attention input, attention output), each [B, T, hidden], from one forward of ``model``."""
    attention = attention_modules(model)
    inputs, outputs = [None] * len(attention), [None] * len(attention)

    def pre(idx):
        def hook(module, args, kwargs):
            inputs[idx] = _hidden_states(args, kwargs).detach()

        return hook

    def post(idx):
        def hook(module, args, output):
            outputs[idx] = (output[0] if isinstance(output, tuple) else output).detach()

        return hook

    with _hooks(attention, pre, post):
        model(input_ids=input_ids, use_cache=False, logits_to_keep=1)
    return inputs, outputs


def attention_on_inputs(
    model: nn.Module, input_ids: torch.Tensor, inputs, skip_mlps: bool = True, return_logits: bool = False
):
    """Outputs of ``model``'s attention layers when layer l's attention input is replaced by ``inputs[l]``
    (``return_logits``: and the model's last-position logits).

    The model runs normally otherwise (its own rotary embeddings and masks); gradients flow to the attention
    parameters only through these outputs.
    """
    attention = attention_modules(unwrap(model))
    if len(attention) != len(inputs):
        raise ValueError(
            f"the converted model has {len(attention)} attention layers, the original {len(inputs)}"
        )
    outputs = [None] * len(attention)

    def pre(idx):
        def hook(module, args, kwargs):
            if "hidden_states" in kwargs:
                return args, {**kwargs, "hidden_states": inputs[idx]}
            return (inputs[idx], *args[1:]), kwargs

        return hook

    def post(idx):
        def hook(module, args, output):
            outputs[idx] = output[0] if isinstance(output, tuple) else output

        return hook

    with ExitStack() as stack:
        stack.enter_context(_hooks(attention, pre, post))
        if skip_mlps:
            stack.enter_context(mlps_skipped(unwrap(model)))
        logits = model(input_ids=input_ids, use_cache=False, logits_to_keep=1).logits
    return (outputs, logits) if return_logits else outputs


def relative_mse(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """||prediction - target||^2 / ||target||^2 (scale-free, so every layer weighs the same)."""
    target = target.float()
    return (prediction.float() - target).pow(2).sum() / target.pow(2).sum().clamp_min(1e-12)


class Layerwise(Objective):
    name = "layerwise"
    needs_teacher = True
    default_trainable = "attention"
    default_learning_rate = 1e-3
    #: replacing modules is unsafe when a wrapper (FSDP, DeepSpeed ZeRO-3) has flattened the parameters
    skip_mlps = True
    #: sharded runs: FSDP2 unshards a wrapped layer's weights for backward from a hook on the layer's
    #: *outputs*, which the loss (taken inside the layer) never reaches: a zero-weighted term on the logits
    #: sends a (zero) gradient through every layer output, so the hooks fire; the gradients are unchanged
    through_output = False

    def loss(self, model, input_ids, teacher, config):
        inputs, targets = capture_attention(teacher, input_ids)
        predictions, logits = attention_on_inputs(
            model, input_ids, inputs, skip_mlps=self.skip_mlps, return_logits=True
        )
        loss = torch.stack([relative_mse(p, t) for p, t in zip(predictions, targets, strict=True)]).mean()
        return loss + 0.0 * logits.float().sum() if self.through_output else loss
