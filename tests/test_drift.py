"""The drift metrics themselves, on a scripted answerer whose answers we control (no model)."""

import math

import pytest
import torch

from persona_lit.evaluation.conversation import Conversation, ConversationRunner, TurnRecord
from persona_lit.evaluation.protocol import ProtocolResult, merge, run_protocol, summarize
from persona_lit.mechanisms.base import Mechanism
from persona_lit.mechanisms.none import NoMechanism
from persona_lit.personas.load import persona_from_dict
from persona_lit.evaluation.probing import Scored

PERSONA = persona_from_dict({
    "name": "Cato", "system_prompt": "You are Cato.",
    "probes": [{"question": "What is your name?", "kind": "name", "check": {"contains_any": ["cato"]},
                "persona_answer": "I am Cato.", "assistant_answer": "I am an assistant."}]}, "<test>")
TURNS = ["q"] * 8
PROBE_TURNS = [0, 1, 2, 4, 8]


class Scripted(Mechanism):
    """A mechanism in name only: the scripted runner reads whether it is switched off (the baseline arm)."""

    name = "scripted"

    def disabled(self):
        return self.switched_off()


class ScriptedRunner(ConversationRunner):
    """Answers in persona while `in_persona(turn)`; the turn is the number of user turns so far. With
    `baseline` (a policy for the persona as plain system prompt) the mechanism is `scripted`, else `none`."""

    device = torch.device("cpu")  # no model

    def __init__(self, in_persona, baseline=None):
        super().__init__(model=None, chat=None, mechanism=Scripted() if baseline else NoMechanism())
        self.in_persona, self.baseline = in_persona, baseline

    def start(self, persona, rows=1):
        return Conversation(persona.system_prompt if persona else None, rows)

    def _on(self, conv):
        policy = self.baseline if self.mechanism._disabled else self.in_persona
        return conv.system_prompt is not None and policy(conv.tokens.shape[1])

    def say(self, conv, user_text, max_new_tokens=None, close=True):
        texts = [user_text] * conv.rows if isinstance(user_text, str) else user_text
        on = self._on(conv)
        conv.append([[0]] * conv.rows, pad_id=0)  # one slot per user turn: the turn counter
        return ["I am Cato." if on and t.startswith("What is your name") else "I am an assistant." for t in texts]

    def score(self, conv, items):
        on = self._on(conv)
        out = []
        for it in items:
            logp = {"I am Cato.": -1.0 if on else -3.0, "I am an assistant.": -2.0}[it.answer or "I am an assistant."]
            state = torch.tensor([[1.0, 0.0]]) if on else torch.tensor([[0.0, 0.0]])
            out.append(Scored(logp, state + torch.tensor([[0.0, 5.0]])))  # a shared offset the centring must remove
        return out


@pytest.mark.parametrize("policy,expected", [
    (lambda t: True, [1, 1, 1, 1, 1]),
    (lambda t: False, [0, 0, 0, 0, 0]),
    (lambda t: t < 4, [1, 1, 1, 0, 0]),  # in persona until turn 4: a step at 4
])
def test_scripted_answerer_gives_the_adherence_it_was_scripted_to(policy, expected):
    result = run_protocol(ScriptedRunner(policy), PERSONA, [TURNS, TURNS, TURNS], PROBE_TURNS, progress=False)
    metrics = summarize(result, PROBE_TURNS, layer=0)["metrics"]
    assert metrics["adherence/name"]["mean"] == expected
    assert metrics["adherence/name_control"]["mean"] == [0] * 5  # the control arm never had the persona
    assert metrics["adherence/name"]["n"] == [1, 3, 3, 3, 3]  # turn 0 (no user turn yet) counts once per persona
    assert metrics["adherence/name"]["unit"] == ["personas"] + ["conversations"] * 4
    assert "adherence/name_baseline" not in metrics and not result.baseline_arm  # `none` is its own baseline
    margin = metrics["likelihood_margin"]["mean"]
    assert margin == [1.0 if e else -1.0 for e in expected]  # log p persona answer - log p default answer
    if expected[0]:
        projection = metrics["projection"]["mean"]
        assert projection == pytest.approx([float(e) for e in expected])  # 1 = as at turn 0, 0 = no persona


