"""The ``hf-attn-swap uptrain`` job: ``hf_attn_swap.uptrain.uptrain`` on an ``UptrainConfig`` (the command's flags,
with ``--config YAML`` supplying their defaults), then a one-line summary and the optional JSON record.

A recipe's ``convert:`` section (``recipes/uptrain.py`` and ``--config`` alike) builds MODEL first when it does not
exist yet (``build_model``): ``source`` (a folder, or ``example:NAME`` for a packaged model) plus the keyword
arguments of ``convert_checkpoint``. Every setting the run can check without a model is checked before that."""

from __future__ import annotations

import inspect
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

from ..io.folders import check_output_file, machine_info, write_json
from ..io.recipes import coerce_fields, coerce_value, resolve_source
from ..uptrain import UptrainConfig, uptrain
from ..uptrain.run import check_settings, cpu_only
from .convert import convert_checkpoint


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

    def __post_init__(self):
        coerce_fields(self)


def convert_section(convert) -> tuple[str, dict]:
    """(source, ``convert_checkpoint`` keyword arguments) of a ``convert:`` section; ``ValueError`` naming the
    fix for anything else (not a mapping, no ``source``, an unknown key)."""
    known = sorted(set(inspect.signature(convert_checkpoint).parameters) - {"src", "out"})
    if not isinstance(convert, dict):
        raise ValueError(
            f"convert: must be a mapping (source: FOLDER or example:NAME, to: gqa|mla, ...), got {convert!r}"
        )
    options = dict(convert)
    source = options.pop("source", None)
    if not isinstance(source, str) or not source.strip():
        raise ValueError(
            "the convert: section needs source: FOLDER (or example:NAME), the checkpoint MODEL is converted from"
        )
    unknown = sorted(map(str, set(options) - set(known)))
    if unknown:
        raise ValueError(f"unknown convert: setting(s) {unknown}; known: source, {', '.join(known)}")
    try:
        hints = typing.get_type_hints(convert_checkpoint)
    except NameError:  # an annotation only a type checker resolves: the values are checked by the conversion
        hints = {}
    return source, {k: coerce_value(f"convert: {k}", v, hints.get(k, typing.Any)) for k, v in options.items()}


def build_model(config: UptrainConfig) -> None:
    """Check the run's settings (``check_settings``); then, when ``config.model`` does not exist and the run has
    a ``convert:`` section, convert it from the section's source (once: the main process of a distributed run
    converts while the others wait). An existing MODEL is used as it is (a rerun resumes)."""
    check_settings(config)
    if config.convert is None:
        if not Path(config.model).expanduser().exists():
            raise FileNotFoundError(
                f"model {config.model!r} does not exist: convert it first (hf-attn-swap convert), or give "
                "--config a recipe whose convert: section builds it"
            )
        return
    source, options = convert_section(config.convert)
    if Path(config.model).expanduser().exists():
        return
    from accelerate import PartialState

    state = PartialState(cpu=cpu_only())
    with state.main_process_first():
        if state.is_main_process and not Path(config.model).expanduser().exists():
            print(convert_checkpoint(resolve_source(source), config.model, **options), file=sys.stderr)


def run_uptrain(config: UptrainConfig, command: UptrainCommandArguments) -> int:
    if command.json:
        check_output_file(command.json, "--json")
    build_model(config)
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
