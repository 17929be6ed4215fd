"""Calibration activations: what each attention layer actually sees on real text.

Activation-aware methods (GQA grouping/fitting, MLA PCA/whitened SVD) need, per layer, the hidden states that
enter the attention module (after the layer's input norm). They are captured with forward pre-hooks during
ordinary forwards of the unmodified model.
"""

from __future__ import annotations

import torch
from torch import nn

from .architectures import get_adapter
from .data import load_token_ids, resolve_text_files
from .evaluation import windows


@torch.inference_mode()
def collect_attention_inputs(
    model: nn.Module, token_ids: torch.Tensor, window: int = 512, max_rows: int | None = None
) -> list[torch.Tensor]:
    """Per layer, the attention inputs [N, hidden] (float32, CPU) for ``token_ids`` cut into windows.

    ``max_rows`` keeps an evenly spaced subset of the N = len(token_ids) rows to bound memory.
    """
    attention = get_adapter(model).attention_modules(model)
    captured: list[list[torch.Tensor]] = [[] for _ in attention]

    def make_hook(idx):
        def hook(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            captured[idx].append(hidden.detach().reshape(-1, hidden.shape[-1]).float().cpu())

        return hook

    handles = [
        attn.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, attn in enumerate(attention)
    ]
    try:
        for chunk in windows(token_ids, window):
            model(input_ids=chunk.unsqueeze(0).to(model.device), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    out = [torch.cat(rows) for rows in captured]
    if max_rows is not None and out and out[0].shape[0] > max_rows:
        keep = torch.linspace(0, out[0].shape[0] - 1, max_rows).round().long()
        out = [x[keep] for x in out]
    return out


def require_calibration_files(paths, method: str = "this method"):
    """The calibration text files at ``paths``; a ``ValueError`` naming ``--calibration-data`` when none given."""
    if not paths:
        raise ValueError(
            f"{method} needs calibration text: pass --calibration-data FILE... (e.g. the default corpus "
            "/usr/share/doc/python3.11/html/_sources/library, disjoint from the eval text)"
        )
    return resolve_text_files(paths)


def collect_attention_inputs_from_files(
    model: nn.Module, tokenizer, paths, max_tokens: int = 8192, window: int = 512
) -> list[torch.Tensor]:
    """``collect_attention_inputs`` on the first ``max_tokens`` tokens of the text files at ``paths``."""
    require_calibration_files(paths)
    return collect_attention_inputs(model, load_token_ids(tokenizer, paths, max_tokens), window=window)