def test_intervals_shrink_with_more_conversations_and_cover_the_mean():
    from persona_lit.metrics import t_interval, wilson_interval

    mean, lo, hi = t_interval([0.2, 0.4, 0.6])
    assert lo < mean < hi and mean == pytest.approx(0.4)
    assert t_interval([0.5]) == (0.5, None, None) and math.isnan(t_interval([])[0])  # n=1: no interval
    narrow, wide = wilson_interval(50, 100), wilson_interval(5, 10)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]


def test_compare_overlays_earlier_evaluations(tmp_path):
    import json

    from persona_lit.evaluation.compare import compare_runs
    from persona_lit.evaluation.report import write_report

    for name, policy in (("always", lambda t: True), ("until4", lambda t: t < 4)):
        result = run_protocol(ScriptedRunner(policy), PERSONA, [TURNS, TURNS], PROBE_TURNS, progress=False)
        res = {"run": {"mechanism": name, "model": "scripted", "persona": "Cato", "ckpt": None, "conversations": 2,
                       "turns": 8, "do_sample": False, "probe_turns": PROBE_TURNS},
               **summarize(result, PROBE_TURNS, layer=0)}
        (tmp_path / name).mkdir()
        write_report(tmp_path / name, res, result.persona_arm, result.control_arm)
        assert "n=1: no interval" in (tmp_path / name / "report.md").read_text()  # turn 0, one persona
        assert json.loads((tmp_path / name / "results.json").read_text())["metrics"]["adherence/name"]
    (tmp_path / "cmp").mkdir()
    written = compare_runs([tmp_path / "always", tmp_path / "until4"], tmp_path / "cmp")
    assert "compare_adherence.png" in written and "compare.png" in written
    table = (tmp_path / "cmp" / "compare.md").read_text()
    assert "| until4 | until4 | scripted | Cato | adherence/name | 0: 1.00, 1: 1.00, 2: 1.00, 4: 0.00, 8: 0.00 |" in table


def test_evaluate_pools_several_personas_and_reports_each(tmp_path):
    """evaluate.py personas=[...] on tiny-llama: pooled metrics over both personas' conversations, each
    persona alone under by_persona, capability cost in both arms, the persona on every transcript row."""
    import json

    from tests.conftest import run_cli

    out = tmp_path / "eval"
    r = run_cli("evaluate.py", "model=tiny-llama", "mechanism=none", "personas=[stoic,botanist]", "turns=2",
                "conversations=2", "probe_turns=[0,2]", "probe_kinds=[name]", "max_new_tokens=4",
                "probe_max_new_tokens=4", "capability_exchanges=2", "capability_tokens=6", "logger=none",
                f"out_dir={out}")
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["run"]["personas"] == ["stoic", "botanist"]
    ref = results["run"]["capability_references"]  # compare flags KL scored on different references
    assert isinstance(ref, str) and len(ref) == 12 and int(ref, 16) >= 0
    assert set(results["by_persona"]) == {"stoic", "botanist"}
    pooled, alone = results["metrics"], results["by_persona"]["stoic"]
    # pooled: two personas, the interval over their means; alone: turn 0 once, then 2 conversations
    assert pooled["likelihood_margin"]["n"] == [2, 2] and pooled["likelihood_margin"]["unit"] == ["personas"] * 2
    assert alone["likelihood_margin"]["n"] == [1, 2] and alone["likelihood_margin"]["ci_low"][0] is None
    assert pooled["projection"]["mean"][0] == pytest.approx(1.0)  # each persona scaled by its own turn 0
    assert pooled["capability/kl_to_base_control"]["mean"][0] == pytest.approx(0.0, abs=1e-6)
    rows = [json.loads(line) for line in (out / "transcript.jsonl").read_text().splitlines()]
    assert {row["persona"] for row in rows} == {"stoic", "botanist"} and {row["arm"] for row in rows} == {"persona", "control"}
    assert (out / "kl_to_base.png").stat().st_size > 0 and "capability/kl_to_base" in (out / "report.md").read_text()


def _records(verdicts_by_turn: dict[int, list[bool]]) -> list[TurnRecord]:
    from persona_lit.evaluation.probing import ProbeResult

    return [TurnRecord(turn, "q", "a", "writing", 10 * turn,
                       probes=[ProbeResult(turn, f"probe {i}", "name", "a", ok) for i, ok in enumerate(verdicts)])
            for turn, verdicts in verdicts_by_turn.items()]


