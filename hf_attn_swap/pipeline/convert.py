"""Folder to folder conversion: ``convert_checkpoint(src, out, to="gqa"|"mla"|<config>, ...)``, and the
``hf-attn-swap convert`` job (``ConvertArguments``, ``run_convert``).

The source folder is only ever read. Everything that can be checked from its config is checked before any weight
is loaded, and OUT is written through ``atomic_output_dir``: it appears complete or not at all. ``to="mla"`` goes
through ``convert_mla_checkpoint`` (stock ``deepseek_v3`` or the plugin format). The options are the method configs
(``GQAConfig``, ``MLAConversionConfig``) and ``CalibrationConfig``; ``conversion.json`` records them
(``details["options"]``, ``details["calibration_*"]``).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Literal

import torch

from ..adapters import get_adapter
from ..export.deepseek_v3 import (
    check_deepseek_dtype,
    deepseek_v3_plan,
    record_deepseek_v3,
    to_deepseek_v3,
)
from ..io.checkpoints import (
    copy_sentence_transformers_files,
    copy_tokenizer_files,
    load_causal_lm,
    load_tokenizer,
)
from ..io.folders import atomic_output_dir, check_output, check_source, parse_dtype
from ..io.shards import parse_size
from ..methods.calibration import CalibrationConfig
from ..methods.gqa import GQA_METHODS, GQAConfig
from ..methods.mla import LADDER_SELECTIONS, MLAConversionConfig, select_rope_pairs
from ..methods.mla.convert import (
    convert_to_mla,
    mla_config,
    resolve_kv_budget,
    validate_mla_options,
)
from ..methods.mla.freqfold import fold_ladder
from ..methods.report import ConversionReport
from .stream import DEFAULT_MAX_SHARD_SIZE, stream_checkpoint, streaming_refusal

DType = Literal["auto", "float32", "bfloat16", "float16"]


def _check_deepseek_options(opts: MLAConversionConfig, config, layout, dtype) -> None:
    problems = []
    if opts.num_rope_key_heads != 1:
        problems.append("--num-rope-key-heads must be 1 (one shared rope key)")
    if opts.rank_allocation != "uniform":
        problems.append("--rank-allocation must be uniform (one kv_lora_rank for all layers)")
    if opts.rope_selection == "freqfold" and not opts.rope_fold_ladder:
        problems.append("--rope-fold-ladder must be true (one frequency per rope pair)")
    if opts.rope_selection not in LADDER_SELECTIONS:
        problems.append(
            f"--rope-selection must be one of {', '.join(LADDER_SELECTIONS)} (a DeepSeek frequency ladder)"
        )
    if getattr(config, "mlp_bias", False):
        problems.append("the source has MLP biases")
    if config.model_type == "qwen2" or getattr(config, "attention_bias", False):
        problems.append("the source has attention biases (stock DeepSeek attention has none)")
    if problems:
        raise ValueError(
            "deepseek_v3 cannot express this conversion: " + "; ".join(problems) + ". Use --format plugin."
        )
    if opts.rope_selection == "low" and (opts.pad_rope_dim or opts.qk_rope_head_dim) < layout.head_dim:
        raise ValueError(  # the lowest frequencies sit at the end of the source ladder (hf_attn_swap.export)
            f"--rope-selection low needs --pad-rope-dim {layout.head_dim} (puts the kept frequencies on a plain "
            "DeepSeek ladder) for --format deepseek_v3; or use --rope-selection high, or --format plugin"
        )
    saved = dtype if isinstance(dtype, torch.dtype) else parse_dtype(getattr(config, "dtype", None))
    saved = saved if isinstance(saved, torch.dtype) else torch.float32  # auto: the checkpoint's
    check_deepseek_dtype(saved)
    # the rope ladder and the padding, planned on the config alone: refused before any layer is converted
    if opts.rope_selection == "freqfold":
        pairs = fold_ladder(layout, opts.qk_rope_head_dim, opts.rope_fold)[0]
    else:
        pairs = select_rope_pairs(opts.rope_selection, layout, opts.qk_rope_head_dim)
    planned = mla_config(
        config, [opts.kv_lora_rank] * layout.num_layers, opts.qk_rope_head_dim, 1,
        [pairs] * layout.num_layers, (False, False, False),
    )  # fmt: skip
    deepseek_v3_plan(planned, saved, opts.pad_kv_lora_rank, opts.pad_rope_dim)


def convert_mla_checkpoint(
    src,
    out,
    config,
    dtype,
    options: MLAConversionConfig,
    calibration: CalibrationConfig,
    overwrite: bool,
    device: str = "cpu",
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    progress: bool = False,
) -> ConversionReport:
    """``convert_checkpoint(..., to=options)`` once ``src``/``out``/``dtype`` are checked and ``config`` is read:
    layer by layer (``stream_checkpoint``) where ``streaming_refusal`` has no objection, else in memory. A
    ``kv_budget`` is split into kv_lora_rank + qk_rope_head_dim first (recorded in ``details.options``)."""
    opts = resolve_kv_budget(config, options)
    if opts.kv_lora_rank is None or opts.qk_rope_head_dim is None:
        raise ValueError(
            "--to mla needs --kv-budget FRACTION|VALUES, or --kv-lora-rank R and --rope-dim D (KV cache: R + D "
            "values per token and layer)"
        )
    # the pipeline always has calibration text (the library reference by default): an unset factorization is pca
    opts = replace(opts, factorization=opts.resolved_factorization(calibrated=True))
    deepseek = opts.format == "deepseek_v3"
    layout = get_adapter(config).layout(config)
    validate_mla_options(config, opts)
    if deepseek:
        _check_deepseek_options(opts, config, layout, dtype)

    calibration_inputs, files, tokenizer = None, None, None
    calibration_data = calibration.calibration_data
    needs_text = calibration_data or opts.factorization == "pca" or opts.rope_selection == "norm"
    if needs_text:  # before any weight is loaded
        why = [f"--factorization {opts.factorization}"] if opts.factorization == "pca" else []
        why += ["--rope-selection norm"] if opts.rope_selection == "norm" else []
        why += ["--calibration-data"] if calibration_data else []
        tokenizer = load_tokenizer(
            src,
            f"{' and '.join(why)} calibrate{'s' if len(why) == 1 else ''} on text",
            "use --factorization svd"
            + (" and another --rope-selection" if opts.rope_selection == "norm" else "")
            + (" without --calibration-data" if calibration_data else ""),
        )
    if needs_text:
        from ..io.text import default_train_files

        files = calibration_data or default_train_files()
    if streaming_refusal(config, src, opts) is None:
        return stream_checkpoint(
            src, out, config, opts, calibration, tokenizer, dtype, device, overwrite, max_shard_size,
            progress, files, report_options=opts,
        )  # fmt: skip
    # in memory (--rank-allocation energy needs every layer's spectrum first): calibrated on the original model
    model = load_causal_lm(src, dtype=dtype).to(device)
    if needs_text:
        from ..methods.calibration import collect_calibration_from_files

        calibration_inputs = collect_calibration_from_files(
            model, tokenizer, files, calibration.calibration_tokens, calibration.calibration_window,
            key_weights=opts.key_weight_power > 0,
        )  # fmt: skip
    report = convert_to_mla(model, opts, calibration=calibration_inputs)
    report.details.update(
        source=str(src),
        format=opts.format,
        options=asdict(opts),
        calibration_data=None if files is None else [str(f) for f in files],
        calibration_tokens=None if files is None else calibration.calibration_tokens,
        calibration_window=None if files is None else calibration.calibration_window,
        calibration_mode=None if files is None else "original",
    )
    saved = model
    if deepseek:
        saved, details = to_deepseek_v3(model, opts.pad_kv_lora_rank, opts.pad_rope_dim)
        saved.generation_config = copy.deepcopy(model.generation_config)
        record_deepseek_v3(report, details, layout.num_layers, next(model.parameters()).dtype)
    with atomic_output_dir(out, overwrite=overwrite) as tmp, torch.no_grad():
        saved.save_pretrained(tmp)
        copy_tokenizer_files(src, tmp)
        report.save(tmp)
    return report


def _target(to, num_key_value_heads, method, mla) -> GQAConfig | MLAConversionConfig:
    """The validated options of ``convert_checkpoint``'s target: a config given as ``to``, or one built from the
    loose arguments (``to="gqa"``: ``num_key_value_heads``/``method``; ``to="mla"``: the ``mla`` dict)."""
    if isinstance(to, (GQAConfig, MLAConversionConfig)):
        if num_key_value_heads is not None or method != GQAConfig.method or mla is not None:
            raise ValueError(
                "pass the options in the config given as `to` or as arguments (num_key_value_heads, method, mla), "
                "not both"
            )
        return to
    if to == "mla":
        if num_key_value_heads is not None or method != GQAConfig.method:
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
    return GQAConfig(num_key_value_heads, method)


def convert_checkpoint(
    src: str | Path,
    out: str | Path,
    to: str | GQAConfig | MLAConversionConfig = "gqa",
    *,
    num_key_value_heads: int | None = None,
    method: str = GQAConfig.method,
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

    The target: ``to="gqa"`` with ``num_key_value_heads`` and ``method``, ``to="mla"`` with its options in ``mla``
    (an ``MLAConversionConfig`` or a dict of its fields), or the config itself as ``to``:
    ``convert_checkpoint(src, out, GQAConfig(1, "fit"), calibration_data=[...])``.

    Everything that can be checked from the config (family, head counts, dtype, paths) is checked before any
    weight is loaded; nothing is written to ``out`` unless the conversion succeeds. Methods that need calibration
    read the first ``calibration_tokens`` tokens of ``calibration_data`` (``CalibrationConfig``), unless
    ``calibration_inputs`` (a ``hf_attn_swap.methods.calibration.Calibration`` of this source model; GQA only) is given.
    ``calibration_mode``: ``sequential`` (layer l calibrated on the outputs of the converted layers 0..l-1) or
    ``original`` (on the source model's own activations); None: sequential for MLA, original for GQA.

    Llama / Mistral / Qwen2 / Qwen3 safetensors checkpoints are converted layer by layer (``pipeline.stream``):
    one decoder layer in memory at a time, on ``device`` (``cpu``, ``cuda``, ``cuda:N``), written in shards of at
    most ``max_shard_size``, resumable after a kill by rerunning the same call; ``progress`` shows a bar per
    layer. Other families, ``rank_allocation="energy"`` and given ``calibration_inputs`` load the whole model.
    """
    from transformers import AutoConfig

    from ..methods.gqa import convert_to_gqa, validate_num_key_value_heads

    target = _target(to, num_key_value_heads, method, mla)
    parse_size(max_shard_size)
    calibration = CalibrationConfig(
        calibration_data, calibration_tokens, calibration_window, calibration_mode
    )
    calibration = replace(  # unset: the best measured mode of this target
        calibration, calibration_mode=calibration.resolved_mode(isinstance(target, MLAConversionConfig))
    )
    src = check_source(src)
    out = check_output(out, src=src, overwrite=overwrite)
    torch_dtype = parse_dtype(dtype)
    config = AutoConfig.from_pretrained(src)
    adapter = get_adapter(config)
    layout = adapter.layout(config)
    if isinstance(target, MLAConversionConfig):
        if calibration_inputs is not None:  # never dropped silently
            raise ValueError(
                "calibration_inputs applies to to='gqa'; MLA calibrates on calibration_data (use "
                "hf_attn_swap.convert_to_mla(model, ..., calibration=...) for precomputed activations)"
            )
        return convert_mla_checkpoint(
            src, out, config, torch_dtype, target, calibration, overwrite, device, max_shard_size, progress
        )
    if target.num_key_value_heads is None:
        raise ValueError("--to gqa needs --num-kv-heads N (1 = MQA)")
    validate_num_key_value_heads(layout, target.num_key_value_heads)
    gqa_method = GQA_METHODS[target.method]
    if gqa_method.needs_calibration and calibration_inputs is None:
        from ..methods.calibration import require_calibration_files

        require_calibration_files(
            calibration_data, f"method {target.method!r}"
        )  # before any weight is loaded
    needs_text = gqa_method.needs_calibration and calibration_inputs is None
    tokenizer = (
        load_tokenizer(src, f"method {target.method!r} calibrates on text", "use --method mean")
        if needs_text
        else None
    )

    if layout.causal and calibration_inputs is None and streaming_refusal(config, src, target) is None:
        return stream_checkpoint(
            src, out, config, target, calibration, tokenizer, torch_dtype, device, overwrite, max_shard_size,
            progress, calibration.calibration_data if needs_text else None,
        )  # fmt: skip
    if layout.causal:
        model = load_causal_lm(src, dtype=torch_dtype).to(device)
    else:  # encoders (BERT): the checkpoint's own architecture, e.g. BertModel for sentence-transformers
        from transformers import AutoModel

        model = AutoModel.from_pretrained(str(src), dtype=torch_dtype).eval()
    activations = calibration_inputs
    if needs_text:
        from ..methods.calibration import collect_calibration_from_files

        activations = collect_calibration_from_files(
            model,
            tokenizer,
            calibration.calibration_data,
            max_tokens=calibration.calibration_tokens,
            window=calibration.calibration_window,
            key_weights=gqa_method.uses_key_weights,
        )
    report = convert_to_gqa(model, target.num_key_value_heads, method=gqa_method, calibration=activations)
    if needs_text:
        report.details["calibration_mode"] = "original"
    report.details.update(source=str(src), options=asdict(target))
    if needs_text:
        report.details.update(
            calibration_data=[str(f) for f in calibration.calibration_data],
            calibration_window=calibration.calibration_window,
        )  # details["calibration_tokens"]: the rows the method saw (convert_to_gqa)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        copy_tokenizer_files(src, tmp)
        copy_sentence_transformers_files(src, tmp)
        report.save(tmp)
    return report


