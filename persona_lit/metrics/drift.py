"""Per-turn drift metrics with confidence intervals over independent units, and the persona projection.

The unit of replication is the conversation, or the persona when several are pooled: probes asked in one
conversation share its history and are not independent trials. Per turn:
- each conversation contributes one value (for adherence, the fraction of its probes passed at that turn);
- turn 0 (the persona alone, no user turn yet) is the same for every conversation of a persona, so it counts
  once per persona (the mean of that persona's conversations);
- the point estimate: with >= 2 personas the values are first averaged per persona and the persona means
  averaged with equal weight (n = personas); with one persona, the mean over its conversations (n =
  conversations);
- the interval (default, `interval` = "bootstrap"): a seeded 95% percentile cluster bootstrap of that same
  statistic, BOOTSTRAP_RESAMPLES (2000) resamples from a generator seeded with BOOTSTRAP_SEED, so the same
  records give the same interval. Pooled (>= 2 personas): each resample draws personas with replacement (as
  many as there are), then, inside each drawn persona, its conversations with replacement (as many as it
  has), and averages the drawn personas' means; the spread thus includes both the persona-to-persona and
  the conversation-to-conversation variation, never a pooled-probe one. One persona: its conversations are
  drawn with replacement. (At turn 0 each persona holds one value: personas are drawn.) The percentile
  bootstrap stays inside the values' range and, with very few units (n < ~5), is narrower than a
  t-interval and under-covers: read small-n intervals as rough; method="t" (t_interval over the unit
  values: conversations, or persona means when pooled) remains available;
- n = 1 has no interval (None); no spread (every value equal, so a zero-width interval) gives a proportion
  (any value with finite `bounds`) the Wilson score interval with the units as trials (valid because a
  [0, 1] value's variance is at most p(1 - p)), any other metric no interval; intervals are clipped to
  `bounds`. `interval` names the method per turn: "bootstrap" (or "t"), "wilson" or "none".

unit_interval (t over flat, independent units, same n = 1 / no-spread rules) is what the steering reports use
over runs.

Multi-process use: the states are lists of rows (group, conversation, turn index, sum, count) reduced by
concatenation, so a synced compute() sees every rank's conversations, provided conversation ids are global.
compute() orders the rows by (turn, group, conversation) before resampling, so the interval does not depend on
which rank held what. The drift protocol computes them on one process over the complete list of records and
constructs them with sync_on_compute=False (see persona_lit.evaluation.protocol.LOCAL): no collective a lone rank could wait in.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Sequence

import numpy as np
import torch
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

# Two-sided 95% Student-t critical values by degrees of freedom (1..30); 1.96 beyond.
_T95 = [12.71, 4.30, 3.18, 2.78, 2.57, 2.45, 2.36, 2.31, 2.26, 2.23, 2.20, 2.18, 2.16, 2.14, 2.13, 2.12, 2.11,
        2.10, 2.09, 2.09, 2.08, 2.07, 2.07, 2.06, 2.06, 2.06, 2.05, 2.05, 2.05, 2.04]
Z80 = 0.8416  # the normal 80% quantile: power 0.8 in detectable_difference


def detectable_difference(values: Sequence[float]) -> float | None:
    """The smallest mean paired difference a two-sided 5% test over these units (one paired difference each) detects
    with 80% power: (t_0.975,n-1 + z_0.8) * sd / sqrt(n). None with fewer than two units or no spread."""
    n = len(values)
    if n < 2:
        return None
    if max(values) == min(values):
        return None
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    return ((_T95[n - 2] if n - 1 <= len(_T95) else 1.96) + Z80) * sd / math.sqrt(n)


BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0  # fixed: the same records always give the same interval
INTERVAL_METHODS = ("bootstrap", "t")
_CHUNK = 4_000_000  # bootstrap draws held at once (resamples x personas x conversations), bounds the memory


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


def _clustered_mean(clusters: Sequence[Sequence[float]]) -> tuple[float, int]:
    """(the point estimate, n units): the mean of the cluster means with >= 2 clusters, else of the one cluster's
    values."""
    clusters = [c for c in clusters if len(c)]
    units = [sum(c) / len(c) for c in clusters] if len(clusters) >= 2 else list(clusters[0] if clusters else [])
    return (sum(units) / len(units) if units else math.nan), len(units)


def bootstrap_interval(clusters: Sequence[Sequence[float]], resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = BOOTSTRAP_SEED, level: float = 0.95) -> tuple[float, float | None, float | None]:
    """(mean, low, high): a seeded percentile cluster bootstrap. `clusters`: one list of conversation values per
    persona. With >= 2 clusters a resample draws clusters with replacement, then values within each drawn
    cluster with replacement, and takes the mean of the drawn clusters' means; with one, its values are
    drawn. (mean, None, None) with fewer than two units."""
    clusters = [np.asarray(c, dtype=np.float64) for c in clusters if len(c)]
    mean, n = _clustered_mean([c.tolist() for c in clusters])
    if n < 2:
        return mean, None, None
    rng = np.random.default_rng(seed)
    groups, longest = len(clusters), max(len(c) for c in clusters)
    sizes = np.array([len(c) for c in clusters])
    padded = np.zeros((groups, longest))
    for g, c in enumerate(clusters):
        padded[g, : len(c)] = c
    reps = []
    step = max(1, _CHUNK // (groups * longest))
    for start in range(0, resamples, step):
        b = min(step, resamples - start)
        pick = rng.integers(0, groups, (b, groups))  # one cluster always picks itself: conversations only
        size = sizes[pick][..., None]  # (b, groups, 1)
        draw = np.minimum((rng.random((b, groups, longest)) * size).astype(np.int64), size - 1)
        kept = np.arange(longest) < size
        values = np.where(kept, padded[pick[..., None], draw], 0.0)
        reps.append((values.sum(-1) / size[..., 0]).mean(-1))
    low, high = np.quantile(np.concatenate(reps), [(1 - level) / 2, (1 + level) / 2])
    return mean, float(low), float(high)


SIGN_FLIPS = 20_000  # Monte Carlo sign flips of sign_flip_p beyond an exact enumeration


def sign_flip_p(values: Sequence[float], resamples: int = SIGN_FLIPS, seed: int = BOOTSTRAP_SEED) -> float | None:
    """Two-sided p-value of "the mean is 0" for independent paired differences (persona means, or conversations):
    the randomization test that flips each unit's sign (exact over all 2^n flips where that is <= `resamples`,
    else seeded Monte Carlo, (hits + 1) / (resamples + 1)). None with fewer than two units."""
    v = np.asarray(values, dtype=np.float64)
    n = len(v)
    if n < 2:
        return None
    observed = abs(v.mean())
    tol = 1e-12 * max(1.0, float(np.abs(v).max()))
    if 2 ** n <= resamples:
        signs = 1 - 2 * ((np.arange(2 ** n)[:, None] >> np.arange(n)) & 1)
        return float(np.mean(np.abs((signs * v).mean(1)) >= observed - tol))
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, resamples, 4096):
        signs = rng.choice((-1.0, 1.0), size=(min(4096, resamples - start), n))
        hits += int(np.sum(np.abs((signs * v).mean(1)) >= observed - tol))
    return (hits + 1) / (resamples + 1)


def holm(pvalues: Sequence[float | None]) -> list[float | None]:
    """Holm-Bonferroni adjusted p-values (family-wise error across the given tests; None stays None)."""
    present = sorted((p, i) for i, p in enumerate(pvalues) if p is not None)
    out: list[float | None] = [None] * len(pvalues)
    running, m = 0.0, len(present)
    for rank, (p, i) in enumerate(present):
        running = max(running, min(1.0, (m - rank) * p))
        out[i] = running
    return out


def wilson_interval(passed: float, n: float, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a proportion; (0, 1) when there is no data."""
    if n <= 0:
        return 0.0, 1.0
    p = passed / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _no_spread(mean: float, n: int, bounds: tuple[float, float] | None) -> dict[str, Any]:
    """All units equal: Wilson with the units as trials for a bounded value (rescaled to [0, 1]), else none."""
    out = {"mean": mean, "ci_low": None, "ci_high": None, "n": n, "interval": "none"}
    if bounds is not None and bounds[0] <= mean <= bounds[1] and math.isfinite(bounds[1] - bounds[0]):
        a, width = bounds[0], bounds[1] - bounds[0]
        q_low, q_high = wilson_interval((mean - a) / width * n, n)
        out.update(ci_low=a + q_low * width, ci_high=a + q_high * width, interval="wilson")
    return out


