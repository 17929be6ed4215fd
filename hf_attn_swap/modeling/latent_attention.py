"""``attn_implementation="latent_sdpa"``: MLA attention over a cache that holds only the latent (c, k_rope).

With W_UK,h / W_UV,h the per-head blocks of ``kv_b_proj`` ([d_nope, r] / [d_v, r]), two forms give the same output:
- *absorbed*: score_h(s) = (q_nope,h W_UK,h) . c_s + q_rope,h . k_rope,s   (RoPE only touches the shared rope key)
              out_h      = W_UV,h (sum_s softmax(score_h * scale)(s) c_s)
  so every query head attends over [c ; k_rope] like one shared MQA head (key dim r + d_rope, value dim r);
- *expanded* (stock ``DeepseekV3Attention``): keys [W_UK,h c_s ; k_rope,s] and values W_UV,h c_s per head, from
  running ``kv_b_proj`` over all S latents of this call, then ordinary SDPA.
Each call picks the form with fewer multiply-adds (:func:`prefers_expanded`). Per batch row, with T query tokens,
S key tokens (cached + new), H heads, d_qk = d_nope + d_rope and d_v' = max(d_v, d_qk) (V is zero-padded to the q/k
head dim, which lets CPU SDPA use its fused kernel; the absorbed prefill likewise reuses its keys as values):
    absorbed(T, S) = T * H * r * (d_nope + d_v)  +  T * S * H * 2 (r + d_rope)   (W_UK into q, W_UV out; [c ; k_rope])
    expanded(T, S) = S * H * r * (d_nope + d_v)  +  T * S * H * (d_qk + d_v')    (kv_b_proj over S latents; SDPA)
    expand  <=>  T * S * (2 (r + d_rope) - d_qk - d_v')  >  (S - T) * r * (d_nope + d_v)
A prompt without a cache (T = S) is expanded whenever 2 (r + d_rope) > d_qk + d_v' (SmolLM2 at r 88 + d_rope 32,
head dim 64: 240 > 192 per score; DeepSeek-V3, r 512 + d_rope 64, d 128: 1152 > 384). A decode step (T = 1) stays
absorbed: expanding would run ``kv_b_proj`` over all S cached latents for one query. A chunk of T tokens over P cached
ones (S = P + T) is expanded once T * S * 48 > P * 11264 for SmolLM2, i.e. T >= 197 at P = 1024, T >= 223 at
P = 4096. Score pairs are counted densely (a causal mask halves them in both forms alike). The cache holds only
(c, k_rope) in both forms, never expanded keys or values; ``force_latent_form`` overrides the choice (tests,
benchmarks). Both forms are exact: tests hold them to <= 1e-10 relative to eager attention in float64.

Registered on ``import hf_attn_swap`` with ``AttentionInterface`` and, for its boolean masks, with
``AttentionMaskInterface`` (the same masks as ``sdpa``; both forms use what transformers hands them: causal,
padding, chunked prefill over a cache). Works for:
- the plugin ``hf_attn_swap_mla`` model, whose attention hands (c, k_rope) straight to this function;
- stock ``deepseek_v3`` loaded with ``from_pretrained(path, attn_implementation="latent_sdpa")``. Stock
  ``DeepseekV3Attention`` calls ``self.expand_kv`` before the attention function, so on its first call this function
  computes ordinary SDPA on the expanded inputs and then gives *that module instance* an ``expand_kv`` which hands
  the latents through unexpanded while its config asks for ``latent_sdpa``; the expanded form then calls the class's
  own ``expand_kv``. Classes are never patched: models that did not ask for ``latent_sdpa`` run exactly the stock
  code.
"""

from __future__ import annotations

import contextlib
import contextvars
import types
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .mla import LATENT_SDPA

