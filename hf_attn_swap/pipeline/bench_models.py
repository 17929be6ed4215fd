"""Random-weight models of the shapes users serve, and their MLA exports, for ``hf-attn-swap bench --random-weights``.

Decode and prefill speed depend on the shapes (hidden size, heads, head_dim, MLP width, vocabulary, layers, the
cache layout) and the storage types, not on the weight values, so a model with a few of the real model's layers
and random weights times the same per layer as the real one (what differs: fewer layers, so the output head and
embedding weigh more in the total). ``SHAPES`` are the published configs; ``qwen2.5-7b`` is built as a Llama
(its q/k/v biases are < 0.01 % of the bytes and a data-free deepseek_v3 export refuses biases, which need
calibration text to fold). ``max_position_embeddings`` is raised to 32768 so every engine accepts long contexts;
rope θ is the real one.

The MLA exports are ``convert_checkpoint(--to mla --factorization svd)`` (data-free) of the random model, stock
deepseek_v3, each ``MLAShape`` (latent rank + rope dims, optionally padded to a kernel size, e.g. 448+64 padded to
512+64) or converter-chosen split of a ``--kv-budget``. Everything is cached under ``workdir``: a rerun reuses it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

#: published configs (Llama-2-7B, Meta-Llama-3-8B, Qwen2.5-7B), the fields a Llama config needs
SHAPES: dict[str, dict] = {
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32,
                      head_dim=128, vocab_size=32000, rope_theta=10000.0, rms_norm_eps=1e-5),
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                      head_dim=128, vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                       head_dim=128, vocab_size=152064, rope_theta=1000000.0, rms_norm_eps=1e-6),
}  # fmt: skip
MAX_POSITIONS = 32768
SPEC = re.compile(r"^(\d+)\+(\d+)(?::(\d+)\+(\d+))?$")


@dataclass(frozen=True)
class MLAShape:
    """An MLA export: latent rank + rope dims, optionally written padded to ``pad_rank`` + ``pad_rope``."""

    rank: int
    rope: int
    pad_rank: int | None = None
    pad_rope: int | None = None

    @classmethod
    def parse(cls, text: str, flag: str = "--mla") -> MLAShape:
        """``"256+64"`` or ``"448+64:512+64"`` (padded); ``ValueError`` naming ``flag`` and the form otherwise."""
        found = SPEC.match(text.strip())
        if not found:
            raise ValueError(
                f"{flag} {text!r}: write RANK+ROPE or RANK+ROPE:PADRANK+PADROPE, e.g. 448+64:512+64"
            )
        rank, rope, pad_rank, pad_rope = (int(g) if g else None for g in found.groups())
        if pad_rank is not None and (pad_rank < rank or pad_rope < rope):
            raise ValueError(f"{flag} {text!r}: the padded size must hold the unpadded one")
        return cls(rank, rope, pad_rank, pad_rope)

    @property
    def label(self) -> str:
        padded = f" padded to {self.pad_rank}+{self.pad_rope}" if self.pad_rank else ""
        return f"MLA {self.rank}+{self.rope}{padded}"

    def options(self) -> dict:
        options = {"kv_lora_rank": self.rank, "qk_rope_head_dim": self.rope}
        if self.pad_rank:
            options.update(pad_kv_lora_rank=self.pad_rank, pad_rope_dim=self.pad_rope)
        return options


def random_model(shape: str, layers: int, workdir: str | Path) -> Path:
    """The folder of a random-weight ``shape`` model with ``layers`` layers (bfloat16, no tokenizer), made once."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    if shape not in SHAPES:
        raise ValueError(f"--random-weights must be one of {', '.join(SHAPES)}, got {shape!r}")
    folder = Path(workdir).expanduser() / f"{shape}-L{layers}" / "original"
    if (folder / "config.json").is_file():
        return folder
    config = LlamaConfig(
        **SHAPES[shape], num_hidden_layers=layers, max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    tmp = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(tmp)
    tmp.rename(folder)
    return folder


def mla_exports(source: Path, shapes: list[MLAShape], budgets: list[str], pad: MLAShape | None) -> list:
    """[(label, folder)]: the data-free deepseek_v3 export of ``source`` per shape, and per KV budget (the
    converter's split) plus, when ``pad`` is given and is larger, that split padded to ``pad``'s size."""
    from ..methods.mla import MLAConversionConfig
    from .convert import convert_checkpoint

    wanted = [(s.label, s.options()) for s in shapes]
    for budget in budgets:
        config = MLAConversionConfig(kv_budget=budget, factorization="svd")
        wanted.append((f"MLA budget {budget}", config))
    exports = []
    for label, options in wanted:
        folder = source.parent / re.sub(r"[^\w.+-]+", "_", label)
        if not (folder / "config.json").is_file():
            mla = options if isinstance(options, MLAConversionConfig) else {**options, "factorization": "svd"}
            convert_checkpoint(source, folder, to="mla", mla=mla)
        exports.append((label, folder))
        if isinstance(options, MLAConversionConfig) and pad is not None:
            exports += _padded(source, folder, label, pad)
    return exports


def _padded(source: Path, export: Path, label: str, pad: MLAShape) -> list:
    """The budget's split (read from its export) padded to ``pad``'s size, when it fits and is smaller."""
    import json

    from .convert import convert_checkpoint

    config = json.loads((export / "config.json").read_text())
    shape = MLAShape(config["kv_lora_rank"], config["qk_rope_head_dim"], pad.rank, pad.rope)
    if shape.rank > pad.rank or shape.rope > pad.rope or (shape.rank, shape.rope) == (pad.rank, pad.rope):
        return []  # does not fit, or is that size already
    folder = export.with_name(export.name + f"_padded_{pad.rank}+{pad.rope}")
    if not (folder / "config.json").is_file():
        convert_checkpoint(source, folder, to="mla", mla={**shape.options(), "factorization": "svd"})
    return [(f"{label} ({shape.rank}+{shape.rope}) padded to {pad.rank}+{pad.rope}", folder)]
