"""What a conversion did, in numbers a user can check (and ``conversion.json`` in every output folder)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..adapters import AttentionLayout
from ..io.folders import write_json

REPORT_FILE = "conversion.json"


def model_dtype(model: nn.Module) -> torch.dtype:
    """The dtype of the model's first floating-point parameter (what its KV cache holds)."""
    return next(p.dtype for p in model.parameters() if p.is_floating_point())


def element_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def kv_bytes_per_token(layout: AttentionLayout, num_key_value_heads: int, dtype: torch.dtype) -> int:
    """MHA/GQA: K and V of every layer, 2 * H_kv * head_dim * layers * bytes."""
    return 2 * num_key_value_heads * layout.head_dim * layout.num_layers * element_bytes(dtype)


def mla_kv_bytes_per_token(ranks: list[int], qk_rope_head_dim: int, num_rope_key_heads: int, dtype) -> int:
    """MLA: the latent and the rope keys of every layer, sum over layers of (r_l + n * d_rope) * bytes."""
    return sum(r + num_rope_key_heads * qk_rope_head_dim for r in ranks) * element_bytes(dtype)


@dataclass
class ConversionReport:
    """``kv_*_bytes_per_token`` are per token over all layers, for the model's dtype (formula; the ``eval``
    command measures the real cache)."""

    target: str  # "gqa" or "mla"
    method: str
    family: str
    num_layers: int
    num_attention_heads: int
    head_dim: int
    dtype: str
    kv_bytes_per_token_before: int
    kv_bytes_per_token_after: int
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    details: dict = field(default_factory=dict)
    changed: bool = True

    @classmethod
    def of(
        cls,
        target: str,
        method: str,
        layout: AttentionLayout,
        dtype: torch.dtype,
        kv_bytes_after: int,
        **fields,
    ):
        """A report of converting a model with ``layout`` (its head counts and KV bytes before, for ``dtype``);
        ``fields``: after, details, changed."""
        return cls(
            target=target,
            method=method,
            family=layout.family,
            num_layers=layout.num_layers,
            num_attention_heads=layout.num_attention_heads,
            head_dim=layout.head_dim,
            dtype=str(dtype).removeprefix("torch."),
            kv_bytes_per_token_before=kv_bytes_per_token(layout, layout.num_key_value_heads, dtype),
            kv_bytes_per_token_after=kv_bytes_after,
            before={"num_key_value_heads": layout.num_key_value_heads},
            **fields,
        )

    @property
    def kv_reduction(self) -> float:
        """Fraction of KV-cache bytes removed (0.6667 = -66.7%)."""
        return 1.0 - self.kv_bytes_per_token_after / self.kv_bytes_per_token_before

    def to_dict(self) -> dict:
        out = asdict(self)
        out["kv_reduction"] = round(self.kv_reduction, 6)
        return out

    def save(self, folder: str | Path) -> Path:
        return write_json(Path(folder) / REPORT_FILE, self.to_dict())

    def __str__(self) -> str:
        arrow = " -> ".join(
            ", ".join(f"{k}={v}" for k, v in side.items()) for side in (self.before, self.after)
        )
        return (
            f"{self.family}: {self.target} ({self.method}) {arrow}; KV cache "
            f"{self.kv_bytes_per_token_before} -> {self.kv_bytes_per_token_after} bytes/token "
            f"({-100 * self.kv_reduction:+.2f}%)"
        )


def load_report(folder: str | Path) -> dict | None:
    path = Path(folder) / REPORT_FILE
    return json.loads(path.read_text()) if path.is_file() else None