# -- hf-attn-swap convert --------------------------------------------------------------------------------------
@dataclass
class ConvertArguments:
    """``hf-attn-swap convert SRC OUT --to gqa|mla``; the target's options are ``GQAConfig`` /
    ``MLAConversionConfig``, the calibration text's ``CalibrationConfig``."""

    src: str = field(metadata={"help": "checkpoint folder to convert (only read)"})
    out: str = field(metadata={"help": "new folder for the converted checkpoint"})
    to: Literal["gqa", "mla"] = field(metadata={"help": "target attention"})
    dtype: DType = field(default="auto", metadata={"help": "dtype to load and save (auto: the checkpoint's)"})
    overwrite: bool = field(default=False, metadata={"help": "replace OUT if it exists"})
    device: str = field(
        default="cpu",
        metadata={"help": "where each layer's forwards and float64 decompositions run: cpu, cuda or cuda:N"},
    )
    max_shard_size: str = field(
        default=DEFAULT_MAX_SHARD_SIZE, metadata={"help": "largest output shard (e.g. 500MB, 5GB)"}
    )


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
    args: ConvertArguments, gqa: GQAConfig, mla: MLAConversionConfig, calibration: CalibrationConfig
) -> int:
    # the flags of the other target must not be dropped silently
    if args.to == "gqa" and mla != MLAConversionConfig():
        raise ValueError("MLA options (--kv-lora-rank, --rope-dim, --format, ...) only apply to --to mla")
    if args.to == "mla" and gqa != GQAConfig():
        raise ValueError("--num-kv-heads and --method only apply to --to gqa")
    if args.to == "gqa" and calibration.calibration_data and not GQA_METHODS[gqa.method].needs_calibration:
        raise ValueError(  # the API lets a loop over methods share its text; a typed flag is never dropped
            f"method {gqa.method!r} reads no calibration text: drop --calibration-data, or pick a calibrated "
            f"method ({', '.join(sorted(m for m, c in GQA_METHODS.items() if c.needs_calibration))})"
        )
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
