"""``layerwise``: each converted attention layer learns to reproduce the ORIGINAL model's attention output.

Per batch, the original (teacher) model runs once without gradients while hooks record, for every layer l,
the hidden states entering its attention x_l [B, T, hidden] (after the layer's input norm) and the attention
output y_l [B, T, hidden]. The converted model then runs with each attention module's input replaced by the
teacher's x_l, so every layer is trained on the original model's activations, independently of the errors of
the layers below (and in one backward pass for all layers):

    loss = mean_l  ||attn_l(x_l) - s y_l||^2 / ||s y_l||^2

s is the scale of the converted model's residual stream against the original's (``residual_scale``): a stock
``deepseek_v3`` export multiplies it by s = sqrt(1e-6 / eps_src) (0.316 for SmolLM2's eps 1e-5) so that every
norm keeps its output with DeepSeek's one eps, and its attention layers therefore write s y_l. Without s the loss
would pull every layer's output up by 1/s, which the rest of the converted model does not expect.

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


def residual_scale(model: nn.Module, teacher: nn.Module, tolerance: float = 0.05) -> float:
    """s with the model's residual stream = s x the teacher's, fitted on the input embeddings (which write it):
    s = <E_m, E_t> / <E_t, E_t>. Raises ValueError where E_m is not a scaled copy of E_t (relative residual over
    ``tolerance``): then no layer-by-layer target exists."""
    student = unwrap(model).get_input_embeddings().weight.detach().double().cpu()
    source = teacher.get_input_embeddings().weight.detach().double().cpu()
    if student.shape != source.shape:
        raise ValueError(
            f"layerwise needs the model's input embeddings shaped like the teacher's ({tuple(student.shape)} vs "
            f"{tuple(source.shape)}): use --mode distill"
        )
    scale = float((student * source).sum() / (source * source).sum().clamp_min(1e-300))
    misfit = float((student - scale * source).norm() / student.norm().clamp_min(1e-300))
    if not scale > 0 or misfit > tolerance:
        raise ValueError(
            f"layerwise needs the model's embeddings to be a scaled copy of the teacher's (best scale {scale:.4g} "
            f"leaves {misfit:.1%} of them unexplained): is --teacher the model it was converted from? Else use "
            "--mode distill"
        )
    return scale


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
    #: the converted model's residual stream over the teacher's (``residual_scale``; set by ``bind``)
    scale: float | None = None

    #: MLA (a ``kv_lora_rank`` in the config): its output correction already fits o_proj by least squares, so the
    #: loss starts low (SmolLM2 −68.75 %: 0.09-0.17) and 1e-3 only adds noise (8k tokens: KL 0.41 -> 0.43 on 256
    #: tutorial tokens), while 1e-4 lowers it (32k tokens: loss 0.166 -> 0.135, KL 0.41 -> 0.39)
    mla_learning_rate = 1e-4

    def learning_rate_for(self, model_config):
        return self.mla_learning_rate if model_config.get("kv_lora_rank") else self.default_learning_rate

    def bind(self, model, teacher):
        self.scale = residual_scale(model, teacher)

    def loss(self, model, input_ids, teacher, config):
        if self.scale is None:
            self.bind(model, teacher)
        inputs, targets = capture_attention(teacher, input_ids)
        targets = [self.scale * t for t in targets]
        predictions, logits = attention_on_inputs(
            model, input_ids, inputs, skip_mlps=self.skip_mlps, return_logits=True
        )
        loss = torch.stack([relative_mse(p, t) for p, t in zip(predictions, targets, strict=True)]).mean()
        return loss + 0.0 * logits.float().sum() if self.through_output else loss
