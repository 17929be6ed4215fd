"""Folder to folder conversion: ``convert_checkpoint(src, out, to="gqa"|"mla"|<config>, ...)``, and the
``hf-attn-swap convert`` job (``ConvertArguments``, ``run_convert``).

One skeleton for every method and format (``run_job``): a checked ``ConversionJob`` (``pipeline.job``) is
converted layer by layer straight from the checkpoint's shards (``pipeline.stream``) when it can be, else the
model is loaded, calibrated on its own activations, converted and saved; the job's sink (``pipeline.sinks``) writes
the format (plugin / stock ``deepseek_v3``). The source folder is only ever read. Everything that can be checked
from its config is checked before any weight is loaded, and OUT is written through ``atomic_output_dir``: it
appears complete or not at all. The options are the method configs (``GQAConversionConfig``,
``MLAConversionConfig``) and ``CalibrationConfig``; ``conversion.json`` records them (``details["options"]``,
``details["calibration_*"]``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Literal

import torch

from ..adapters import get_adapter
from ..io.checkpoints import copy_sentence_transformers_files, copy_tokenizer_files
from ..io.folders import atomic_output_dir, check_output, check_source, parse_dtype
from ..io.shards import parse_size
from ..methods.calibration import CalibrationConfig
from ..methods.gqa import GQA_METHODS, GQAConversionConfig
from ..methods.mla import MLAConversionConfig
from ..methods.mla.convert import resolve_kv_budget
from ..methods.options import option
from ..methods.report import ConversionReport
from .job import ConversionJob, GQAJob, MLAJob
from .stream import stream_checkpoint

DType = Literal["auto", "float32", "bfloat16", "float16"]
DEFAULT_MAX_SHARD_SIZE = "2GB"


def run_job(job: ConversionJob) -> ConversionReport:
    """Run a checked job: layer by layer where ``job.streaming_refusal()`` has no objection, else load ->
    calibrate (on the original model's activations) -> convert -> save."""
    if job.streaming_refusal() is None:
        return stream_checkpoint(job)
    model = job.load_model()
    report = job.convert_model(model, job.collect_activations(model))
    job.record(report, "original")
    with atomic_output_dir(job.out, overwrite=job.overwrite) as tmp, torch.no_grad():
        job.sink.save_model(model, tmp, report)
        copy_tokenizer_files(job.src, tmp)
        copy_sentence_transformers_files(job.src, tmp)
        report.save(tmp)
    return report


def _target(to, num_key_value_heads, method, mla) -> GQAConversionConfig | MLAConversionConfig:
    """The validated options of ``convert_checkpoint``'s target: a config given as ``to``, or one built from the
    loose arguments (``to="gqa"``: ``num_key_value_heads``/``method``; ``to="mla"``: the ``mla`` dict)."""
    if isinstance(to, (GQAConversionConfig, MLAConversionConfig)):
        if num_key_value_heads is not None or method != GQAConversionConfig.method or mla is not None:
            raise ValueError(
                "pass the options in the config given as `to` or as arguments (num_key_value_heads, method, mla), "
                "not both"
            )
        return to
    if to == "mla":
        if num_key_value_heads is not None or method != GQAConversionConfig.method:
            raise ValueError("num_key_value_heads and method only apply to to='gqa'")
        if isinstance(mla, MLAConversionConfig):
            return mla
        known = [f.name for f in fields(MLAConversionConfig)]
        unknown = sorted(set(mla or {}) - set(known))
        if unknown:
            raise ValueError(f"unknown MLA option(s) {unknown}; known: {known}")
        return MLAConversionConfig(**(mla or {}))
    if to != "gqa":
        raise ValueError(f"unknown conversion target {to!r}; choose gqa or mla")
    if mla is not None:
        raise ValueError("mla options only apply to to='mla'")
    return GQAConversionConfig(num_key_value_heads, method)


def convert_checkpoint(
    src: str | Path,
    out: str | Path,
    to: str | GQAConversionConfig | MLAConversionConfig = "gqa",
    *,
    num_key_value_heads: int | None = None,
    method: str = GQAConversionConfig.method,
    calibration_data=None,
    calibration_tokens: int = CalibrationConfig.calibration_tokens,
    calibration_window: int = CalibrationConfig.calibration_window,
    calibration_mode: str | None = CalibrationConfig.calibration_mode,
    calibration_inputs=None,
    dtype: str = "auto",
    overwrite: bool = False,
    mla: MLAConversionConfig | dict | None = None,
    device: str = "cpu",
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = False,
) -> ConversionReport:
    """Load ``src``, convert it, and save the result (weights, config, tokenizer, ``conversion.json``) to ``out``.

    Args:
        to: ``"gqa"`` with ``num_key_value_heads`` and ``method``, ``"mla"`` with its options in ``mla`` (an
            ``MLAConversionConfig`` or a dict of its fields), or the config itself:
            ``convert_checkpoint(src, out, GQAConversionConfig(1, "fit"), calibration_data=[...])``.
        calibration_data, calibration_tokens, calibration_window, calibration_mode: the calibration text
            (``CalibrationConfig``): methods that need it read its first ``calibration_tokens`` tokens;
            ``sequential`` calibrates layer l on the outputs of the converted layers 0..l-1, ``original`` on the
            source model's own activations; None: sequential for MLA, original for GQA.
        calibration_inputs: a ``methods.calibration.Calibration`` of this source model (GQA only) instead of text.
        dtype: load and save dtype (``auto``: the checkpoint's); device: ``cpu``, ``cuda``, ``cuda:N``.
        max_shard_size, progress: the layer-by-layer writer's shard size and progress bar.

    Returns:
        The ``ConversionReport`` (also saved as ``out/conversion.json``).

    Everything that can be checked from the config (family, head counts, dtype, paths) is checked before any
    weight is loaded; nothing is written to ``out`` unless the conversion succeeds. Llama / Mistral / Qwen2 / Qwen3
    safetensors checkpoints are converted layer by layer (``pipeline.stream``): one decoder layer in memory at a
    time, in shards of at most ``max_shard_size``, resumable after a kill by rerunning the same call. Other
    families, ``rank_allocation="energy"`` and given ``calibration_inputs`` load the whole model.
    """
    from transformers import AutoConfig

    target = _target(to, num_key_value_heads, method, mla)
    parse_size(max_shard_size)
    calibration = CalibrationConfig(
        calibration_data, calibration_tokens, calibration_window, calibration_mode
    )
    mla_target = isinstance(target, MLAConversionConfig)
    calibration = replace(
        calibration, calibration_mode=calibration.resolved_mode(mla_target)
    )  # unset: best measured
    src = check_source(src)
    job = {"src": src, "out": check_output(out, src=src, overwrite=overwrite), "dtype": parse_dtype(dtype)}
    job.update(overwrite=overwrite, device=device, max_shard_size=max_shard_size, progress=progress)
    config = AutoConfig.from_pretrained(src)
    get_adapter(config)  # an unsupported family is named first, whatever the target
    return run_job(JOBS[type(target)].plan(config, target, calibration, calibration_inputs, **job))


#: the job of each target's options (``pipeline.job``)
JOBS: dict[type, type[ConversionJob]] = {GQAConversionConfig: GQAJob, MLAConversionConfig: MLAJob}


# -- hf-attn-swap convert --------------------------------------------------------------------------------------
@dataclass
class ConvertArguments:
    """``hf-attn-swap convert SRC OUT --to gqa|mla``; the target's options are ``GQAConversionConfig`` /
    ``MLAConversionConfig``, the calibration text's ``CalibrationConfig``."""

    src: str = option(help="checkpoint folder to convert (only read)")
    out: str = option(help="new folder for the converted checkpoint")
    to: Literal["gqa", "mla"] = option(help="target attention")
    dtype: DType = option("auto", "dtype to load and save (auto: the checkpoint's)")
    overwrite: bool = option(False, "replace OUT if it exists")
    device: str = option(
        "cpu", "where each layer's forwards and float64 decompositions run: cpu, cuda or cuda:N"
    )
    max_shard_size: str = option(DEFAULT_MAX_SHARD_SIZE, "largest output shard (e.g. 500MB, 5GB)")
    engine: Literal["any", "llama.cpp", "mlx", "transformers", "vllm", "sglang"] = option(
        "any",
        "the engine the MLA export will be served with: vllm / sglang pad the latent to 512 + rope 64 (the only "
        "shape of vLLM's CPU_MLA and of FlashMLA); llama.cpp, mlx and transformers keep it unpadded (the smallest "
        "cache and the fastest CPU decode); any: as the pad flags say. --to gqa writes the stock family every "
        "engine serves as it is: nothing to pad",
    )


#: ``--engine``: the (latent, rope) widths an MLA export is padded to for each engine's MLA kernels (None: unpadded)
ENGINE_SHAPES: dict[str, tuple[int, int] | None] = {
    "llama.cpp": None,
    "mlx": None,
    "transformers": None,
    "vllm": (512, 64),
    "sglang": (512, 64),
}


def engine_options(engine: str, to: str, mla: MLAConversionConfig, src: str) -> MLAConversionConfig:
    """``mla`` with ``--engine``'s padding; ``ValueError`` naming the fix where the flags disagree or the latent
    (``--kv-budget`` split for the source ``src``) is wider than the engine's kernels take."""
    if engine == "any" or to != "mla":
        return mla
    if mla.format != "deepseek_v3":
        raise ValueError(
            f"--engine {engine}: the plugin format runs in transformers only; drop --format plugin"
        )
    shape = ENGINE_SHAPES[engine]
    pads = (mla.pad_kv_lora_rank, mla.pad_rope_dim)
    if pads != (None, None) and pads != shape:
        wanted = "no padding" if shape is None else f"--pad-kv-lora-rank {shape[0]} --pad-rope-dim {shape[1]}"
        raise ValueError(f"--engine {engine} sets {wanted}: drop the pad flags or --engine")
    if shape is None:
        return mla
    resolved = mla
    if mla.kv_budget is not None:
        from transformers import AutoConfig

        resolved = resolve_kv_budget(AutoConfig.from_pretrained(check_source(src)), mla)
    rank, rope = resolved.kv_lora_rank or 0, resolved.qk_rope_head_dim or 0
    if rank > shape[0] or rope > shape[1]:
        raise ValueError(
            f"--engine {engine}: latent {rank} + rope {rope} is wider than the {shape[0]} + {shape[1]} its MLA "
            f"kernels take: lower --kv-budget (at most {sum(shape)} values per token and layer) or serve unpadded "
            "(--engine llama.cpp)"
        )
    return replace(mla, pad_kv_lora_rank=shape[0], pad_rope_dim=shape[1])


def check_device(device: str) -> str:
    """``cpu`` / ``cuda`` / ``cuda:N`` that exists here, else ``ValueError`` naming the fix."""
    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (parsed.index or 0) >= count:
            raise ValueError(f"--device {device}: this machine has {count} CUDA device(s); use --device cpu")
    elif parsed.type != "cpu":
        raise ValueError(f"unsupported device {device!r}: use cpu, cuda or cuda:N")
    return str(parsed)


def run_convert(
    args: ConvertArguments, gqa: GQAConversionConfig, mla: MLAConversionConfig, calibration: CalibrationConfig
) -> int:
    # the flags of the other target must not be dropped silently
    if args.to == "gqa" and mla != MLAConversionConfig():
        raise ValueError("MLA options (--kv-lora-rank, --rope-dim, --format, ...) only apply to --to mla")
    if args.to == "mla" and gqa != GQAConversionConfig():
        raise ValueError("--num-kv-heads and --method only apply to --to gqa")
    if args.to == "gqa" and calibration.calibration_data and not GQA_METHODS[gqa.method].needs_calibration:
        raise ValueError(  # the API lets a loop over methods share its text; a typed flag is never dropped
            f"method {gqa.method!r} reads no calibration text: drop --calibration-data, or pick a calibrated "
            f"method ({', '.join(sorted(m for m, c in GQA_METHODS.items() if c.needs_calibration))})"
        )
    mla = engine_options(args.engine, args.to, mla, args.src)
    report = convert_checkpoint(
        args.src,
        args.out,
        gqa if args.to == "gqa" else mla,
        dtype=args.dtype,
        overwrite=args.overwrite,
        device=check_device(args.device),
        max_shard_size=args.max_shard_size,
        progress=True,
        **asdict(calibration),
    )
    print(report)
    print(f"saved to {args.out}")
    return 0