def test_adherence_interval_is_over_conversations_not_pooled_probes():
    """3 conversations x 4 probes at turn 2: one passes all four, two pass none. 12 pooled 'trials' would give
    a Wilson interval of about [0.14, 0.61]; the honest unit is the conversation (n = 3), much wider."""
    from persona_lit.metrics import PerTurnMean, bootstrap_interval, t_interval, wilson_interval

    arm = [_records({0: [True] * 4, 2: [ok] * 4}) for ok in (True, False, False)]
    m = summarize(ProtocolResult(arm, []), [0, 2])["metrics"]["adherence/name"]
    assert m["n"] == [1, 3] and m["unit"] == ["personas", "conversations"] and m["interval"] == ["none", "bootstrap"]
    pooled = wilson_interval(4, 12)
    mean, lo, hi = bootstrap_interval([[1.0, 0.0, 0.0]])  # the conversations resampled
    assert m["mean"][1] == pytest.approx(1 / 3) == pytest.approx(mean)
    assert (m["ci_low"][1], m["ci_high"][1]) == (lo, hi) == (0.0, 1.0)
    assert m["ci_high"][1] - m["ci_low"][1] > 1.5 * (pooled[1] - pooled[0])
    t = PerTurnMean([2], method="t", bounds=(0.0, 1.0))  # the t-interval stays available
    for c, v in enumerate((1.0, 0.0, 0.0)):
        t.update(c, 2, v)
    mean, lo, hi = t_interval([1.0, 0.0, 0.0])
    tm = t.compute()
    assert tm["interval"] == ["t"] and (tm["ci_low"], tm["ci_high"]) == ([max(0.0, lo)], [min(1.0, hi)])  # clipped
    # Conversations that agree on every probe: no spread, so the Wilson interval with 3 units as trials
    # (never a zero-width [1, 1]; the pooled 12 probes would claim [0.76, 1]).
    agree = summarize(ProtocolResult([_records({2: [True] * 4})] * 3, []), [2])["metrics"]["adherence/name"]
    assert agree["interval"] == ["wilson"] and agree["ci_high"] == [1.0]
    assert agree["ci_low"][0] == pytest.approx(wilson_interval(3, 3)[0]) and agree["ci_low"][0] < wilson_interval(12, 12)[0]


def test_one_conversation_has_no_interval_anywhere(tmp_path):
    import json

    from persona_lit.evaluation.report import write_report

    result = run_protocol(ScriptedRunner(lambda t: t < 4), PERSONA, [TURNS], PROBE_TURNS, progress=False)
    res = {"run": {"mechanism": "none", "model": "scripted", "persona": "Cato", "ckpt": None, "conversations": 1,
                   "turns": 8, "do_sample": False, "probe_turns": PROBE_TURNS}, **summarize(result, PROBE_TURNS, layer=0)}
    write_report(tmp_path, res, result.persona_arm, result.control_arm)
    metrics = json.loads((tmp_path / "results.json").read_text())["metrics"]
    for name, m in metrics.items():
        assert m["n"] == [1] * 5 and m["ci_low"] == [None] * 5 and m["ci_high"] == [None] * 5, name  # null in JSON
    report = (tmp_path / "report.md").read_text()
    assert report.count("n=1: no interval") >= 5 * len(metrics) and "[1.000, 1.000]" not in report
    assert (tmp_path / "adherence.png").stat().st_size > 0  # drawn without a band


def test_identical_values_never_give_a_zero_width_interval():
    from persona_lit.metrics import PerTurnMean

    metric = PerTurnMean([3])
    for c in range(4):
        metric.update(c, 3, 0.25)
    m = metric.compute()
    assert m["mean"] == [0.25] and m["n"] == [4] and m["ci_low"] == [None] and m["interval"] == ["none"]


