"""``MLAConversionConfig``: the options of an MHA/GQA -> MLA conversion, validated on construction.

One set of defaults for ``convert_to_mla``, ``convert_checkpoint(..., to="mla")``, ``hf-attn-swap convert --to mla``
and the recipes' ``convert: {to: mla, mla: {...}}``; ``convert_checkpoint`` saves it in ``conversion.json``
(``details["options"]``). The defaults are the best measured training-free choices (README, MLA results): rope
selection ``freqfold``, ``pca`` factorization whenever calibration activations are available. What needs the model
(rank and rope-dim ranges, the family) is checked by ``validate_mla_options``. (``MLAConfig`` is the plugin model's
``PretrainedConfig``, ``hf_attn_swap.modeling.mla``.)
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Literal, get_args

from .budget import RANK_ALLOCATIONS, parse_kv_budget, split_kv_budget
from .factorize import FACTORIZATIONS
from .rope import ROPE_SELECTIONS

MLAFormat = Literal["deepseek_v3", "plugin"]
FORMATS: tuple[str, ...] = get_args(MLAFormat)


def _optional_int(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise ValueError(f"{name} must be an int, got {value!r}")


@dataclass
class MLAConversionConfig:
    """kv_lora_rank: latent values cached per token and layer (besides the rope key), all of them learned in both
    formats (the ``deepseek_v3`` export neutralises ``kv_a_layernorm`` without a constant channel,
    ``hf_attn_swap.export``). ``format`` is how ``convert_checkpoint`` saves the result: ``convert_to_mla`` itself
    always builds the plugin model with a latent of exactly kv_lora_rank (export it with
    ``hf_attn_swap.export.to_deepseek_v3``). ``pad_kv_lora_rank`` / ``pad_rope_dim`` (``deepseek_v3`` only) write
    that many latent channels / rope dims, the extra ones exact zeros, to fit fixed-size kernels (vLLM FlashMLA and
    CPU_MLA: 512 + 64); the cache grows to pad_kv_lora_rank + pad_rope_dim values."""

    kv_lora_rank: int | None = field(
        default=None,
        metadata={"help": "latent values cached per token and layer (R); required for --to mla"},
    )
    qk_rope_head_dim: int | None = field(
        default=None,
        metadata={"help": "rotary dims kept in the shared rope key (D, even); required for --to mla"},
    )
    rope_selection: str = field(
        default="freqfold",
        metadata={
            "help": f"rotary pairs that keep RoPE: {' | '.join(ROPE_SELECTIONS)} (norm: plugin format)"
        },
    )
    rope_fold: int | None = field(
        default=None,
        metadata={
            "help": "freqfold: neighbouring rotary frequencies per window of rope components (a multiple of "
            "rotary_dim / qk_rope_head_dim; default: that ratio, one window per kept frequency)"
        },
    )
    rope_fold_ladder: bool = field(
        default=True,
        metadata={
            "help": "freqfold: the components of a window turn at distinct ladder frequencies (true) or all at the "
            "window's first frequency (false: TransMLA's FreqFold; plugin format)"
        },
    )
    factorization: str | None = field(
        default=None,
        metadata={
            "help": "joint K/V latent: pca (activation-aware) | svd (weights only); default: pca when "
            "calibration is available (convert reads calibration text), svd without"
        },
    )
    num_rope_key_heads: int = field(
        default=1, metadata={"help": "rope keys per layer (plugin format; 1 = DeepSeek's shared key)"}
    )
    rank_allocation: str = field(
        default="uniform",
        metadata={"help": f"latent rank per layer: {' | '.join(RANK_ALLOCATIONS)} (energy: plugin format)"},
    )
    format: MLAFormat = field(
        default="deepseek_v3",
        metadata={"help": "output format: deepseek_v3 (stock transformers) or plugin (import hf_attn_swap)"},
    )
    balance_kv: bool = field(
        default=True, metadata={"help": "scale K against V before factorizing (TransMLA's K/V balancing)"}
    )
    key_weight_power: float = field(
        default=1.0,
        metadata={
            "help": "weigh each calibration token in the rope key's and the latent's statistics by the attention it "
            "receives as a key, to this power (0: every token alike)"
        },
    )
    output_correction: bool = field(
        default=True,
        metadata={
            "help": "after converting a layer, refit its o_proj by least squares so its attention reproduces the "
            "source layer's outputs on the same calibration inputs (needs calibration text, run layer by layer)"
        },
    )
    latent_metric_power: float = field(
        default=1.0,
        metadata={
            "help": "measure the latent's K rows in the metric of the queries that read them and its V rows in "
            "o_proj's, to this power (0: plain PCA of the K/V activations; 1: score and output error)"
        },
    )
    pad_kv_lora_rank: int | None = field(
        default=None,
        metadata={
            "help": "deepseek_v3: write N >= kv_lora_rank latent channels, the extra ones zero (512: vLLM "
            "FlashMLA/CPU_MLA; >= 256, multiple of 8: FA3 MLA)"
        },
    )
    pad_rope_dim: int | None = field(
        default=None,
        metadata={
            "help": "deepseek_v3: write N >= rope-dim rope dims (even), the extra ones zero (64: vLLM FlashMLA/CPU_MLA)"
        },
    )

    kv_budget: str | None = field(
        default=None,
        metadata={
            "help": "KV cache per token and layer instead of --kv-lora-rank/--rope-dim: a fraction of the source's "
            "(0.3125 = -68.75%%) or a number of values (120); the split into R + D is chosen and recorded"
        },
    )

    def __post_init__(self):
        if self.kv_budget is not None:
            self.kv_budget = str(self.kv_budget)
            parse_kv_budget(self.kv_budget)
            if self.kv_lora_rank is not None or self.qk_rope_head_dim is not None:
                raise ValueError("give either kv_budget or kv_lora_rank and qk_rope_head_dim, not both")
        _optional_int("kv_lora_rank", self.kv_lora_rank)
        _optional_int("qk_rope_head_dim", self.qk_rope_head_dim)
        _optional_int("num_rope_key_heads", self.num_rope_key_heads)
        _optional_int("rope_fold", self.rope_fold)
        if self.rope_selection not in ROPE_SELECTIONS:
            raise ValueError(
                f"unknown rope selection {self.rope_selection!r}; choose one of {', '.join(ROPE_SELECTIONS)}"
            )
        if self.factorization is not None and self.factorization not in FACTORIZATIONS:
            raise ValueError(
                f"unknown factorization {self.factorization!r}; choose one of {', '.join(FACTORIZATIONS)} "
                "(or leave it unset: pca with calibration, svd without)"
            )
        if self.rank_allocation not in RANK_ALLOCATIONS:
            raise ValueError(
                f"unknown rank allocation {self.rank_allocation!r}; choose one of {', '.join(RANK_ALLOCATIONS)}"
            )
        if self.format not in FORMATS:
            raise ValueError(f"unknown format {self.format!r}; choose one of {', '.join(FORMATS)}")
        if not isinstance(self.rope_fold_ladder, bool):
            raise ValueError(f"rope_fold_ladder must be true or false, got {self.rope_fold_ladder!r}")
        if not isinstance(self.balance_kv, bool):
            raise ValueError(f"balance_kv must be true or false, got {self.balance_kv!r}")
        if not isinstance(self.output_correction, bool):
            raise ValueError(f"output_correction must be true or false, got {self.output_correction!r}")
        for name in ("key_weight_power", "latent_metric_power"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 4:
                raise ValueError(f"{name} must be a number between 0 and 4, got {value!r}")
            setattr(self, name, float(value))
        _optional_int("pad_kv_lora_rank", self.pad_kv_lora_rank)
        _optional_int("pad_rope_dim", self.pad_rope_dim)
        padded = self.pad_kv_lora_rank is not None or self.pad_rope_dim is not None
        if padded and self.format != "deepseek_v3":
            raise ValueError("--pad-kv-lora-rank / --pad-rope-dim only apply to --format deepseek_v3")
        if self.pad_kv_lora_rank is not None and self.pad_kv_lora_rank < (self.kv_lora_rank or 1):
            raise ValueError(
                f"--pad-kv-lora-rank {self.pad_kv_lora_rank} must be at least --kv-lora-rank {self.kv_lora_rank}"
            )
        if self.pad_rope_dim is not None and (
            self.pad_rope_dim % 2 or self.pad_rope_dim < (self.qk_rope_head_dim or 2)
        ):
            raise ValueError(
                f"--pad-rope-dim {self.pad_rope_dim} must be even and at least --rope-dim {self.qk_rope_head_dim}"
            )

    def resolved_split(self, rotary_dim: int, source_values: int) -> MLAConversionConfig:
        """These options with ``kv_budget`` turned into kv_lora_rank + qk_rope_head_dim (``budget.split_kv_budget``);
        unchanged without a budget. source_values: the source's KV values per token and layer (2 H_kv head_dim)."""
        if self.kv_budget is None:
            return self
        _, rank, rope = split_kv_budget(self.kv_budget, rotary_dim, source_values)
        return replace(self, kv_budget=None, kv_lora_rank=rank, qk_rope_head_dim=rope)

    def resolved_factorization(self, calibrated: bool) -> str:
        """The factorization used: the one set, else ``pca`` with calibration activations and ``svd`` without."""
        return self.factorization or ("pca" if calibrated else "svd")
