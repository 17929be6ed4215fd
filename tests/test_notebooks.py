"""The notebooks run top to bottom (nbclient, a real Jupyter kernel) on tiny settings."""

from __future__ import annotations

import nbformat
import pytest
from _recipes_fixtures import REPO
from nbclient import NotebookClient


@pytest.mark.parametrize("name", ["quickstart.ipynb", "uptrain_walkthrough.ipynb"])
def test_notebook_executes(name, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_ATTN_SWAP_NOTEBOOK", "tiny")
    monkeypatch.setenv("HF_ATTN_SWAP_NOTEBOOK_WORKDIR", str(tmp_path / "work"))
    monkeypatch.setenv("PYTHONPATH", str(REPO))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    notebook = nbformat.read(REPO / "notebooks" / name, as_version=4)
    NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert any(o.output_type in ("display_data", "execute_result") for o in outputs)
