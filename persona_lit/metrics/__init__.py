"""Drift metrics as torchmetrics Metrics (they know nothing of loggers)."""

from persona_lit.metrics.adherence import ProbeAdherence
from persona_lit.metrics.drift import PerTurnMean, persona_projection, t_interval, unit_interval, wilson_interval

__all__ = ["PerTurnMean", "ProbeAdherence", "persona_projection", "t_interval", "unit_interval", "wilson_interval"]
