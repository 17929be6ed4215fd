"""Training text as packed blocks: the token stream of the files cut into equal ``block_size`` rows."""

from __future__ import annotations

import math
from contextlib import contextmanager
from itertools import accumulate

from ..io.text import CHARS_PER_TOKEN, FILE_SEPARATOR, default_train_files, read_text, resolve_text_files


def packed_blocks(tokenizer, data, block_size: int, max_blocks: int):
    """A ``datasets.Dataset`` with one column ``input_ids``: up to ``max_blocks`` rows of ``block_size`` tokens.

    The ``datasets`` recipe for causal-LM text: the files (default: the Python library docs) are loaded in order,
    one row each; ``map`` tokenises each file (without special tokens, followed by a blank line as separator);
    a second ``map`` concatenates the tokens and cuts them into consecutive blocks (a trailing partial block is
    dropped). Only a prefix of the files large enough for ``max_blocks`` blocks is tokenised. Raises
    ``ValueError`` when the text holds less than one block.
    """
    from datasets import Dataset

    if block_size < 2:
        raise ValueError(f"block_size must be at least 2 tokens, got {block_size}")
    files = resolve_text_files(data or default_train_files())
    texts = Dataset.from_dict({"text": [read_text([path]) for path in files]})
    wanted = max_blocks * block_size

    def tokenize(batch):
        ids = tokenizer([text + FILE_SEPARATOR for text in batch["text"]], add_special_tokens=False)
        return {"input_ids": ids["input_ids"]}

    ends = list(accumulate(len(text) for text in texts["text"]))
    chars = wanted * CHARS_PER_TOKEN
    with _quiet_datasets():
        while True:  # tokenise the shortest prefix of the files that holds enough tokens (doubling a guess)
            count = next((i + 1 for i, end in enumerate(ends) if end >= chars), len(files))
            tokens = texts.select(range(count)).map(tokenize, batched=True, remove_columns=["text"])
            total = sum(len(ids) for ids in tokens["input_ids"])
            if total >= wanted or count == len(files):
                break
            chars *= 2
        blocks = tokens.map(
            group_into_blocks, batched=True, batch_size=None, fn_kwargs={"block_size": block_size}
        )
    if len(blocks) == 0:
        raise ValueError(
            f"the training text ({len(files)} file(s), first {str(files[0])!r}) holds {total} tokens, "
            f"less than one block of {block_size}: pass more text with --data or a smaller --block-size"
        )
    return blocks.select(range(min(max_blocks, len(blocks)))), files


def group_into_blocks(batch: dict, block_size: int) -> dict:
    """``datasets`` batched map: the rows' ``input_ids`` concatenated and cut into rows of ``block_size``."""
    stream = [token for ids in batch["input_ids"] for token in ids]
    count = len(stream) // block_size
    return {"input_ids": [stream[i * block_size : (i + 1) * block_size] for i in range(count)]}


@contextmanager
def _quiet_datasets():
    """No ``Map: 100%`` bars in the uptrain output (the caller's progress-bar setting is restored)."""
    from datasets.utils import are_progress_bars_disabled, disable_progress_bars, enable_progress_bars

    was_disabled = are_progress_bars_disabled()
    disable_progress_bars()
    try:
        yield
    finally:
        if not was_disabled:
            enable_progress_bars()


def steps_for_budget(max_tokens: int, tokens_per_step: int) -> int:
    """Optimizer steps that cover ``max_tokens`` (rounded up to whole steps)."""
    if max_tokens is None:
        raise ValueError("uptrain needs a token budget: --max-tokens N (training tokens)")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
        raise ValueError(f"--max-tokens must be a positive number of training tokens, got {max_tokens!r}")
    return math.ceil(max_tokens / tokens_per_step)
