"""``LatentCache``: a transformers ``Cache`` that stores only what MLA needs, c_kv and the rope key(s).

Each :class:`LatentLayer` keeps one buffer [B, capacity, r + n * d_rope] per layer: the latent c [B, 1, S, r]
and the n rope keys [B, n, S, d_rope] are views into it, so appending a decode step writes r + n * d_rope values
per sequence instead of re-concatenating the whole cache (``DynamicLayer`` copies it every step). Capacity grows
geometrically; ``nbytes()`` counts the cached tokens, ``allocated_nbytes()`` the buffer. Under autograd (inputs
that require grad) every update copies instead, as ``DynamicLayer`` does, so views saved by earlier steps stay valid.

Works with the plugin MLA model and with stock ``deepseek_v3`` (whose attention calls
``past_key_values.update(normed_latent, k_rot, layer_idx)``), in ``generate()`` (greedy, sampling, beam search
through ``reorder_cache``), with padding, ``crop`` and batch selection.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class LatentLayer(CacheLayerMixin):
    """One layer's latent cache. ``update(latent [B, 1, T, r], rope_key [B, n, T, d])`` returns the full views."""

    is_sliding = False
    is_croppable = True
    supports_early_init = False  # the widths are only known from the first update

    def __init__(self, **kwargs):
        self.buffer: torch.Tensor | None = None  # [B, capacity, r + n * d]
        self.length = 0
        self.latent_dim = 0
        self.rope_heads = 0
        self.is_initialized = False

    # -- views ---------------------------------------------------------------------------------------------------
    @property
    def keys(self) -> torch.Tensor | None:
        """The latent c_kv [B, 1, S, r] (a view)."""
        if self.buffer is None:
            return None
        return self.buffer[:, : self.length, : self.latent_dim].unsqueeze(1)

    @property
    def values(self) -> torch.Tensor | None:
        """The rope keys [B, n, S, d_rope] (a view)."""
        if self.buffer is None:
            return None
        rope = self.buffer[:, : self.length, self.latent_dim :]
        return rope.unflatten(-1, (self.rope_heads, -1)).permute(0, 2, 1, 3)

    # -- CacheLayerMixin -----------------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        batch, _, _, latent_dim = key_states.shape
        self.latent_dim, self.rope_heads = latent_dim, value_states.shape[1]
        width = latent_dim + value_states.shape[1] * value_states.shape[-1]
        self.dtype, self.device = key_states.dtype, key_states.device
        self.buffer = key_states.new_empty(batch, 0, width)
        self.length = 0
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if key_states.shape[1] != 1 or value_states.shape[1] != self.rope_heads:
            raise ValueError(
                "LatentCache stores MLA latents: expected latent [B, 1, T, r] and rope keys [B, n, T, d_rope], got "
                f"{tuple(key_states.shape)} and {tuple(value_states.shape)}. Use DynamicCache for other attention."
            )
        batch, new = key_states.shape[0], key_states.shape[2]
        # under autograd an earlier step may have saved a view of the buffer: write into a copy, never over it
        tracked = torch.is_grad_enabled() and (
            key_states.requires_grad or value_states.requires_grad or self.buffer.requires_grad
        )
        self._reserve(self.length + new, copy=tracked)
        end = self.length + new
        self.buffer[:, self.length : end, : self.latent_dim] = key_states[:, 0]
        self.buffer[:, self.length : end, self.latent_dim :] = value_states.transpose(1, 2).reshape(
            batch, new, -1
        )
        self.length = end
        return self.keys, self.values

    def _reserve(self, needed: int, copy: bool = False) -> None:
        capacity = self.buffer.shape[1]
        if needed <= capacity and not copy:
            return
        # the first write allocates exactly (so one forward's cache holds no slack); later ones grow by >= 1/4
        grown = needed if self.length == 0 or copy else max(needed, capacity + max(capacity // 4, 64))
        bigger = self.buffer.new_empty(self.buffer.shape[0], grown, self.buffer.shape[2])
        bigger[:, : self.length] = self.buffer[:, : self.length]
        self.buffer = bigger

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def offload(self):
        if self.is_initialized:
            self.buffer = self.buffer.to("cpu", non_blocking=True)

    def prefetch(self):
        if self.is_initialized and self.buffer.device != self.device:
            self.buffer = self.buffer.to(self.device, non_blocking=True)

    def reset(self) -> None:
        self.buffer, self.length, self.is_initialized = None, 0, False

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` tokens (transformers' convention: a negative count)."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}")
        self.length = max(0, self.length + tokens_to_remove)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.length > 0:
            self.buffer = self.buffer[:, : self.length].index_select(0, beam_idx.to(self.buffer.device))

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.length > 0:
            self.buffer = self.buffer[:, : self.length].repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.length > 0:
            self.buffer = self.buffer[indices, : self.length]

    # -- sizes ---------------------------------------------------------------------------------------------------
    def nbytes(self) -> int:
        """Bytes of the cached tokens: B * S * (r + n * d_rope) * element size."""
        if self.buffer is None:
            return 0
        return self.buffer.shape[0] * self.length * self.buffer.shape[2] * self.buffer.element_size()

    def allocated_nbytes(self) -> int:
        return 0 if self.buffer is None else self.buffer.numel() * self.buffer.element_size()


class LatentCache(Cache):
    """A :class:`LatentLayer` per decoder layer (created lazily when no config is given).

    ``LatentCache(config=model.config)``; pass it as ``past_key_values`` to ``forward``/``generate`` of a
    ``deepseek_v3`` model (the plugin MLA model uses it by default).
    """

    def __init__(self, config=None, num_layers: int | None = None):
        if config is not None:
            num_layers = config.get_text_config(decoder=True).num_hidden_layers
        if num_layers is None:
            super().__init__(layer_class_to_replicate=LatentLayer)
        else:
            super().__init__(layers=[LatentLayer() for _ in range(num_layers)])

    def nbytes(self) -> int:
        """Bytes of the cached latents over all layers (what ``evaluation.cache_nbytes`` reports)."""
        return sum(layer.nbytes() for layer in self.layers)

    def allocated_nbytes(self) -> int:
        """Bytes of the buffers, including room reserved for tokens not yet generated."""
        return sum(layer.allocated_nbytes() for layer in self.layers)
