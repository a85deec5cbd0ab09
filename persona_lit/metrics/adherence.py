"""Probe adherence by turn as a torchmetrics Metric: per conversation the fraction of its probes passed,
then an interval over conversations (clustered by persona; see metrics/drift.py for the rules)."""

from __future__ import annotations

from typing import Sequence

from persona_lit.metrics.drift import PerTurnMean, wilson_interval

__all__ = ["ProbeAdherence", "wilson_interval"]


class ProbeAdherence(PerTurnMean):
    """Fraction of probes passed at each of a fixed list of turns, one value per conversation."""

    bounds = (0.0, 1.0)

    def update(self, conversation: int, turn: int, passed: bool | Sequence[bool], group: int = 0) -> None:
        values = [passed] if isinstance(passed, bool) else list(passed)
        if values:
            self._add(conversation, turn, float(sum(values)), float(len(values)), group)
