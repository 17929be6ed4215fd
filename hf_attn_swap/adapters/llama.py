"""Separate q/k/v/o projections with rotate-half RoPE: Llama, Mistral, Qwen2 (qkv bias), Qwen3 (q/k norm),
Gemma and Gemma2 (explicit head_dim, soft-capping).

Projection weights are ``nn.Linear`` [heads * head_dim, hidden]; query head j uses KV head
``j // num_key_value_groups`` (``repeat_kv``), so head-major views are plain reshapes.
"""

from __future__ import annotations

from torch import nn

from .base import (
    ArchitectureAdapter,
    AttentionLayout,
    AttentionWeights,
    RopeInfo,
    flat,
    new_linear,
    unscaled_pairs,
)


def _bias(linear: nn.Linear, heads: int, head_dim: int):
    return None if linear.bias is None else linear.bias.detach().view(heads, head_dim)


def rope_info_from_config(
    config, head_dim: int, model: nn.Module | None, adapter: ArchitectureAdapter
) -> RopeInfo:
    """Rotate-half RoPE on the first ``head_dim * partial_rotary_factor`` dims of each head."""
    params = getattr(config, "rope_parameters", None) or {}
    factor = params.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", 1.0)) or 1.0
    rotary_dim = int(head_dim * factor)
    inv_freq = None
    if model is not None:
        rotary = adapter.rotary_embedding(model)
        if rotary is not None and hasattr(rotary, "inv_freq"):
            inv_freq = rotary.inv_freq.detach().float().clone()
    rope_type = params.get("rope_type", "default")
    scaled = unscaled_pairs(config, rotary_dim)
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return RopeInfo(
        "half", rotary_dim, inv_freq, unscaled_pairs=scaled, rope_type=rope_type,
        rope_theta=None if theta is None else float(theta),
    )  # fmt: skip


class LlamaLikeAdapter(ArchitectureAdapter):
    """Families whose attention has ``q_proj``/``k_proj``/``v_proj``/``o_proj`` and ``repeat_kv`` grouping."""

    attention_class_names: tuple[str, ...] = ()

    def layout(self, config, model: nn.Module | None = None) -> AttentionLayout:
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        return AttentionLayout(
            family=self.family,
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_attention_heads=config.num_attention_heads,
            num_key_value_heads=kv,
            head_dim=head_dim,
            rope=rope_info_from_config(config, head_dim, model, self),
            biases=self.attention_biases(config),
        )

    def attention_biases(self, config) -> tuple[str, ...]:
        """The projections with a bias: all four with ``attention_bias`` (Llama), none otherwise."""
        return ("q_proj", "k_proj", "v_proj", "o_proj") if getattr(config, "attention_bias", False) else ()

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        found = [
            m
            for m in model.modules()
            if any(cls.__name__ in self.attention_class_names for cls in type(m).__mro__)
        ]
        return sorted(found, key=lambda m: getattr(m, "layer_idx", 0) or 0)

    def read(self, attn: nn.Module) -> AttentionWeights:
        d = attn.head_dim
        q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        n_q, n_kv = q.out_features // d, k.out_features // d
        return AttentionWeights(
            q=q.weight.detach().view(n_q, d, -1),
            k=k.weight.detach().view(n_kv, d, -1),
            v=v.weight.detach().view(n_kv, d, -1),
            o=o.weight.detach().view(o.out_features, n_q, d),
            q_bias=_bias(q, n_q, d),
            k_bias=_bias(k, n_kv, d),
            v_bias=_bias(v, n_kv, d),
            o_bias=None if o.bias is None else o.bias.detach(),
        )

    def write(self, attn: nn.Module, weights: AttentionWeights) -> None:
        hidden = weights.q.shape[-1]
        attn.q_proj = new_linear(weights.q.reshape(-1, hidden), flat(weights.q_bias), attn.q_proj)
        attn.k_proj = new_linear(weights.k.reshape(-1, hidden), flat(weights.k_bias), attn.k_proj)
        attn.v_proj = new_linear(weights.v.reshape(-1, hidden), flat(weights.v_bias), attn.v_proj)
        attn.o_proj = new_linear(weights.o.reshape(weights.o.shape[0], -1), weights.o_bias, attn.o_proj)
        attn.num_key_value_groups = weights.num_attention_heads // weights.num_key_value_heads


class LlamaAdapter(LlamaLikeAdapter):
    family = "llama"
    model_types = ("llama",)
    attention_class_names = ("LlamaAttention",)


class MistralAdapter(LlamaLikeAdapter):
    family = "mistral"
    model_types = ("mistral",)
    attention_class_names = ("MistralAttention",)


class Qwen2Adapter(LlamaLikeAdapter):
    """Qwen2: biases on q/k/v (pooled with the weights), none on o."""

    family = "qwen2"
    model_types = ("qwen2",)
    attention_class_names = ("Qwen2Attention",)

    def attention_biases(self, config) -> tuple[str, ...]:
        return ("q_proj", "k_proj", "v_proj")


class Qwen3Adapter(LlamaLikeAdapter):
    """Qwen3: per-head RMSNorm on q and k (``q_norm``/``k_norm``, weight shared by all heads) before RoPE.

    The norm weights are untouched by head pooling; pooling the projection of identical heads stays exact.
    """

    family = "qwen3"
    model_types = ("qwen3",)
    attention_class_names = ("Qwen3Attention",)


class GemmaAdapter(LlamaLikeAdapter):
    family = "gemma"
    model_types = ("gemma",)
    attention_class_names = ("GemmaAttention",)


class Gemma2Adapter(LlamaLikeAdapter):
    """Gemma2: explicit head_dim, ``query_pre_attn_scalar`` scaling and logit soft-capping (untouched)."""

    family = "gemma2"
    model_types = ("gemma2",)
    attention_class_names = ("Gemma2Attention",)
