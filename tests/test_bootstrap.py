"""The drift protocol's default interval: a seeded percentile cluster bootstrap (metrics/drift.py). No model."""

import math

import numpy as np
import pytest

from persona_lit.metrics import (BOOTSTRAP_RESAMPLES, PerTurnMean, ProbeAdherence, bootstrap_interval,
                                 cluster_interval, wilson_interval)


def _metric(clusters, cls=PerTurnMean, turn=2, **kwargs):
    """A metric at one turn holding clusters[g] as persona g's conversation values (ProbeAdherence: 0/1, one probe
    per conversation)."""
    metric, c = cls([turn], **kwargs), 0
    for g, values in enumerate(clusters):
        for v in values:
            metric.update(c, turn, [v == 1.0] if cls is ProbeAdherence else v, group=g)
            c += 1
    return metric.compute()


def test_default_is_bootstrap_with_2000_resamples_and_covers_the_mean():
    values = [0.1, 0.4, 0.35, 0.8, 0.55, 0.2]
    m = _metric([values])
    assert m["interval"] == ["bootstrap"] and m["unit"] == ["conversations"] and m["n"] == [6]
    assert m["mean"][0] == pytest.approx(sum(values) / len(values))
    assert min(values) <= m["ci_low"][0] < m["mean"][0] < m["ci_high"][0] <= max(values)
    assert BOOTSTRAP_RESAMPLES == 2000


def test_the_same_records_give_the_same_interval():
    clusters = [[0.1, 0.9, 0.4], [0.3, 0.2], [0.7, 0.6, 0.65, 0.1]]
    a, b = _metric(clusters), _metric(clusters)
    assert a == b
    assert bootstrap_interval(clusters) == bootstrap_interval(clusters)
    assert bootstrap_interval(clusters, seed=1) != bootstrap_interval(clusters)  # the seed is what fixes it
    # the order the updates arrive in (e.g. which rank held which conversation) does not matter
    metric = PerTurnMean([2])
    rows = [(g, v) for g, values in enumerate(clusters) for v in values]
    for c, (g, v) in reversed(list(enumerate(rows))):
        metric.update(c, 2, v, group=g)
    assert metric.compute() == a


def test_interval_narrows_as_n_grows():
    rng = np.random.default_rng(0)
    widths = []
    for n in (5, 20, 80, 320):
        values = (rng.random(n) < 0.4).astype(float).tolist()
        m = cluster_interval([values], (0.0, 1.0))
        assert m["interval"] == "bootstrap" and m["ci_low"] <= m["mean"] <= m["ci_high"]
        widths.append(m["ci_high"] - m["ci_low"])
    assert widths == sorted(widths, reverse=True) and widths[-1] < widths[0] / 3


def test_pooled_personas_are_resampled_not_the_pooled_conversations():
    """4 personas x 6 conversations; inside a persona every conversation gives the same value, personas differ
    (two always keep the persona, two never). The honest spread is the persona-to-persona one (n = 4); treating
    the 24 conversations as independent would give a much narrower interval."""
    clusters = [[1.0] * 6, [0.0] * 6, [1.0] * 6, [0.0] * 6]
    m = _metric(clusters, ProbeAdherence)
    assert m["n"] == [4] and m["unit"] == ["personas"] and m["interval"] == ["bootstrap"] and m["mean"] == [0.5]
    width = m["ci_high"][0] - m["ci_low"][0]
    _, lo, hi = bootstrap_interval([[v for c in clusters for v in c]])  # the 24 conversations as one sample
    assert width > 1.8 * (hi - lo)
    _, lo, hi = bootstrap_interval([[1.0, 0.0, 1.0, 0.0]])  # the 4 persona means as the sample
    assert (m["ci_low"][0], m["ci_high"][0]) == (lo, hi) == (0.0, 1.0)
    # Unequal conversation counts: every persona weighs the same in the mean and in each resample.
    m = _metric([[1.0], [0.0, 0.0, 0.0, 0.0, 0.0], [0.5, 0.5]])
    assert m["mean"] == [pytest.approx(0.5)] and m["n"] == [3] and m["ci_low"][0] == 0.0 and m["ci_high"][0] == 1.0


def test_within_persona_spread_counts_when_persona_means_agree():
    """Persona means equal (0.5 each) but conversations inside them differ: conversations are resampled inside
    each drawn persona, so the interval has width (not the 'no spread' Wilson of equal units)."""
    m = _metric([[0.0, 1.0], [1.0, 0.0], [0.25, 0.75]])
    assert m["interval"] == ["bootstrap"] and m["ci_low"][0] < 0.5 < m["ci_high"][0]


def test_one_unit_has_no_interval():
    m = _metric([[0.7]])
    assert m["n"] == [1] and m["ci_low"] == [None] and m["ci_high"] == [None] and m["interval"] == ["none"]
    assert bootstrap_interval([[0.7]]) == (0.7, None, None)
    one_persona_at_turn_zero = _metric([[1.0, 0.0, 1.0]], turn=0)  # turn 0 counts once per persona
    assert one_persona_at_turn_zero["n"] == [1] and one_persona_at_turn_zero["ci_low"] == [None]


