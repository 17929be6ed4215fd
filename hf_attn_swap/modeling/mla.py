"""The plugin MLA format (``model_type="hf_attn_swap_mla"``): a Llama-family decoder whose attention is
DeepSeek-style multi-head latent attention, with what ``deepseek_v3`` cannot express:

- ``num_rope_key_heads`` rope keys (1 = DeepSeek's single shared key; = source KV heads reproduces RoPE exactly),
- per-layer ``kv_lora_rank`` (a list) and per-layer kept rotary pairs ``rope_pairs`` (any subset of the source's
  frequencies, not only DeepSeek's ladder),
- no ``kv_a_layernorm`` on the latent, and optional q / rope-key / o biases (Qwen2, Llama ``attention_bias``).

Per layer, with H query heads, d_nope = qk_nope_head_dim, d_rope = qk_rope_head_dim, n = num_rope_key_heads:
    q_proj             [H * (d_nope + d_rope), hidden]  per head: nope dims, then rope dims (rotate-half order)
    kv_a_proj_with_mqa [r + n * d_rope, hidden]         latent c = first r rows; then n rope keys
    kv_b_proj          [H * (d_nope + d_v), r]          per head: W_UK (d_nope rows), then W_UV (d_v rows)
    o_proj             [hidden, H * d_v]
    score_h = (q_nope,h . W_UK,h c + q_rope,h . RoPE(k_rope,h // (H/n))) * (d_nope + d_rope)^-0.5
The cache holds only c and the n rope keys: r + n * d_rope values per token and layer.
Everything else (embeddings, RMSNorms, MLP, rotary frequencies, tied lm_head) is Llama's own code.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, DynamicCache, LlamaConfig
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import (
    LlamaDecoderLayer,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    LlamaPreTrainedModel,
    LlamaRMSNorm,
    LlamaRotaryEmbedding,
    apply_rotary_pos_emb,
    eager_attention_forward,
)

from .compat import CACHE_KWARG, cache_kwargs, check_cache_grew, pop_cache, update_layer_cache
from .latent_cache import LatentCache

MLA_MODEL_TYPE = "hf_attn_swap_mla"
#: config fields of the Llama-style decoder that every MLA format (plugin, deepseek_v3) carries over unchanged
DECODER_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "hidden_act", "max_position_embeddings", "initializer_range", "rms_norm_eps", "use_cache",
                  "pad_token_id", "bos_token_id", "eos_token_id", "tie_word_embeddings", "attention_dropout")  # fmt: skip
#: name of the absorbed-decoding attention implementation (registered in ``hf_attn_swap.modeling.latent_attention``)
LATENT_SDPA = "latent_sdpa"


@strict
class MLAConfig(LlamaConfig):
    r"""Llama config plus the MLA attention fields (see the module docstring).

    kv_lora_rank (`int` or `list[int]`): latent rank r, one value for all layers or one per layer.
    rope_pairs (`list[list[int]]`, *optional*): per layer, the source rotary pairs (indices into the source's
        ``inv_freq``) kept in the rope key, ``qk_rope_head_dim / 2`` each. None: DeepSeek's uniform ladder
        ``0, s, 2s, ...`` with ``s = rotary pairs / (qk_rope_head_dim / 2)``.
    """

    model_type = MLA_MODEL_TYPE

    kv_lora_rank: int | list[int] = 512
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    num_rope_key_heads: int = 1
    rope_pairs: list[list[int]] | None = None
    q_proj_bias: bool = False
    kv_a_proj_bias: bool = False
    o_proj_bias: bool = False
    source_model_type: str | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if isinstance(self.kv_lora_rank, list) and len(self.kv_lora_rank) != self.num_hidden_layers:
            raise ValueError(
                f"kv_lora_rank has {len(self.kv_lora_rank)} entries for {self.num_hidden_layers} layers"
            )
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim must be even, got {self.qk_rope_head_dim}")
        if self.num_attention_heads % self.num_rope_key_heads:
            raise ValueError(
                f"num_rope_key_heads={self.num_rope_key_heads} must divide the {self.num_attention_heads} query heads"
            )

    @classmethod
    def from_source(
        cls,
        source_config,
        kv_lora_rank: int | list[int],
        qk_rope_head_dim: int,
        num_rope_key_heads: int = 1,
        rope_pairs: list[list[int]] | None = None,
        biases: tuple[bool, bool, bool] = (False, False, False),
    ) -> MLAConfig:
        """The plugin config of an MLA conversion of ``source_config`` (a Llama-style config): its decoder fields,
        rope parameters and head_dim, with one query head per expanded K/V head and the MLA fields.

        Args:
            kv_lora_rank: r for every layer, or one per layer (a list whose entries all agree becomes an int).
            qk_rope_head_dim: rope dims per rope key (even).
            num_rope_key_heads: rope keys per layer (1 = DeepSeek's shared key).
            rope_pairs: per layer, the source rotary pairs kept; None for DeepSeek's uniform ladder.
            biases: whether (q_proj, kv_a_proj_with_mqa, o_proj) have a bias.
        """
        shared = (*DECODER_FIELDS, "rope_parameters", "mlp_bias", "head_dim")
        fields = {name: getattr(source_config, name) for name in shared if hasattr(source_config, name)}
        fields["head_dim"] = (
            fields.get("head_dim") or source_config.hidden_size // source_config.num_attention_heads
        )
        if isinstance(kv_lora_rank, list) and len(set(kv_lora_rank)) == 1:
            kv_lora_rank = kv_lora_rank[0]
        return cls(
            **fields,
            num_key_value_heads=source_config.num_attention_heads,
            kv_lora_rank=kv_lora_rank,
            qk_rope_head_dim=qk_rope_head_dim,
            qk_nope_head_dim=fields["head_dim"],
            v_head_dim=fields["head_dim"],
            num_rope_key_heads=num_rope_key_heads,
            rope_pairs=rope_pairs,
            q_proj_bias=biases[0],
            kv_a_proj_bias=biases[1],
            o_proj_bias=biases[2],
            source_model_type=source_config.model_type,
            dtype=getattr(source_config, "dtype", None),
        )

    @property
    def uniform_rank(self) -> bool:
        """Whether every layer has the same latent rank."""
        return not isinstance(self.kv_lora_rank, list) or len(set(self.kv_lora_rank)) == 1

    def layer_kv_lora_rank(self, layer_idx: int) -> int:
        rank = self.kv_lora_rank
        return int(rank[layer_idx] if isinstance(rank, list) else rank)

    def layer_rope_pairs(self, layer_idx: int) -> list[int]:
        if self.rope_pairs is not None:
            return list(self.rope_pairs[layer_idx])
        rotary_pairs = self.head_dim // 2
        kept = self.qk_rope_head_dim // 2
        return list(range(0, rotary_pairs, rotary_pairs // kept))[:kept]

    def latent_width(self, layer_idx: int) -> int:
        """Values cached per token in this layer: r + num_rope_key_heads * qk_rope_head_dim."""
        return self.layer_kv_lora_rank(layer_idx) + self.num_rope_key_heads * self.qk_rope_head_dim


class MLAAttention(nn.Module):
    """Multi-head latent attention over a Llama-style rotary embedding (shapes in the module docstring)."""

    #: ``latent_sdpa`` receives (c, k_rope) from this module, never expanded keys and values
    _hf_attn_swap_latent_kv = True

    def __init__(self, config: MLAConfig, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.kv_lora_rank = config.layer_kv_lora_rank(layer_idx)
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.num_rope_key_heads = config.num_rope_key_heads
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        self.num_key_value_groups = 1  # expanded keys/values have one head per query head
        self.scaling = self.qk_head_dim**-0.5
        self.attention_dropout = config.attention_dropout
        self.is_causal = True
        self.rope_pairs = tuple(config.layer_rope_pairs(layer_idx))
        self._rope_index: dict[torch.device, torch.Tensor] = {}

        hidden, heads = config.hidden_size, self.num_heads
        self.q_proj = nn.Linear(hidden, heads * self.qk_head_dim, bias=config.q_proj_bias)
        self.kv_a_proj_with_mqa = nn.Linear(
            hidden,
            self.kv_lora_rank + self.num_rope_key_heads * self.qk_rope_head_dim,
            bias=config.kv_a_proj_bias,
        )
        self.kv_b_proj = nn.Linear(
            self.kv_lora_rank, heads * (self.qk_nope_head_dim + self.v_head_dim), bias=False
        )
        self.o_proj = nn.Linear(heads * self.v_head_dim, hidden, bias=config.o_proj_bias)

    def rope_cos_sin(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Source [B, T, rotary_dim] (``cat(freqs, freqs)``) -> this layer's kept pairs [B, T, d_rope]."""
        index = self._rope_index.get(cos.device)
        if index is None:
            index = self._rope_index[cos.device] = torch.tensor(self.rope_pairs, device=cos.device)
        cos, sin = cos.index_select(-1, index), sin.index_select(-1, index)
        return torch.cat([cos, cos], dim=-1), torch.cat([sin, sin], dim=-1)

    def expand_kv(self, latent: torch.Tensor, rope_key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, 1, S, r], [B, n, S, d_rope] -> keys [B, H, S, d_nope + d_rope], values [B, H, S, d_v]."""
        batch, _, length, _ = latent.shape
        kv = self.kv_b_proj(latent[:, 0]).view(batch, length, self.num_heads, -1).transpose(1, 2)
        k_nope, values = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        group = self.num_heads // self.num_rope_key_heads
        rope_key = (
            rope_key[:, :, None].expand(-1, -1, group, -1, -1).reshape(batch, self.num_heads, length, -1)
        )
        return torch.cat([k_nope, rope_key], dim=-1), values

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        batch, length = hidden_states.shape[:-1]
        query = (
            self.q_proj(hidden_states).view(batch, length, self.num_heads, self.qk_head_dim).transpose(1, 2)
        )
        q_nope, q_rope = query.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        latent, rope_key = self.kv_a_proj_with_mqa(hidden_states).split(
            [self.kv_lora_rank, self.num_rope_key_heads * self.qk_rope_head_dim], dim=-1
        )
        latent = latent.view(batch, 1, length, self.kv_lora_rank)
        rope_key = rope_key.view(batch, length, self.num_rope_key_heads, self.qk_rope_head_dim).transpose(
            1, 2
        )
        cos, sin = self.rope_cos_sin(*position_embeddings)
        q_rope, rope_key = apply_rotary_pos_emb(q_rope, rope_key, cos, sin)

        latent, rope_key = update_layer_cache(kwargs, latent, rope_key, self.layer_idx)

        query = torch.cat([q_nope, q_rope], dim=-1)
        implementation = self.config._attn_implementation
        if implementation == LATENT_SDPA:
            keys, values = latent, rope_key  # absorbed: attention runs in the latent space
        else:
            keys, values = self.expand_kv(latent, rope_key)
        attention_interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            implementation, eager_attention_forward
        )
        attn_output, attn_weights = attention_interface(
            self,
            query,
            keys,
            values,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(batch, length, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


class MLADecoderLayer(LlamaDecoderLayer):
    """Llama's decoder layer (same forward) with :class:`MLAAttention`."""

    def __init__(self, config: MLAConfig, layer_idx: int):
        GradientCheckpointingLayer.__init__(self)
        self.hidden_size = config.hidden_size
        self.self_attn = MLAAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)


