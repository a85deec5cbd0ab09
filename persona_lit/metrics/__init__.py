"""Drift metrics as torchmetrics Metrics (they know nothing of loggers)."""

from persona_lit.metrics.adherence import ProbeAdherence
from persona_lit.metrics.drift import (BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, PerTurnMean, bootstrap_interval,
                                       cluster_interval, persona_projection, t_interval, unit_interval,
                                       wilson_interval)

__all__ = ["BOOTSTRAP_RESAMPLES", "BOOTSTRAP_SEED", "PerTurnMean", "ProbeAdherence", "bootstrap_interval",
           "cluster_interval", "persona_projection", "t_interval", "unit_interval", "wilson_interval"]
