"""``convert`` layer by layer: checkpoints larger than memory, on any device, resumable after a kill.

``stream_checkpoint`` reads one decoder layer's tensors from the source shards (``io.shards.CheckpointReader``,
memory-mapped), converts it with the job's ``LayerConversion`` (``methods.layerwise.convert_layers``, the per-layer
code of the in-memory API, calibration carried from layer to layer), writes its tensors as the job's sink makes
them (``pipeline.sinks``) to the output shards (``io.shards.ShardWriter``) and frees it; embeddings, final norm
and head are copied through at the end. Peak memory: one layer (source and converted) + its float64 attention math
+ the calibration hidden states (tokens x hidden); output shards fill on disk, and tensors copied through go over
in blocks of rows.

Resuming: OUT is written through ``atomic_output_dir(resume_key=...)``, whose hidden folder is named after a hash
of everything the output depends on (source files, options, text, dtype, device, shard size, versions). After
each layer is written (its bytes fsynced into the shard being filled), a ``ResumeState`` (the next layer's index,
its calibration hidden states, the writer's state, the method's and the sink's per-layer records) goes to
``.convert-state/`` there; a rerun of the same command continues from the layer after the last finished one and
writes the same bytes as an uninterrupted run. OUT appears only when everything is written.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..io.checkpoints import copy_tokenizer_files
from ..io.folders import atomic_output_dir, write_json
from ..io.shards import ShardWriter, parse_size, save_safetensors, tensor_bytes
from ..methods.layerwise import CheckpointSource, convert_layers, initial_stream, tune_allocator
from ..methods.report import ConversionReport
from .job import ConversionJob

STATE_DIR = ".convert-state"
#: test hook: the process kills itself (SIGKILL) when it reaches this layer, as ``kill -9`` would
KILL_AT_LAYER = "HF_ATTN_SWAP_KILL_AT_LAYER"


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


@dataclass
class ResumeState:
    """What a rerun of an interrupted ``stream_checkpoint`` continues from (``.convert-state/state.json``).

    next_layer: the first layer not written; stream: the file holding its calibration inputs (None: data-free or
    past the last layer); writer: the shard writer's state; records / sink: the conversion's and the sink's
    per-layer records."""

    next_layer: int = 0
    stream: str | None = None
    writer: dict | None = None
    records: dict = field(default_factory=dict)
    sink: dict = field(default_factory=dict)

    @classmethod
    def load(cls, file: Path) -> ResumeState | None:
        return cls(**json.loads(file.read_text())) if file.is_file() else None

    def save(self, file: Path) -> None:
        write_json(file, asdict(self))


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


class _LayerWriter:
    """One run of ``stream_checkpoint`` inside the hidden output folder ``tmp``: the shard writer, the resume
    state after every layer, and the sink that turns converted layers into output tensors."""

    def __init__(
        self, tmp: Path, job: ConversionJob, source: CheckpointSource, conversion, dtype: torch.dtype
    ):
        self.state_dir = tmp / STATE_DIR
        self.state_dir.mkdir(exist_ok=True)
        self.state = ResumeState.load(self.state_dir / "state.json")
        self.resumed = self.state is not None
        self.state = self.state or ResumeState()
        self.writer = ShardWriter(tmp, job.max_shard_size, self.state.writer)
        self.job, self.source, self.conversion, self.dtype = job, source, conversion, dtype
        if self.resumed:
            conversion.restore(self.state.records)
            job.sink.restore(self.state.sink)

    def checkpoint(self, next_layer: int, stream: list[torch.Tensor] | None = None) -> None:
        """Save the state a rerun resumes from (``next_layer`` onwards, its calibration inputs ``stream``, or those
        already saved for it when None): the written bytes are synced first, the state replaced atomically, and
        only then is the previous stream file deleted."""
        self.writer.sync()
        state = self.state
        if next_layer >= self.source.num_layers:
            state.stream = None
        elif stream is not None:
            state.stream = _save_stream(self.state_dir, next_layer, stream)
        state.next_layer, state.writer = next_layer, self.writer.state()
        state.records, state.sink = self.conversion.records(), self.job.sink.records()
        state.save(self.state_dir / "state.json")
        for old in self.state_dir.glob("stream-*"):
            if old.name != state.stream:
                old.unlink()

    def on_layer(self, idx: int, layer, following) -> None:
        """``convert_layers``' callback: write converted layer ``idx``, then checkpoint (with h_{idx+1})."""
        if os.environ.get(KILL_AT_LAYER) == str(idx):
            os.kill(os.getpid(), signal.SIGKILL)
        tensors = {k: v.detach().to(self.dtype) for k, v in self.job.sink.layer_tensors(idx, layer).items()}
        if self.writer.overflows(sum(tensor_bytes(t) for t in tensors.values())):
            self.writer.flush()
            self.checkpoint(idx)
        self.writer.add(tensors)
        del tensors
        self.checkpoint(idx + 1, following)

    def convert(self, text) -> None:
        """Convert every layer not written yet (from the saved calibration inputs when resuming)."""
        start, stream = self.state.next_layer, None
        if start >= self.source.num_layers:
            return
        if text is not None:
            stream = (
                _load_stream(self.state_dir, self.state.stream, self.source.device)
                if self.resumed
                else initial_stream(self.source, text)
            )
        convert_layers(
            self.source,
            self.conversion,
            text,
            self.on_layer,
            start=start,
            stream=stream,
            progress=self.job.progress,
        )

    def copy_outer(self) -> None:
        """Embeddings, final norm and head, block by block (never a whole table), as the sink names and scales them."""
        written, reader = self.writer.written(), self.source.reader
        outer = self.job.sink.outer_tensors(self.source.other_tensors(), self.source.embedding_name)
        for name, (source_name, scale) in outer.items():
            if name in written:
                continue
            stored, shape, blocks = reader.blocks(source_name)
            saved = self.dtype if stored.is_floating_point else stored
            if self.writer.overflows(torch.Size(shape).numel() * torch.empty((), dtype=saved).element_size()):
                self.writer.flush()
                self.checkpoint(self.source.num_layers)
            if scale != 1.0:
                blocks = (b.double() * scale for b in blocks)
            self.writer.add_blocks(name, saved, shape, blocks)
            self.checkpoint(self.source.num_layers)
        reader.close()

    def finish(self, tmp: Path, config, report: ConversionReport) -> None:
        """Close the shards and write config, generation config, tokenizer and ``conversion.json``."""
        from transformers import GenerationConfig

        (self.state_dir / "state.json").unlink(missing_ok=True)  # killed from here on: a rerun starts over
        self.writer.finish()
        config.dtype = self.dtype
        config.save_pretrained(tmp)
        src = self.job.src
        generation = (
            GenerationConfig.from_pretrained(src)
            if (src / "generation_config.json").is_file()
            else GenerationConfig.from_model_config(self.job.config)
        )
        generation.save_pretrained(tmp)
        copy_tokenizer_files(src, tmp)
        report.save(tmp)
        for file in self.state_dir.iterdir():
            file.unlink()
        self.state_dir.rmdir()


