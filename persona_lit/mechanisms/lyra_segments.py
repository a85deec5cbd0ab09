"""Lyra's per-layer state: the keys/values a chosen layer may attend to, and how it sits in the model's cache.

A chosen layer keeps its own keys/values (persona, optional history window, current turn) in `Segments`
and writes only zero-width entries ([B, heads, N, 0]) into the model's own cache, so that cache's length
bookkeeping (positions, the masks of the other layers) stays right at no memory cost. transformers'
`DynamicLayer.get_seq_length()` reads an empty tensor as "no tokens", and the model reads its length
from layer 0 (Gemma-3's full-attention mask from the first global layer): such a layer is therefore
turned into a `LyraCacheLayer`, whose length is its width, so any layer set is exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from persona_lit.errors import UserError
from persona_lit.models.kv_cache import GrowingLayer


@dataclass
class Segments:
    """Keys/values of one chosen layer, stored joined in the order persona, window, current turn: k and v
    [B, kv_heads, N, d], valid [B, N], pos [B, N] (each key's position in Lyra's frame: what it was
    rotated at), and each part's width. Only the last part grows, so a decoding step is one cat, as in a
    plain KV cache. Tensors are replaced, never changed in place: a snapshot is a shallow copy."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    pos: torch.Tensor | None = None
    widths: dict[str, int] = field(default_factory=dict)  # in order: persona, window, turn

    def append(self, part: str, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, pos: torch.Tensor) -> None:
        if part in self.widths and list(self.widths)[-1] != part:
            raise ValueError(f"lyra: only the last part grows, not {part!r}")
        if self.k is None:
            self.k, self.v, self.valid, self.pos = k, v, valid, pos
        else:
            self.k, self.v = torch.cat([self.k, k], 2), torch.cat([self.v, v], 2)
            self.valid, self.pos = torch.cat([self.valid, valid], 1), torch.cat([self.pos, pos], 1)
        self.widths = {**self.widths, part: self.widths.get(part, 0) + k.shape[2]}

    def keep_first(self, part: str) -> tuple[torch.Tensor, ...]:
        """Keeps the parts up to and including `part`; returns (k, v, valid, pos) of what was cut off."""
        names = list(self.widths)
        width = sum(self.widths[p] for p in names[: names.index(part) + 1])
        cut = (self.k[:, :, width:], self.v[:, :, width:], self.valid[:, width:], self.pos[:, width:])
        self.k, self.v, self.valid, self.pos = (self.k[:, :, :width], self.v[:, :, :width], self.valid[:, :width],
                                                self.pos[:, :width])
        self.widths = {p: self.widths[p] for p in names[: names.index(part) + 1]}
        return cut

    def select(self, index: torch.Tensor) -> "Segments":
        if self.k is None:
            return Segments()
        return Segments(self.k[index], self.v[index], self.valid[index], self.pos[index], dict(self.widths))

    def copy(self) -> "Segments":
        return Segments(self.k, self.v, self.valid, self.pos, dict(self.widths))

    def tokens(self) -> int:
        return 0 if self.k is None else self.k.shape[2]


def last_real(k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, pos: torch.Tensor, n: int):
    """Per row, the last `n` real (valid) slots, in order, left-padded to one width: (k, v, valid, pos)."""
    slots = valid.shape[1]
    from_end = valid.flip(1).long().cumsum(1).flip(1)  # real tokens at or after each slot
    keep = valid & (from_end <= n)
    width = int(keep.sum(1).max()) if slots else 0
    # a stable sort puts the dropped slots first and keeps the order within each group
    index = torch.sort(keep.to(torch.int8), dim=1, stable=True).indices[:, slots - width:]
    kv_index = index[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
    return k.gather(2, kv_index), v.gather(2, kv_index), keep.gather(1, index), pos.gather(1, index)


def rotate(k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Applies a rotary rotation (the rotate-half convention of Llama and Gemma) to keys [B, H, N, d]."""
    half = k.shape[-1] // 2
    turned = torch.cat([-k[..., half:], k[..., :half]], -1)
    return k * cos[:, None] + turned * sin[:, None]


class LyraCacheLayer(DynamicLayer):
    """A chosen layer's entry in the model's cache: zero-width keys [B, heads, N, 0] whose length is N."""

    def get_seq_length(self) -> int:
        return self.keys.shape[-2] if self.is_initialized else 0


class SegmentCache:
    """Stands in for the KV cache inside a chosen layer: stores the new keys/values in the current part and
    returns the keys/values the layer may attend to; the model's own cache gets zero-width entries."""

    def __init__(self, segments: Segments, part: str, valid: torch.Tensor, pos: torch.Tensor, real_cache: Any):
        self.segments, self.part, self.valid, self.pos, self.real_cache = segments, part, valid, pos, real_cache

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.real_cache is not None:
            self.real_cache.update(k[..., :0], v[..., :0], layer_idx, *args, **kwargs)
            layer = self.real_cache.layers[layer_idx]
            if type(layer) is DynamicLayer:
                layer.__class__ = LyraCacheLayer  # same fields; only the length it reports differs
            elif not isinstance(layer, (LyraCacheLayer, DynamicSlidingWindowLayer, GrowingLayer)):  # these count slots
                raise UserError(f"mechanism=lyra: the model's cache uses {type(layer).__name__} layers; Lyra "
                                "supports transformers' dynamic cache (the default) only")
        self.segments.append(self.part, k, v, self.valid, self.pos)
        return self.segments.k, self.segments.v
