"""Shared set-up for the recipe tests: a tiny checkpoint with a real tokenizer, its MQA conversion, text."""

from __future__ import annotations

import hashlib
from pathlib import Path

from hf_attn_swap.io.text import PYTHON_DOCS
from hf_attn_swap.testing import TINY_TEXT, save_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]


def sample_text(part: str = "tutorial", chars: int = 40_000) -> str:
    """Real English (the Python docs) when installed, else the built-in paragraph repeated."""
    folder = PYTHON_DOCS / part
    if folder.is_dir():
        text = "\n\n".join(p.read_text() for p in sorted(folder.glob("*.txt")))
    else:
        text = TINY_TEXT * (chars // len(TINY_TEXT) + 1)
    return text[:chars]


def make_tiny_pair(root: Path) -> tuple[Path, Path]:
    """(original tiny Llama with 4 query / 2 KV heads, its mean-pooled MQA conversion with conversion.json)."""
    from hf_attn_swap.pipeline.convert import convert_checkpoint

    src = save_tiny_checkpoint(root / "tiny", num_attention_heads=4, num_key_value_heads=2)
    convert_checkpoint(src, root / "tiny-mqa", to="gqa", num_key_value_heads=1)
    return src, root / "tiny-mqa"


def make_tiny_setup(root: Path, chars: int = 60_000) -> dict[str, Path]:
    """``make_tiny_pair`` plus ``train.txt`` (library docs) and held-out ``heldout.txt`` (tutorial)."""
    src, mqa = make_tiny_pair(root)
    data, heldout = root / "train.txt", root / "heldout.txt"
    data.write_text(sample_text("library", chars))
    heldout.write_text(sample_text("tutorial", chars))
    return {"root": root, "src": src, "mqa": mqa, "data": data, "heldout": heldout}


def folder_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }
