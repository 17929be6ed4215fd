"""The ``hf-attn-swap example-model`` job: materialise a packaged real model; prints its folder."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal


@dataclass
class ExampleModelArguments:
    name: Literal["smollm2", "qwen2.5-coder", "minilm"] = field(
        metadata={"help": "the packaged model (hf_attn_swap.io.examples)"}
    )
    refresh: bool = field(default=False, metadata={"help": "rebuild the cached folder"})


def run_example_model(args: ExampleModelArguments) -> int:
    from ..io.examples import example_model_path

    print(example_model_path(args.name, refresh=args.refresh))
    return 0