def _clipped(mean: float, low: float, high: float, n: int, bounds: tuple[float, float] | None,
             method: str) -> dict[str, Any]:
    if bounds is not None:
        low, high = max(bounds[0], low), min(bounds[1], high)
    return {"mean": mean, "ci_low": low, "ci_high": high, "n": n, "interval": method}


def unit_interval(units: Sequence[float], bounds: tuple[float, float] | None = None) -> dict[str, Any]:
    """Mean, 95% t-interval and method over independent unit values (see the module docstring). `bounds`: the
    range of a bounded value (a proportion: (0, 1); a difference of proportions: (-1, 1); a KL: (0, inf),
    where the interval is only clipped)."""
    n = len(units)
    mean, low, high = t_interval(units)
    if n >= 2 and max(units) == min(units):  # no spread: the t-interval would be zero width
        return _no_spread(mean, n, bounds)
    if low is None:
        return {"mean": mean, "ci_low": None, "ci_high": None, "n": n, "interval": "none"}
    return _clipped(mean, low, high, n, bounds, "t")


def cluster_interval(clusters: Sequence[Sequence[float]], bounds: tuple[float, float] | None = None,
                     method: str = "bootstrap", resamples: int = BOOTSTRAP_RESAMPLES,
                     seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """Mean, 95% interval and method of conversation values in persona clusters (one list per persona; see the
    module docstring): "bootstrap" (the cluster bootstrap) or "t" (a t-interval over the units: persona means
    when >= 2 clusters, else the conversations)."""
    if method not in INTERVAL_METHODS:
        raise ValueError(f"interval method {method!r}; allowed: {', '.join(INTERVAL_METHODS)}")
    clusters = [list(c) for c in clusters if len(c)]
    if method == "t":
        return unit_interval([sum(c) / len(c) for c in clusters] if len(clusters) >= 2
                             else (clusters[0] if clusters else []), bounds)
    mean, n = _clustered_mean(clusters)
    if n < 2:
        return {"mean": mean, "ci_low": None, "ci_high": None, "n": n, "interval": "none"}
    values = [v for c in clusters for v in c]
    if max(values) == min(values):
        return _no_spread(mean, n, bounds)
    _, low, high = bootstrap_interval(clusters, resamples, seed)
    if high <= low:  # (almost) every resample the same: as good as no spread, never a zero-width interval
        return _no_spread(mean, n, bounds)
    return _clipped(mean, low, high, n, bounds, "bootstrap")


class PerTurnMean(Metric):
    """One value per (conversation, turn), optionally in persona groups; per turn the mean and a 95% interval
    over the independent units (conversations, personas at turn 0, persona means when pooled): by default the
    seeded cluster bootstrap (`method="bootstrap"`, `resamples`, `seed`), or `method="t"`. `test_zero` (paired
    differences): also `p` per turn, sign_flip_p over the same units (None with fewer than two)."""

    full_state_update = False
    bounds: tuple[float, float] | None = None  # a bounded value: interval clipped, Wilson when all units agree

    def __init__(self, turns: Sequence[int], shared_first_turn: bool = True,
                 bounds: tuple[float, float] | None = None, method: str = "bootstrap",
                 resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED, test_zero: bool = False,
                 **kwargs):
        super().__init__(**kwargs)
        self.test_zero = bool(test_zero)
        if method not in INTERVAL_METHODS:
            raise ValueError(f"interval method {method!r}; allowed: {', '.join(INTERVAL_METHODS)}")
        self.method, self.resamples, self.seed = method, int(resamples), int(seed)
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
                                "interval": [], **({"p": []} if self.test_zero else {})}
        for i, turn in enumerate(self.turns):
            by_group: dict[int, list[float]] = defaultdict(list)
            for (j, g, _), (total, count) in sorted(sums.items()):
                if j == i and count > 0 and not math.isnan(total):
                    by_group[g].append(total / count)
            if turn == 0 and self.shared_first_turn:
                by_group = {g: [sum(v) / len(v)] for g, v in by_group.items()}
            unit = "personas" if len(by_group) >= 2 or (turn == 0 and self.shared_first_turn) else "conversations"
            stats = cluster_interval(list(by_group.values()), self.bounds, self.method, self.resamples, self.seed)
            for key in ("mean", "ci_low", "ci_high", "n", "interval"):
                out[key].append(stats[key])
            out["unit"].append(unit)
            if self.test_zero:  # the units' values: persona means when pooled, else the one persona's conversations
                units = [sum(v) / len(v) for v in by_group.values()] if len(by_group) >= 2 else next(
                    iter(by_group.values()), [])
                out["p"].append(sign_flip_p(units))
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
