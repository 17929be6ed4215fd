"""Recipe files (``recipes/configs/*.yaml``): a YAML mapping of settings plus ``key=value`` overrides, read into the
options dataclasses with ``transformers.HfArgumentParser.parse_dict``; ``example:NAME`` sources."""

from __future__ import annotations

import dataclasses
import math
import numbers
import types
import typing
from pathlib import Path


def load_recipe_yaml(
    path: str | Path, overrides: list[str] | None = None, required: tuple[str, ...] = ()
) -> dict:
    """A recipe config: the YAML mapping at ``path`` updated by ``key=value`` overrides (values parsed as YAML);
    every key in ``required`` must be set by one of them."""
    path = Path(path).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"recipe config {str(path)!r} does not exist")
    if not path.is_file():
        raise ValueError(f"recipe config {str(path)!r} is not a file: name a YAML file")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"recipe config {str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start})"
        ) from None
    values = parse_yaml(text, f"recipe config {str(path)!r}") or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a YAML mapping of settings, not a {type(values).__name__}")
    odd = [key for key in values if not isinstance(key, str)]
    if odd:
        raise ValueError(f"{path}: setting names are words, got {odd[0]!r}")
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        values[key.strip().replace("-", "_")] = parse_yaml(raw, f"override {item!r}")
    missing = [key for key in required if values.get(key) in (None, "", {})]
    if missing:
        raise ValueError(
            f"{path} does not set {', '.join(missing)}: add `{missing[0]}: ...` to the YAML "
            f"or pass {missing[0]}=... on the command line"
        )
    return values


def parse_yaml(text: str, what: str):
    """``yaml.safe_load(text)``; malformed YAML raises ``ValueError`` naming ``what`` and the line."""
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ValueError(f"{what} is not valid YAML ({problem}{where}): fix it") from None


def parse_settings(values: dict, dataclass_types: tuple, what: str = "recipe") -> tuple:
    """``HfArgumentParser(dataclass_types).parse_dict(values)`` (one instance per dataclass, validated by its
    ``__post_init__``), after naming any key that no dataclass has."""
    from transformers import HfArgumentParser

    known = sorted({f.name for cls in dataclass_types for f in dataclasses.fields(cls) if f.init})
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ValueError(f"unknown {what} setting(s) {unknown}; known: {known}")
    return HfArgumentParser(dataclass_types).parse_dict(values)


def parse_recipe(
    path: str | Path, overrides: list[str] | None, dataclass_types: tuple, required: tuple[str, ...] = ()
) -> tuple:
    """A recipe YAML (+ overrides) as instances of ``dataclass_types``; see ``load_recipe_yaml``."""
    return parse_settings(load_recipe_yaml(path, overrides, required), dataclass_types, f"{Path(path).name}")


def resolve_source(source: str | Path) -> Path:
    """Recipe paths: ``example:NAME`` is the packaged example model's folder, anything else a path."""
    source = str(source)
    if source.startswith("example:"):
        from .examples import example_model_path

        return example_model_path(source.split(":", 1)[1])
    return Path(source).expanduser()


def coerce_fields(options) -> None:
    """Check every field of the dataclass instance ``options`` against its type hint, in place.

    YAML settings and ``--config`` defaults reach the options classes unchecked (``HfArgumentParser.parse_dict``
    and ``set_defaults`` apply no types), and so do Python callers: each options class calls this from
    ``__post_init__``. Near misses are converted: a number written as a string (YAML reads ``1e-3`` as one)
    becomes the number, an integral float an int, a path a str, a single value a list of one. Anything else of
    the wrong type, and NaN or an infinite number, raises ``ValueError`` naming the field and what it takes.
    """
    hints = typing.get_type_hints(type(options))
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        coerced = coerce_value(f.name, value, hints[f.name])
        if coerced is not value:
            object.__setattr__(options, f.name, coerced)  # frozen classes too


def coerce_value(name: str, value, hint):
    """``value`` checked against the type ``hint`` (see ``coerce_fields``); a hint that is not a plain type
    (a class, ``Any``) accepts any value."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        for option in options:
            try:
                return coerce_value(name, value, option)
            except ValueError:
                if len(options) == 1:
                    raise
        raise ValueError(f"{name} must be {_describe(hint)}, got {value!r}")
    if origin is typing.Literal:
        if isinstance(value, str) and value in args:
            return value
        raise ValueError(f"{name} must be one of {', '.join(map(str, args))}, got {value!r}")
    if origin in (list, tuple) or hint in (list, tuple):
        item, given = (args[0] if args else typing.Any), value
        if isinstance(value, (str, Path, numbers.Number)) and not isinstance(value, bool):
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be {_describe(hint)}, got {given!r}")
        try:
            return [coerce_value(name, v, item) for v in value]
        except ValueError:
            raise ValueError(f"{name} must be {_describe(hint)}, got {given!r}") from None
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name} must be a mapping (key: value), got {value!r}")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if hint is int:
        number = _number(name, value)
        if float(number).is_integer():
            return int(number)
        raise ValueError(f"{name} must be a whole number, got {value!r}")
    if hint is float:
        return float(_number(name, value))
    if hint is str:
        if isinstance(value, (str, Path)):
            return str(value)
        raise ValueError(f"{name} must be text, got {value!r}")
    return value


def _number(name: str, value):
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            try:
                value = float(value)
            except ValueError:
                raise ValueError(f"{name} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return value


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args if a is not type(None))
    if origin in (list, tuple):
        plural = {int: "whole numbers", float: "numbers", str: "strings"}
        return f"a list of {plural.get(args[0], 'values')}" if args else "a list"
    names = {int: "a whole number", float: "a number", str: "text", bool: "true or false", dict: "a mapping"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))
