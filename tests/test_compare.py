"""evaluate.py compare=[...]: one summary plot and one table across earlier evaluations, from small fake
results.json files (no model)."""

import json

import pytest

from persona_lit.evaluation.compare import compare_runs
from persona_lit.errors import UserError

TURNS = [0, 4, 8]


def per_turn(means, half=0.1, n=(1, 3, 3)):
    """A per-turn metric as summarize writes it: no interval at turn 0 (n = 1)."""
    return {"turn": TURNS, "mean": list(means), "ci_low": [None] + [m - half for m in means[1:]],
            "ci_high": [None] + [m + half for m in means[1:]], "n": list(n),
            "unit": ["personas"] + ["conversations"] * 2, "interval": ["none"] + ["bootstrap"] * 2}


def results(mechanism, name, style=None, seconds=True, baseline=True):
    metrics = {"adherence/name": per_turn(name), "likelihood_margin": per_turn([1.0, 0.5, 0.2]),
               "capability/kl_to_base": per_turn([0.01, 0.02, 0.03], half=0.005),
               "adherence/name_control": per_turn([0.0, 0.0, 0.0]),
               "capability/kl_to_base_control": per_turn([0.0, 0.01, 0.02], half=0.005)}
    if style is not None:
        metrics["adherence/style"] = per_turn(style)
    if baseline and mechanism != "none":
        metrics["adherence/name_baseline"] = per_turn([1.0, 0.3, 0.0])
        metrics["likelihood_margin_baseline"] = per_turn([1.0, 0.1, -0.4])
    out = {"run": {"mechanism": mechanism, "model": "SmolLM2-135M-Instruct", "persona": "Cato", "ckpt": None},
           "metrics": metrics, "history_tokens": {str(t): 40 + 150 * t + (60 if mechanism == "repeat" else 0)
                                                  for t in range(9)}}
    if seconds:  # older results.json have no seconds_per_turn
        out["seconds_per_turn"] = {str(t): 2.5 + 0.1 * t for t in range(1, 9)}
    return out


@pytest.fixture
def runs(tmp_path):
    specs = {"eval_lyra": results("lyra", [1.0, 0.9, 0.8], style=[0.9, 0.7, 0.6]),
             "eval_repeat": results("repeat", [1.0, 0.8, 0.5], style=[0.9, 0.5, 0.4], seconds=False),
             "eval_none": results("none", [1.0, 0.3, 0.0], style=[0.8, 0.2, 0.1])}
    dirs = []
    for name, res in specs.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(res))
        dirs.append(tmp_path / name)
    return dirs


def test_compare_writes_one_summary_plot_and_a_table_of_every_run(tmp_path, runs):
    out = tmp_path / "cmp"
    out.mkdir()
    written = compare_runs(runs, out)
    assert written[0] == "compare.png" and "compare.md" in written and "compare_adherence.png" in written
    for name in written:
        assert (out / name).stat().st_size > 0, name
    table = (out / "compare.md").read_text()
    assert "![compare.png](compare.png)" in table
    head = table.split("## Every metric")[0]
    header = next(line for line in head.splitlines() if line.startswith("| run | turn |"))
    assert header == "| run | turn | name | style | margin | KL to base | control KL | history tokens | s/turn |"
    rows = [line for line in head.splitlines() if line.startswith("| ") and not line.startswith("| run")]
    assert {r.split(" | ")[0][2:] for r in rows} == {"lyra", "repeat", "none"}  # each run; `none` is the baseline
    assert len(rows) == 3 * len(TURNS)
    lyra8 = next(r for r in rows if r.startswith("| lyra | 8 |"))
    assert "0.80 [0.70, 0.90]" in lyra8 and "| 1240 | 3.30 |" in lyra8  # interval, history tokens, s/turn
    assert next(r for r in rows if r.startswith("| repeat | 8 |")).endswith("| 1300 | — |")  # no seconds recorded
    assert "1.00 (n=1)" in next(r for r in rows if r.startswith("| lyra | 0 |"))  # no interval at turn 0


def test_without_a_none_run_the_baseline_arm_is_a_row_once(tmp_path, runs):
    out = tmp_path / "cmp"
    out.mkdir()
    compare_runs(runs[:2], out)
    head = (out / "compare.md").read_text().split("## Every metric")[0]
    baseline = [line for line in head.splitlines() if line.startswith("| none: persona as system prompt |")]
    assert len(baseline) == len(TURNS) and "0.00 [-0.10, 0.10]" in baseline[-1]


