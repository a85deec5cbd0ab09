"""How many conversations fit in one batch: the KV cache's size, estimated before anything runs.

A row's cache at h history tokens holds, per decoder layer, keys and values of min(h, window) tokens (window: a
sliding layer's, else h) x KV heads x head dim, in the evaluation's dtype. The batch's peak is its rows plus the
rows of one copied probe fork (probe_batch), each with the growing cache's spare room (a quarter), at the longest
history any conversation can reach (its persona, every user turn, max_new_tokens per answer, the closings).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from persona_lit.errors import UserError
from persona_lit.models.backbones import layer_types

ROOM = 1.25  # the growing cache's spare room (models/kv_cache.py: a quarter beyond what it holds)
USABLE = 0.8  # of the free memory, what the batch may plan to use
AUTO_MAX = 64  # the most rows an automatic choice takes (beyond, a CPU gains little and a batch's slowest row rules)


@dataclass
class BatchPlan:
    rows: int
    row_bytes: int  # one row's cache at the longest history
    history: int  # the longest history in tokens
    free: int  # bytes free on the device
    auto: bool

    def line(self) -> str:
        how = "auto" if self.auto else "given"
        return (f"conversation_batch={self.rows} ({how}): KV cache ~{self.need(self.rows) / 2**30:.2f} GiB at "
                f"~{self.history} history tokens ({self.row_bytes / 2**20:.0f} MiB a row), "
                f"{self.free / 2**30:.1f} GiB free")

    def need(self, rows: int, fork_rows: int = 0) -> float:
        return (rows + fork_rows) * self.row_bytes * ROOM


def kv_bytes_per_row(model: torch.nn.Module, tokens: int, dtype: torch.dtype) -> int:
    """Bytes of one conversation's KV cache at `tokens` history tokens."""
    config = getattr(model.config, "text_config", None) or model.config
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    window = getattr(config, "sliding_window", None) or tokens
    per_token = 2 * heads * head_dim * torch.tensor([], dtype=dtype).element_size()
    return sum(per_token * (min(tokens, window) if t == "sliding_attention" else tokens) for t in layer_types(model))


def free_memory(device: torch.device) -> int:
    """Bytes the process may still use on `device`: the GPU's free memory, or the machine's available memory."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    import psutil

    return int(psutil.virtual_memory().available)


def plan_batch(requested: Any, units: int, model: torch.nn.Module, dtype: torch.dtype, history: int,
               probe_batch: int, device: torch.device, free: int | None = None) -> BatchPlan:
    """The batch size: `requested` (checked) or, when None, the most rows (<= units, <= AUTO_MAX) whose cache,
    with one copied probe fork, fits in USABLE of the free memory. A batch that cannot fit is refused (UserError)."""
    free = free_memory(device) if free is None else free
    row = kv_bytes_per_row(model, history, dtype)
    plan = BatchPlan(0, row, history, free, requested is None)
    budget = USABLE * free
    if requested is not None:
        rows = int(requested)
        fits = max(0, math.floor(budget / (row * ROOM)) - min(probe_batch, rows))
        if plan.need(rows, min(probe_batch, rows)) > budget:
            raise UserError(f"conversation_batch={rows}: the KV cache would need ~{plan.need(rows, min(probe_batch, rows)) / 2**30:.1f} "
                            f"GiB at ~{history} history tokens ({row / 2**20:.0f} MiB a row, a probe fork "
                            f"included), {free / 2**30:.1f} GiB are free on {device}; use conversation_batch<={fits} "
                            f"or fewer turns")
        plan.rows = rows
        return plan
    rows = min(units, AUTO_MAX)
    while rows > 1 and plan.need(rows, min(probe_batch, rows)) > budget:
        rows -= 1
    if plan.need(rows, min(probe_batch, rows)) > budget:
        raise UserError(f"turns: one conversation's KV cache would need ~{plan.need(1, 1) / 2**30:.1f} GiB at ~{history} "
                        f"history tokens, {free / 2**30:.1f} GiB are free on {device}; use fewer turns or "
                        f"max_new_tokens")
    plan.rows = max(1, rows)
    return plan


def longest_history(chat, personas, streams, max_new_tokens: int) -> int:
    """The most tokens any (persona, stream) conversation can hold after its last turn: its persona segment, each
    user turn, max_new_tokens per answer and each answer's closing."""
    close = len(chat.close_assistant())
    turns = max((sum(len(chat.user_turn_ids(t if isinstance(t, str) else t.text)) + max_new_tokens + close
                     for t in stream) for stream in streams), default=0)
    persona = max((len(chat.persona_ids(p.system_prompt if p else None)) for p in personas), default=0)
    return persona + turns