MLA_MODULE_ATTRIBUTES = ("kv_b_proj", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")


def _passthrough_expand_kv(module: nn.Module, latent: torch.Tensor, rope_key: torch.Tensor):
    """Instance ``expand_kv`` for stock MLA modules: latents go through untouched under ``latent_sdpa``."""
    if module.config._attn_implementation == LATENT_SDPA:
        return latent, rope_key
    return type(module).expand_kv(module, latent, rope_key)


def _check_mla_module(module: nn.Module) -> None:
    missing = [name for name in MLA_MODULE_ATTRIBUTES if not hasattr(module, name)]
    if missing:
        raise ValueError(
            f"attn_implementation='{LATENT_SDPA}' only works for multi-head latent attention (deepseek_v3 or "
            f"hf_attn_swap_mla models); {type(module).__name__} has no {', '.join(missing)}. Convert the model "
            "first (hf_attn_swap.convert_to_mla) or use attn_implementation='sdpa'."
        )


FORMS = ("auto", "absorbed", "expanded")
_FORCED_FORM: contextvars.ContextVar[str] = contextvars.ContextVar("latent_sdpa_form", default="auto")


@dataclass(frozen=True)
class LatentShapes:
    """The sizes of one MLA layer that decide the form: H heads, latent rank r and the per-head dims."""

    heads: int
    rank: int
    nope_dim: int
    rope_dim: int
    value_dim: int

    def absorbed_cost(self, queries: int, keys: int) -> int:
        """Multiply-adds per batch row of the absorbed form (module docstring)."""
        projections = queries * self.heads * self.rank * (self.nope_dim + self.value_dim)
        return projections + queries * keys * self.heads * 2 * (self.rank + self.rope_dim)

    def expanded_cost(self, queries: int, keys: int) -> int:
        """Multiply-adds per batch row of the expanded form (module docstring)."""
        qk_dim = self.nope_dim + self.rope_dim
        projections = keys * self.heads * self.rank * (self.nope_dim + self.value_dim)
        return projections + queries * keys * self.heads * (qk_dim + max(self.value_dim, qk_dim))


def prefers_expanded(shapes: LatentShapes, query_length: int, kv_length: int) -> bool:
    """Whether expanding the ``kv_length`` latents beats absorbing ``query_length`` queries (ties stay absorbed)."""
    return shapes.expanded_cost(query_length, kv_length) < shapes.absorbed_cost(query_length, kv_length)


@contextlib.contextmanager
def force_latent_form(form: str) -> Iterator[None]:
    """Within the block, ``latent_sdpa`` always runs ``form``: "absorbed", "expanded" or "auto" (the rule)."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
    token = _FORCED_FORM.set(form)
    try:
        yield
    finally:
        _FORCED_FORM.reset(token)


def _uses_expanded_form(module: nn.Module, query: torch.Tensor, latent: torch.Tensor) -> bool:
    form = _FORCED_FORM.get()
    if form != "auto":
        return form == "expanded"
    d_nope = module.qk_nope_head_dim
    shapes = LatentShapes(
        query.shape[1], latent.shape[-1], d_nope, query.shape[-1] - d_nope, module.v_head_dim
    )
    return prefers_expanded(shapes, query.shape[2], latent.shape[2])


def latent_sdpa_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """query [B, H, T, d_nope + d_rope]; key = latent c [B, 1, S, r]; value = rope keys [B, n, S, d_rope].

    Returns attention output [B, T, H, d_v] (before ``o_proj``) and no weights.
    """
    _check_mla_module(module)
    if not getattr(module, "_hf_attn_swap_latent_kv", False):
        # first call on a stock module: its inputs are already expanded; switch this instance over for next time
        module.expand_kv = types.MethodType(_passthrough_expand_kv, module)
        module._hf_attn_swap_latent_kv = True
        return expanded_attention(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    if _uses_expanded_form(module, query, key):
        keys, values = type(module).expand_kv(module, key, value)  # the class's own expansion, never cached
        return expanded_attention(module, query, keys, values, attention_mask, dropout, scaling, **kwargs)
    return absorbed_attention(module, query, key, value, attention_mask, scaling, dropout)


def expanded_attention(
    module: nn.Module,
    query: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Ordinary SDPA on per-head keys [B, H, S, d_qk] and values [B, H, S, d_v] -> [B, T, H, d_v]."""
    v_dim = values.shape[-1]
    # zero-pad V to the q/k head dim: CPU SDPA only fuses equal head dims (~4-8x faster, no S x S scores)
    values = F.pad(values, (0, query.shape[-1] - v_dim)) if v_dim < query.shape[-1] else values
    out, weights = sdpa_attention_forward(
        module, query, keys, values, attention_mask, dropout=dropout, scaling=scaling, **kwargs
    )
    return out[..., :v_dim], weights


def absorbed_attention(
    module: nn.Module,
    query: torch.Tensor,
    latent: torch.Tensor,
    rope_key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
) -> tuple[torch.Tensor, None]:
    """Attention in the latent space (module docstring) -> [B, T, H, d_v]."""
    heads, rank, d_nope = query.shape[1], latent.shape[-1], module.qk_nope_head_dim
    scaling = module.scaling if scaling is None else scaling
    dropout = dropout if module.training else 0.0
    up = module.kv_b_proj.weight.view(heads, d_nope + module.v_head_dim, rank)
    w_uk, w_uv = up[:, :d_nope], up[:, d_nope:]  # [H, d_nope, r], [H, d_v, r]
    q_nope, q_rope = query.split([d_nope, query.shape[-1] - d_nope], dim=-1)
    q_latent = torch.matmul(q_nope, w_uk)  # [B, H, T, r]
    attend = _latent_decode if query.shape[2] == 1 else _latent_sdpa
    out_latent = attend(q_latent, q_rope, latent, rope_key, attention_mask, scaling, dropout)
    out = torch.matmul(out_latent, w_uv.transpose(1, 2))  # [B, H, T, d_v]
    return out.transpose(1, 2).contiguous(), None


def _latent_decode(q_latent, q_rope, latent, rope_key, attention_mask, scaling, dropout) -> torch.Tensor:
    """One query token: heads of a rope group become rows of one MQA query against the shared [c ; k_rope]."""
    batch, heads, length, rank = q_latent.shape
    rope_heads, kv_length = rope_key.shape[1], latent.shape[2]
    group = heads // rope_heads
    q_latent = q_latent.reshape(batch, rope_heads, group * length, rank)
    q_rope = q_rope.reshape(batch, rope_heads, group * length, -1)
    joint = _joint_view(latent, rope_key)
    if joint is not None:  # LatentCache keeps [c ; k_rope] side by side: one key of dim r + d_rope
        scores = torch.matmul(torch.cat([q_latent, q_rope], dim=-1), joint.transpose(-1, -2))
    else:
        scores = torch.matmul(q_latent, latent.transpose(-1, -2)) + torch.matmul(
            q_rope, rope_key.transpose(-1, -2)
        )
    scores = scores.to(torch.promote_types(scores.dtype, torch.float32)) * scaling  # float32 or wider
    if attention_mask is not None:
        mask = (
            attention_mask[:, :, None]
            .expand(-1, -1, group, -1, -1)
            .reshape(batch, -1, group * length, kv_length)
        )
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask
    probs = F.dropout(scores.softmax(dim=-1), p=dropout, training=dropout > 0).to(latent.dtype)
    if joint is not None:  # multiply the contiguous rows and drop the rope columns
        out_latent = torch.matmul(probs, joint)[..., :rank]
    else:
        out_latent = torch.matmul(probs, latent)
    return out_latent.reshape(batch, heads, length, rank)


def _latent_sdpa(q_latent, q_rope, latent, rope_key, attention_mask, scaling, dropout) -> torch.Tensor:
    """Several query tokens: one SDPA call over latent keys [c ; k_rope] (key dim r + d_rope); the values are the same
    rows (equal head dims let CPU SDPA use its fused kernel) and the rope columns of the output are dropped."""
    batch, heads, length, rank = q_latent.shape
    if attention_mask is None and latent.shape[2] > length:
        # sdpa_mask left out the causal mask of an empty static cache: only its first T slots hold keys (as in
        # transformers' sdpa_attention_forward)
        latent, rope_key = latent[:, :, :length], rope_key[:, :, :length]
    rope_heads, kv_length = rope_key.shape[1], latent.shape[2]
    keys = torch.cat([latent.expand(-1, rope_heads, -1, -1), rope_key], dim=-1)
    keys = keys[:, :, None].expand(-1, -1, heads // rope_heads, -1, -1).reshape(batch, heads, kv_length, -1)
    q = torch.cat([q_latent, q_rope], dim=-1)
    is_causal = attention_mask is None
    return F.scaled_dot_product_attention(
        q, keys, keys, attn_mask=attention_mask, dropout_p=dropout, is_causal=is_causal, scale=scaling
    )[..., :rank]


def _joint_view(latent: torch.Tensor, rope_key: torch.Tensor) -> torch.Tensor | None:
    """[B, 1, S, r + d_rope] over the same memory when c and a single rope key sit side by side (LatentCache).

    None under autograd: the view reaches past ``latent``'s own elements, which ``as_strided`` cannot back-propagate.
    """
    if torch.is_grad_enabled() and (latent.requires_grad or rope_key.requires_grad):
        return None
    if rope_key.shape[1] != 1 or latent.stride(-1) != 1 or rope_key.stride(-1) != 1:
        return None
    same_rows = latent.stride(0) == rope_key.stride(0) and latent.stride(2) == rope_key.stride(2)
    if not same_rows or latent.stride(2) < latent.shape[-1] + rope_key.shape[-1]:
        return None
    if rope_key.data_ptr() != latent.data_ptr() + latent.shape[-1] * latent.element_size():
        return None
    return latent.as_strided((*latent.shape[:3], latent.shape[-1] + rope_key.shape[-1]), latent.stride())


def attention_for(config, requested: str | None) -> str | None:
    """``requested``, except ``"auto"``: ``latent_sdpa`` for an MLA config (one with ``kv_lora_rank``: stock
    ``deepseek_v3`` or the plugin's), else None (transformers' default). Stock ``sdpa`` on such an export re-expands
    every cached latent at each decode step and runs its v head (64) under wider q/k heads (96) in CPU SDPA's
    unfused kernel; ``latent_sdpa`` prefills expanded with V padded (fused) and decodes absorbed."""
    if requested != "auto":
        return requested
    return LATENT_SDPA if getattr(config, "kv_lora_rank", None) else None


def register_latent_sdpa() -> None:
    AttentionInterface.register(LATENT_SDPA, latent_sdpa_attention_forward)
    AttentionMaskInterface.register(LATENT_SDPA, sdpa_mask)
