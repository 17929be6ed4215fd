"""Recipe files (``recipes/configs/*.yaml``): a YAML mapping of settings plus ``key=value`` overrides, read into the
options dataclasses with ``transformers.HfArgumentParser.parse_dict``; ``example:NAME`` sources."""

from __future__ import annotations

import dataclasses
from pathlib import Path


def load_recipe_yaml(
    path: str | Path, overrides: list[str] | None = None, required: tuple[str, ...] = ()
) -> dict:
    """A recipe config: the YAML mapping at ``path`` updated by ``key=value`` overrides (values parsed as YAML);
    every key in ``required`` must be set by one of them."""
    import yaml

    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"recipe config {str(path)!r} does not exist")
    values = yaml.safe_load(path.read_text()) or {}
    if not isinstance(values, dict):
        raise ValueError(f"{path} must hold a YAML mapping of settings")
    for item in overrides or []:
        if "=" not in item:
            raise ValueError(f"override {item!r} is not key=value")
        key, raw = item.split("=", 1)
        values[key.strip().replace("-", "_")] = yaml.safe_load(raw)
    missing = [key for key in required if values.get(key) in (None, "", {})]
    if missing:
        raise ValueError(
            f"{path} does not set {', '.join(missing)}: add `{missing[0]}: ...` to the YAML "
            f"or pass {missing[0]}=... on the command line"
        )
    return values


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