def test_same_mechanism_twice_is_told_apart_by_directory(tmp_path, runs):
    out = tmp_path / "cmp"
    out.mkdir()
    (tmp_path / "eval_lyra2").mkdir()
    (tmp_path / "eval_lyra2" / "results.json").write_text(json.dumps(results("lyra", [1.0, 0.5, 0.5])))
    compare_runs([runs[0], tmp_path / "eval_lyra2"], out)
    table = (out / "compare.md").read_text()
    assert "| lyra (eval_lyra) | 4 |" in table and "| lyra (eval_lyra2) | 4 |" in table


@pytest.mark.parametrize("content,fact", [
    (None, "results.json not found"),
    ('{"run": {"mechanism": "lyra"}, "metrics": {', "not valid JSON"),
    ('[1, 2]', "not a drift results.json (needs 'run' and 'metrics' objects"),
    ('{"run": {}, "metrics": {}}', "run.mechanism is missing or not a string"),
    ('{"run": {"mechanism": "lyra"}, "metrics": {"adherence/name": {"turn": [0], "mean": []}}}',
     "metrics.adherence/name is not a per-turn metric"),
    ('{"run": {"mechanism": "lyra"}, "metrics": {}, "history_tokens": {"x": 3}}',
     "history_tokens is not an object of turn: number"),
], ids=["missing", "truncated", "list", "no-mechanism", "short-list", "bad-tokens"])
def test_a_damaged_results_file_is_one_line_and_nothing_is_written(tmp_path, runs, content, fact):
    bad = tmp_path / "bad"
    bad.mkdir()
    if content is not None:
        (bad / "results.json").write_text(content)
    out = tmp_path / "cmp"
    out.mkdir()
    with pytest.raises(UserError) as e:
        compare_runs([runs[0], bad], out)
    assert fact in str(e.value) and str(bad) in str(e.value) and "\n" not in str(e.value)
    assert list(out.iterdir()) == []


def test_kl_on_different_capability_references_is_flagged(tmp_path, runs, capsys):
    """A longer run scores KL on other (unasked) references: compare says so; equal or unknown fingerprints do not."""
    for d, ref in zip(runs, ("aaaaaaaaaaaa", "aaaaaaaaaaaa", None)):
        res = json.loads((d / "results.json").read_text())
        res["run"]["capability_references"] = ref
        (d / "results.json").write_text(json.dumps(res))
    (tmp_path / "same").mkdir()
    compare_runs(runs, tmp_path / "same")
    assert "not comparable" not in (tmp_path / "same" / "compare.md").read_text()
    assert "warning" not in capsys.readouterr().out
    res = json.loads((runs[1] / "results.json").read_text())
    res["run"]["capability_references"] = "bbbbbbbbbbbb"
    (runs[1] / "results.json").write_text(json.dumps(res))
    (tmp_path / "other").mkdir()
    compare_runs(runs, tmp_path / "other")
    table = (tmp_path / "other" / "compare.md").read_text()
    assert "**KL to base is not comparable across these runs**" in table
    assert "eval_lyra: aaaaaaaaaaaa" in table and "eval_repeat: bbbbbbbbbbbb" in table and "eval_none:" not in table
    assert "warning" in capsys.readouterr().out


@pytest.mark.parametrize("key, value, what", [
    ("streams", {"per": "persona and conversation", "seed": 1, "questions": {"cato": [[81, 81]]}}, "question streams"),
    ("protocol", {"name": "replay", "transcript": "0123456789abcdef"}, "the protocol"),
    ("personas", ["role:pirate"], "the evaluated personas"),
    ("question_split", {"hash": "ffff", "part": "val"}, "the question split")])
def test_runs_on_different_footing_are_refused_in_one_line(tmp_path, runs, key, value, what):
    for d in runs:
        res = json.loads((d / "results.json").read_text())
        res["run"].update({"streams": {"per": "persona and conversation", "seed": 0, "questions": {"cato": [[81]]}},
                           "personas": ["cato"], "question_split": {"hash": "aaaa", "part": "test"}})
        (d / "results.json").write_text(json.dumps(res))
    out = tmp_path / "same"
    out.mkdir()
    compare_runs(runs, out)  # the same footing: compared
    res = json.loads((runs[1] / "results.json").read_text())
    res["run"][key] = value
    (runs[1] / "results.json").write_text(json.dumps(res))
    out = tmp_path / "mixed"
    out.mkdir()
    with pytest.raises(UserError) as e:
        compare_runs(runs, out)
    assert what in str(e.value) and "\n" not in str(e.value) and not any(out.iterdir())
