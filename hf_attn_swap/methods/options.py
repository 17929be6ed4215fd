"""The checks every options dataclass runs on construction, written once (``GQAConversionConfig``,
``MLAConversionConfig``, ``CalibrationConfig``, the pipeline's argument classes): each raises a one-line
``ValueError`` that names the option and the value it got. ``option`` declares a dataclass field with its help
text (what ``HfArgumentParser`` turns into ``--flag``)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

_NO_DEFAULT = dataclasses.MISSING


def option(default=_NO_DEFAULT, help: str = "", **metadata) -> dataclasses.Field:
    """``field(default=default, metadata={"help": help, **metadata})`` (no default: a required option)."""
    return dataclasses.field(default=default, metadata={"help": help, **metadata})


def check_int(name: str, value, *, minimum: int | None = None, optional: bool = False) -> int | None:
    """``value`` as an int (not a bool), at least ``minimum``; None passes when ``optional``."""
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        bound = "a positive int" if minimum == 1 else f"at least {minimum}"
        raise ValueError(f"{name} must be {bound}, got {value!r}")
    return value


def check_bool(name: str, value) -> bool:
    """``value`` when it is True or False (not 1, 0 or "yes")."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def check_number(name: str, value, low: float, high: float) -> float:
    """``value`` as a float in [low, high] (ints accepted, bools not)."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise ValueError(f"{name} must be a number between {low:g} and {high:g}, got {value!r}")
    return float(value)


def check_choice(name: str, value, choices: Iterable[str], hint: str = "") -> str:
    """``value`` when it is one of ``choices``; the error lists them (and ``hint``)."""
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}{hint}")
    return value
