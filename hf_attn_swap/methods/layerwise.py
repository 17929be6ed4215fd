"""Layer-by-layer conversion: one decoder layer in memory at a time, calibration carried from layer to layer.

The one loop (``convert_layers``) behind both the in-memory API (``convert_to_mla`` / ``convert_to_gqa`` with a
``CalibrationText``, through ``convert_model_layerwise``) and ``hf-attn-swap convert`` on checkpoints larger than
memory. It reads decoder layers from a ``LayerSource`` (``ModelSource``: a loaded model; ``CheckpointSource``: a
checkpoint folder, one layer's tensors at a time) and rewrites them with a ``LayerConversion`` (``MLAConversion``,
``GQAConversion``). Per layer l:

1. ``source.layer(l)``: the decoder layer;
2. its attention inputs on the carried calibration hidden states h_l [windows, T, hidden] (a forward pre-hook on
   the attention, the rest of the layer skipped; with ``uses_key_weights`` one eager attention forward for the
   attention each token receives; with ``output_correction`` also the attention's outputs);
3. ``conversion.convert(l, layer, inputs, key_weights)``: the method's per-layer math, which rewrites the layer in
   place; with ``output_correction``, its o_proj is then refitted to the source attention's outputs
   (``refit_output_projection``);
4. h_{l+1} = layer(h_l): the converted layer in ``sequential`` mode (layer l+1 is calibrated on what the converted
   layers 0..l produce), the original one, in step 2, in ``original`` mode (the inputs ``collect_calibration``
   records, bit for bit: eager attention throughout when key weights are collected, as there);
5. ``on_layer(l, layer, h_{l+1})``: the caller saves or keeps the layer, and may checkpoint h_{l+1}.

Memory: one layer, h (tokens x hidden in the compute dtype) and the method's per-layer statistics.
Forwards run on the layers' device in their dtype; the methods' decompositions run in float64 on that device too,
or on the CPU where it has no float64 (``methods.device.math_device``).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from ..adapters import check_full_attention, get_adapter
from ..io.shards import CheckpointReader, layer_names
from ..io.text import windows
from .calibration import CalibrationText
from .device import math_device
from .report import ConversionReport, model_dtype

#: families whose decoder layers run alone here: ``layer(h, position_embeddings=rotary(h, positions))`` after a
#: plain token embedding (Gemma scales its embeddings, BERT/GPT-2/OPT/Falcon have other layer signatures)
LAYERWISE_FAMILIES = ("llama", "mistral", "qwen2", "qwen3")


class _Captured(Exception):
    """Raised by the capture hooks to skip the rest of a layer once its attention inputs are recorded."""


def check_layerwise(config) -> None:
    """``ValueError`` naming the fix when ``config``'s decoder layers cannot be run one at a time here."""
    family = get_adapter(config).family
    if family not in LAYERWISE_FAMILIES:
        raise ValueError(
            f"layer-by-layer conversion supports {', '.join(LAYERWISE_FAMILIES)}, not {family!r}: calibrate with "
            "the whole model instead (calibration=collect_calibration(model, token_ids))"
        )
    check_full_attention(config, "layer-by-layer conversion")


class LayerSource(Protocol):
    """Where ``convert_layers`` reads decoder layers from (``ModelSource``, ``CheckpointSource``).

    config: the source model's config; num_layers; rotary: its rotary embedding module (called as
    ``rotary(h, positions)``); dtype / device: what the layers compute in."""

    config: object
    num_layers: int
    rotary: nn.Module
    dtype: torch.dtype
    device: torch.device

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """[T] token ids -> [T, hidden] input embeddings (layer 0's inputs)."""

    def layer(self, idx: int) -> nn.Module:
        """Decoder layer ``idx`` (the model's own, or a fresh copy built from its tensors)."""

    def release(self, idx: int, layer: nn.Module) -> None:
        """Take back layer ``idx`` once converted (a model keeps it; a checkpoint frees it)."""


class LayerConversion(Protocol):
    """A method applied one decoder layer at a time (``MLAConversion``, ``GQAConversion``).

    needs_calibration: it needs calibration inputs; uses_key_weights: it also reads the attention each
    calibration token receives as a key; output_correction: ``convert_layers`` refits each converted layer's
    o_proj to the source attention's outputs."""

    needs_calibration: bool
    uses_key_weights: bool
    output_correction: bool

    def convert(
        self, idx: int, layer: nn.Module, inputs: torch.Tensor | None, key_weights: torch.Tensor | None
    ) -> nn.Module:
        """Rewrite decoder ``layer`` in place (inputs [N, hidden], key_weights [N], or None) and return it."""

    def records(self) -> dict:
        """What was recorded of the layers converted so far, as JSON (a resumed run ``restore``s it)."""

    def restore(self, records: dict) -> None:
        """Take back ``records`` of an interrupted run before converting its remaining layers."""

    def report(self, dtype: torch.dtype) -> ConversionReport:
        """What the conversion did (every layer converted), KV bytes per token for ``dtype``."""

    def saved_config(self):
        """The config a folder of the converted model is saved with (every layer converted)."""

    def finish_model(self, model: nn.Module) -> None:
        """Make a loaded ``model`` whose layers were all converted consistent (config, classes, head counts)."""


