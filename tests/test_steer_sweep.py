"""`task=steer_sweep`: one drift protocol per alpha on one loaded model; its alpha=0 arm is the drift protocol's
control arm, its reference is the baseline arm; the recommendation follows the rule it states."""

import json

import pytest
from hydra import compose, initialize_config_dir

from persona_lit.errors import UserError
from persona_lit.evaluation.runner import evaluate
from persona_lit.steering.sweep import recommend
from tests.conftest import REPO
from tests.test_steer import direction_file
from tests.test_weight_steer import delta_file  # noqa: F401 (a fixture)

SMALL = ["model=tiny-llama", "mechanism=steer", "persona=stoic", "turns=2", "probe_turns=[0,2]", "conversations=2",
         "max_new_tokens=5", "probe_max_new_tokens=4", "capability_exchanges=1", "capability_tokens=8",
         "logger=none", "probe_kinds=[name]"]


def config(*overrides, steer=True):
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("evaluate", overrides=[*SMALL, *(["mechanism.options.layers=[1,2]"] if steer else []),
                                              *overrides])


def test_sweep_alpha_zero_is_the_control_arm_and_the_reference_is_the_baseline_arm(backbone_factory, tmp_path):
    path = direction_file(backbone_factory("tiny-llama"), tmp_path / "d.safetensors")
    out = tmp_path / "sweep"
    evaluate(config("task=steer_sweep", f"mechanism.options.direction={path}", "task.alphas=[4,0]",
                    "task.max_kl=100", f"out_dir={out}"))
    assert sorted(p.name for p in out.iterdir()) == ["report.md", "results.json", "sweep.png"]
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # nothing half-written left
    results = json.loads((out / "results.json").read_text())
    by_alpha = {s["alpha"]: s["metrics"] for s in results["sweep"]}
    assert list(by_alpha) == [0.0, 4.0]
    for m in by_alpha.values():
        assert m["adherence/name"]["turn"] == m["capability/kl_to_base"]["turn"] == [0, 2]
        assert {"ci_low", "ci_high", "n"} <= set(m["capability/kl_to_base"])
    assert by_alpha[0.0]["capability/kl_to_base"]["mean"][0] == pytest.approx(0.0, abs=1e-6)  # the base model
    assert by_alpha[4.0]["capability/kl_to_base"]["mean"][0] > 1e-3  # steering moves it, before any history
    # the drift protocol on the same settings: its control arm is alpha=0, its baseline arm the reference
    drift = tmp_path / "drift"
    evaluate(config(f"mechanism.options.direction={path}", "mechanism.options.alpha=4", f"out_dir={drift}"))
    metrics = json.loads((drift / "results.json").read_text())["metrics"]
    for name in ("adherence/name", "capability/kl_to_base", "capability/perplexity"):
        assert by_alpha[0.0][name]["mean"] == pytest.approx(metrics[f"{name}_control"]["mean"], abs=1e-9)
        assert results["reference_none"][name]["mean"] == pytest.approx(metrics[f"{name}_baseline"]["mean"], abs=1e-9)
    report = (out / "report.md").read_text()
    assert "Rule: At turn 2" in report and "| 4 |" in report and "none (persona prompt" in report
    rec = results["recommendation"]
    assert rec == recommend(results["sweep"], "adherence/name", "name adherence", 2, 100.0)


def per_turn(mean, low=None, high=None):
    return {"turn": [0, 4], "mean": [0.0, mean], "ci_low": [None, low], "ci_high": [None, high], "n": [1, 3]}


def test_recommendation_follows_the_stated_rule():
    sweep = [{"alpha": a, "metrics": {"adherence/name": per_turn(*adh), "capability/kl_to_base": per_turn(kl)}}
             for a, adh, kl in [(0, (0.2, 0.1, 0.3), 0.0),
                                (1, (0.3, 0.1, 0.5), 0.1),   # mean above, interval reaches below alpha=0's mean
                                (2, (0.6, 0.4, 0.8), 0.2),   # qualifies
                                (4, (0.7,), 0.5),            # no interval: its mean is above; KL at the budget
                                (8, (0.9, 0.8, 1.0), 0.9)]]  # over the KL budget
    rec = recommend(sweep, "adherence/name", "name adherence", 4, 0.5)
    assert rec["alphas"] == [2, 4] and rec["range"] == [2, 4]
    assert recommend(sweep, "adherence/name", "name adherence", 4, 0.05)["range"] is None
    # the margin measure reads likelihood_margin with the same rule
    margins = [{"alpha": s["alpha"], "metrics": {"likelihood_margin": s["metrics"]["adherence/name"],
                                                 "capability/kl_to_base": s["metrics"]["capability/kl_to_base"]}}
               for s in sweep]
    assert recommend(margins, "likelihood_margin", "margin", 4, 0.5)["alphas"] == [2, 4]


