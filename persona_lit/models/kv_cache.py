"""The conversation runner's KV cache: a transformers DynamicCache whose full-attention layers grow in place, plus
the two things the runner does to it: roll it back to an earlier length, and copy some of its rows.

transformers' DynamicLayer grows by `torch.cat`, a copy of the whole history at every layer and every decoded
token: at 5k tokens x 8 rows on SmolLM2 (46 KB per token in fp32) that is 1.8 GB copied per step, about as much
as the attention itself reads. `GrowingLayer` keeps its keys and values in a buffer with room to spare and writes
each new token into it; `keys`/`values` are views of the filled part, so every caller (the attention layers, the
masks, the mechanisms) sees what a DynamicLayer would hold, value for value. Sliding-window layers (Gemma-3) keep
transformers' own class: they hold a window, so their cat is small.

A GrowingLayer's length is its slot count even when its head dimension is zero, as Lyra's zero-width entries need
(lyra_segments.py): transformers reads the model's length from layer 0.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

_NO_CACHE = ("none",)
MIN_ROOM = 256  # slots a buffer is allocated beyond what it must hold, at the least (then a quarter more)


class GrowingLayer(DynamicLayer):
    """A full-attention cache layer whose keys/values are views of a buffer that grows by a quarter at a time;
    update() writes into the free slots (only ever beyond the current length, so views handed out earlier keep
    their values, unless the layer was truncated below them: the runner never keeps such views)."""

    def __init__(self):
        super().__init__()
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._n = 0

    # keys / values: what a DynamicLayer holds; assigning a tensor adopts it as the buffer (no copy)
    @property
    def keys(self) -> torch.Tensor | None:
        return None if self._k is None else self._k[:, :, : self._n]

    @keys.setter
    def keys(self, value: torch.Tensor | None) -> None:
        if value is None or value.dim() != 4:  # None (reset) or the empty 1-D tensor of lazy_initialization
            self._k, self._n = None, 0
        else:
            self._k, self._n = value, value.shape[-2]

    @property
    def values(self) -> torch.Tensor | None:
        return None if self._v is None else self._v[:, :, : self._n]

    @values.setter
    def values(self, value: torch.Tensor | None) -> None:
        self._v = None if value is None or value.dim() != 4 else value

    def _room(self, needed: int) -> int:
        return needed + max(MIN_ROOM, needed // 4)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, w = self._n, key_states.shape[-2]
        if self._k is None or n + w > self._k.shape[-2] or self._k.shape[0] != key_states.shape[0]:
            if self._k is not None and n and self._k.shape[0] != key_states.shape[0]:
                raise ValueError(f"cache rows {self._k.shape[0]} != new rows {key_states.shape[0]}")
            self._k = self._grown(self._k, key_states, n, w)
            self._v = self._grown(self._v, value_states, n, w)
        self._k[:, :, n : n + w] = key_states
        self._v[:, :, n : n + w] = value_states
        self._n = n + w
        return self.keys, self.values

    def _grown(self, old: torch.Tensor | None, new: torch.Tensor, n: int, w: int) -> torch.Tensor:
        b, h, _, d = new.shape
        buf = new.new_empty(b, h, self._room(n + w), d)
        if n:
            buf[:, :, :n] = old[:, :, :n]
        return buf

    def get_seq_length(self) -> int:
        return self._n if self.is_initialized else 0

    def truncate(self, length: int) -> None:
        """Forget every slot from `length` on (no copy: later updates overwrite them)."""
        self._n = min(self._n, length)

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        self._n = max(0, self._n + tokens_to_remove)

    def select_rows(self, index: torch.Tensor) -> "GrowingLayer":
        """A new layer holding rows `index` (repeats allowed) of this one: one copy of the filled slots."""
        other = GrowingLayer()
        other.dtype, other.device, other.is_initialized = (getattr(self, "dtype", None), getattr(self, "device", None),
                                                           self.is_initialized)
        if self._k is None:
            return other
        n, rows = self._n, index.tolist()
        for name in ("_k", "_v"):
            src = getattr(self, name)
            buf = src.new_empty(len(rows), src.shape[1], self._room(n), src.shape[3])
            for i, r in enumerate(rows):
                buf[i, :, :n].copy_(src[r, :, :n])
            setattr(other, name, buf)
        other._n = n
        return other

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        chosen = self.select_rows(indices)
        self._k, self._v, self._n = chosen._k, chosen._v, chosen._n

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self._k is not None:
            self.batch_select_indices(torch.arange(self._k.shape[0]).repeat_interleave(repeats))


def new_cache(model: torch.nn.Module) -> DynamicCache:
    """An empty cache for `model`: transformers' DynamicCache for its layer types, full-attention layers growing
    in place (GrowingLayer)."""
    config = getattr(model, "config", None)
    cache = DynamicCache(config=config) if config is not None else DynamicCache()
    cache.layers = [GrowingLayer() if type(layer) is DynamicLayer else layer for layer in cache.layers]
    if getattr(cache, "layer_class_to_replicate", None) is DynamicLayer:
        cache.layer_class_to_replicate = GrowingLayer
    return cache


def rollback_point(cache: Any) -> list[tuple] | tuple:
    """What roll_back(cache, point) needs to return `cache` to its present slots. Growing layers are truncated,
    other full-attention layers cropped; a sliding-window layer keeps only its last window, so its present
    tensors are kept (by reference: it replaces them on update, never writes into them) with its length."""
    if cache is None:
        return _NO_CACHE
    point = []
    for layer in cache.layers:
        if isinstance(layer, GrowingLayer):
            point.append(("truncate", layer.get_seq_length()))
        elif isinstance(layer, DynamicSlidingWindowLayer):
            point.append(("keep", layer.keys, layer.values, layer.cumulative_length, layer.is_initialized))
        elif isinstance(layer, DynamicLayer):
            point.append(("crop", layer.get_seq_length()))
        else:
            raise ValueError(f"cannot roll back a {type(layer).__name__} cache layer")
    return point


def roll_back(cache: Any, point: list[tuple] | tuple) -> Any:
    """The cache as it was at rollback_point (None if there was none)."""
    if point is _NO_CACHE:
        return None
    for layer, p in zip(cache.layers, point):
        if p[0] == "truncate":
            layer.truncate(p[1])
        elif p[0] == "crop":
            if layer.keys is None:  # not written yet (no slot reached it)
                continue
            layer.keys, layer.values = layer.keys[..., : p[1], :], layer.values[..., : p[1], :]
        else:
            layer.keys, layer.values, layer.cumulative_length, layer.is_initialized = p[1:]
    return cache


def select_rows(cache: Any, index: torch.Tensor) -> Any:
    """A new cache holding rows `index` (repeats allowed) of `cache`, which stays as it is: one copy of each
    layer's rows (transformers' way, a deepcopy and then batch_select_indices, copies everything twice)."""
    if cache is None:
        return None
    other = DynamicCache.__new__(DynamicCache)
    other.__dict__.update(cache.__dict__)
    other.layers = [layer_rows(layer, index) for layer in cache.layers]
    return other


def layer_rows(layer: Any, index: torch.Tensor) -> Any:
    """Rows `index` of one cache layer, as a new layer."""
    if isinstance(layer, GrowingLayer):
        return layer.select_rows(index)
    copy = layer.__class__.__new__(layer.__class__)  # a sliding window or another dynamic layer: replaced
    copy.__dict__.update(layer.__dict__)  # tensors, never written in place
    if layer.is_initialized and layer.keys is not None and layer.keys.dim() == 4:
        copy.keys, copy.values = layer.keys[index], layer.values[index]
    return copy
