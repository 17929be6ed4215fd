"""The adapter contract: where one model family keeps its attention, in one canonical form.

Every converter in this package works on :class:`AttentionWeights` (head-major tensors) and never on a
family's own module layout. An adapter reads those tensors out of a family's attention module and writes
them back (resizing projections and fixing the module attributes derived from head counts), so a new family
is one small file.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn


@dataclass(frozen=True)
class RopeInfo:
    """How a family applies rotary position embeddings to each head.

    style: ``"half"`` (Llama ``rotate_half``: pair i is dims (i, i + rotary_dim/2)),
           ``"interleaved"`` (GPT-J: pair i is dims (2i, 2i+1)) or ``"none"`` (absolute/learned positions).
    rotary_dim: leading dims of each head that are rotated (``head_dim * partial_rotary_factor``).
    inv_freq: [rotary_dim/2] angular frequency of each pair (None when style is "none").
    """

    style: str
    rotary_dim: int
    inv_freq: torch.Tensor | None = None
    #: the leading pairs (fastest frequencies) a rope scaling (Llama-3's ``llama3``, YaRN, ...) leaves on the plain
    #: ladder theta^(-2i/rotary_dim); None: every pair (no scaling)
    unscaled_pairs: int | None = None
    rope_type: str = "default"
    rope_theta: float | None = None

    def plain_frequencies(self, pairs: list[int]) -> torch.Tensor:
        """[len(pairs)] float64: theta^(-2p/rotary_dim), the frequencies of these pairs without rope scaling."""
        if self.rope_theta is None:
            raise ValueError("this layout does not know its rope_theta")
        return self.rope_theta ** (-2 * torch.tensor(pairs, dtype=torch.float64) / self.rotary_dim)

    @property
    def plain_pairs(self) -> int:
        """How many leading pairs turn at the plain ladder's frequencies (all of them without rope scaling)."""
        return self.rotary_dim // 2 if self.unscaled_pairs is None else self.unscaled_pairs

    def pair_indices(self) -> torch.Tensor:
        """[rotary_dim/2, 2] the two head dims rotated together by each frequency."""
        half = self.rotary_dim // 2
        i = torch.arange(half)
        if self.style == "half":
            return torch.stack([i, i + half], dim=1)
        if self.style == "interleaved":
            return torch.stack([2 * i, 2 * i + 1], dim=1)
        raise ValueError(f"rope style {self.style!r} has no rotary pairs")


@dataclass(frozen=True)
class AttentionLayout:
    """Head counts and sizes of a model's attention, read from its config."""

    family: str
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope: RopeInfo
    causal: bool = True
    #: the attention projections with a bias (by config: Qwen2's q/k/v, Llama's ``attention_bias``)
    biases: tuple[str, ...] = ()

    @property
    def group_size(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads


@dataclass
class AttentionWeights:
    """One layer's attention projections, head-major, in the math convention ``y = x W^T + b``.

    q: [H, d, hidden]      q_bias: [H, d] | None
    k: [H_kv, d, hidden]   k_bias: [H_kv, d] | None
    v: [H_kv, d, hidden]   v_bias: [H_kv, d] | None
    o: [hidden, H, d]      o_bias: [hidden] | None
    Query head j attends with key/value head ``j // (H / H_kv)``.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    o_bias: torch.Tensor | None = None
    extra: dict = field(default_factory=dict)

    @property
    def num_attention_heads(self) -> int:
        return self.q.shape[0]

    @property
    def num_key_value_heads(self) -> int:
        return self.k.shape[0]

    def tensors(self) -> dict[str, torch.Tensor | None]:
        """The projections and biases by name (``extra`` excluded)."""
        return {
            name: getattr(self, name) for name in ("q", "k", "v", "o", "q_bias", "k_bias", "v_bias", "o_bias")
        }

    def to(self, dtype: torch.dtype, device: torch.device | str | None = None) -> AttentionWeights:
        """A copy in ``dtype`` (on ``device`` when given)."""
        cast = {
            name: None if t is None else t.to(device=device, dtype=dtype, copy=True)
            for name, t in self.tensors().items()
        }
        return replace(self, **cast)


def unscaled_pairs(config, rotary_dim: int) -> int | None:
    """The leading rotary pairs whose frequency ``config``'s rope scaling leaves at theta^(-2i/rotary_dim) (None:
    no scaling). ``dynamic`` rescales every frequency but pair 0's once a sequence passes the trained length."""
    params = getattr(config, "rope_parameters", None) or {}
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        return None
    if rope_type == "dynamic":
        return 1
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS[rope_type](config, None)
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim
    plain = float(params["rope_theta"]) ** -exponents
    same = torch.isclose(scaled.double().cpu()[: len(plain)], plain, rtol=1e-5, atol=0)
    return int(same.int().cumprod(0).sum())