@pytest.mark.parametrize("overrides,facts", [
    (["task.alphas=[1,2]"], ["task.alphas=[1, 2]", "including 0"]),
    (["task.alphas=[]"], ["task.alphas=[]", "non-empty"]),
    (["task.max_kl=0"], ["task.max_kl=0", "> 0"]),
    (["mechanism=none"], ["mechanism=none", "needs mechanism=steer"]),
    (["devices=2"], ["devices=2", "devices=1"]),
    (["capability_exchanges=0"], ["capability_exchanges=0", ">= 1"]),
    (["task.metric=vibes"], ["task.metric=vibes", "adherence, margin"]),
])
def test_bad_sweep_settings_are_one_line_user_errors(tmp_path, overrides, facts):
    steer = "mechanism=none" not in overrides
    options = ["mechanism.options.direction=/x.safetensors"] if steer else []
    with pytest.raises(UserError) as err:
        evaluate(config("task=steer_sweep", *options, f"out_dir={tmp_path}/o", *overrides, steer=steer))
    message = str(err.value)
    assert "\n" not in message and all(f in message for f in facts), message
    assert not (tmp_path / "o").exists()


def test_weight_steer_sweep_and_side_by_side_with_activation_steering(backbone_factory, tmp_path, delta_file):
    """mechanism=weight_steer sweeps like steer (alpha changed in place re-merges; alpha 0 = the base model), and
    task=sweep_compare puts both on one table and plot; sweeps of different metrics are refused."""
    from persona_lit.steering.sweep_compare import run_task as compare

    delta = delta_file()
    weights, act = tmp_path / "w", tmp_path / "a"
    evaluate(config("task=steer_sweep", "mechanism=weight_steer", f"mechanism.options.delta={delta}",
                    "task.alphas=[0,3]", "task.max_kl=100", f"out_dir={weights}", steer=False))
    results = json.loads((weights / "results.json").read_text())
    by_alpha = {s["alpha"]: s["metrics"] for s in results["sweep"]}
    assert results["run"]["mechanism"] == "weight_steer" and results["run"]["delta"] == str(delta)
    assert by_alpha[0.0]["capability/kl_to_base"]["mean"][0] == pytest.approx(0.0, abs=1e-6)
    assert by_alpha[3.0]["capability/kl_to_base"]["mean"][0] > 1e-4
    assert "mechanism=weight_steer, W + alpha·ΔW" in (weights / "report.md").read_text()
    path = direction_file(backbone_factory("tiny-llama"), tmp_path / "d.safetensors")
    evaluate(config("task=steer_sweep", f"mechanism.options.direction={path}", "task.alphas=[0,4]",
                    "task.max_kl=100", f"out_dir={act}"))
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("evaluate", overrides=["task=sweep_compare", f"task.runs=[{act},{weights}]",
                                             f"out_dir={tmp_path / 'c'}"])
        compare(cfg)
        rows = json.loads((tmp_path / "c" / "results.json").read_text())["rows"]
        assert [(r["run"], r["alpha"]) for r in rows] == [("activation steer (blocks [1, 2])", 0.0),
                                                          ("activation steer (blocks [1, 2])", 4.0),
                                                          ("weight steer", 0.0), ("weight steer", 3.0)]
        assert rows[0]["kl"][0] == pytest.approx(rows[2]["kl"][0], abs=1e-6)  # both alpha=0: the base model
        assert (tmp_path / "c" / "compare.png").is_file()
        assert "persona prompt, no steering" in (tmp_path / "c" / "report.md").read_text()
        other = json.loads((weights / "results.json").read_text())
        other["task"]["metric"] = "margin"
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / "results.json").write_text(json.dumps(other))
        with pytest.raises(UserError, match=r"task.runs\[1\]=.*task.metric='margin' but 'adherence'"):
            compare(compose("evaluate", overrides=["task=sweep_compare", f"task.runs=[{act},{tmp_path / 'm'}]",
                                                   f"out_dir={tmp_path / 'c2'}"]))