def stream_checkpoint(job: ConversionJob) -> ConversionReport:
    """Convert ``job.src`` into ``job.out`` layer by layer (module docstring)."""
    dtype = checkpoint_dtype(job.config) if job.dtype == "auto" else job.dtype
    device = torch.device(job.device)
    parse_size(job.max_shard_size)
    text = job.text()
    payload = {
        "target": type(job.options).__name__,
        "options": asdict(job.options),
        "calibration": asdict(job.calibration),
        "files": None if job.files is None else [str(f) for f in job.files],
        "dtype": str(dtype),
        "device": str(device),
        "max_shard_size": str(job.max_shard_size),
        # the text itself, not only its paths: an edited calibration file must not resume a half-made output
        "text_sha256": None if text is None else hashlib.sha256(text.token_ids.numpy().tobytes()).hexdigest(),
    }
    tune_allocator()
    with atomic_output_dir(job.out, overwrite=job.overwrite, resume_key=resume_key(job.src, payload)) as tmp:
        with torch.no_grad():
            source = CheckpointSource(job.src, job.config, dtype, device)
            conversion = job.layer_conversion(text is not None, source.rotary)
            run = _LayerWriter(tmp, job, source, conversion, dtype)
            run.convert(text)
            run.copy_outer()
            report = conversion.report(dtype)
            config = job.sink.config(conversion, report, dtype)
            job.record(report, job.calibration.calibration_mode)
            run.finish(tmp, config, report)
    return report
