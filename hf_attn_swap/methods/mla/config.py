"""``MLAConversionConfig``: the options of an MHA/GQA -> MLA conversion, validated on construction, and the rule
of what the stock ``deepseek_v3`` format can express (``deepseek_v3_problems``).

One set of defaults for ``convert_to_mla``, ``convert_checkpoint(..., to="mla")``, ``hf-attn-swap convert --to mla``
and the recipes' ``convert: {to: mla, mla: {...}}``; ``convert_checkpoint`` saves it in ``conversion.json``
(``details["options"]``). The defaults are the best measured training-free choices (README, MLA results): rope
selection ``freqfold``, ``pca`` factorization whenever calibration activations are available. What needs the model
(rank and rope-dim ranges, the family) is checked by ``validate_mla_options``. (``MLAConfig`` is the plugin model's
``PretrainedConfig``, ``hf_attn_swap.modeling.mla``.)
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, get_args

from ...adapters import AttentionLayout
from ..options import check_bool, check_choice, check_int, check_number, option
from .budget import RANK_ALLOCATIONS, parse_kv_budget, split_kv_budget
from .factorize import FACTORIZATIONS
from .registry import ROPE_SELECTIONS, rope_key_method

MLAFormat = Literal["deepseek_v3", "plugin"]
FORMATS: tuple[str, ...] = get_args(MLAFormat)


@dataclass
class MLAConversionConfig:
    """kv_lora_rank: latent values cached per token and layer (besides the rope key), all of them learned in both
    formats (the ``deepseek_v3`` export neutralises ``kv_a_layernorm`` without a constant channel,
    ``hf_attn_swap.export``). ``format`` is how ``convert_checkpoint`` saves the result: ``convert_to_mla`` itself
    always builds the plugin model with a latent of exactly kv_lora_rank (export it with
    ``hf_attn_swap.export.to_deepseek_v3``). ``pad_kv_lora_rank`` / ``pad_rope_dim`` (``deepseek_v3`` only) write
    that many latent channels / rope dims, the extra ones exact zeros, to fit fixed-size kernels (vLLM FlashMLA and
    CPU_MLA: 512 + 64); the cache grows to pad_kv_lora_rank + pad_rope_dim values."""

    kv_lora_rank: int | None = option(
        None, "latent values cached per token and layer (R); required for --to mla"
    )
    qk_rope_head_dim: int | None = option(
        None, "rotary dims kept in the shared rope key (D, even); required for --to mla"
    )
    rope_selection: str = option(
        "freqfold", f"rotary pairs that keep RoPE: {' | '.join(ROPE_SELECTIONS)} (norm: plugin format)"
    )
    rope_fold: int | None = option(
        None,
        "freqfold: neighbouring rotary frequencies per window of rope components (a multiple of rotary_dim / "
        "qk_rope_head_dim; default: that ratio, one window per kept frequency)",
    )
    rope_fold_ladder: bool = option(
        True,
        "freqfold: the components of a window turn at distinct ladder frequencies (true) or all at the window's "
        "first frequency (false: TransMLA's FreqFold; plugin format)",
    )
    factorization: str | None = option(
        None,
        "joint K/V latent: pca (activation-aware) | svd (weights only); default: pca when calibration is "
        "available (convert reads calibration text), svd without",
    )
    num_rope_key_heads: int = option(1, "rope keys per layer (plugin format; 1 = DeepSeek's shared key)")
    rank_allocation: str = option(
        "uniform", f"latent rank per layer: {' | '.join(RANK_ALLOCATIONS)} (energy: plugin format)"
    )
    format: MLAFormat = option(
        "deepseek_v3", "output format: deepseek_v3 (stock transformers) or plugin (import hf_attn_swap)"
    )
    balance_kv: bool = option(True, "scale K against V before factorizing (TransMLA's K/V balancing)")
    key_weight_power: float = option(
        1.0,
        "weigh each calibration token in the rope key's and the latent's statistics by the attention it receives "
        "as a key, to this power (0: every token alike)",
    )
    output_correction: bool = option(
        True,
        "after converting a layer, refit its o_proj by least squares so its attention reproduces the source "
        "layer's outputs on the same calibration inputs (needs calibration text, run layer by layer)",
    )
    latent_metric_power: float = option(
        1.0,
        "measure the latent's K rows in the metric of the queries that read them and its V rows in o_proj's, to "
        "this power (0: plain PCA of the K/V activations; 1: score and output error)",
    )
    pad_kv_lora_rank: int | None = option(
        None,
        "deepseek_v3: write N >= kv_lora_rank latent channels, the extra ones zero (512: vLLM FlashMLA/CPU_MLA; "
        ">= 256, multiple of 8: FA3 MLA)",
    )
    pad_rope_dim: int | None = option(
        None,
        "deepseek_v3: write N >= rope-dim rope dims (even), the extra ones zero (64: vLLM FlashMLA/CPU_MLA)",
    )
    kv_budget: str | None = option(
        None,
        "KV cache per token and layer instead of --kv-lora-rank/--rope-dim: a fraction of the source's (0.3125 = "
        "-68.75%%) or a number of values (120); the split into R + D is chosen and recorded",
    )

    def __post_init__(self):
        if self.kv_budget is not None:
            self.kv_budget = str(self.kv_budget)
            parse_kv_budget(self.kv_budget)
            if self.kv_lora_rank is not None or self.qk_rope_head_dim is not None:
                raise ValueError("give either kv_budget or kv_lora_rank and qk_rope_head_dim, not both")
        for name in ("kv_lora_rank", "qk_rope_head_dim", "rope_fold", "pad_kv_lora_rank", "pad_rope_dim"):
            check_int(name, getattr(self, name), optional=True)
        check_int("num_rope_key_heads", self.num_rope_key_heads)
        check_choice("rope selection", self.rope_selection, ROPE_SELECTIONS)
        if self.factorization is not None:
            check_choice(
                "factorization",
                self.factorization,
                FACTORIZATIONS,
                " (or leave it unset: pca with calibration, svd without)",
            )
        check_choice("rank allocation", self.rank_allocation, RANK_ALLOCATIONS)
        check_choice("format", self.format, FORMATS)
        for name in ("rope_fold_ladder", "balance_kv", "output_correction"):
            check_bool(name, getattr(self, name))
        for name in ("key_weight_power", "latent_metric_power"):
            setattr(self, name, check_number(name, getattr(self, name), 0, 4))
        if (
            self.pad_kv_lora_rank is not None or self.pad_rope_dim is not None
        ) and self.format != "deepseek_v3":
            raise ValueError("--pad-kv-lora-rank / --pad-rope-dim only apply to --format deepseek_v3")
        padding_problem = check_padding(
            self.kv_lora_rank, self.qk_rope_head_dim, self.pad_kv_lora_rank, self.pad_rope_dim
        )
        if padding_problem:
            raise ValueError(padding_problem)

    def resolved_split(self, layout: AttentionLayout) -> MLAConversionConfig:
        """These options with ``kv_budget`` turned into kv_lora_rank + qk_rope_head_dim for a source with ``layout``
        (``budget.split_kv_budget`` over the ladder sizes it allows); unchanged without a budget."""
        if self.kv_budget is None:
            return self
        source_values = 2 * layout.num_key_value_heads * layout.head_dim
        ladders = rope_key_method("uniform").valid_rope_dims(self.rope_layout(layout))
        if not ladders:
            raise ValueError(
                f"the source's {layout.rope.rope_type} rope scaling changes every rotary frequency, so no rope key "
                "fits the plain ladder of the deepseek_v3 format: use --format plugin (it keeps the scaled "
                "frequencies)"
            )
        _, rank, rope = split_kv_budget(self.kv_budget, ladders, source_values)
        return replace(self, kv_budget=None, kv_lora_rank=rank, qk_rope_head_dim=rope)

    def rope_layout(self, layout: AttentionLayout) -> AttentionLayout:
        """The source ``layout`` as the rope-key methods see it: the plugin format turns any source pair at the
        source's own (scaled) frequency; deepseek_v3 writes no rope scaling, so under a scaling its ladder stays
        within the pairs the scaling leaves unchanged (``RopeInfo.plain_pairs``)."""
        if self.format == "plugin" and layout.rope.unscaled_pairs is not None:
            return replace(layout, rope=replace(layout.rope, unscaled_pairs=None))
        return layout

    def resolved_factorization(self, calibrated: bool) -> str:
        """The factorization used: the one set, else ``pca`` with calibration activations and ``svd`` without."""
        return self.factorization or ("pca" if calibrated else "svd")

    def layer_by_layer_refusal(self) -> str | None:
        """Why these options cannot be converted one layer at a time (then the whole model is loaded), or None."""
        if self.rank_allocation != "uniform":
            return "rank_allocation 'energy' needs every layer's K/V spectrum before the first layer is cut"
        return None

    def deepseek_v3_problems(self, layout: AttentionLayout, mlp_bias: bool, calibrated: bool) -> list[str]:
        """What keeps a conversion of a source with ``layout`` (and ``mlp_bias``) with these options (a rank and
        rope dims given) from the stock ``deepseek_v3`` format (``deepseek_v3_problems``), before it runs.
        ``calibrated``: calibration text comes with it, so the attention biases are folded (``biasfold``)."""
        method = rope_key_method(self.rope_selection)
        pairs = method.pairs(layout, self)
        return deepseek_v3_problems(
            num_rope_key_heads=self.num_rope_key_heads,
            uniform_rank=self.rank_allocation == "uniform",
            rope_pairs=None if pairs is None else [pairs] * layout.num_layers,
            mlp_bias=mlp_bias,
            attention_biases=[] if calibrated else [f"{name}.bias" for name in layout.biases],
        )


def check_padding(
    rank: int | None, rope_dim: int | None, pad_kv_lora_rank: int | None, pad_rope_dim: int | None
) -> str | None:
    """Why a latent of ``rank`` channels and ``rope_dim`` rope dims cannot be written padded to these sizes, or
    None (the padding only adds channels; rope dims come in pairs)."""
    if pad_kv_lora_rank is not None and pad_kv_lora_rank < (rank or 1):
        return (
            f"--pad-kv-lora-rank {pad_kv_lora_rank} must be at least --kv-lora-rank {rank} (the latent rank)"
        )
    if pad_rope_dim is not None and (pad_rope_dim % 2 or pad_rope_dim < (rope_dim or 2)):
        return (
            f"--pad-rope-dim {pad_rope_dim} must be even and at least --rope-dim {rope_dim} (the rope dims)"
        )
    return None


def deepseek_v3_problems(
    *,
    num_rope_key_heads: int,
    uniform_rank: bool,
    rope_pairs: list[list[int]] | None,
    mlp_bias: bool,
    attention_biases: list[str],
) -> list[str]:
    """What an MLA model with these properties has that stock ``deepseek_v3`` cannot express (empty: nothing).

    The one rule behind the checks before a conversion (``MLAConversionConfig.deepseek_v3_problems``) and on a
    converted model (``hf_attn_swap.export``). rope_pairs: the kept source pairs per layer, None when they are
    chosen per layer from the weights."""
    problems = []
    if num_rope_key_heads != 1:
        problems.append(f"{num_rope_key_heads} rope keys per layer (deepseek_v3 has one shared rope key)")
    if not uniform_rank:
        problems.append("per-layer kv_lora_rank (deepseek_v3 has one rank for all layers)")
    if rope_pairs is None or any(p != rope_pairs[0] for p in rope_pairs):
        problems.append("different rotary frequencies per layer (deepseek_v3 has one rope for all layers)")
    elif len(set(rope_pairs[0])) < len(rope_pairs[0]):
        problems.append("repeated rotary frequencies (deepseek_v3 turns each rope pair at its own frequency)")
    if mlp_bias:
        problems.append("MLP biases (DeepseekV3MLP has none)")
    if attention_biases:
        more = ", ..." if len(attention_biases) > 3 else ""
        problems.append(
            f"the source has attention biases ({', '.join(attention_biases[:3])}{more}; stock DeepSeek attention "
            "has none: convert with calibration text to fold them into the weights)"
        )
    return problems


def check_deepseek_v3(problems: list[str]) -> None:
    """The one-line ``ValueError`` naming ``--format plugin`` for the ``deepseek_v3_problems`` found, if any."""
    if problems:
        raise ValueError(
            "deepseek_v3 cannot express this conversion: "
            + "; ".join(problems)
            + ". Use --format plugin (rope selection freqfold/uniform/high/low with its ladder, rank allocation "
            "uniform, one rope key and a bias-free source export to deepseek_v3)."
        )
