"""BERT encoders (and BERT decoders, ``is_decoder=True``): separate ``query``/``key``/``value`` with biases in
``attention.self``, the output projection is ``attention.output.dense`` (before the residual LayerNorm),
learned absolute positions. Converted models use ``hf_attn_swap.modeling.bert``."""

from __future__ import annotations

from torch import nn

from ..modeling.bert import GroupedBertConfig, GroupedBertSelfAttention
from .base import AttentionWeights
from .plugin import PluginAdapter, read_projections, unsupported, write_projections


class BertAdapter(PluginAdapter):
    """``attention_modules`` are the ``BertAttention`` blocks (q/k/v in ``.self``, o in ``.output.dense``)."""

    family = "bert"
    model_types = ("bert", GroupedBertConfig.model_type)
    config_class = GroupedBertConfig
    grouped_attention = GroupedBertSelfAttention

    def check_supported(self, config) -> None:
        if config.add_cross_attention:
            raise unsupported(
                "BERT with cross-attention (add_cross_attention=True) is not supported: hf_attn_swap converts "
                "BERT self-attention (encoders, and decoders without cross-attention)"
            )

    def is_causal(self, config) -> bool:
        return bool(config.is_decoder)

    def attention_modules(self, model: nn.Module) -> list[nn.Module]:
        return [layer.attention for layer in model.base_model.encoder.layer]

    def read(self, attn: nn.Module) -> AttentionWeights:
        s = attn.self
        return read_projections(s.query, s.key, s.value, attn.output.dense, s.attention_head_size)

    def write(self, attn: nn.Module, weights: AttentionWeights) -> None:
        self.ensure_kv_heads(attn.self, weights.num_key_value_heads)
        s = attn.self
        write_projections(s.query, s.key, s.value, attn.output.dense, weights)
