"""Sequential calibration: layer l calibrated on the inputs that the already converted layers 0..l-1 produce.

Activation-aware steps (the ``pca`` latent, the rope-key mixing) fit each layer to the activations it will see.
Calibrated on the original model, layer l is fitted to inputs x_o that the converted model never produces: every
converted layer before it drifts the residual stream. Here the calibration windows are carried through the model
once, layer by layer: layer l's inputs x_s are taken from the converted prefix, layer l is converted on them, then
run to give layer l + 1's inputs (TransMLA fits its PCA on the RoPE-reduced model for the same reason).

Input correction (optional, closed form): with both x_o (the original model's inputs of layer l, same tokens) and
x_s, the least-squares map shrunk toward the identity, C = argmin E|x_o - C x_s|^2 + lambda |C - I|^2 =
(E[x_o x_s^T] + lambda I) (E[x_s x_s^T] + lambda I)^-1 (lambda relative to the mean diagonal; C = I when x_s = x_o,
and directions the calibration text never excites are left alone) turns every projection W that reads the layer's input into W C before conversion,
so the converted layer's queries, keys and values on the drifted inputs best match the original layer's on the
original inputs. Linear (no bias), so a bias-free source stays bias-free and exportable.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ...adapters import get_adapter
from ...io.text import windows


def input_correction(source: torch.Tensor, target: torch.Tensor, ridge: float = 1e-4) -> torch.Tensor:
    """C [hidden, hidden] (float64) with target ~ C source in least squares, shrunk toward I (module docstring);
    source, target [N, hidden]."""
    xs, xo = source.double(), target.double()
    gram = xs.T @ xs
    shrink = ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
    return torch.linalg.solve(gram + shrink, xs.T @ xo + shrink).T


@torch.no_grad()
def correct_inputs(attention: nn.Module, correction: torch.Tensor) -> None:
    """Replace the q/k/v projection weights W of a Llama-style attention by W C, in place."""
    for proj in (attention.q_proj, attention.k_proj, attention.v_proj):
        proj.weight.copy_((proj.weight.double() @ correction).to(proj.weight.dtype))


def _one_layer_model(model: nn.Module, idx: int) -> nn.Module:
    """A copy of ``model`` holding only decoder layer ``idx`` (as layer 0), for converting that layer alone."""
    layers = model.model.layers
    model.model.layers = nn.ModuleList()
    try:
        single = copy.deepcopy(model)
    finally:
        model.model.layers = layers
    single.model.layers = nn.ModuleList([copy.deepcopy(layers[idx])])
    single.config.num_hidden_layers = 1
    if getattr(single.config, "layer_types", None):
        single.config.layer_types = single.config.layer_types[idx : idx + 1]
    single.model.layers[0].self_attn.layer_idx = 0
    return single


@torch.no_grad()
def sequential_calibration(
    model: nn.Module,
    convert_layer,
    token_ids: torch.Tensor,
    window: int,
    targets: list[torch.Tensor] | None = None,
    ridge: float = 1e-4,
) -> list[torch.Tensor]:
    """Per layer, the attention inputs [N, hidden] (float32) produced by the converted layers before it.

    model: the source Llama-style causal LM (left unconverted; with ``targets`` its q/k/v weights get the input
    correction in place, since they are about to be converted). convert_layer(one_layer_model, inputs) converts a
    one-layer copy in place (``convert_to_mla`` with the same options). token_ids [N] cut into full windows of
    ``window`` tokens (a shorter last window is dropped); targets: the original model's inputs for the same rows
    (``collect_attention_inputs(model, token_ids, window)``), or None for no correction.
    """
    chunks = [c for c in windows(token_ids, window) if c.numel() == window]
    if not chunks:
        raise ValueError(f"sequential calibration needs at least {window} calibration tokens")
    ids = torch.stack(chunks).to(model.device)
    rows = ids.numel()
    implementation = model.config._attn_implementation
    backbone = model.model
    hidden = backbone.embed_tokens(ids)
    positions = torch.arange(ids.shape[1], device=ids.device)[None].expand(len(ids), -1)
    position_embeddings = backbone.rotary_emb(hidden, positions)
    attention = get_adapter(model).attention_modules(model)
    inputs = []
    for idx, layer in enumerate(backbone.layers):
        x = layer.input_layernorm(hidden)
        inputs.append(x.reshape(rows, -1).float().cpu())
        if targets is not None:
            correct_inputs(attention[idx], input_correction(inputs[-1], targets[idx][:rows], ridge).to(x.device))
        single = _one_layer_model(model, idx)
        single.config._attn_implementation = "sdpa"
        convert_layer(single, [inputs[-1]])
        converted = single.model.layers[0]
        converted.self_attn.layer_idx = idx
        converted.self_attn.config._attn_implementation = "sdpa"
        out = converted(hidden, position_embeddings=position_embeddings, attention_mask=None)
        hidden = out[0] if isinstance(out, tuple) else out
    model.config._attn_implementation = implementation
    return inputs


def convert_to_mla_calibrated(
    model: nn.Module, options, token_ids: torch.Tensor, window: int, original: list[torch.Tensor] | None = None
):
    """``convert_to_mla(model, options, calibration=...)`` calibrated on ``token_ids`` in ``options``'s order
    (``calibration_order``: ``sequential`` with the input correction when ``input_correction``, or ``original``:
    every layer on the unconverted model's activations). original: those activations when already collected
    (``collect_attention_inputs(model, token_ids, window)``). Returns the conversion report."""
    from ..calibration import collect_attention_inputs
    from .convert import convert_to_mla, resolve_kv_budget

    options = resolve_kv_budget(model.config, options)
    if original is None:
        original = collect_attention_inputs(model, token_ids, window=window)
    if options.calibration_order == "original":
        return convert_to_mla(model, options, calibration=original)
    inputs = sequential_calibration(
        model,
        lambda single, rows: convert_to_mla(single, copy.deepcopy(options), calibration=rows),
        token_ids,
        window,
        targets=original if options.input_correction else None,
    )
    report = convert_to_mla(model, options, calibration=inputs)
    report.details.update(calibration_order="sequential", input_correction=options.input_correction)
    return report
