"""Per-turn drift metrics with confidence intervals over independent units, and the persona projection.

The unit of replication is the conversation, or the persona when several are pooled: probes asked in one
conversation share its history and are not independent trials. Per turn:
- each conversation contributes one value (for adherence, the fraction of its probes passed at that turn);
- turn 0 (the persona alone, no user turn yet) is the same for every conversation of a persona, so it counts
  once per persona (the mean of that persona's conversations);
- with >= 2 personas the values are first averaged per persona and the interval is over persona means
  (each persona weighs the same); with one persona it is over conversations;
- the interval is a 95% Student-t interval over those units (clipped to [0, 1] for proportions); n = 1 has
  no interval (None); n >= 2 identical values give no t spread: a proportion then gets the Wilson score
  interval with the units as trials (valid because a [0, 1] value's variance is at most p(1 - p)), any
  other metric gets no interval. `interval` names the method per turn: "t", "wilson" or "none".

Multi-process use: the states are lists of rows (group, conversation, turn index, sum, count) reduced by
concatenation, so a synced compute() sees every rank's conversations, provided conversation ids are global.
The drift protocol computes them on one process over the complete list of records and constructs them
with sync_on_compute=False (see persona_lit.drift.LOCAL): no collective a lone rank could wait in.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Sequence

import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

# Two-sided 95% Student-t critical values by degrees of freedom (1..30); 1.96 beyond.
_T95 = [12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23, 2.20, 2.18, 2.16, 2.14, 2.13, 2.12, 2.11,
        2.10, 2.09, 2.09, 2.08, 2.07, 2.07, 2.06, 2.06, 2.06, 2.05, 2.05, 2.05, 2.04]


def t_interval(values: Sequence[float]) -> tuple[float, float | None, float | None]:
    """(mean, low, high): a 95% t-interval; (mean, None, None) with fewer than two values (no spread known)."""
    n = len(values)
    if n == 0:
        return math.nan, None, None
    mean = sum(values) / n
    if n == 1:
        return mean, None, None
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = (_T95[n - 2] if n - 1 <= len(_T95) else 1.96) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def wilson_interval(passed: float, n: float, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion; (0, 1) when there is no data."""
    if n <= 0:
        return 0.0, 1.0
    p = passed / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def unit_interval(units: Sequence[float], bounds: tuple[float, float] | None = None) -> dict[str, Any]:
    """Mean, 95% interval and method over independent unit values (see the module docstring). `bounds`: the
    range of a bounded value (a proportion: (0, 1); a difference of proportions: (-1, 1); a KL: (0, inf),
    where the interval is only clipped)."""
    n = len(units)
    mean, low, high = t_interval(units)
    method = "t" if low is not None else "none"
    if n >= 2 and max(units) == min(units):  # no spread: the t-interval would be zero width
        low = high = None
        method = "none"
        if bounds is not None and bounds[0] <= mean <= bounds[1] and math.isfinite(bounds[1] - bounds[0]):
            a, width = bounds[0], bounds[1] - bounds[0]  # rescaled to [0, 1], Wilson, scaled back
            q_low, q_high = wilson_interval((mean - a) / width * n, n)
            low, high, method = a + q_low * width, a + q_high * width, "wilson"
    elif bounds is not None and low is not None:
        low, high = max(bounds[0], low), min(bounds[1], high)
    return {"mean": mean, "ci_low": low, "ci_high": high, "n": n, "interval": method}


class PerTurnMean(Metric):
    """One value per (conversation, turn), optionally in persona groups; per turn the mean and a 95% interval
    over the independent units (conversations, personas at turn 0, persona means when pooled)."""

    full_state_update = False
    bounds: tuple[float, float] | None = None  # a bounded value: interval clipped, Wilson when all units agree

    def __init__(self, turns: Sequence[int], shared_first_turn: bool = True,
                 bounds: tuple[float, float] | None = None, **kwargs):
        super().__init__(**kwargs)
        self.turns = list(turns)
        self.bounds = bounds if bounds is not None else type(self).bounds
        self.shared_first_turn = shared_first_turn  # turn 0 counts once per persona
        self.add_state("rows", default=[], dist_reduce_fx="cat")

    def _add(self, conversation: int, turn: int, total: float, count: float, group: int) -> None:
        if turn not in self.turns:
            raise ValueError(f"turn {turn} is not one of the metric's turns {self.turns}")
        row = [group, conversation, self.turns.index(turn), total, count]
        self.rows.append(torch.tensor([row], dtype=torch.float64))

    def update(self, conversation: int, turn: int, value: float, group: int = 0) -> None:
        """`conversation`: an id unique across processes (e.g. its index in the full list); `group`: its persona."""
        self._add(conversation, turn, float(value), 1.0, group)

    def compute(self) -> dict[str, list]:
        rows = self.rows if isinstance(self.rows, torch.Tensor) else (
            dim_zero_cat(self.rows) if self.rows else torch.zeros(0, 5, dtype=torch.float64))
        sums: dict[tuple[int, int, int], list[float]] = defaultdict(lambda: [0.0, 0.0])
        for g, c, i, total, count in rows.reshape(-1, 5).tolist():
            acc = sums[(int(i), int(g), int(c))]
            acc[0] += total
            acc[1] += count
        out: dict[str, list] = {"turn": self.turns, "mean": [], "ci_low": [], "ci_high": [], "n": [], "unit": [],
                                "interval": []}
        for i, turn in enumerate(self.turns):
            by_group: dict[int, list[float]] = defaultdict(list)
            for (j, g, _), (total, count) in sorted(sums.items()):
                if j == i and count > 0 and not math.isnan(total):
                    by_group[g].append(total / count)
            if turn == 0 and self.shared_first_turn:
                by_group = {g: [sum(v) / len(v)] for g, v in by_group.items()}
            if len(by_group) >= 2 or (turn == 0 and self.shared_first_turn):
                units, unit = [sum(v) / len(v) for v in by_group.values()], "personas"
            else:
                units, unit = [v for vs in by_group.values() for v in vs], "conversations"
            stats = unit_interval(units, self.bounds)
            for key in ("mean", "ci_low", "ci_high", "n", "interval"):
                out[key].append(stats[key])
            out["unit"].append(unit)
        return out


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