def sliding_window_layers(config) -> bool:
    """Whether ``config`` has attention layers that see only a window of past tokens (``layer_types`` other than
    ``full_attention``, or Mistral's ``sliding_window``)."""
    layer_types = getattr(config, "layer_types", None) or []
    mistral_window = config.model_type == "mistral" and getattr(config, "sliding_window", None) is not None
    return any(t != "full_attention" for t in layer_types) or mistral_window


def check_full_attention(config, what: str) -> None:
    """``ValueError`` naming the fix when ``config`` has sliding-window layers, which ``what`` does not support."""
    if sliding_window_layers(config):
        raise ValueError(
            f"{what} runs full causal attention, and this model has sliding-window attention layers: set "
            "sliding_window=None (or use_sliding_window=False) in the source config if the model is used within "
            "its window"
        )


def flat(bias: torch.Tensor | None) -> torch.Tensor | None:
    """A head-major bias [H, d] as the projection's [H * d] (None stays None)."""
    return None if bias is None else bias.reshape(-1)


def new_linear(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` holding ``weight`` [out, in] / ``bias`` [out], on ``like``'s device and dtype."""
    ref = like.weight
    layer = nn.Linear(
        weight.shape[1], weight.shape[0], bias=bias is not None, device=ref.device, dtype=ref.dtype
    )
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    layer.weight.requires_grad_(ref.requires_grad)
    return layer


class ArchitectureAdapter:
    """Base class: one subclass per model family (see ``llama.py`` and ``phi3.py``)."""

    family: str = ""
    model_types: tuple[str, ...] = ()
    #: stock transformers can load a changed KV head count from ``config.num_key_value_heads``
    native_gqa: bool = True

    # -- reading the model -------------------------------------------------------------------------------
    def layout(self, config, model: nn.Module | None = None) -> AttentionLayout:
        """Head counts from ``config``; pass ``model`` to also read the RoPE frequencies (``rope.inv_freq``)."""
        raise NotImplementedError

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        """The attention module of every decoder layer, in layer order."""
        raise NotImplementedError

    def rotary_embedding(self, model: nn.Module) -> nn.Module | None:
        """The model's rotary-embedding module (holds ``inv_freq``), if any."""
        for module in model.modules():
            if type(module).__name__.endswith("RotaryEmbedding"):
                return module
        return None

    def read(self, attn: nn.Module) -> AttentionWeights:
        raise NotImplementedError

    # -- writing the model -------------------------------------------------------------------------------
    def write(self, attn: nn.Module, weights: AttentionWeights) -> None:
        """Replace the projections of ``attn`` with ``weights`` (head counts may change)."""
        raise NotImplementedError

    def set_num_key_value_heads(self, model: nn.Module, num_key_value_heads: int) -> None:
        """Record a new KV head count in the config and in every attention module."""
        model.config.num_key_value_heads = num_key_value_heads
        for attn in self.attention_modules(model):
            self._set_module_kv_heads(attn, model.config, num_key_value_heads)

    def _set_module_kv_heads(self, attn: nn.Module, config, num_key_value_heads: int) -> None:
        attn.num_key_value_groups = config.num_attention_heads // num_key_value_heads
        if hasattr(attn, "num_key_value_heads"):
            attn.num_key_value_heads = num_key_value_heads