def test_personas_are_the_unit_when_pooled():
    """Persona A: one conversation, always in persona; persona B: three, never. Pooled by conversation the
    mean would be 0.25 over n = 4; clustered by persona it is the mean of the persona means over n = 2."""
    a = run_protocol(ScriptedRunner(lambda t: True), PERSONA, [TURNS], PROBE_TURNS, progress=False)
    b = run_protocol(ScriptedRunner(lambda t: False), PERSONA, [TURNS] * 3, PROBE_TURNS, progress=False)
    merged = merge([a, b])
    assert merged.groups == [0, 1, 1, 1]
    m = summarize(merged, PROBE_TURNS, layer=0)["metrics"]
    adherence, margin = m["adherence/name"], m["likelihood_margin"]
    assert adherence["mean"] == [0.5] * 5 and adherence["n"] == [2] * 5 and adherence["unit"] == ["personas"] * 5
    # personas resampled: a resample's mean is 0, 0.5 or 1 (margin -1, 0, +1), each end with probability 1/4
    assert adherence["ci_low"] == [0.0] * 5 and adherence["ci_high"] == [1.0] * 5
    assert adherence["interval"] == ["bootstrap"] * 5
    assert margin["mean"] == [0.0] * 5  # persona means +1 and -1
    assert margin["ci_low"] == pytest.approx([-1.0] * 5) and margin["ci_high"] == pytest.approx([1.0] * 5)


def test_turn_zero_counts_once_per_persona():
    one = summarize(run_protocol(ScriptedRunner(lambda t: True), PERSONA, [TURNS] * 4, [0, 2], progress=False), [0, 2])
    assert one["metrics"]["likelihood_margin"]["n"] == [1, 4]
    two = merge([run_protocol(ScriptedRunner(lambda t: t < 1), PERSONA, [TURNS] * 3, [0, 2], progress=False)] * 2)
    m = summarize(two, [0, 2])["metrics"]["adherence/name"]
    assert m["n"] == [2, 2] and m["unit"] == ["personas", "personas"]
    assert m["interval"][0] == "wilson" and m["ci_low"][0] > 0  # 2 personas agree at turn 0: Wilson over 2


def test_baseline_arm_in_results_report_and_transcript(tmp_path):
    """The mechanism holds the persona throughout; the plain system prompt (its baseline) only until turn 4."""
    import json

    from persona_lit.evaluation.report import write_report

    runner = ScriptedRunner(lambda t: True, baseline=lambda t: t < 4)
    result = run_protocol(runner, PERSONA, [TURNS] * 5, PROBE_TURNS, progress=False)
    assert len(result.baseline_arm) == 5 and merge([result]).baseline_arm == result.baseline_arm
    assert len(run_protocol(runner, PERSONA, [TURNS], PROBE_TURNS, progress=False, baseline=False).baseline_arm) == 0
    summary = summarize(result, PROBE_TURNS, layer=0)
    m = summary["metrics"]
    assert m["adherence/name"]["mean"] == [1] * 5 and m["adherence/name_baseline"]["mean"] == [1, 1, 1, 0, 0]
    assert m["projection_baseline"]["mean"] == pytest.approx([1, 1, 1, 0, 0])
    diff = m["vs_baseline/adherence/name"]
    assert diff["mean"] == [0, 0, 0, 1, 1] and diff["n"] == [1, 5, 5, 5, 5]
    assert diff["ci_low"][3] > 0 and diff["ci_high"][3] == 1.0  # 5 conversations all +1: Wilson over units
    assert m["vs_baseline/likelihood_margin"]["mean"] == [0, 0, 0, 2, 2]
    res = {"run": {"mechanism": "scripted", "model": "scripted", "persona": "Cato", "ckpt": None, "conversations": 5,
                   "turns": 8, "do_sample": False, "probe_turns": PROBE_TURNS}, **summary}
    write_report(tmp_path, res, result.persona_arm, result.control_arm, result.baseline_arm)
    assert "adherence/name_baseline" in json.loads((tmp_path / "results.json").read_text())["metrics"]
    rows = [json.loads(line) for line in (tmp_path / "transcript.jsonl").read_text().splitlines()]
    assert {r["arm"] for r in rows} == {"persona", "baseline", "control"}
    assert sum(r["arm"] == "baseline" for r in rows) == 5 * 9
    report = (tmp_path / "report.md").read_text()
    assert "## Did scripted beat the plain system prompt?" in report
    assert "| adherence/name | 4 | 1.000 |" in report and "| +1.000 |" in report
    rows = {line.split(" | ")[1]: line for line in report.split("## adherence")[0].splitlines()
            if line.startswith("| adherence/name |")}
    # no headline declared in this run: every row is Holm-corrected; five conversations all +1 give the smallest
    # sign-flip p five units allow, 2/32, which no correction brings below 0.05
    assert "| 0.0625 |" in rows["4"] and rows["4"].endswith("| no clear difference (Holm) |")
    assert rows["1"].endswith("| no clear difference (Holm) |")
    assert rows["0"].endswith("| - | - | no test (n < 2) |") and "n=1: no interval" in rows["0"]
    res["run"]["headline"] = {"metric": "adherence/name", "turn": 4}  # declared: judged by its interval alone
    (tmp_path / "declared").mkdir()
    write_report(tmp_path / "declared", res, result.persona_arm, result.control_arm, result.baseline_arm)
    report = (tmp_path / "declared" / "report.md").read_text()
    head = next(line for line in report.splitlines() if line.startswith("| **adherence/name** | 4 |"))
    assert head.endswith("| 0.0625 | - | better (headline) |")


