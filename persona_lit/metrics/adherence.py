"""Probe adherence by turn as a torchmetrics Metric, with a Wilson interval across probes and conversations."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torchmetrics import Metric


def wilson_interval(passed: float, n: float, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion; (0, 1) when there is no data."""
    if n <= 0:
        return 0.0, 1.0
    p = passed / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


class ProbeAdherence(Metric):
    """Fraction of probes passed at each of a fixed list of turns (sums across processes)."""

    full_state_update = False

    def __init__(self, turns: Sequence[int], **kwargs):
        super().__init__(**kwargs)
        self.turns = list(turns)
        self.add_state("passed", torch.zeros(len(self.turns), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros(len(self.turns), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, turn: int, passed: bool | Sequence[bool]) -> None:
        values = [passed] if isinstance(passed, bool) else list(passed)
        i = self.turns.index(turn)
        self.passed[i] += float(sum(values))
        self.count[i] += float(len(values))

    def compute(self) -> dict[str, list[float]]:
        mean = torch.where(self.count > 0, self.passed / self.count.clamp(min=1), torch.nan)
        ci = [wilson_interval(float(p), float(n)) for p, n in zip(self.passed, self.count)]
        return {"turn": self.turns, "mean": mean.tolist(), "ci_low": [c[0] for c in ci],
                "ci_high": [c[1] for c in ci], "n": self.count.tolist()}
