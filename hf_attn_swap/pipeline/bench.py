"""The ``hf-attn-swap bench`` job: decode tokens/s at one context, cache bytes per token and peak RSS."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from ..io.folders import machine_info, write_json


@dataclass
class BenchArguments:
    model: str = field(metadata={"help": "checkpoint folder"})
    context: int = field(metadata={"help": "prompt tokens before decoding"})
    new_tokens: int = field(default=16, metadata={"help": "greedy decode steps timed"})
    attn_implementation: str | None = field(default=None, metadata={"help": "e.g. sdpa, eager, latent_sdpa"})
    cache: Literal["auto", "latent", "dynamic"] = field(
        default="auto", metadata={"help": "cache class (auto: the model's)"}
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="float32", metadata={"help": "dtype the model is loaded in"}
    )
    threads: int | None = field(default=None, metadata={"help": "torch threads (default: torch's)"})
    json: str | None = field(
        default=None, metadata={"help": "write the measurements to this JSON file", "metavar": "OUT"}
    )

    def __post_init__(self):
        if self.context < 1:
            raise ValueError(f"--context must be at least 1, got {self.context}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {self.threads}")


def bench_prompt(model_path, context: int, vocab_size: int):
    """The first ``context`` tokens of the held-out text (repeated if short), or fixed ids without a tokenizer."""
    import torch

    from ..io.checkpoints import load_tokenizer
    from ..io.text import default_eval_files, load_token_ids

    try:
        ids = load_token_ids(load_tokenizer(model_path), default_eval_files(), context)
    except (OSError, ValueError, TypeError):
        ids = torch.arange(3, 3 + context) % vocab_size
    return ids.repeat(context // len(ids) + 1)[:context]


def run_bench(args: BenchArguments) -> int:
    import torch

    from ..evaluate.speed import measure_decode_speed
    from ..io.checkpoints import load_causal_lm

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_causal_lm(args.model, args.dtype, args.attn_implementation)
    prompt = bench_prompt(args.model, args.context, model.config.vocab_size)
    result = measure_decode_speed(
        model, args.context, args.new_tokens, prompt, args.cache, check_positions=False
    )
    result = {"model": str(args.model), **result, "command": sys.argv, "machine": machine_info()}
    print(
        f"{Path(args.model).name} [{result['attn_implementation']}, {result['cache_class']}] context {args.context}: "
        f"{result['decode_tokens_per_second']:.2f} tokens/s over {args.new_tokens} new tokens, prefill "
        f"{result['prefill_seconds']:.1f} s, cache {result['cache_bytes_per_token']:.0f} bytes/token, "
        f"peak RSS {result['peak_rss_mib']:.0f} MiB"
    )
    if args.json:
        print(f"wrote {write_json(args.json, result)}")
    return 0
