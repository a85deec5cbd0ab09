"""Per-turn drift metrics with confidence intervals across conversations, and the persona projection."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torchmetrics import Metric

# Two-sided 95% Student-t critical values by degrees of freedom (1..30); 1.96 beyond.
_T95 = [12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23, 2.20, 2.18, 2.16, 2.14, 2.13, 2.12, 2.11,
        2.10, 2.09, 2.09, 2.08, 2.07, 2.07, 2.06, 2.06, 2.06, 2.05, 2.05, 2.05, 2.04]


def t_interval(values: Sequence[float]) -> tuple[float, float, float]:
    """(mean, low, high): a 95% t-interval; with one value the interval is that value (no spread known)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = sum(values) / n
    if n == 1:
        return mean, mean, mean
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = (_T95[n - 2] if n - 1 <= len(_T95) else 1.96) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


class PerTurnMean(Metric):
    """One value per (conversation, turn); computes the mean and a t-interval across conversations."""

    full_state_update = False

    def __init__(self, turns: Sequence[int], max_conversations: int = 256, **kwargs):
        super().__init__(**kwargs)
        self.turns = list(turns)
        self.add_state("values", torch.full((max_conversations, len(self.turns)), torch.nan, dtype=torch.float64),
                       dist_reduce_fx=lambda x: x.nanmean(0) if x.dim() == 3 else x)

    def update(self, conversation: int, turn: int, value: float) -> None:
        self.values[conversation, self.turns.index(turn)] = float(value)

    def compute(self) -> dict[str, list[float]]:
        stats = [t_interval([v for v in col.tolist() if not math.isnan(v)]) for col in self.values.T]
        return {"turn": self.turns, "mean": [s[0] for s in stats], "ci_low": [s[1] for s in stats],
                "ci_high": [s[2] for s in stats],
                "n": [float((~col.isnan()).sum()) for col in self.values.T]}


def persona_projection(persona: dict[int, torch.Tensor], control: dict[int, torch.Tensor],
                       direction: torch.Tensor) -> dict[int, float]:
    """Projection of the reply-start hidden state onto the persona direction, centred on the control arm
    at the same turn and scaled by turn 0: 1.0 = as strong as at turn 0, 0 = like no persona.

    persona/control map turn -> hidden state (one layer) at the start of the assistant's reply; the
    direction is the mean turn-0 activation with the persona minus without (over conversations)."""
    norm = direction.norm()
    if norm == 0:
        return {t: math.nan for t in persona}
    unit = direction / norm
    scale = float((persona[0] - control[0]) @ unit)
    return {t: float((persona[t] - control[t]) @ unit) / scale for t in persona if t in control}
