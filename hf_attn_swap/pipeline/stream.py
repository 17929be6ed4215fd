"""``convert`` layer by layer: checkpoints larger than memory, on any device, resumable after a kill.

``stream_checkpoint`` reads one decoder layer's tensors from the source shards (``io.shards.CheckpointReader``,
memory-mapped), converts it with the per-layer code of the in-memory API (``MLALayers`` / ``GQALayers`` in
``methods.layerwise.convert_layers``, calibration carried from layer to layer), writes its tensors to the output
shards (``io.shards.ShardWriter``) and frees it; embeddings, final norm and head are copied through at the end.
Peak memory: one layer (source and converted) + the calibration hidden states (tokens x hidden) + one output shard.

Resuming: OUT is written through ``atomic_output_dir(resume_key=...)``, whose hidden folder is named after a hash
of everything the output depends on (source files, options, text, dtype, device, shard size, versions). Before a
shard is written, the layer it ends at, the carried calibration hidden states and the methods' per-layer records
go to ``.convert-state/`` there; a rerun of the same command continues from the first layer after the last written
shard and writes the same bytes as an uninterrupted run. OUT appears only when everything is written.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import signal
from dataclasses import asdict
from pathlib import Path

import torch

from ..io.checkpoints import copy_tokenizer_files
from ..io.folders import atomic_output_dir, write_json
from ..io.shards import ShardWriter, parse_size, tensor_bytes
from ..io.text import load_token_ids
from ..methods.calibration import CalibrationConfig, CalibrationText
from ..methods.gqa import GQAConfig, GQALayers
from ..methods.layerwise import (
    LAYERWISE_FAMILIES,
    CheckpointLayers,
    convert_layers,
    initial_stream,
    tune_allocator,
)
from ..methods.mla import MLAConversionConfig, MLALayers
from ..methods.mla.convert import mla_kv_bytes_per_token
from ..methods.report import ConversionReport

STATE_DIR = ".convert-state"
#: test hook: the process kills itself (SIGKILL) when it reaches this layer, as ``kill -9`` would
KILL_AT_LAYER = "HF_ATTN_SWAP_KILL_AT_LAYER"
DEFAULT_MAX_SHARD_SIZE = "2GB"


def streaming_refusal(config, src: Path, target) -> str | None:
    """Why ``src`` cannot be converted layer by layer (then it is loaded whole), or None."""
    from ..adapters import get_adapter

    family = get_adapter(config).family
    if family not in LAYERWISE_FAMILIES:
        return f"{family} decoder layers are not run one at a time here ({', '.join(LAYERWISE_FAMILIES)} are)"
    if isinstance(target, MLAConversionConfig) and target.rank_allocation != "uniform":
        return "--rank-allocation energy needs every layer's spectrum before the first layer is cut"
    if getattr(config, "sliding_window", None) is not None and family == "mistral":
        return "sliding-window attention"
    if not any(src.glob("*.safetensors")):
        return "the checkpoint has no safetensors files"
    return None


def checkpoint_dtype(config) -> torch.dtype:
    """The dtype the checkpoint was saved in (its config's ``dtype``), float32 when unrecorded."""
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype.removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) and dtype.is_floating_point else torch.float32


