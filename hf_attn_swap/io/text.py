"""Local text for evaluation, calibration and uptraining.

The default corpus is the English reST of the Python 3.11 documentation (Debian ``python3.11-doc``):
``tutorial/`` is held out for evaluation, ``library/`` is used for calibration and training, so the two never
overlap. Any text files or folders can be passed instead.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

PYTHON_DOCS = Path("/usr/share/doc/python3.11/html/_sources")
TEXT_SUFFIXES = (".txt", ".rst", ".md", ".text")
INSTALL_HINT = "apt-get install python3.11-doc (or pass --data with your own text files)"
#: what goes between two files of a corpus (a blank line)
FILE_SEPARATOR = "\n\n"
#: generous characters per token of English text: how much to read for a token budget before tokenising
CHARS_PER_TOKEN = 8


def default_eval_files() -> list[Path]:
    """Held-out evaluation text: the Python tutorial."""
    return [_python_docs("tutorial")]


def default_train_files() -> list[Path]:
    """Calibration / uptraining text: the Python library reference (disjoint from the tutorial)."""
    return [_python_docs("library")]


def _python_docs(part: str) -> Path:
    path = PYTHON_DOCS / part
    if not path.is_dir():
        raise FileNotFoundError(f"default text {path} is missing: {INSTALL_HINT}")
    return path


def resolve_text_files(paths: str | Path | Iterable[str | Path]) -> list[Path]:
    """Files in the given order; folders expand to their text files (sorted, recursive).

    Raises ``FileNotFoundError`` for a missing path and ``ValueError`` for an empty file, a folder without
    text files, or no paths at all.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(TEXT_SUFFIXES))
            found = [p for p in found if p.stat().st_size > 0]
            if not found:
                raise ValueError(
                    f"data folder {str(path)!r} has no non-empty {'/'.join(TEXT_SUFFIXES)} files"
                )
            files.extend(found)
        elif path.is_file():
            if path.stat().st_size == 0:
                raise ValueError(f"data file {str(path)!r} is empty")
            files.append(path)
        else:
            raise FileNotFoundError(f"data path {str(path)!r} does not exist")
    if not files:
        raise ValueError("no data files given")
    return files


def read_text(files: Sequence[Path], max_chars: int | None = None) -> str:
    """Concatenate files (blank line between them), stopping once ``max_chars`` characters are read."""
    parts, total = [], 0
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text) + len(FILE_SEPARATOR)
        if max_chars is not None and total >= max_chars:
            break
    return FILE_SEPARATOR.join(parts)


#: a line that is reST/doctest markup rather than prose: indented (code, quotes, directive bodies), a directive or
#: comment (``..``), ``::``, a prompt (``>>>``, ``...``), a title over/underline, a list item or a field (``:``)
_MARKUP = re.compile(r"^(\s|\.\.|::|>>>|\.\.\.|[=\-~^*#+`|]{3,}|[*\-+] |\d+\. |:)")


def prose_paragraphs(
    text: str,
    min_words: int = 0,
    min_chars: int = 0,
    max_chars: int | None = None,
    limit: int | None = None,
) -> list[str]:
    """The plain-prose paragraphs of reST/text ``text``, in order, each joined into one line.

    A paragraph is a blank-line separated block none of whose lines is markup (directives, code, doctest
    prompts, titles, list items, fields; see ``_MARKUP``) and which holds no ``::`` (it introduces a code block).
    Kept when it has at least ``min_words`` words and ``min_chars`` to ``max_chars`` characters; the first
    ``limit`` are returned. ``read_text(resolve_text_files(paths))`` gives the text of files or folders.
    """
    paragraphs = []
    for block in re.split(r"\n\s*\n", text):
        lines = block.strip("\n").split("\n")
        if not block.strip() or any(_MARKUP.match(line) for line in lines) or "::" in block:
            continue
        paragraph = " ".join(line.strip() for line in lines)
        if (
            len(paragraph.split()) >= min_words
            and len(paragraph) >= min_chars
            and (max_chars is None or len(paragraph) <= max_chars)
        ):
            paragraphs.append(paragraph)
            if limit is not None and len(paragraphs) >= limit:
                break
    return paragraphs


def load_token_ids(tokenizer, paths, max_tokens: int | None = None):
    """The first ``max_tokens`` token ids [N] (LongTensor) of the text at ``paths``, without special tokens.

    Reads only as many files as needed. Raises ``ValueError`` when the text holds fewer than 2 tokens.
    """
    # One tokenizer call on the joined text, not the ``datasets`` per-file map that ``uptrain.data`` packs with:
    # this stream feeds evaluation and calibration, and tokenising files separately changes the tokens at every
    # file boundary and so shifts everything after it. Measured with SmolLM2 on the default tutorial (17 files):
    # 68 552 tokens joined, 68 538 per file ("\n\n\n" at a boundary becomes one token, 16506, instead of [1116,
    # 198]), and 65 746 positions differ from the first boundary (token 1186) on, so every evaluation window
    # after it and the published perplexity / KL figures would change.
    files = resolve_text_files(paths)
    budget = None if max_tokens is None else max_tokens * CHARS_PER_TOKEN
    while True:
        text = read_text(files, budget)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if (
            max_tokens is None
            or len(ids) >= max_tokens
            or budget is None
            or budget >= sum(f.stat().st_size for f in files)
        ):
            break
        budget *= 2
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise ValueError(
            f"the data at {[str(f) for f in files[:3]]} holds {len(ids)} tokens; need at least 2"
        )
    return torch.tensor(ids, dtype=torch.long)


def windows(token_ids: torch.Tensor, window: int) -> list[torch.Tensor]:
    """Consecutive non-overlapping windows of ``window`` tokens (a trailing window of < 2 tokens dropped)."""
    if window < 2:
        raise ValueError(f"window must be at least 2 tokens, got {window}")
    chunks = list(torch.split(token_ids, window))
    return [c for c in chunks if c.numel() >= 2]
