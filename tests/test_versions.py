"""The supported transformers range: declared once in pyproject, enforced on import, tested at both ends by CI."""

from __future__ import annotations

import re
from importlib import metadata

import pytest
import transformers
from conftest import REPO_ROOT
from packaging.requirements import Requirement

from hf_attn_swap import versions


def declared() -> Requirement:
    """pyproject's transformers requirement (read as text: tomllib is not in Python 3.10)."""
    line = re.search(r'^\s*"(transformers[^"]*)"', (REPO_ROOT / "pyproject.toml").read_text(), re.M)
    return Requirement(line.group(1))


def test_the_range_has_a_real_floor_and_excludes_the_next_major():
    spec = declared().specifier
    floor = next(s.version for s in spec if s.operator == ">=")
    assert floor.startswith("5.") and floor != "5.0" and "5.0.0" not in spec
    assert floor in spec and "6.0.0" not in spec
    assert transformers.__version__ in spec  # the tests themselves run inside the range


def test_installed_metadata_declares_the_same_range():
    installed = next(
        Requirement(r) for r in metadata.requires("hf_attn_swap") if r.startswith("transformers")
    )
    assert installed.specifier == declared().specifier, "stale install: pip install -e . again"


@pytest.mark.parametrize(
    "version,accepted", [("5.14.2", False), ("6.0.0", False), ("5.15.0", True), ("5.99.1", True)]
)
def test_import_refuses_a_transformers_outside_the_range(monkeypatch, version, accepted):
    monkeypatch.setattr(versions.transformers, "__version__", version)
    if accepted:
        versions.check_transformers_version()
    else:
        with pytest.raises(ImportError, match=re.escape(f"found {version}: pip install 'transformers")):
            versions.check_transformers_version()