def _causal_mask(length: int, dtype: torch.dtype, device) -> torch.Tensor:
    """[1, 1, T, T] additive causal mask (what transformers builds for eager attention)."""
    mask = torch.full((length, length), torch.finfo(dtype).min, dtype=dtype, device=device).triu(1)
    return mask[None, None]


def _call_layer(layer: nn.Module, hidden: torch.Tensor, rotary: nn.Module) -> torch.Tensor:
    """One decoder layer on one window [1, T, hidden], called the way the model's forward calls it (sdpa: no
    mask, causal by itself; other implementations: transformers' additive causal mask)."""
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    embeddings = rotary(hidden, positions[None])
    causal = layer.self_attn.config._attn_implementation in ("sdpa", "latent_sdpa")
    out = layer(
        hidden,
        attention_mask=None if causal else _causal_mask(hidden.shape[1], hidden.dtype, hidden.device),
        position_ids=positions[None],
        position_embeddings=embeddings,
        use_cache=False,
        cache_position=positions,
    )
    return out[0] if isinstance(out, tuple) else out


@dataclass
class Captured:
    """What ``capture_attention_inputs`` recorded of one layer on the calibration windows (rows aligned).

    inputs [N, hidden] float32 CPU: the attention inputs; key_weights [N] or None: the attention each row receives
    as a key; attention_outputs [N, hidden] float32 CPU or None: the attention module's outputs (after o_proj);
    outputs: the layer's outputs per window (the next layer's inputs) or None.
    """

    inputs: torch.Tensor
    key_weights: torch.Tensor | None = None
    attention_outputs: torch.Tensor | None = None
    outputs: list[torch.Tensor] | None = None


@torch.no_grad()
def capture_attention_inputs(
    layer: nn.Module,
    stream: list[torch.Tensor],
    rotary: nn.Module,
    key_weights: bool = False,
    outputs: bool = False,
    attention_outputs: bool = False,
) -> Captured:
    """The attention inputs of ``layer`` on the windows of ``stream``, and on request (``Captured``):

    ``key_weights``: the attention each token receives as a key (``Calibration.key_weights``), from an eager
    forward (as ``collect_calibration`` does); ``attention_outputs``: the attention module's outputs;
    ``outputs``: the layer's outputs (the next layer's inputs). The layer stops as soon as what is asked for is
    recorded (after its attention inputs, or after its attention, unless ``outputs``)."""
    attn = layer.self_attn
    rows, received, attended, results = [], [], [], []
    after_attention = key_weights or attention_outputs

    def pre_hook(module, args, kwargs):
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        rows.append(hidden.detach().reshape(-1, hidden.shape[-1]).float().cpu())
        if not (after_attention or outputs):
            raise _Captured

    def hook(module, args, kwargs, output):
        if attention_outputs:
            attended.append(output[0].detach().reshape(-1, output[0].shape[-1]).float().cpu())
        if key_weights:
            probs = output[1]
            if probs is None:
                raise ValueError(
                    f"{type(module).__name__} returns no attention probabilities: use another method"
                )
            received.append(probs[0].float().sum(-2).mean(0).cpu())  # [H, T_query, T_key] -> [T_key]
        if not outputs:  # the rest of the layer (its MLP) is not needed
            raise _Captured

    handles = [attn.register_forward_pre_hook(pre_hook, with_kwargs=True)]
    config = attn.config
    implementation = config._attn_implementation
    if after_attention:
        handles.append(attn.register_forward_hook(hook, with_kwargs=True))
    if key_weights:
        config._attn_implementation = "eager"
    try:
        for hidden in stream:
            try:
                results.append(_call_layer(layer, hidden, rotary))
            except _Captured:
                pass
    finally:
        for handle in handles:
            handle.remove()
        config._attn_implementation = implementation
    return Captured(
        torch.cat(rows),
        torch.cat(received) if key_weights else None,
        torch.cat(attended) if attention_outputs else None,
        results if outputs else None,
    )