def test_nonnegative_costs_never_get_an_interval_below_their_range():
    """KL to base (>= 0) and perplexity (>= 1) over two spread-out conversations: the bootstrap stays in the
    values' range; a t-interval with n=2 reaches far below the mean and is clipped to the value's range; all-equal
    values still get no interval."""
    from persona_lit.evaluation.protocol import _record_metrics
    from persona_lit.metrics import cluster_interval

    def arm(values):
        return [[TurnRecord(2, "q", "a", "", 10, capability={"kl_to_base": v, "nll": math.log(1 + v)})]
                for v in values]

    m = _record_metrics(arm([0.05, 0.6]), [0, 0], [2], "")
    kl, ppl = m["capability/kl_to_base"], m["capability/perplexity"]
    assert kl["ci_low"] == [0.05] and kl["ci_high"] == [0.6] and kl["interval"] == ["bootstrap"]
    assert ppl["ci_low"] == [pytest.approx(1.05)] and ppl["ci_high"] == [pytest.approx(1.6)]
    t = cluster_interval([[0.05, 0.6]], (0.0, math.inf), method="t")
    assert t["ci_low"] == 0.0 and t["ci_high"] > 0.6 and t["interval"] == "t"
    same = _record_metrics(arm([0.2, 0.2]), [0, 0], [2], "")["capability/kl_to_base"]
    assert same["ci_low"] == [None] and same["interval"] == ["none"]


def test_seconds_per_turn_recorded_summarized_and_reported(tmp_path):
    """Each turn's answer generation is timed for its conversation batch (probes excluded): every row of a batch
    holds the same seconds, turn 0 (no answer) none; results.json holds their mean per turn beside history tokens,
    report.md shows it, the transcript leaves timings out (the same run gives the same transcript)."""
    import json

    from persona_lit.evaluation.report import write_report

    result = run_protocol(ScriptedRunner(lambda t: True), PERSONA, [TURNS] * 3, PROBE_TURNS, progress=False, batch=2)
    for records in result.persona_arm + result.control_arm:
        assert records[0].seconds is None and all(r.seconds is not None and r.seconds >= 0 for r in records[1:])
    assert [r.seconds for r in result.persona_arm[0]] == [r.seconds for r in result.persona_arm[1]]  # one batch
    summary = summarize(result, PROBE_TURNS, layer=0)
    seconds = summary["seconds_per_turn"]
    assert sorted(seconds, key=int) == [str(t) for t in range(1, 9)] and set(summary["history_tokens"]) >= set(seconds)
    by_turn = [r.seconds for records in result.persona_arm for r in records if r.turn == 3]
    assert seconds["3"] == pytest.approx(sum(by_turn) / 3, abs=1e-4)
    res = {"run": {"mechanism": "none", "model": "scripted", "persona": "Cato", "ckpt": None, "conversations": 3,
                   "turns": 8, "do_sample": False, "probe_turns": PROBE_TURNS}, **summary}
    write_report(tmp_path, res, result.persona_arm, result.control_arm)
    assert json.loads((tmp_path / "results.json").read_text())["seconds_per_turn"] == seconds
    report = (tmp_path / "report.md").read_text()
    assert "| turn | history tokens | s/turn | mean | 95% CI | n |" in report
    assert f"| 4 | {summary['history_tokens']['4']} | {seconds['4']:.2f} |" in report
    assert "| 0 | 0 | — |" in report
    rows = [json.loads(line) for line in (tmp_path / "transcript.jsonl").read_text().splitlines()]
    assert rows and all("seconds" not in row for row in rows)