def resume_key(src: Path, payload: dict) -> str:
    """A hash of the source files (names, sizes, modification times) and ``payload`` (the options)."""
    files = [
        (p.name, p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(src.iterdir())
        if p.is_file() and p.suffix in (".safetensors", ".json")
    ]
    from importlib import metadata

    import transformers

    try:
        ours = metadata.version("hf_attn_swap")
    except metadata.PackageNotFoundError:
        ours = None
    versions = {"hf_attn_swap": ours, "torch": torch.__version__, "transformers": transformers.__version__}
    text = json.dumps([str(src.resolve()), files, payload, versions], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _save_stream(folder: Path, stream: list[torch.Tensor] | None) -> None:
    from safetensors.torch import save_file

    tmp = folder / "stream.safetensors.tmp"
    tensors = {} if stream is None else {str(i): t.detach().cpu().contiguous() for i, t in enumerate(stream)}
    save_file(tensors, str(tmp))
    os.replace(tmp, folder / "stream.safetensors")


def _load_stream(folder: Path, device) -> list[torch.Tensor] | None:
    from safetensors.torch import load_file

    tensors = load_file(str(folder / "stream.safetensors"))
    return [tensors[str(i)].to(device) for i in range(len(tensors))] or None


def stream_checkpoint(
    src: Path,
    out: Path,
    config,
    target: GQAConfig | MLAConversionConfig,
    calibration: CalibrationConfig,
    tokenizer,
    dtype: torch.dtype | str = "auto",
    device: str = "cpu",
    overwrite: bool = False,
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = False,
    calibration_files=None,
    report_options=None,
) -> ConversionReport:
    """Convert ``src`` into ``out`` layer by layer (module docstring). ``target``: the checked options (for
    ``deepseek_v3`` the latent rank is ``kv_lora_rank - 1``: one cached channel is the norm constant);
    ``tokenizer`` and ``calibration_files``: the calibration text, or None for a data-free conversion;
    ``report_options``: the options as the user gave them, for ``conversion.json`` (default ``target``)."""
    from transformers import GenerationConfig

    dtype = checkpoint_dtype(config) if dtype == "auto" else dtype
    device = torch.device(device)
    parse_size(max_shard_size)
    mla = isinstance(target, MLAConversionConfig)
    deepseek = mla and target.format == "deepseek_v3"
    text = None
    if tokenizer is not None:
        ids = load_token_ids(tokenizer, calibration_files, calibration.calibration_tokens)
        text = CalibrationText(ids, calibration.calibration_window, calibration.calibration_mode)
    payload = {
        "target": type(target).__name__,
        "options": asdict(target),
        "calibration": asdict(calibration),
        "files": None if calibration_files is None else [str(f) for f in calibration_files],
        "dtype": str(dtype),
        "device": str(device),
        "max_shard_size": str(max_shard_size),
    }
    key = resume_key(src, payload)
    tune_allocator()
    with atomic_output_dir(out, overwrite=overwrite, resume_key=key) as tmp, torch.no_grad():
        state_dir = tmp / STATE_DIR
        state_dir.mkdir(exist_ok=True)
        state_file = state_dir / "state.json"
        state = json.loads(state_file.read_text()) if state_file.is_file() else None
        source = CheckpointLayers(src, config, dtype, device)
        if mla:
            conversion = MLALayers(config, target, text is not None, source.rotary)
        else:
            conversion = GQALayers(config, target)
        writer = ShardWriter(tmp, max_shard_size, None if state is None else state["writer"])
        bounds: dict[int, list[float]] = {}
        start, stream = 0, None
        if state is not None:
            start = state["next_layer"]
            conversion.restore(state["records"])
            bounds = {int(i): b for i, b in state["bounds"].items()}
            if text is not None:
                stream = _load_stream(state_dir, device)
        elif text is not None:
            stream = initial_stream(source, text)
        inputs = {"stream": stream}  # the calibration inputs of the layer being converted

        def checkpoint(next_layer: int, stream) -> None:
            """Write the buffered shard, then the state a rerun resumes from (``next_layer`` onwards)."""
            writer.flush()
            if text is not None:
                _save_stream(state_dir, stream)
            records = conversion.records()
            write_json(
                state_file,
                {"next_layer": next_layer, "writer": writer.state(), "records": records, "bounds": bounds},
            )

        def on_layer(idx: int, layer, following) -> None:
            if os.environ.get(KILL_AT_LAYER) == str(idx):
                os.kill(os.getpid(), signal.SIGKILL)
            if deepseek:
                from ..export.deepseek_v3 import deepseek_v3_layer_state, deepseek_v3_model_config

                ds_config, _ = deepseek_v3_model_config(layer.self_attn.config, dtype)
                tensors, bounds[idx] = deepseek_v3_layer_state(layer, idx, ds_config)
            else:
                tensors = {f"model.layers.{idx}.{k}": v for k, v in layer.state_dict().items()}
            tensors = {k: v.detach().to(dtype) for k, v in tensors.items()}
            if writer.overflows(sum(tensor_bytes(t) for t in tensors.values())):
                checkpoint(idx, inputs["stream"])
            writer.add(tensors)
            inputs["stream"] = following
            del tensors

        if start < source.num_layers:
            convert_layers(source, conversion, text, on_layer, start=start, stream=stream, progress=progress)
            inputs["stream"] = None
        written = writer.written()
        for name in source.other_tensors():  # embeddings, final norm, head
            if name in written:
                continue
            tensor = source.reader.read([name])[name].to(dtype)
            if writer.overflows(tensor_bytes(tensor)):
                checkpoint(source.num_layers, None)
            writer.add({name: tensor})
        source.reader.close()

        report, saved_config = _finish_report(conversion, target, config, dtype, deepseek, bounds)
        report.details.update(source=str(src), options=asdict(report_options or target))
        if mla:
            report.details["format"] = target.format
        if text is not None or mla:  # (MLA records them always, None without text)
            given = text is not None
            report.details.update(
                calibration_data=[str(f) for f in calibration_files] if given else None,
                calibration_tokens=calibration.calibration_tokens if given else None,
                calibration_window=calibration.calibration_window if given else None,
                calibration_mode=calibration.calibration_mode if given else None,
            )
        writer.finish()
        saved_config.dtype = dtype
        saved_config.save_pretrained(tmp)
        generation = (
            GenerationConfig.from_pretrained(src)
            if (src / "generation_config.json").is_file()
            else GenerationConfig.from_model_config(config)
        )
        generation.save_pretrained(tmp)
        copy_tokenizer_files(src, tmp)
        report.save(tmp)
        for file in state_dir.iterdir():
            file.unlink()
        state_dir.rmdir()
    return report


def _finish_report(conversion, target, config, dtype, deepseek: bool, bounds: dict):
    """(report, config to save) once every layer is converted."""
    if isinstance(conversion, GQALayers):
        saved = copy.deepcopy(config)
        saved.num_key_value_heads = conversion.num_key_value_heads
        return conversion.report(dtype), saved
    mla_config = conversion.converter.config()
    report = conversion.converter.report(dtype)
    if not deepseek:
        mla_config.architectures = ["MLAForCausalLM"]
        return report, mla_config
    from ..export.deepseek_v3 import deepseek_v3_details, deepseek_v3_model_config

    ds_config, rope = deepseek_v3_model_config(mla_config, dtype)
    ds_config.architectures = ["DeepseekV3ForCausalLM"]
    report.details["deepseek_v3"] = deepseek_v3_details(
        ds_config, rope, [b for i in sorted(bounds) for b in bounds[i]]
    )
    report.after["kv_lora_rank"] = target.kv_lora_rank + 1
    report.kv_bytes_per_token_after = mla_kv_bytes_per_token(
        [target.kv_lora_rank + 1] * mla_config.num_hidden_layers, target.qk_rope_head_dim, 1, dtype
    )
    return report, ds_config
