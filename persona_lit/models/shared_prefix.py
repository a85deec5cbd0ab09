"""Forks that share their conversation's cache: many probe rows decoded in one batch, the history read once.

A probe fork (probing.py) asks every conversation row several questions; each question is a row of a forked batch
whose history is its conversation row's. Copying that history for every fork row costs memory and time, and the
attention then reads the same keys and values once per question. Here a fork row holds only its own suffix (the
probe's prompt and answer) in a `SharedPrefixLayer`; the history stays where it is, in the conversation's cache, and
is read once per conversation row for all the questions on it:

    softmax over [history ; suffix]  =  the two parts' softmaxes, merged by their log-sum-exp weights

The history part packs every query of every fork row of one conversation row into one attention call against that
row's keys (P questions x G query heads per K/V head), the suffix part is each fork row's own causal attention.
Mathematically the same attention; in floating point the sum runs in another order (tests/test_engine.py holds
the probe verdicts and scores to the copying forks' in fp32 and bf16).

Only full-attention layers share (sliding-window layers hold a short window and are copied as before), only models
attending with `sdpa`, and only under mechanisms that leave the attention function alone
(Mechanism.attention_untouched): the runner checks `can_share` before it forks this way.
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any

import torch
from transformers.cache_utils import DynamicCache

from persona_lit.models.kv_cache import GrowingLayer, layer_rows

_ACTIVE: contextvars.ContextVar[Any] = contextvars.ContextVar("persona_lit_shared_cache", default=None)


class SharedPrefixLayer(GrowingLayer):
    """A fork's cache layer: read-only the first `prefix_len` slots of the parent layer's rows `index` (fork row i
    continues parent row index[i]), and its own suffix, which update() grows (and returns: the attention function
    installed by `sharing` adds the prefix)."""

    def __init__(self, parent: GrowingLayer, index: torch.Tensor):
        super().__init__()
        self.prefix_keys, self.prefix_values = parent.keys, parent.values  # views: the parent is not written meanwhile
        self.prefix_len = parent.get_seq_length()
        self.dtype, self.device = getattr(parent, "dtype", None), getattr(parent, "device", None)
        self.index = index.to(parent.keys.device)
        rows = self.index.tolist()
        used = sorted(set(rows))
        self.used = torch.tensor(used, device=self.index.device)  # parent rows some fork row continues
        where = {r: i for i, r in enumerate(used)}
        groups: list[list[int]] = [[] for _ in used]
        for i, r in enumerate(rows):
            groups[where[r]].append(i)
        self.width = max(len(g) for g in groups)  # fork rows per parent row, at most
        pad = len(rows)  # an index past the fork rows: a zero query, dropped after
        self.gather = torch.tensor([g + [pad] * (self.width - len(g)) for g in groups], device=self.index.device)
        slot = [0] * len(rows)
        for gi, g in enumerate(groups):
            for j, i in enumerate(g):
                slot[i] = gi * self.width + j
        self.slot = torch.tensor(slot, device=self.index.device)  # fork row -> its place among the gathered rows
        self.whole = used == list(range(parent.keys.shape[0]))  # every parent row continued: no copy of the prefix

    def get_seq_length(self) -> int:
        return self.prefix_len + self._n

    def truncate(self, length: int) -> None:
        if length < self.prefix_len:
            raise ValueError("a shared fork cannot be rolled back into the history it shares")
        super().truncate(length - self.prefix_len)

    def crop(self, tokens_to_remove: int) -> None:
        self.truncate(self.get_seq_length() + tokens_to_remove)

    def select_rows(self, index: torch.Tensor) -> "GrowingLayer":
        raise ValueError("a shared fork's rows cannot be forked again")

    def attend(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
               scaling: float | None) -> torch.Tensor:
        """Attention of the fork rows' `query` (rows, heads, q, dim) over [prefix ; suffix `key`/`value`], `mask`
        the model's 4-D boolean mask over both (or None: all of the prefix, the suffix causally). Returns
        (rows, q, heads, dim) as transformers' attention functions do."""
        rows, heads, q, dim = query.shape
        kv = key.shape[1]
        group = heads // kv
        scale = dim ** -0.5 if scaling is None else scaling
        n0, s = self.prefix_len, key.shape[2]
        if mask is not None and mask.dtype != torch.bool:
            raise ValueError("shared forks take a boolean attention mask")
        # the history: each parent row's keys once, every query of its fork rows packed per K/V head
        padded = torch.cat([query, query.new_zeros(1, heads, q, dim)])
        packed = padded[self.gather].view(len(self.used), self.width, kv, group, q, dim)
        packed = packed.permute(0, 2, 1, 3, 4, 5).reshape(len(self.used), kv, self.width * group * q, dim)
        pk, pv = (self.prefix_keys, self.prefix_values) if self.whole else (
            self.prefix_keys.index_select(0, self.used), self.prefix_values.index_select(0, self.used))
        if mask is None:
            pmask = None
        else:  # a fork row's view of the history is its parent row's padding, the same for all its queries
            first = self.gather[:, 0]
            pmask = mask[first, :, :1, :n0]  # (used, 1, 1, n0)
        out1, lse1 = _attention(packed, pk, pv, pmask, scale)
        out1 = out1.view(len(self.used), kv, self.width, group, q, dim).permute(0, 2, 1, 3, 4, 5)
        out1 = out1.reshape(len(self.used) * self.width, heads, q, dim)[self.slot]
        lse1 = lse1.view(len(self.used), kv, self.width, group, q).permute(0, 2, 1, 3, 4)
        lse1 = lse1.reshape(len(self.used) * self.width, heads, q)[self.slot]
        # the suffix: each fork row's own slots, causal
        if mask is None:
            smask = torch.ones(q, s, dtype=torch.bool, device=query.device).tril(s - q)[None, None].expand(rows, 1, q, s)
        else:
            smask = mask[:, :, :, n0:]
        sq = query.reshape(rows, kv, group * q, dim)
        smask_packed = smask[:, :, None].expand(rows, 1, group, q, s).reshape(rows, 1, group * q, s)
        out2, lse2 = _attention(sq, key, value, smask_packed, scale)
        out2, lse2 = out2.view(rows, heads, q, dim), lse2.view(rows, heads, q)
        # merged by log-sum-exp weights (a part with no visible slot weighs nothing)
        top = torch.maximum(lse1, lse2).clamp(min=-1e30)  # no visible slot in either part: weights 0
        w1, w2 = (lse1 - top).exp(), (lse2 - top).exp()
        total = (w1 + w2).clamp(min=torch.finfo(torch.float32).tiny)
        out = (out1.float() * (w1 / total)[..., None] + out2.float() * (w2 / total)[..., None]).to(query.dtype)
        return out.transpose(1, 2).contiguous()


