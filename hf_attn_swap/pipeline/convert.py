"""Folder to folder conversion: ``convert_checkpoint(src, out, to="gqa"|"mla", ...)``.

The source folder is only ever read. Everything that can be checked from its config is checked before any weight
is loaded, and OUT is written through ``atomic_output_dir``: it appears complete or not at all. ``to="mla"`` goes
through ``convert_mla_checkpoint`` (stock ``deepseek_v3`` or the plugin format).
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..adapters import get_adapter
from ..io.checkpoints import (
    copy_sentence_transformers_files,
    copy_tokenizer_files,
    load_causal_lm,
    load_tokenizer,
)
from ..io.folders import atomic_output_dir, check_output, check_source, parse_dtype
from ..methods.mla.convert import (
    convert_to_mla,
    max_kv_lora_rank,
    mla_kv_bytes_per_token,
    validate_mla_options,
)
from ..methods.mla.rope import LADDER_SELECTIONS
from ..methods.report import ConversionReport

FORMATS = ("deepseek_v3", "plugin")


@dataclass
class MLAOptions:
    """kv_lora_rank: latent values cached per token and layer (besides the rope key). In ``deepseek_v3`` format
    one of them is the constant channel that neutralises ``kv_a_layernorm`` (``hf_attn_swap.export``), so the
    learned latent has kv_lora_rank - 1 dims; the cache is (kv_lora_rank + qk_rope_head_dim) values either way."""

    kv_lora_rank: int | None = None
    qk_rope_head_dim: int | None = None
    rope_selection: str = "high"
    factorization: str = "pca"
    num_rope_key_heads: int = 1
    rank_allocation: str = "uniform"
    format: str = "deepseek_v3"
    balance_kv: bool = True


def _check_deepseek_options(opts: MLAOptions, config, layout) -> None:
    problems = []
    if opts.num_rope_key_heads != 1:
        problems.append("--num-rope-key-heads must be 1 (one shared rope key)")
    if opts.rank_allocation != "uniform":
        problems.append("--rank-allocation must be uniform (one kv_lora_rank for all layers)")
    if opts.rope_selection not in LADDER_SELECTIONS:
        problems.append(
            f"--rope-selection must be one of {', '.join(LADDER_SELECTIONS)} (a DeepSeek frequency ladder)"
        )
    if getattr(config, "mlp_bias", False):
        problems.append("the source has MLP biases")
    if problems:
        raise ValueError(
            "deepseek_v3 cannot express this conversion: " + "; ".join(problems) + ". Use --format plugin."
        )
    rank = opts.kv_lora_rank
    if isinstance(rank, int) and not isinstance(rank, bool) and not 2 <= rank <= max_kv_lora_rank(layout) + 1:
        raise ValueError(
            f"kv_lora_rank={rank} is out of range for --format deepseek_v3: it must be between 2 and "
            f"{max_kv_lora_rank(layout) + 1} (one latent channel holds the constant that neutralises kv_a_layernorm)"
        )


def convert_mla_checkpoint(
    src, out, config, dtype, options, calibration_data, calibration_tokens: int, overwrite: bool
) -> ConversionReport:
    opts = options if isinstance(options, MLAOptions) else MLAOptions(**options)
    if opts.kv_lora_rank is None or opts.qk_rope_head_dim is None:
        raise ValueError(
            "--to mla needs --kv-lora-rank R and --rope-dim D (KV cache: R + D values per token and layer)"
        )
    if opts.format not in FORMATS:
        raise ValueError(f"unknown format {opts.format!r}; choose one of {', '.join(FORMATS)}")
    deepseek = opts.format == "deepseek_v3"
    layout = get_adapter(config).layout(config)
    if deepseek:
        _check_deepseek_options(opts, config, layout)
    latent_rank = opts.kv_lora_rank - 1 if deepseek else opts.kv_lora_rank
    validate_mla_options(
        config, latent_rank, opts.qk_rope_head_dim, opts.rope_selection, opts.factorization, opts.num_rope_key_heads,
        opts.rank_allocation,
    )  # fmt: skip

    calibration, files, tokenizer = None, None, None
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
    model = load_causal_lm(src, dtype=dtype)
    if needs_text:
        from ..io.text import default_train_files
        from ..methods.calibration import collect_attention_inputs_from_files

        files = calibration_data or default_train_files()
        calibration = collect_attention_inputs_from_files(
            model, tokenizer, files, max_tokens=calibration_tokens
        )
    report = convert_to_mla(
        model, latent_rank, opts.qk_rope_head_dim, opts.rope_selection, opts.factorization, calibration,
        opts.num_rope_key_heads, opts.rank_allocation, opts.balance_kv,
    )  # fmt: skip
    report.details.update(
        source=str(src),
        format=opts.format,
        options=asdict(opts),
        calibration_data=None if files is None else [str(f) for f in files],
        calibration_tokens=None if files is None else calibration_tokens,
    )
    saved = model
    if deepseek:
        from ..export.deepseek_v3 import to_deepseek_v3

        saved, details = to_deepseek_v3(model)
        saved.generation_config = copy.deepcopy(model.generation_config)
        report.details["deepseek_v3"] = details
        report.after["kv_lora_rank"] = opts.kv_lora_rank
        report.kv_bytes_per_token_after = mla_kv_bytes_per_token(
            [opts.kv_lora_rank] * layout.num_layers, opts.qk_rope_head_dim, 1, next(model.parameters()).dtype
        )
    with atomic_output_dir(out, overwrite=overwrite) as tmp, torch.no_grad():
        saved.save_pretrained(tmp)
        copy_tokenizer_files(src, tmp)
        report.save(tmp)
    return report


def convert_checkpoint(
    src: str | Path,
    out: str | Path,
    to: str = "gqa",
    *,
    num_key_value_heads: int | None = None,
    method: str = "mean",
    calibration_data=None,
    calibration_tokens: int = 8192,
    calibration_inputs=None,
    dtype: str = "auto",
    overwrite: bool = False,
    mla: dict | None = None,
) -> ConversionReport:
    """Load ``src``, convert it, and save the result (weights, config, tokenizer, ``conversion.json``) to ``out``.

    Everything that can be checked from the config (family, head counts, dtype, paths) is checked before any
    weight is loaded; nothing is written to ``out`` unless the conversion succeeds. Methods that need calibration
    read the first ``calibration_tokens`` tokens of ``calibration_data``, unless ``calibration_inputs`` (a
    ``hf_attn_swap.methods.calibration.Calibration`` of this source model) is given.
    ``to="mla"`` takes its options in ``mla`` (see ``hf_attn_swap.pipeline.convert.MLAOptions``).
    """
    from transformers import AutoConfig

    from ..methods.gqa import convert_to_gqa, validate_num_key_value_heads
    from ..methods.gqa.convert import GQA_METHODS

    src = check_source(src)
    out = check_output(out, src=src, overwrite=overwrite)
    torch_dtype = parse_dtype(dtype)
    config = AutoConfig.from_pretrained(src)
    adapter = get_adapter(config)
    layout = adapter.layout(config)
    if to == "mla":
        return convert_mla_checkpoint(
            src, out, config, torch_dtype, mla or {}, calibration_data, calibration_tokens, overwrite
        )
    if to != "gqa":
        raise ValueError(f"unknown conversion target {to!r}; choose gqa or mla")
    if num_key_value_heads is None:
        raise ValueError("--to gqa needs --num-kv-heads N (1 = MQA)")
    validate_num_key_value_heads(layout, num_key_value_heads)
    if getattr(GQA_METHODS.get(method), "needs_calibration", False) and calibration_inputs is None:
        from ..methods.calibration import require_calibration_files

        require_calibration_files(calibration_data, f"method {method!r}")  # before any weight is loaded
    if method not in GQA_METHODS:
        raise ValueError(f"unknown GQA method {method!r}; choose one of {sorted(GQA_METHODS)}")
    gqa_method = GQA_METHODS[method]
    calibration = calibration_inputs
    needs_text = gqa_method.needs_calibration and calibration is None
    tokenizer = (
        load_tokenizer(src, f"method {method!r} calibrates on text", "use --method mean")
        if needs_text
        else None
    )

    if layout.causal:
        model = load_causal_lm(src, dtype=torch_dtype)
    else:  # encoders (BERT): the checkpoint's own architecture, e.g. BertModel for sentence-transformers
        from transformers import AutoModel

        model = AutoModel.from_pretrained(str(src), dtype=torch_dtype).eval()
    if needs_text:
        from ..methods.calibration import collect_calibration_from_files

        calibration = collect_calibration_from_files(
            model,
            tokenizer,
            calibration_data,
            max_tokens=calibration_tokens,
            key_weights=gqa_method.uses_key_weights,
        )
    report = convert_to_gqa(model, num_key_value_heads, method=gqa_method, calibration=calibration)
    report.details["source"] = str(src)
    with atomic_output_dir(out, overwrite=overwrite) as tmp:
        model.save_pretrained(tmp)
        copy_tokenizer_files(src, tmp)
        copy_sentence_transformers_files(src, tmp)
        report.save(tmp)
    return report
