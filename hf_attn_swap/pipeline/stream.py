"""``convert`` layer by layer: checkpoints larger than memory, on any device, resumable after a kill.

``stream_checkpoint`` reads one decoder layer's tensors from the source shards (``io.shards.CheckpointReader``,
memory-mapped), converts it with the per-layer code of the in-memory API (``MLALayers`` / ``GQALayers`` in
``methods.layerwise.convert_layers``, calibration carried from layer to layer), writes its tensors to the output
shards (``io.shards.ShardWriter``) and frees it; embeddings, final norm and head are copied through at the end.
Peak memory: one layer (source and converted) + its float64 attention math + the calibration hidden states
(tokens x hidden); output shards fill on disk, and tensors copied through go over in blocks of rows.

Resuming: OUT is written through ``atomic_output_dir(resume_key=...)``, whose hidden folder is named after a hash
of everything the output depends on (source files, options, text, dtype, device, shard size, versions). After
each layer is written (its bytes fsynced into the shard being filled), the next layer's index, its calibration
hidden states and the methods' per-layer records go to ``.convert-state/`` there; a rerun of the same command
continues from the layer after the last finished one and writes the same bytes as an uninterrupted run. OUT
appears only when everything is written.
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

from ..export.deepseek_v3 import (
    deepseek_v3_details,
    deepseek_v3_layer_state,
    deepseek_v3_outer_scale,
    deepseek_v3_plan,
    record_deepseek_v3,
)
from ..io.checkpoints import copy_tokenizer_files
from ..io.folders import atomic_output_dir, write_json
from ..io.shards import ShardWriter, parse_size, save_safetensors, tensor_bytes
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


def _save_stream(folder: Path, layer: int, stream: list[torch.Tensor]) -> str:
    """Save layer ``layer``'s calibration inputs as ``stream-<layer>.safetensors`` (fsynced, then renamed into
    place); returns the file name."""
    name = f"stream-{layer}.safetensors"
    tmp = folder / (name + ".tmp")
    save_safetensors({str(i): t.detach().cpu().contiguous() for i, t in enumerate(stream)}, tmp)
    os.replace(tmp, folder / name)
    return name


def _load_stream(folder: Path, name: str, device) -> list[torch.Tensor]:
    from safetensors.torch import load_file

    tensors = load_file(str(folder / name))
    return [tensors[str(i)].to(device) for i in range(len(tensors))]


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
    ``deepseek_v3``: written per layer by ``hf_attn_swap.export``, padded as the options say);
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
        # the text itself, not only its paths: an edited calibration file must not resume a half-made output
        "text_sha256": None if text is None else hashlib.sha256(text.token_ids.numpy().tobytes()).hexdigest(),
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
        bounds: dict[int, list[float]] = {}  # layer -> [latent norm error bound, kappa] (deepseek_v3)
        plan: dict = {}
        start, stream = 0, None
        stream_file = {"name": None}  # the stream file the state names
        if state is not None:
            start = state["next_layer"]
            conversion.restore(state["records"])
            bounds = {int(i): b for i, b in state["bounds"].items()}
            stream_file["name"] = state["stream"]
            if text is not None and start < source.num_layers:
                stream = _load_stream(state_dir, state["stream"], device)
        elif text is not None:
            stream = initial_stream(source, text)

        def checkpoint(next_layer: int, stream=None) -> None:
            """Save the state a rerun resumes from (``next_layer`` onwards, its calibration inputs ``stream``, or
            those already saved for it when None): the written bytes are synced first, the state replaced
            atomically, and only then is the previous stream file deleted."""
            writer.sync()
            if next_layer >= source.num_layers:
                stream_file["name"] = None
            elif stream is not None:
                stream_file["name"] = _save_stream(state_dir, next_layer, stream)
            records = conversion.records()
            write_json(
                state_file,
                {"next_layer": next_layer, "stream": stream_file["name"], "writer": writer.state(),
                 "records": records, "bounds": bounds},
            )  # fmt: skip
            for old in state_dir.glob("stream-*"):
                if old.name != stream_file["name"]:
                    old.unlink()

        def on_layer(idx: int, layer, following) -> None:
            if os.environ.get(KILL_AT_LAYER) == str(idx):
                os.kill(os.getpid(), signal.SIGKILL)
            if deepseek:
                if plan.get("deepseek") is None:  # the plugin config exists once layer 0 is converted
                    plan["deepseek"] = deepseek_v3_plan(
                        layer.self_attn.config, dtype, target.pad_kv_lora_rank, target.pad_rope_dim
                    )
                tensors, bound, kappa = deepseek_v3_layer_state(layer, idx, plan["deepseek"])
                bounds[idx] = [bound, kappa]
            else:
                tensors = {f"model.layers.{idx}.{k}": v for k, v in layer.state_dict().items()}
            tensors = {k: v.detach().to(dtype) for k, v in tensors.items()}
            if writer.overflows(sum(tensor_bytes(t) for t in tensors.values())):
                writer.flush()
                checkpoint(idx)
            writer.add(tensors)
            del tensors
            checkpoint(idx + 1, following)

        if start < source.num_layers:
            convert_layers(source, conversion, text, on_layer, start=start, stream=stream, progress=progress)
        written = writer.written()
        outer = {name: name for name in source.other_tensors()}  # output name -> source name
        if deepseek and "lm_head.weight" not in outer:  # stock deepseek_v3 is untied: write the tied head
            outer["lm_head.weight"] = source.embedding_name
        for name, source_name in outer.items():  # embeddings, final norm, head
            if name in written:
                continue
            stored, shape, blocks = source.reader.blocks(source_name)  # block by block: never the whole table
            saved = dtype if stored.is_floating_point else stored
            if writer.overflows(torch.Size(shape).numel() * torch.empty((), dtype=saved).element_size()):
                writer.flush()
                checkpoint(source.num_layers)
            if deepseek:  # the embeddings write the rescaled residual stream (hf_attn_swap.export)
                scale = deepseek_v3_outer_scale(name, _deepseek_plan(plan, conversion, target, dtype))
                blocks = (b if scale == 1.0 else (b.double() * scale) for b in blocks)
            writer.add_blocks(name, saved, shape, blocks)
            checkpoint(source.num_layers)
        source.reader.close()

        report, saved_config = _finish_report(
            conversion,
            target,
            config,
            dtype,
            _deepseek_plan(plan, conversion, target, dtype) if deepseek else None,
            bounds,
        )
        report.details.update(source=str(src), options=asdict(report_options or target))
        if mla:
            report.details["format"] = target.format
        if text is not None or mla:  # (MLA records them always, None without text)
            given = text is not None
            report.details.update(
                calibration_data=[str(f) for f in calibration_files] if given else None,
                calibration_window=calibration.calibration_window if given else None,
                calibration_mode=calibration.calibration_mode if given else None,
            )
            if mla:  # GQA's calibration_tokens: the rows the method saw (GQALayers.report)
                report.details["calibration_tokens"] = calibration.calibration_tokens if given else None
        state_file.unlink(
            missing_ok=True
        )  # killed from here on: a rerun starts over (the shards get renamed)
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


def _deepseek_plan(plan: dict, conversion, target, dtype):
    """The export plan of this run (made at the first converted layer, or now on a resumed run)."""
    if plan.get("deepseek") is None:
        plan["deepseek"] = deepseek_v3_plan(
            conversion.converter.config(), dtype, target.pad_kv_lora_rank, target.pad_rope_dim
        )
    return plan["deepseek"]


def _finish_report(conversion, target, config, dtype, deepseek, bounds: dict):
    """(report, config to save) once every layer is converted; ``deepseek``: the export plan, or None."""
    if isinstance(conversion, GQALayers):
        saved = copy.deepcopy(config)
        saved.num_key_value_heads = conversion.num_key_value_heads
        return conversion.report(dtype), saved
    mla_config = conversion.converter.config()
    report = conversion.converter.report(dtype)
    if deepseek is None:
        mla_config.architectures = ["MLAForCausalLM"]
        return report, mla_config
    ds_config = deepseek.config
    ds_config.architectures = ["DeepseekV3ForCausalLM"]
    layers = [bounds[i] for i in sorted(bounds)]
    details = deepseek_v3_details(deepseek, [b for b, _ in layers], [k for _, k in layers])
    record_deepseek_v3(report, details, mla_config.num_hidden_layers, dtype)
    return report, ds_config
