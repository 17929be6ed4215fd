"""Checkpoint-level operations behind the CLI: load, convert a folder into a new folder, copy tokenizer files.

The source folder is only ever read. The output folder is written through ``atomic_output_dir``: it appears
complete or not at all.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .architectures import get_adapter
from .io import atomic_output_dir, check_output, check_source, parse_dtype
from .report import ConversionReport

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def load_causal_lm(
    path: str | Path, dtype: str | torch.dtype = "auto", attn_implementation: str | None = None
):
    """``AutoModelForCausalLM.from_pretrained`` in eval mode, with readable errors for bad paths/dtypes."""
    from transformers import AutoModelForCausalLM

    dtype = parse_dtype(dtype)
    kwargs = {"dtype": dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if Path(str(path)).expanduser().exists():
        path = check_source(path)
    return AutoModelForCausalLM.from_pretrained(str(path), **kwargs).eval()


def load_tokenizer(path: str | Path, needed_for: str = "", alternative: str = ""):
    """``AutoTokenizer.from_pretrained(path)``; a folder without a usable tokenizer raises ``ValueError`` naming
    the fix (transformers' own message asks to install sentencepiece or tiktoken, which rarely is the cause)."""
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, TypeError, ImportError) as err:
        folder = Path(str(path)).expanduser()
        has_files = folder.is_dir() and any((folder / name).is_file() for name in TOKENIZER_FILES)
        what = (
            "its tokenizer files do not load (" + str(err).strip().splitlines()[0] + ")"
            if has_files
            else ("it has no tokenizer files")
        )
        purpose = f" ({needed_for})" if needed_for else ""
        fix = f"; or {alternative}" if alternative else ""
        raise ValueError(
            f"no tokenizer in {str(path)!r}{purpose}: {what}. Copy the original model's tokenizer files "
            f"({', '.join(TOKENIZER_FILES[:2])}, ...) into it{fix}"
        ) from None


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    copied = []
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, dst / name)
            copied.append(name)
    return copied


SENTENCE_TRANSFORMERS_FILES = (
    "modules.json",
    "sentence_bert_config.json",
    "config_sentence_transformers.json",
    "1_Pooling",
    "2_Normalize",
)


def copy_sentence_transformers_files(src: Path, dst: Path) -> list[str]:
    """The pooling/normalisation set-up of a sentence-transformers folder (the weights are written anew)."""
    copied = []
    for name in SENTENCE_TRANSFORMERS_FILES:
        if (src / name).is_dir():
            shutil.copytree(src / name, dst / name)
        elif (src / name).is_file():
            shutil.copy2(src / name, dst / name)
        else:
            continue
        copied.append(name)
    return copied


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
    ``hf_attn_swap.calibration.Calibration`` of this source model) is given.
    ``to="mla"`` takes its options in ``mla`` (see ``hf_attn_swap.mla.checkpoint.MLAOptions``).
    """
    from transformers import AutoConfig

    from .gqa import convert_to_gqa, validate_num_key_value_heads
    from .gqa.convert import GQA_METHODS

    src = check_source(src)
    out = check_output(out, src=src, overwrite=overwrite)
    torch_dtype = parse_dtype(dtype)
    config = AutoConfig.from_pretrained(src)
    adapter = get_adapter(config)
    layout = adapter.layout(config)
    if to == "mla":
        from .mla.checkpoint import convert_mla_checkpoint

        return convert_mla_checkpoint(
            src, out, config, torch_dtype, mla or {}, calibration_data, calibration_tokens, overwrite
        )
    if to != "gqa":
        raise ValueError(f"unknown conversion target {to!r}; choose gqa or mla")
    if num_key_value_heads is None:
        raise ValueError("--to gqa needs --num-kv-heads N (1 = MQA)")
    validate_num_key_value_heads(layout, num_key_value_heads)
    if getattr(GQA_METHODS.get(method), "needs_calibration", False) and calibration_inputs is None:
        from .calibration import require_calibration_files

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
        from .calibration import collect_calibration_from_files

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
