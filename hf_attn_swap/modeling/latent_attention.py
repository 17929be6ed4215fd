"""``attn_implementation="latent_sdpa"``: absorbed MLA attention that never re-expands the latent cache.

With W_UK,h / W_UV,h the per-head blocks of ``kv_b_proj`` ([d_nope, r] / [d_v, r]):
    score_h(s) = (q_nope,h W_UK,h) . c_s + q_rope,h . k_rope,s     (RoPE only touches the shared rope key)
    out_h      = W_UV,h (sum_s softmax(score_h * scale)(s) c_s)
so every query head attends over [c ; k_rope] like one shared MQA head (key dim r + d_rope, value dim r), and
per decode step the work is O(S * H * (r + d_rope)) instead of re-expanding the cache through ``kv_b_proj``
(O(S * r * H * (d_nope + d_v))) as stock ``DeepseekV3Attention`` does.

Registered on ``import hf_attn_swap`` with ``AttentionInterface`` and, for its boolean masks, with
``AttentionMaskInterface`` (the same masks as ``sdpa``). Works for:
- the plugin ``hf_attn_swap_mla`` model, whose attention hands (c, k_rope) straight to this function;
- stock ``deepseek_v3`` loaded with ``from_pretrained(path, attn_implementation="latent_sdpa")``. Stock
  ``DeepseekV3Attention`` calls ``self.expand_kv`` before the attention function, so on its first call this function
  computes ordinary SDPA on the expanded inputs and then gives *that module instance* an ``expand_kv`` which hands
  the latents through unexpanded while its config asks for ``latent_sdpa``. Classes are never patched: models that
  did not ask for ``latent_sdpa`` run exactly the stock code.
"""

from __future__ import annotations

import types

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
        # zero-pad V to the q/k head dim: CPU SDPA only fuses equal head dims (~8x faster, no S x S scores)
        v_dim = value.shape[-1]
        value = F.pad(value, (0, query.shape[-1] - v_dim)) if v_dim < query.shape[-1] else value
        out, weights = sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
        return out[..., :v_dim], weights
    return absorbed_attention(module, query, key, value, attention_mask, scaling, dropout)


def absorbed_attention(
    module: nn.Module,
    query: torch.Tensor,
    latent: torch.Tensor,
    rope_key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
) -> tuple[torch.Tensor, None]:
    """Attention in the latent space (module docstring). Query heads are grouped by the rope key they share."""
    batch, heads, length, _ = query.shape
    rank, d_nope = latent.shape[-1], module.qk_nope_head_dim
    rope_heads, kv_length = rope_key.shape[1], latent.shape[2]
    group = heads // rope_heads
    scaling = module.scaling if scaling is None else scaling
    dropout = dropout if module.training else 0.0

    up = module.kv_b_proj.weight.view(heads, d_nope + module.v_head_dim, rank)
    w_uk, w_uv = up[:, :d_nope], up[:, d_nope:]  # [H, d_nope, r], [H, d_v, r]
    q_nope, q_rope = query.split([d_nope, query.shape[-1] - d_nope], dim=-1)
    q_latent = torch.matmul(q_nope, w_uk)  # [B, H, T, r]

    if length == 1:
        # decode: heads of a rope group become rows of one MQA query against the shared [c ; k_rope]
        q_latent = q_latent.reshape(batch, rope_heads, group * length, rank)
        q_rope = q_rope.reshape(batch, rope_heads, group * length, -1)
        joint = _joint_view(latent, rope_key)
        if joint is not None:  # LatentCache keeps [c ; k_rope] side by side: one key of dim r + d_rope
            scores = torch.matmul(torch.cat([q_latent, q_rope], dim=-1), joint.transpose(-1, -2))
        else:
            scores = torch.matmul(q_latent, latent.transpose(-1, -2)) + torch.matmul(
                q_rope, rope_key.transpose(-1, -2)
            )
        scores = scores.float() * scaling
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
        probs = F.dropout(scores.softmax(dim=-1), p=dropout, training=module.training).to(latent.dtype)
        if joint is not None:  # multiply the contiguous rows and drop the rope columns
            out_latent = torch.matmul(probs, joint)[..., :rank]
        else:
            out_latent = torch.matmul(probs, latent)
        out_latent = out_latent.reshape(batch, heads, length, rank)
    else:
        # prefill: one SDPA call over latent keys [c ; k_rope] (key dim r + d_rope); the values are the same rows
        # (equal head dims let CPU SDPA use its fused kernel) and the rope columns of the output are dropped
        keys = torch.cat([latent.expand(-1, rope_heads, -1, -1), rope_key], dim=-1)
        keys = keys[:, :, None].expand(-1, -1, group, -1, -1).reshape(batch, heads, kv_length, -1)
        q = torch.cat([q_latent, q_rope], dim=-1)
        is_causal = attention_mask is None and length == kv_length
        out_latent = F.scaled_dot_product_attention(
            q, keys, keys, attn_mask=attention_mask, dropout_p=dropout, is_causal=is_causal, scale=scaling
        )[..., :rank]
    out = torch.matmul(out_latent, w_uv.transpose(1, 2))  # [B, H, T, d_v]
    return out.transpose(1, 2).contiguous(), None


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


def register_latent_sdpa() -> None:
    AttentionInterface.register(LATENT_SDPA, latent_sdpa_attention_forward)
    AttentionMaskInterface.register(LATENT_SDPA, sdpa_mask)
