"""Training text as packed blocks: the token stream of the files cut into equal ``block_size`` rows."""

from __future__ import annotations

import math

from ..io.text import default_train_files, load_token_ids, resolve_text_files


def packed_blocks(tokenizer, data, block_size: int, max_blocks: int):
    """A ``datasets.Dataset`` with one column ``input_ids``: up to ``max_blocks`` rows of ``block_size`` tokens.

    The files (default: the Python library docs) are read in order, tokenised without special tokens,
    concatenated and cut into consecutive blocks; a trailing partial block is dropped. Raises ``ValueError``
    when the text holds less than one block.
    """
    from datasets import Dataset

    if block_size < 2:
        raise ValueError(f"block_size must be at least 2 tokens, got {block_size}")
    files = resolve_text_files(data or default_train_files())
    # Tokenised as one joined text (``load_token_ids``, the stream evaluation and calibration use), not with a
    # per-file ``datasets.map``: that changes the tokens at every file boundary (measured on the library docs
    # with SmolLM2: a different token stream from the first boundary on), so the published uptraining figures
    # would no longer reproduce. ``datasets`` holds the packed blocks for the Trainer.
    ids = load_token_ids(tokenizer, files, max_tokens=max_blocks * block_size)
    count = min(max_blocks, ids.numel() // block_size)
    if count == 0:
        raise ValueError(
            f"the training text ({len(files)} file(s), first {str(files[0])!r}) holds {ids.numel()} tokens, "
            f"less than one block of {block_size}: pass more text with --data or a smaller --block-size"
        )
    blocks = ids[: count * block_size].view(count, block_size)
    return Dataset.from_dict({"input_ids": blocks.tolist()}), files


def steps_for_budget(max_tokens: int, tokens_per_step: int) -> int:
    """Optimizer steps that cover ``max_tokens`` (rounded up to whole steps)."""
    if max_tokens is None:
        raise ValueError("uptrain needs a token budget: --max-tokens N (training tokens)")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens <= 0:
        raise ValueError(f"--max-tokens must be a positive number of training tokens, got {max_tokens!r}")
    return math.ceil(max_tokens / tokens_per_step)