def _attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
               scale: float, flash: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale) v and its log-sum-exp per query (float32; -inf where no slot is visible); `mask`
    boolean, broadcast over heads and, if its query axis is 1, over queries. `flash` (default: on the CPU): the
    CPU's flash kernel, which returns the log-sum-exp; else matmuls in float32 (any device)."""
    if flash if flash is not None else query.device.type == "cpu":  # the flash kernel takes an additive mask
        additive = None if mask is None else torch.zeros(mask.shape, dtype=query.dtype, device=query.device
                                                         ).masked_fill(~mask, -torch.inf)
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(query, key, value, 0.0, False,
                                                                             attn_mask=additive, scale=scale)
    else:
        scores = torch.matmul(query.float(), key.float().transpose(-1, -2)) * scale
        if mask is not None:
            scores = scores.masked_fill(~mask, -torch.inf)
        lse = scores.logsumexp(-1)
        out = torch.matmul((scores - lse[..., None].clamp(min=-1e30)).exp().nan_to_num(0.0), value.float())
    if mask is not None:
        lse = lse.masked_fill(~mask.any(-1).expand_as(lse), -torch.inf)
    return out, lse


def share_rows(cache: Any, index: torch.Tensor) -> DynamicCache:
    """A fork of `cache` for rows `index` (repeats allowed): full-attention layers shared (SharedPrefixLayer),
    the other layers' rows copied (kv_cache.layer_rows)."""
    other = DynamicCache.__new__(DynamicCache)
    other.__dict__.update(cache.__dict__)
    other.layers = [SharedPrefixLayer(layer, index) if isinstance(layer, GrowingLayer) else layer_rows(layer, index)
                    for layer in cache.layers]
    return other


def can_share(model: torch.nn.Module, cache: Any) -> bool:
    """Whether forks of `cache` may share it: a model attending with sdpa, every full-attention layer growing in
    place and filled."""
    config = getattr(model, "config", None)
    config = getattr(config, "text_config", None) or config
    if cache is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    growing = [layer for layer in cache.layers if isinstance(layer, GrowingLayer)]
    return bool(growing) and all(type(layer) is GrowingLayer and layer.keys is not None and layer.keys.dim() == 4
                                 for layer in growing)


@contextlib.contextmanager
def sharing(cache: DynamicCache):
    """While open, the sdpa attention of a layer whose cache layer in `cache` is shared adds the shared prefix;
    every other call goes to transformers' own sdpa function unchanged."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    original = ALL_ATTENTION_FUNCTIONS["sdpa"]
    had_local = "sdpa" in ALL_ATTENTION_FUNCTIONS._local_mapping

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        active = _ACTIVE.get()
        idx = getattr(module, "layer_idx", None)
        layer = active.layers[idx] if active is not None and idx is not None and idx < len(active.layers) else None
        if not isinstance(layer, SharedPrefixLayer) or kwargs.get("sliding_window") or module.training:
            return original(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
        return layer.attend(query, key, value, attention_mask, scaling), None

    token = _ACTIVE.set(cache)
    ALL_ATTENTION_FUNCTIONS["sdpa"] = attention
    try:
        yield cache
    finally:
        _ACTIVE.reset(token)
        if had_local:
            ALL_ATTENTION_FUNCTIONS["sdpa"] = original
        else:
            del ALL_ATTENTION_FUNCTIONS["sdpa"]