class MLAPreTrainedModel(LlamaPreTrainedModel):
    config: MLAConfig
    config_class = MLAConfig
    _no_split_modules = ["MLADecoderLayer"]
    _supports_flash_attn = False  # q/k and v head dims differ
    _supports_flex_attn = False
    _can_compile_fullgraph = False
    _can_record_outputs = {"hidden_states": MLADecoderLayer, "attentions": MLAAttention}


class MLAModel(MLAPreTrainedModel, LlamaModel):
    def __init__(self, config: MLAConfig):
        MLAPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([MLADecoderLayer(config, i) for i in range(config.num_hidden_layers)])
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()

    @check_cache_grew
    def forward(self, *args, use_cache=None, **kwargs):
        """Llama's forward; a fresh cache is a :class:`LatentCache` (the cache is taken under either name)."""
        cache = pop_cache(kwargs)
        wants_cache = use_cache if use_cache is not None else (self.config.use_cache and not self.training)
        if wants_cache and cache is None:
            cache = LatentCache(config=self.config)
        return LlamaModel.forward(self, *args, use_cache=use_cache, **cache_kwargs(cache), **kwargs)


class MLAForCausalLM(MLAPreTrainedModel, LlamaForCausalLM):
    def __init__(self, config: MLAConfig):
        MLAPreTrainedModel.__init__(self, config)
        self.model = MLAModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    # transformers (5.15.0 to 5.24 checked) has no supported way to make generate() build a custom cache class,
    # so this overrides its private hook, as its own models with custom caches do (t5gemma, voxtral_realtime,
    # parakeet, nemotron_asr_streaming). Checked and not fitting:
    # - cache layers chosen from the config: DynamicCache(config) maps ``config.layer_types`` through
    #   ``cache_utils.DYNAMIC_LAYER_TYPE_MAPPING``, a module dict with no registration API, and PreTrainedConfig
    #   validates ``layer_types`` against the fixed ``ALLOWED_ATTN_LAYER_TYPES``; it would also give a DynamicCache
    #   of LatentLayers, not a LatentCache (``nbytes`` / ``allocated_nbytes``).
    # - ``generation_config.cache_implementation``: validated against the fixed ``ALL_CACHE_IMPLEMENTATIONS``.
    # - ``_supports_default_dynamic_cache()`` returning False (MLAModel.forward would then create the cache): just
    #   as private (transformers keys it on class names), and generate() then ignores ``cache_implementation``.
    # - ``_supports_*`` class attributes: none selects a cache class (they gate attention backends, context
    #   parallelism).
    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        """``generate()``'s default cache becomes a :class:`LatentCache` (a user-passed cache is kept)."""
        user_cache = model_kwargs.get(CACHE_KWARG)
        result = super()._prepare_cache_for_generation(generation_config, model_kwargs, *args, **kwargs)
        if user_cache is None and type(model_kwargs.get(CACHE_KWARG)) is DynamicCache:
            model_kwargs[CACHE_KWARG] = LatentCache(config=self.config)
        return result


def register_auto_classes() -> None:
    """Make ``AutoConfig`` / ``AutoModel`` / ``AutoModelForCausalLM`` load ``hf_attn_swap_mla`` folders."""
    AutoConfig.register(MLA_MODEL_TYPE, MLAConfig, exist_ok=True)
    AutoModel.register(MLAConfig, MLAModel, exist_ok=True)
    AutoModelForCausalLM.register(MLAConfig, MLAForCausalLM, exist_ok=True)
