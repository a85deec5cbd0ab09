"""Drift metrics as torchmetrics Metrics (they know nothing of loggers)."""

from persona_lit.metrics.adherence import ProbeAdherence, wilson_interval

__all__ = ["ProbeAdherence", "wilson_interval"]