def test_no_spread_gives_wilson_for_bounded_values_and_none_otherwise():
    agree = _metric([[1.0] * 5], ProbeAdherence)
    assert agree["interval"] == ["wilson"] and agree["ci_high"] == [1.0]
    assert agree["ci_low"][0] == pytest.approx(wilson_interval(5, 5)[0]) and agree["ci_low"][0] < 1.0
    pooled = _metric([[0.0] * 3, [0.0] * 2], ProbeAdherence)  # 2 personas agree: Wilson over 2 units
    assert pooled["interval"] == ["wilson"] and pooled["ci_low"] == [0.0]
    assert pooled["ci_high"][0] == pytest.approx(wilson_interval(0, 2)[1])
    diff = cluster_interval([[0.0] * 4], (-1.0, 1.0))  # a difference of proportions: rescaled Wilson
    assert diff["interval"] == "wilson" and diff["ci_low"] < 0 < diff["ci_high"]
    free = _metric([[0.25] * 4])  # unbounded: never a zero-width interval, none at all
    assert free["interval"] == ["none"] and free["ci_low"] == [None] and free["n"] == [4]


def test_bounds_clip_and_t_stays_available():
    m = cluster_interval([[0.0, 0.0, 0.0, 0.01]], (0.0, math.inf))
    assert m["ci_low"] >= 0.0 and m["interval"] == "bootstrap"
    t = cluster_interval([[0.0, 0.0, 0.0, 0.01]], (0.0, math.inf), method="t")
    assert t["interval"] == "t" and t["ci_low"] == 0.0  # clipped
    with pytest.raises(ValueError, match="allowed: bootstrap, t"):
        PerTurnMean([1], method="normal")


def test_coverage_of_the_95_interval_on_bernoulli_units():
    """200 synthetic evaluations of 25 conversations, each keeping the persona with probability 0.3: the 95%
    bootstrap interval should contain 0.3 in about 95% of them (the percentile bootstrap runs a little low)."""
    rng = np.random.default_rng(2026)
    hits = 0
    for _ in range(200):
        units = (rng.random(25) < 0.3).astype(float).tolist()
        m = cluster_interval([units], (0.0, 1.0))
        hits += m["ci_low"] <= 0.3 <= m["ci_high"]
    assert 0.85 <= hits / 200 <= 0.99


def test_coverage_when_personas_differ():
    """Pooled: 12 personas whose own keep-rate varies (Beta(2, 2), mean 0.5), 4 conversations each."""
    rng = np.random.default_rng(7)
    hits = 0
    for _ in range(100):
        clusters = [(rng.random(4) < p).astype(float).tolist() for p in rng.beta(2, 2, 12)]
        m = cluster_interval(clusters, (0.0, 1.0))
        hits += m["ci_low"] <= 0.5 <= m["ci_high"]
    assert 0.85 <= hits / 100 <= 1.0


def test_detectable_difference_is_the_power_formula_over_units():
    from persona_lit.metrics.drift import detectable_difference

    sd = (sum((v - 2.5) ** 2 for v in [1, 2, 3, 4]) / 3) ** 0.5
    assert detectable_difference([1, 2, 3, 4]) == pytest.approx((3.18 + 0.8416) * sd / 2)
    assert detectable_difference([0.5]) is None and detectable_difference([0.2, 0.2, 0.2]) is None
    many = [((-1) ** k) * 0.3 for k in range(64)]
    assert detectable_difference(many) < detectable_difference(many[:8])  # more personas, smaller differences


def test_report_states_the_smallest_detectable_headline_difference():
    from persona_lit.evaluation.report import detectable_line

    per = lambda d: {"vs_baseline/adherence/choice": {"turn": [0, 8], "mean": [0.0, d]}}  # noqa: E731
    results = {"run": {"headline": {"metric": "adherence/choice", "turn": 8}},
               "by_persona": {f"p{k}": per(0.1 * (k % 3)) for k in range(6)}}
    line = detectable_line(results)[0]
    assert "6 personas" in line and "±" in line
    results["by_persona"] = {"p0": per(0.1)}
    assert "not estimable from 1 persona" in detectable_line(results)[0]


def test_personas_without_a_turn0_effect_are_reported_apart():
    from persona_lit.evaluation.report import turn0_effect, turn0_lines

    def per(fresh, control, diff):
        return {"adherence/choice_baseline": {"turn": [0, 8], "mean": [fresh, fresh]},
                "adherence/choice_control": {"turn": [0, 8], "mean": [control, control]},
                "vs_baseline/adherence/choice": {"turn": [0, 8], "mean": [0.0, diff]}}

    results = {"run": {"mechanism": "repeat", "headline": {"metric": "adherence/choice", "turn": 8}},
               "by_persona": {"a": per(1.0, 0.2, 0.1), "b": per(0.8, 0.2, 0.3), "c": per(0.2, 0.2, -0.9),
                              "d": per(0.0, 0.4, -0.5)}}
    effect = turn0_effect(results)
    assert effect["with_effect"] == ["a", "b"] and effect["without_effect"] == ["c", "d"]
    d = effect["difference"]
    assert d["n"] == 2 and d["mean"] == pytest.approx(0.2) and d["ci_low"] < 0.2 < d["ci_high"]
    text = "\n".join(turn0_lines(results))
    assert "2 of 4 personas" in text and "c, d" in text and "+0.200" in text
    # `none` is its own baseline: its fresh score is its own arm's
    results["run"]["mechanism"] = "none"
    results["by_persona"] = {"a": {"adherence/choice": {"turn": [0], "mean": [0.9]},
                                   "adherence/choice_control": {"turn": [0], "mean": [0.1]}}}
    assert turn0_effect(results)["with_effect"] == ["a"] and turn0_effect(results)["difference"] is None
    results["by_persona"] = {"a": {"adherence/choice": {"turn": [0], "mean": [0.9]}}}  # no control arm
    assert turn0_effect(results) is None and turn0_lines(results) == []
