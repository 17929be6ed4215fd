"""Shared base of the adapters for families whose stock code has no GQA (GPT-2, GPT-NeoX, OPT, Falcon, BERT).

``write`` keeps the stock module while the K/V head count still fits it, and otherwise turns it in place into
the family's grouped plugin module (``hf_attn_swap.modeling.<family>``); ``set_num_key_value_heads`` then
switches the config and model classes to the plugin ones (``model_type`` ``hf_attn_swap_<family>``), which
``import hf_attn_swap`` registers with the Auto classes.
"""

from __future__ import annotations

import torch
from torch import nn

from ..modeling.grouped import GROUPED_MODEL_CLASSES, use_grouped_model_classes
from .base import ArchitectureAdapter, AttentionLayout, AttentionWeights, RopeInfo, flat


def copy_into(module: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Copy ``weight``/``bias`` into ``module``'s parameters (shapes must match; bias presence too)."""
    if (bias is None) != (module.bias is None):
        have = "has" if module.bias is not None else "has no"
        raise ValueError(f"{type(module).__name__} {have} a bias but the converted weights disagree")
    with torch.no_grad():
        module.weight.copy_(weight)
        if bias is not None:
            module.bias.copy_(bias)


class PluginAdapter(ArchitectureAdapter):
    """Adapters whose converted models use ``hf_attn_swap.modeling`` plugin classes.

    Subclasses set ``config_class`` / ``grouped_attention`` and implement ``attention_modules``, ``read``,
    ``write`` (calling ``ensure_kv_heads`` first) and, where needed, ``check_supported`` / ``rope_info``.
    """

    native_gqa = False
    config_class: type = None  # the plugin config (``model_type`` ``hf_attn_swap_<family>``)
    grouped_attention: type = None  # the plugin attention module (``make_grouped(attn, n)``)

    def check_supported(self, config) -> None:
        """Raise ``UnsupportedArchitectureError`` for a config variant this adapter cannot convert."""

    def rope_info(self, config, head_dim: int, model: nn.Module | None) -> RopeInfo:
        return RopeInfo(style="none", rotary_dim=0)

    def layout(self, config, model: nn.Module | None = None) -> AttentionLayout:
        self.check_supported(config)
        self.check_model_class(model)
        heads = config.num_attention_heads
        head_dim = config.hidden_size // heads
        return AttentionLayout(
            family=self.family,
            hidden_size=config.hidden_size,
            num_layers=config.num_hidden_layers,
            num_attention_heads=heads,
            num_key_value_heads=self.stock_num_key_value_heads(config)
            if not isinstance(config, self.config_class)
            else config.num_key_value_heads,
            head_dim=head_dim,
            rope=self.rope_info(config, head_dim, model),
            causal=self.is_causal(config),
        )

    def stock_num_key_value_heads(self, config) -> int:
        return config.num_attention_heads

    def is_causal(self, config) -> bool:
        return True

    def module_num_key_value_heads(self, attn: nn.Module) -> int:
        return getattr(attn, "num_key_value_heads", None) or attn.config.num_attention_heads

    def ensure_kv_heads(self, attn: nn.Module, num_key_value_heads: int) -> None:
        """Turn ``attn`` into the plugin module when the stock one cannot hold ``num_key_value_heads``."""
        if num_key_value_heads != self.module_num_key_value_heads(attn):
            self.grouped_attention.make_grouped(attn, num_key_value_heads)

    def supported_model_classes(self) -> list[str]:
        return sorted(
            stock.__name__
            for stock, plugin in GROUPED_MODEL_CLASSES.items()
            if plugin.config_class is self.config_class
        )

    def check_model_class(self, model: nn.Module | None) -> None:
        """Refuse (before anything changes) a model class that has no plugin class to save and load it as."""
        if model is not None and type(model) not in {*GROUPED_MODEL_CLASSES, *GROUPED_MODEL_CLASSES.values()}:
            raise unsupported(
                f"{type(model).__name__} has no hf_attn_swap grouped-attention class; supported {self.family} "
                f"classes: {', '.join(self.supported_model_classes())}"
            )

    def set_num_key_value_heads(self, model: nn.Module, num_key_value_heads: int) -> None:
        config = model.config
        if not isinstance(config, self.config_class):
            config.__class__ = self.config_class
        config.num_key_value_heads = num_key_value_heads
        use_grouped_model_classes(model)


def unsupported(message: str) -> Exception:
    from . import UnsupportedArchitectureError

    return UnsupportedArchitectureError(message)


def split_grouped_rows(fused: torch.Tensor | None, num_key_value_heads: int, head_dim: int):
    """Rows [H_kv * (g + 2) * d, ...] of a fused projection in the grouped layout (per K/V head: its g query
    heads, then k, then v; see ``hf_attn_swap.modeling.grouped``) -> q [H, d, ...], k and v [H_kv, d, ...]."""
    if fused is None:
        return None, None, None
    x = fused.reshape(num_key_value_heads, -1, head_dim, *fused.shape[1:])
    return x[:, :-2].flatten(0, 1), x[:, -2], x[:, -1]


def fuse_grouped_rows(q: torch.Tensor | None, k: torch.Tensor | None, v: torch.Tensor | None):
    """Inverse of ``split_grouped_rows``: q [H, d, ...], k and v [H_kv, d, ...] -> [H_kv * (g + 2) * d, ...]."""
    if q is None:
        return None
    kv = k.shape[0]
    q = q.reshape(kv, -1, *q.shape[1:])
    return torch.cat([q, k.unsqueeze(1), v.unsqueeze(1)], dim=1).flatten(0, 2)


def with_output(q, k, v, q_bias, k_bias, v_bias, o: nn.Linear, head_dim: int) -> AttentionWeights:
    """Head-major q/k/v (and biases) plus the output projection ``o`` -> ``AttentionWeights``."""
    return AttentionWeights(
        q=q,
        k=k,
        v=v,
        o=o.weight.detach().reshape(o.out_features, -1, head_dim),
        q_bias=q_bias,
        k_bias=k_bias,
        v_bias=v_bias,
        o_bias=None if o.bias is None else o.bias.detach(),
    )


def read_projections(
    q: nn.Linear, k: nn.Linear, v: nn.Linear, o: nn.Linear, head_dim: int
) -> AttentionWeights:
    """Separate q/k/v/o ``nn.Linear`` projections -> head-major ``AttentionWeights``."""

    def heads(linear):
        return linear.weight.detach().reshape(-1, head_dim, linear.in_features)

    def bias(linear):
        return None if linear.bias is None else linear.bias.detach().view(-1, head_dim)

    return with_output(heads(q), heads(k), heads(v), bias(q), bias(k), bias(v), o, head_dim)


def write_projections(
    q: nn.Linear, k: nn.Linear, v: nn.Linear, o: nn.Linear, weights: AttentionWeights
) -> None:
    """Copy ``weights`` into separate q/k/v/o projections of matching sizes."""
    hidden = weights.q.shape[-1]
    for linear, weight, bias in (
        (q, weights.q, weights.q_bias),
        (k, weights.k, weights.k_bias),
        (v, weights.v, weights.v_bias),
    ):
        copy_into(linear, weight.reshape(-1, hidden), flat(bias))
    copy_into(o, weights.o.reshape(weights.o.shape[0], -1), weights.o_bias)


def read_fused_grouped(
    qkv: nn.Linear, dense: nn.Linear, num_key_value_heads: int, head_dim: int
) -> AttentionWeights:
    """A fused ``qkv`` projection in the grouped layout and an output projection -> ``AttentionWeights``."""
    bias = None if qkv.bias is None else qkv.bias.detach()
    return with_output(
        *split_grouped_rows(qkv.weight.detach(), num_key_value_heads, head_dim),
        *split_grouped_rows(bias, num_key_value_heads, head_dim),
        dense,
        head_dim,
    )


def write_fused_grouped(qkv: nn.Linear, dense: nn.Linear, weights: AttentionWeights) -> None:
    """Copy ``weights`` into a fused ``qkv`` projection in the grouped layout and an output projection."""
    copy_into(
        qkv,
        fuse_grouped_rows(weights.q, weights.k, weights.v),
        fuse_grouped_rows(weights.q_bias, weights.k_bias, weights.v_bias),
    )
    copy_into(dense, weights.o.reshape(weights.o.shape[0], -1), weights.o_bias)
