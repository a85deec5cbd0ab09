"""A KV cache that grows in place: the conversation runner's cache for full-attention layers.

transformers' `DynamicLayer` appends a step's keys and values with `torch.cat`, which copies the whole cache
of that layer on every decoded token: at 3k tokens of history that copy cost about as much CPU time as the
model's matrix products (profiled on SmolLM2, one thread). `GrowingLayer` keeps the keys and values in a buffer
with free slots at the end and writes new tokens into them; `keys`/`values` are views of the buffer's filled
prefix, so everything that reads a `DynamicLayer` (lengths, masks, attention) reads it unchanged.

Anything may still replace `keys`/`values` the way it does on a `DynamicLayer` (`crop`, `batch_select_indices`,
the runner's `roll_back`): the next `update` sees that they are no longer its view and adopts them, without a
copy when they are a prefix of its own buffer (a crop), else by copying them into a new buffer. A deep copy
(a forked conversation) copies the buffer with its views, so a fork never writes into its parent's cache.
Sliding-window layers (Gemma-3's local layers) keep transformers' own class.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class GrowingLayer(DynamicLayer):
    """A `DynamicLayer` whose keys/values [B, heads, N, D] are views of buffers [B, heads, capacity, D]."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self._views: tuple[Any, Any] = (None, None)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.keys is not self._views[0] or self.values is not self._views[1]:
            self._adopt(key_states)
        n, new = self._length, key_states.shape[-2]
        if n + new > self._buffers[0].shape[-2]:
            self._buffers = tuple(self._allocate(t, n + new) for t in (self.keys, self.values))
        for buffer, states in zip(self._buffers, (key_states, value_states)):
            buffer[..., n:n + new, :].copy_(states)
        self.keys, self.values = (b[..., :n + new, :] for b in self._buffers)
        self._views, self._length = (self.keys, self.values), n + new
        return self.keys, self.values

    def reset(self) -> None:
        super().reset()
        self._buffers, self._views = None, (None, None)

    @staticmethod
    def _allocate(filled: torch.Tensor, needed: int) -> torch.Tensor:
        """A buffer holding `filled` with room for `needed` slots and half as many again (at least 256 more), so
        a long conversation reallocates a few times rather than on every token."""
        capacity = needed + max(256, needed // 2)
        buffer = filled.new_empty(*filled.shape[:-2], capacity, filled.shape[-1])
        buffer[..., : filled.shape[-2], :].copy_(filled)
        return buffer

    def _adopt(self, like: torch.Tensor) -> None:
        """Takes `keys`/`values` as they are now (set from outside, or the empty start) as the filled slots."""
        if self.keys is None or self.keys.dim() != 4:  # nothing cached yet: an empty cache shaped like `like`
            self.keys, self.values = (like.new_empty(*like.shape[:-2], 0, like.shape[-1]) for _ in range(2))
        if self._buffers is not None and all(_prefix_of(t, b) for t, b in zip((self.keys, self.values),
                                                                             self._buffers)):
            self._length = self.keys.shape[-2]  # a crop: the slots after it are free again
            return
        self._buffers = tuple(self._allocate(t, t.shape[-2]) for t in (self.keys, self.values))
        self._length = self.keys.shape[-2]


def _prefix_of(view: torch.Tensor, buffer: torch.Tensor) -> bool:
    """Whether `view` is buffer[..., :n, :] for some n (same memory, same layout)."""
    return (view.data_ptr() == buffer.data_ptr() and view.stride() == buffer.stride()
            and view.shape[:-2] == buffer.shape[:-2] and view.shape[-1] == buffer.shape[-1]
            and view.shape[-2] <= buffer.shape[-2])


def growing_cache(config: Any) -> DynamicCache:
    """transformers' `DynamicCache` for `config` (its layer types), with every full-attention layer a
    `GrowingLayer`; sliding-window and other layer kinds are left as transformers makes them."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    if cache.layer_class_to_replicate is DynamicLayer:  # no layer types known: layers are made on first use
        cache.layer_class_to_replicate = GrowingLayer
    return cache
