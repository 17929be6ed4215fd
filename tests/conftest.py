"""Shared fixtures: tiny models of every native-GQA family, helpers that make heads identical, subprocess env."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import pytest
import torch

from hf_attn_swap.adapters import get_adapter
from hf_attn_swap.methods.gqa.base import grouped, per_query_head
from hf_attn_swap.testing import tiny_model, tiny_tokenizer

REPO_ROOT = Path(__file__).resolve().parents[1]
NATIVE_FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3"]


def subprocess_env(**extra) -> dict:
    """Environment for child Pythons that import this checkout's code (not another installed copy)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO_ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(extra)
    return env


PYTHON = sys.executable


def make_groups_identical(model, num_key_value_heads: int) -> None:
    """Overwrite K/V (and their biases) so every query head in a future group of ``num_key_value_heads``
    reads the same K/V head: the condition under which pooling must be exact."""
    adapter = get_adapter(model)
    with torch.no_grad():
        for attn in adapter.attention_modules(model):
            w = adapter.read(attn)
            h, n_kv = w.num_attention_heads, w.num_key_value_heads
            for name in ("k", "v", "k_bias", "v_bias"):
                t = getattr(w, name)
                if t is None:
                    continue
                per_q = grouped(per_query_head(t, h), num_key_value_heads)  # [G, H/G, ...]
                rep = per_q[:, :1].expand_as(per_q).reshape(h, *t.shape[1:])
                # write back through the old KV layout: old head i serves query heads i*h/n_kv ...
                t.copy_(rep[:: h // n_kv])
            adapter.write(attn, w)


def tree_digest(folder: Path) -> str:
    """SHA-256 over every file name and content under ``folder`` (to prove a source was not touched)."""
    digest = hashlib.sha256()
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            digest.update(str(path.relative_to(folder)).encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()


@pytest.fixture
def saved_tiny(tmp_path):
    """Factory: save a tiny model (+ character tokenizer) of ``family`` under tmp_path and return the folder."""

    def make(family="llama", name="src", **kwargs):
        model = tiny_model(family, **kwargs)
        folder = tmp_path / name
        model.save_pretrained(folder)
        tiny_tokenizer().save_pretrained(folder)
        return folder

    return make


@pytest.fixture
def text_file(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text(
        "Python is an easy to learn, powerful programming language. It has efficient high-level data "
        "structures and a simple but effective approach to object-oriented programming.\n" * 4
    )
    return path
