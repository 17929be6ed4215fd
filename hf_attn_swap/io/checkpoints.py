"""Checkpoint-level operations behind the CLI: load, convert a folder into a new folder, copy tokenizer files.

The source folder is only ever read. The output folder is written through ``atomic_output_dir``: it appears
complete or not at all.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

from .folders import check_source, parse_dtype

#: files transformers can build a tokenizer from (serialised fast tokenizer, its config, a sentencepiece model,
#: BPE / WordPiece vocabularies). Kept only to tell "no tokenizer" from "a tokenizer that does not load" when
#: loading fails (transformers raises the same errors for both); which files a tokenizer consists of is
#: AutoTokenizer's business (``copy_tokenizer_files``).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
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
    """Save ``src``'s tokenizer into ``dst`` (``AutoTokenizer.from_pretrained(src).save_pretrained(dst)``: every
    file the tokenizer needs, chat template included) and return the names written. A ``src`` without tokenizer
    files gets nothing written and no error; one whose tokenizer does not load raises ``load_tokenizer``'s
    ``ValueError``."""
    if not has_tokenizer_files(src):
        return []
    return sorted(Path(p).name for p in load_tokenizer(src).save_pretrained(str(dst)))


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
