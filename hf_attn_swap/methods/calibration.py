"""Calibration activations: what each attention layer actually sees on real text.

Activation-aware methods (GQA grouping/fitting, MLA PCA/whitened SVD) need, per layer, the hidden states that
enter the attention module (after the layer's input norm). They are captured with forward pre-hooks, either during
ordinary forwards of the unmodified model (``collect_calibration``: every layer sees the original model's
activations), or layer by layer while converting (``CalibrationText`` with ``hf_attn_swap.methods.layerwise``:
``sequential`` mode calibrates layer l on the outputs of the already-converted layers 0..l-1).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..adapters import get_adapter
from ..io.text import load_token_ids, resolve_text_files, windows
from .options import check_int, option

#: where layer l's calibration inputs come from (see the module docstring)
CALIBRATION_MODES = ("sequential", "original")


@dataclass
class CalibrationConfig:
    """Calibration text for activation-aware conversions (GQA ``group``/``align``/``fit``..., MLA ``pca`` and the
    ``norm`` rope selection): which text, how much of it, and how it is cut into forwards. One set of defaults for
    ``convert_checkpoint``, ``hf-attn-swap convert``/``demo`` and the recipes."""

    calibration_data: list[str] | None = option(
        None,
        "calibration text files or folders (MLA and demo default: the Python library reference, disjoint from the "
        "eval text; the calibrated GQA methods need it given)",
        metavar="FILE",
    )
    calibration_tokens: int = option(8192, "calibrate on the first N tokens of the calibration text")
    calibration_window: int = option(512, "tokens per forward while collecting calibration activations")
    calibration_mode: str | None = option(
        None,
        "sequential: layer l is calibrated on the outputs of the already-converted layers 0..l-1; original: on the "
        "unmodified model's activations; unset: the best measured per target (sequential for MLA, original for GQA)",
    )

    def resolved_mode(self, mla: bool) -> str:
        """The mode used: the one set, else ``sequential`` for MLA and ``original`` for GQA (README: best measured;
        sequential calibration makes GQA ``fit`` slightly worse on SmolLM2, 85.66 vs 80.78)."""
        return self.calibration_mode or ("sequential" if mla else "original")

    def __post_init__(self):
        if self.calibration_mode is not None and self.calibration_mode not in CALIBRATION_MODES:
            raise ValueError(
                f"unknown calibration mode {self.calibration_mode!r}; choose one of {', '.join(CALIBRATION_MODES)}"
            )
        if isinstance(self.calibration_data, (str, Path)):
            self.calibration_data = [str(self.calibration_data)]
        for name in ("calibration_tokens", "calibration_window"):
            check_int(name, getattr(self, name), minimum=1)


@dataclass
class Calibration:
    """What activation-aware converters learn from calibration text, per attention layer (rows aligned).

    inputs: [N, hidden] hidden states entering the attention module.
    key_weights: [N] attention each row receives as a key: summed over the queries of its window, averaged
        over heads (mean 1 over a window), or None when not collected.
    """

    inputs: list[torch.Tensor]
    key_weights: list[torch.Tensor] | None = None


@dataclass
class CalibrationText:
    """Calibration for a layer-by-layer conversion: the text itself, run through the layers as they are converted.

    token_ids: [N] calibration tokens, cut into forwards of ``window`` tokens (``io.text.windows``).
    mode: ``sequential`` (layer l sees the outputs of the converted layers 0..l-1) or ``original`` (the
        unmodified layers' outputs: the same inputs ``collect_calibration`` records).
    """

    token_ids: torch.Tensor
    window: int = CalibrationConfig.calibration_window
    mode: str = "sequential"

    def __post_init__(self):
        if self.mode not in CALIBRATION_MODES:
            raise ValueError(
                f"unknown calibration mode {self.mode!r}; choose one of {', '.join(CALIBRATION_MODES)}"
            )
        if self.token_ids.ndim != 1 or len(self.token_ids) == 0:
            raise ValueError("token_ids must be a non-empty 1-D tensor of token ids")


@torch.inference_mode()
def collect_calibration(
    model: nn.Module,
    token_ids: torch.Tensor,
    window: int = CalibrationConfig.calibration_window,
    max_rows: int | None = None,
    key_weights: bool = False,
) -> Calibration:
    """Run ``token_ids`` cut into windows through the unmodified model and record, per layer, the attention
    inputs (float32, CPU) and, with ``key_weights``, the attention each token receives (one eager forward with
    ``output_attentions``; the model's attention implementation is restored after).

    ``max_rows`` keeps an evenly spaced subset of the N = len(token_ids) rows to bound memory.
    """
    attention = get_adapter(model).attention_modules(model)
    captured: list[list[torch.Tensor]] = [[] for _ in attention]
    received: list[list[torch.Tensor]] = [[] for _ in attention]

    def make_hook(idx):
        def hook(module, args, kwargs):
            hidden = kwargs.get("hidden_states", args[0] if args else None)
            captured[idx].append(hidden.detach().reshape(-1, hidden.shape[-1]).float().cpu())

        return hook

    handles = [
        attn.register_forward_pre_hook(make_hook(i), with_kwargs=True) for i, attn in enumerate(attention)
    ]
    implementation = model.config._attn_implementation
    try:
        if key_weights:
            model.set_attn_implementation("eager")
        for chunk in windows(token_ids, window):
            out = model(
                input_ids=chunk.unsqueeze(0).to(model.device), use_cache=False, output_attentions=key_weights
            )
            if key_weights:
                probs = getattr(out, "attentions", None)
                if not probs or len(probs) != len(attention) or any(p is None for p in probs):
                    raise ValueError(
                        f"{type(model).__name__} does not return attention probabilities: collect with key_weights=False"
                    )
                for idx, p in enumerate(probs):  # [1, H, T_query, T_key] -> [T_key]
                    received[idx].append(p[0].float().sum(-2).mean(0).cpu())
    finally:
        for h in handles:
            h.remove()
        if key_weights:
            model.set_attn_implementation(implementation)
    inputs = [torch.cat(rows) for rows in captured]
    weights = [torch.cat(rows) for rows in received] if key_weights else None
    if max_rows is not None and inputs and inputs[0].shape[0] > max_rows:
        keep = torch.linspace(0, inputs[0].shape[0] - 1, max_rows).round().long()
        inputs = [x[keep] for x in inputs]
        weights = None if weights is None else [w[keep] for w in weights]
    return Calibration(inputs, weights)


def collect_attention_inputs(
    model: nn.Module,
    token_ids: torch.Tensor,
    window: int = CalibrationConfig.calibration_window,
    max_rows: int | None = None,
) -> list[torch.Tensor]:
    """Per layer, the attention inputs [N, hidden] (float32, CPU) for ``token_ids`` cut into windows.

    ``max_rows`` keeps an evenly spaced subset of the N = len(token_ids) rows to bound memory.
    """
    return collect_calibration(model, token_ids, window, max_rows).inputs


def require_calibration_files(paths, method: str = "this method"):
    """The calibration text files at ``paths``; a ``ValueError`` naming ``--calibration-data`` when none given."""
    if not paths:
        raise ValueError(
            f"{method} needs calibration text: pass --calibration-data FILE... (e.g. the default corpus "
            "/usr/share/doc/python3.11/html/_sources/library, disjoint from the eval text)"
        )
    return resolve_text_files(paths)


def collect_calibration_from_files(
    model: nn.Module,
    tokenizer,
    paths,
    max_tokens: int = CalibrationConfig.calibration_tokens,
    window: int = CalibrationConfig.calibration_window,
    key_weights: bool = False,
) -> Calibration:
    """``collect_calibration`` on the first ``max_tokens`` tokens of the text files at ``paths``."""
    require_calibration_files(paths)
    ids = load_token_ids(tokenizer, paths, max_tokens)
    return collect_calibration(model, ids, window=window, key_weights=key_weights)
