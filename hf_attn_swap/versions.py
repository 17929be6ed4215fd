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
