"""The drift metrics themselves, on a scripted answerer whose answers we control (no model)."""

import math

import pytest
import torch

from persona_lit.conversation import Conversation, ConversationRunner
from persona_lit.drift import run_protocol, summarize
from persona_lit.mechanisms.none import NoMechanism
from persona_lit.personas import persona_from_dict
from persona_lit.probing import Scored

PERSONA = persona_from_dict({
    "name": "Cato", "system_prompt": "You are Cato.",
    "probes": [{"question": "What is your name?", "kind": "name", "check": {"contains_any": ["cato"]},
                "persona_answer": "I am Cato.", "assistant_answer": "I am an assistant."}]}, "<test>")
TURNS = ["q"] * 8
PROBE_TURNS = [0, 1, 2, 4, 8]


class ScriptedRunner(ConversationRunner):
    """Answers in persona while `in_persona(turn)`; the turn is the number of user turns so far."""

    device = torch.device("cpu")  # no model

    def __init__(self, in_persona):
        super().__init__(model=None, chat=None, mechanism=NoMechanism())
        self.in_persona = in_persona

    def start(self, persona, rows=1):
        return Conversation(persona.system_prompt if persona else None, rows)

    def _on(self, conv):
        return conv.system_prompt is not None and self.in_persona(conv.tokens.shape[1])

    def say(self, conv, user_text, max_new_tokens=None):
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
    assert metrics["adherence/name"]["n"] == [3] * 5
    margin = metrics["likelihood_margin"]["mean"]
    assert margin == [1.0 if e else -1.0 for e in expected]  # log p persona answer - log p default answer
    if expected[0]:
        projection = metrics["projection"]["mean"]
        assert projection == pytest.approx([float(e) for e in expected])  # 1 = as at turn 0, 0 = no persona


def test_intervals_shrink_with_more_conversations_and_cover_the_mean():
    from persona_lit.metrics import t_interval, wilson_interval

    mean, lo, hi = t_interval([0.2, 0.4, 0.6])
    assert lo < mean < hi and mean == pytest.approx(0.4)
    assert t_interval([0.5])[1:] == (0.5, 0.5) and math.isnan(t_interval([])[0])
    narrow, wide = wilson_interval(50, 100), wilson_interval(5, 10)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]


def test_compare_overlays_earlier_evaluations(tmp_path):
    import json

    from persona_lit.report import compare_runs, write_report

    for name, policy in (("always", lambda t: True), ("until4", lambda t: t < 4)):
        result = run_protocol(ScriptedRunner(policy), PERSONA, [TURNS, TURNS], PROBE_TURNS, progress=False)
        res = {"run": {"mechanism": name, "model": "scripted", "persona": "Cato", "ckpt": None, "conversations": 2,
                       "turns": 8, "do_sample": False, "probe_turns": PROBE_TURNS},
               **summarize(result, PROBE_TURNS, layer=0)}
        (tmp_path / name).mkdir()
        write_report(tmp_path / name, res, result.persona_arm, result.control_arm)
        assert json.loads((tmp_path / name / "results.json").read_text())["metrics"]["adherence/name"]
    (tmp_path / "cmp").mkdir()
    written = compare_runs([tmp_path / "always", tmp_path / "until4"], tmp_path / "cmp")
    assert "compare_adherence.png" in written
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
    assert set(results["by_persona"]) == {"stoic", "botanist"}
    pooled, alone = results["metrics"], results["by_persona"]["stoic"]
    assert pooled["likelihood_margin"]["n"] == [4, 4] and alone["likelihood_margin"]["n"] == [2, 2]
    assert pooled["projection"]["mean"][0] == pytest.approx(1.0)  # each persona scaled by its own turn 0
    assert pooled["capability/kl_to_base_control"]["mean"][0] == pytest.approx(0.0, abs=1e-6)
    rows = [json.loads(line) for line in (out / "transcript.jsonl").read_text().splitlines()]
    assert {row["persona"] for row in rows} == {"stoic", "botanist"} and {row["arm"] for row in rows} == {"persona", "control"}
    assert (out / "kl_to_base.png").stat().st_size > 0 and "capability/kl_to_base" in (out / "report.md").read_text()