def test_capability_kl_above_the_baseline_is_paired_and_reported_as_worse(tmp_path):
    """The issue's capability target reads "KL to base at most 0.03 above `none` at the same turn": the mechanism's
    KL minus the baseline arm's, paired by conversation, with its interval; in report.md a KL difference whose
    interval is above 0 is "worse" (a cost), below 0 "better"."""
    from persona_lit.evaluation.report import versus_baseline

    def arm(kls):
        return [[TurnRecord(0, "", "", "", 0, capability={"kl_to_base": 0.0, "nll": 1.0}),
                 TurnRecord(2, "q", "a", "", 10, capability={"kl_to_base": v, "nll": 1.0})] for v in kls]

    base = [0.10, 0.20, 0.15, 0.30]
    for shift, verdict in ((0.05, "worse"), (-0.05, "better")):
        mech = [b + shift + 0.01 * k for k, b in enumerate(base)]
        result = ProtocolResult(arm(mech), [], [0, 0, 1, 1], arm(base), [])
        metrics = summarize(result, [0, 2])["metrics"]
        diff = metrics["vs_baseline/capability/kl_to_base"]
        assert diff["mean"][1] == pytest.approx(shift + 0.015)
        assert (diff["ci_low"][1] > 0) == (shift > 0) and (diff["ci_high"][1] < 0) == (shift < 0)
        run = {"mechanism": "scripted", "headline": {"metric": "capability/kl_to_base", "turn": 2}}
        rows = [line for line in versus_baseline({"run": run, "metrics": metrics})
                if line.startswith("| **capability/kl_to_base** | 2 |")]
        assert len(rows) == 1 and rows[0].endswith(f"| {verdict} (headline) |")


def test_a_narrow_interval_is_never_printed_zero_width():
    """A real but narrow interval (seen: KL 0.08755-0.08788) gets the digits that tell its ends apart."""
    from persona_lit.evaluation.report import interval_cell

    m = {"n": [2, 2, 4], "ci_low": [0.0875486, 0.10, None], "ci_high": [0.0878752, 0.30, None]}
    assert interval_cell(m, 0) == "[0.0875, 0.0879]"
    assert interval_cell(m, 1) == "[0.100, 0.300]"
    assert interval_cell(m, 2) == "n=4, all equal: no interval"


def test_verdicts_other_than_the_headline_are_holm_corrected_sign_flip_tests():
    """12 personas all +0.5 at turn 4: exact sign-flip p 2/4096, Holm over the family stays below 0.05 (better
    (Holm)); mixed signs at turn 1: no clear difference; the adjusted p-values are Holm's of the raw ones."""
    from persona_lit.evaluation.probing import ProbeResult
    from persona_lit.evaluation.report import comparison_rows
    from persona_lit.metrics.drift import holm

    def arm(values_by_turn):
        return [[TurnRecord(t, "q", "a", "", 10, probes=[ProbeResult(t, "q", "name", "a", True, v)])
                 for t, v in values_by_turn[c].items()] for c in range(12)]

    mech = {c: {1: (1.0 if c % 2 else -1.0), 4: 1.0} for c in range(12)}
    base = {c: {1: 0.0, 4: 0.5} for c in range(12)}
    result = ProtocolResult(arm(mech), [], list(range(12)), arm(base), [])
    metrics = summarize(result, [1, 4])["metrics"]
    diff = metrics["vs_baseline/likelihood_margin"]
    assert diff["p"][1] == pytest.approx(2 / 4096) and diff["p"][0] > 0.5
    rows = comparison_rows({"run": {"headline": {"metric": "adherence/name", "turn": 4}}, "metrics": metrics},
                           "vs_baseline")
    by = {(r["name"], r["turn"]): r for r in rows}
    family = [r for r in rows if not r["headline"]]
    assert [r["p_holm"] for r in family] == holm([r["p"] for r in family])
    assert by["likelihood_margin", 4]["verdict"] == "better (Holm)"
    assert by["likelihood_margin", 1]["verdict"] == "no clear difference (Holm)"
    assert by["adherence/name", 4]["headline"] and by["adherence/name", 4]["verdict"].endswith("(headline)")