@torch.no_grad()
def refit_output_projection(
    layer: nn.Module,
    stream: list[torch.Tensor],
    rotary: nn.Module,
    targets: torch.Tensor,
    ridge: float = 1e-3,
) -> None:
    """Output correction: refit the converted layer's ``o_proj`` so that its attention reproduces ``targets``
    [N, hidden] (the source layer's attention outputs on the same windows of ``stream``), by ridge least squares:
    with A [N, H d_v] the per-head attention outputs entering o_proj and Y = targets - bias,
    W_O = Y^T A (A^T A + λ I)^-1, λ = ``ridge`` x mean diag(A^T A) (float64, on the layer's math device; A^T A
    and A^T Y accumulated window by window). Exact in every format: o_proj stays one linear map."""
    o_proj = layer.self_attn.o_proj
    device = math_device(o_proj.weight.device)
    bias = None if o_proj.bias is None else o_proj.bias.to(device=device, dtype=torch.float64)
    sums = {"gram": 0.0, "cross": 0.0, "rows": 0}  # A^T A and A^T Y, accumulated window by window

    def pre_hook(module, args):
        a = args[0].detach().reshape(-1, args[0].shape[-1]).to(device=device, dtype=torch.float64)
        start = sums["rows"]
        y = targets[start : start + len(a)].to(device=device, dtype=torch.float64)
        sums["gram"] = sums["gram"] + a.T @ a
        sums["cross"] = sums["cross"] + a.T @ (y if bias is None else y - bias)
        sums["rows"] = start + len(a)
        raise _Captured

    handle = o_proj.register_forward_pre_hook(pre_hook)
    try:
        for hidden in stream:
            try:
                _call_layer(layer, hidden, rotary)
            except _Captured:
                pass
    finally:
        handle.remove()
    if sums["rows"] != len(targets):
        raise ValueError(f"o_proj saw {sums['rows']} rows for {len(targets)} targets")
    gram = sums["gram"]
    gram.diagonal().add_(ridge * gram.diagonal().mean())
    weight = torch.linalg.solve(gram, sums["cross"]).T  # [hidden, H d_v]
    o_proj.weight.copy_(weight.to(o_proj.weight.dtype))


@torch.no_grad()
def run_layer(layer: nn.Module, stream: list[torch.Tensor], rotary: nn.Module) -> list[torch.Tensor]:
    """``layer`` applied to every window of ``stream``: the next layer's inputs."""
    return [_call_layer(layer, hidden, rotary) for hidden in stream]


# -- where the layers come from ---------------------------------------------------------------------------------
class ModelSource:
    """The decoder layers of a loaded model (converted in place): a ``LayerSource``."""

    def __init__(self, model: nn.Module):
        check_layerwise(model.config)
        self.model = model
        self.config = model.config
        self.num_layers = len(model.model.layers)
        self.rotary = model.model.rotary_emb
        ref = model.model.embed_tokens.weight
        self.dtype, self.device = ref.dtype, ref.device

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        return self.model.model.embed_tokens(token_ids.to(self.device))

    def layer(self, idx: int) -> nn.Module:
        return self.model.model.layers[idx]

    def release(self, idx: int, layer: nn.Module) -> None:
        self.model.model.layers[idx] = layer


class CheckpointSource:
    """The decoder layers of a checkpoint folder, each built from its own tensors only: a ``LayerSource``.

    The model is instantiated on the meta device (no memory); ``layer(l)`` materialises a copy of decoder layer
    l from the ``model.layers.<l>.*`` tensors (``CheckpointReader``), in ``dtype`` on ``device``.
    """

    def __init__(self, folder, config, dtype: torch.dtype, device: str | torch.device = "cpu"):
        from transformers import AutoModelForCausalLM

        check_layerwise(config)
        self.config = copy.deepcopy(config)
        self.config._attn_implementation = "sdpa"
        self.reader = CheckpointReader(folder)
        self.dtype, self.device = dtype, torch.device(device)
        with torch.device("meta"):
            self.skeleton = AutoModelForCausalLM.from_config(self.config, dtype=dtype)
        self.num_layers = len(self.skeleton.model.layers)
        self.rotary = type(self.skeleton.model.rotary_emb)(config=self.config).to(self.device)
        self.layer_tensors = layer_names(self.reader.keys())
        if sorted(self.layer_tensors) != list(range(self.num_layers)):
            raise ValueError(
                f"{str(folder)!r}: expected tensors model.layers.0..{self.num_layers - 1}.*, found layers "
                f"{sorted(self.layer_tensors)[:5]}...: re-save the model with save_pretrained"
            )
        self.embedding_name = "model.embed_tokens.weight"

    def other_tensors(self) -> list[str]:
        """Names outside the decoder layers (embeddings, final norm, head): copied through unchanged."""
        inside = {n for names in self.layer_tensors.values() for n in names}
        return [n for n in self.reader.keys() if n not in inside]

    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        rows = self.reader.rows(self.embedding_name, token_ids)  # never the whole table
        return rows.to(device=self.device, dtype=self.dtype)

    def layer(self, idx: int) -> nn.Module:
        prefix = f"model.layers.{idx}."
        tensors = self.reader.read(self.layer_tensors[idx])
        state = {name[len(prefix) :]: t.to(self.dtype) for name, t in tensors.items()}
        layer = copy.deepcopy(self.skeleton.model.layers[idx])
        layer.load_state_dict(state, strict=True, assign=True)
        return layer.to(self.device).eval()

    def release(self, idx: int, layer: nn.Module) -> None:
        pass


