"""Checkpoint-level operations behind the CLI: load, convert a folder into a new folder, copy tokenizer files.

The source folder is only ever read. The output folder is written through ``atomic_output_dir``: it appears
complete or not at all.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .folders import check_source, parse_dtype

#: the files a tokenizer folder consists of. Converted and uptrained folders get them copied verbatim, not
#: re-saved through ``AutoTokenizer.from_pretrained(src).save_pretrained(out)``: measured (transformers 5.24), a
#: re-save drops ``vocab.txt`` / ``special_tokens_map.json`` (BERT) and ``vocab.json`` / ``merges.txt`` /
#: ``added_tokens.json`` (GPT-2) that other tools read, and a sentencepiece-only source (``tokenizer.model``, no
#: protobuf or tiktoken installed) does not load at all, which would fail a conversion after its work is done.
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


def has_tokenizer_files(folder: str | Path) -> bool:
    folder = Path(str(folder)).expanduser()
    return folder.is_dir() and any((folder / name).is_file() for name in TOKENIZER_FILES)


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
        what = (
            "its tokenizer files do not load (" + str(err).strip().splitlines()[0] + ")"
            if has_tokenizer_files(path)
            else "it has no tokenizer files"
        )
        purpose = f" ({needed_for})" if needed_for else ""
        fix = f"; or {alternative}" if alternative else ""
        raise ValueError(
            f"no tokenizer in {str(path)!r}{purpose}: {what}. Copy the original model's tokenizer files "
            f"({', '.join(TOKENIZER_FILES[:2])}, ...) into it{fix}"
        ) from None


def copy_tokenizer_files(src: Path, dst: Path) -> list[str]:
    """Copy ``src``'s tokenizer files (``TOKENIZER_FILES``, those present) into ``dst``; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, Path(dst) / name)
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
