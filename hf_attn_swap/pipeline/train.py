"""The ``hf-attn-swap uptrain`` job: ``hf_attn_swap.uptrain.uptrain`` on an ``UptrainConfig`` (the command's flags,
with ``--config YAML`` supplying their defaults), then a one-line summary and the optional JSON record."""

from __future__ import annotations

import sys
from dataclasses import dataclass, field

from ..io.folders import machine_info, write_json
from ..uptrain import UptrainConfig, uptrain


@dataclass
class UptrainCommandArguments:
    """The ``uptrain`` flags that are not settings of the run."""

    config: str | None = field(
        default=None,
        metadata={"help": "YAML recipe (recipes/configs/*.yaml) supplying defaults for the flags"},
    )
    json: str | None = field(
        default=None, metadata={"help": "also write the training record here", "metavar": "FILE"}
    )


def run_uptrain(config: UptrainConfig, command: UptrainCommandArguments) -> int:
    record = uptrain(config)
    if record is not None:  # the main process
        first, final = (
            "n/a" if record[k] is None else f"{record[k]:.4g}" for k in ("first_loss", "final_loss")
        )
        print(
            f"{config.mode}: {record['tokens_trained']} tokens in {record['wall_seconds']} s, loss "
            f"{first} -> {final}; saved to {config.output}"
        )
        if command.json:
            payload = {**record, "command": sys.argv, "machine": machine_info()}
            print(f"wrote {write_json(command.json, payload)}")
    return 0