def _libc():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "mallopt") and hasattr(libc, "malloc_trim") else None
    except OSError:
        return None


def tune_allocator() -> None:
    """glibc: serve allocations of 1 MiB and more with their own mappings, so every freed layer goes back to the
    system (by default glibc raises that threshold as large blocks are freed and then keeps them in its heap,
    where a conversion that allocates and frees each layer's tensors grows by fragmentation). No-op elsewhere."""
    libc = _libc()
    if libc is not None:
        libc.mallopt(-3, 2**20)  # M_MMAP_THRESHOLD


def release_memory() -> None:
    """Return the heap's free pages to the system (glibc ``malloc_trim``; no-op elsewhere)."""
    libc = _libc()
    if libc is not None:
        libc.malloc_trim(0)


def resident_memory() -> int:
    """Bytes of this process's resident memory now (``/proc/self/statm``; peak ``ru_maxrss`` elsewhere)."""
    try:
        import os

        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- the loop -------------------------------------------------------------------------------------------------
def initial_stream(source, calibration: CalibrationText) -> list[torch.Tensor]:
    """The calibration windows embedded: layer 0's inputs, [1, T, hidden] each."""
    return [source.embed(chunk).unsqueeze(0) for chunk in windows(calibration.token_ids, calibration.window)]


def convert_model_layerwise(
    model: nn.Module, conversion: LayerConversion, calibration: CalibrationText
) -> ConversionReport:
    """Convert a loaded ``model`` in place layer by layer on ``calibration`` (``convert_layers`` over its own
    layers); returns the conversion's report, with the calibration mode."""
    with torch.no_grad():
        convert_layers(ModelSource(model), conversion, calibration, lambda idx, layer, following: None)
    conversion.finish_model(model)
    report = conversion.report(model_dtype(model))
    report.details["calibration_mode"] = calibration.mode
    return report


def convert_layers(
    source: LayerSource,
    conversion: LayerConversion,
    calibration: CalibrationText | None,
    on_layer: Callable[[int, nn.Module, list[torch.Tensor] | None], None],
    start: int = 0,
    stream: list[torch.Tensor] | None = None,
    progress: bool = False,
) -> None:
    """Convert ``source``'s layers ``start``.. in order (module docstring); ``stream``: layer ``start``'s
    calibration inputs when resuming (else computed from the text)."""
    from tqdm.auto import tqdm

    if calibration is not None and stream is None:
        stream = initial_stream(source, calibration)
    if calibration is None:
        stream = None
    n = source.num_layers
    bar = tqdm(range(start, n), desc="convert", unit="layer", disable=not progress, initial=start, total=n)
    for idx in bar:
        began = time.perf_counter()
        layer = source.layer(idx)
        inputs = key_weights = following = captured = None
        correct = False
        more = stream is not None and idx < n - 1
        if stream is not None:  # original mode: the original layer's outputs come with its inputs
            original = more and calibration.mode == "original"
            correct = conversion.output_correction
            captured = capture_attention_inputs(
                layer, stream, source.rotary, conversion.uses_key_weights, original, correct
            )
            inputs, key_weights, following = captured.inputs, captured.key_weights, captured.outputs
        layer = conversion.convert(idx, layer, inputs, key_weights)
        if stream is not None and correct:
            refit_output_projection(layer, stream, source.rotary, captured.attention_outputs)
            captured = None
        if more and calibration.mode == "sequential":
            following = run_layer(layer, stream, source.rotary)
        on_layer(idx, layer, following)
        source.release(idx, layer)
        del layer, inputs, key_weights, captured
        release_memory()
        stream = following
        bar.set_postfix_str(
            f"{time.perf_counter() - began:.1f} s/layer, RSS {resident_memory() / 2**30:.2f} GiB",
            refresh=False,
        )
    bar.close()
