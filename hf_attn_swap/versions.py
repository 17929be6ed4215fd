"""The transformers range this package supports, checked on import (the range itself lives in pyproject)."""

from __future__ import annotations

import transformers


def check_transformers_version(distribution: str = "hf_attn_swap") -> None:
    """Raise ``ImportError`` when the installed transformers is outside the range ``distribution`` declares
    (pyproject's ``dependencies``, the range CI tests at both ends). No-op when the package is not installed
    (a bare checkout on ``PYTHONPATH``, or this file as saved remote code)."""
    from importlib import metadata

    from packaging.requirements import Requirement

    try:
        requirements = [Requirement(line) for line in metadata.requires(distribution) or []]
    except metadata.PackageNotFoundError:
        return
    for requirement in requirements:
        if requirement.name == "transformers" and requirement.marker is None:
            if not requirement.specifier.contains(transformers.__version__, prereleases=True):
                raise ImportError(
                    f"{distribution} works with transformers{requirement.specifier} (tested at both ends), found "
                    f"{transformers.__version__}: pip install 'transformers{requirement.specifier}'"
                )


#: public names of earlier releases, per module: old name -> the name that replaced it (``renamed_attributes``)
RENAMED = {
    "hf_attn_swap.methods.gqa": {"GQAConfig": "GQAConversionConfig", "GQALayers": "GQAConversion"},
    "hf_attn_swap.methods.mla": {"MLALayers": "MLAConversion", "MLALayerConverter": "MLAConversion"},
    "hf_attn_swap.export": {"DeepseekV3Plan": "DeepseekV3Layout", "deepseek_v3_plan": "deepseek_v3_layout"},
}


def renamed_attributes(namespace: dict):
    """A module ``__getattr__`` that serves the module's names of earlier releases (``RENAMED``) with a
    ``DeprecationWarning``: ``__getattr__ = renamed_attributes(globals())`` at the end of the module."""
    import warnings

    module = namespace["__name__"]
    renamed = RENAMED[module]

    def __getattr__(name: str):
        if name in renamed:
            warnings.warn(f"{module}.{name} is now {renamed[name]}", DeprecationWarning, stacklevel=2)
            return namespace[renamed[name]]
        raise AttributeError(f"module {module!r} has no attribute {name!r}")

    return __getattr__
