"""Forced-choice probes (evaluation/choice.py): built from the evaluated personas (same kind, same source first,
seeded), scored teacher-forced exactly as a plain forward over [persona ; question ; candidate] scores them, on
both model families, batched and after a turn of history; reported as adherence/choice and choice/log_odds."""

import json
import math

import pytest
import torch

from persona_lit.evaluation.choice import KIND, outcome, with_choice_probes
from persona_lit.evaluation.conversation import ConversationRunner
from persona_lit.mechanisms.none import NoMechanism
from persona_lit.personas.types import Check, Persona, Probe
from tests.conftest import REPO

DATA = REPO.parent / "shared" / "data"


def persona(key, answer, kind="name", question="Who are you, and what is your role?"):
    probe = Probe(question, Check({"contains_any": [answer.split()[-1].strip(".")]}), kind, answer,
                  "I am an AI assistant, here to help you with your questions.")
    return Persona(name=key, system_prompt=f"You are {answer[5:]}", probes=(probe,), source=key)


ROLES = [persona(f"role:{n}", f"I am a {n}.") for n in ("pirate", "nurse", "chef", "pilot", "judge", "baker")]


def test_choice_probes_take_distractors_of_the_same_kind_and_source_first():
    gym = persona("personagym:3", "I am a 30-year-old pilot from Lima.", "identity", "Who are you?")
    pack = persona("stoic", "I am Marcus, a stoic.")  # a pack persona (no `source:` prefix)
    li = Persona(name="li2024-1", system_prompt="Always answer in French.", probes=(), source="li2024:1")
    out = with_choice_probes(ROLES + [gym, pack, li], 3, seed=0)
    by = {p.key: p for p in out}
    pirate = next(p for p in by["role:pirate"].probes if p.kind == KIND)
    assert pirate.persona_answer == "I am a pirate." and len(pirate.choices) == 4
    assert pirate.choices[-1].startswith("I am an AI assistant")
    assert all(c.startswith("I am a ") and c != "I am a pirate." for c in pirate.choices[:3])  # other roles
    stoic = next(p for p in by["stoic"].probes if p.kind == KIND)
    assert set(stoic.choices[:3]) <= {r.probes[0].persona_answer for r in ROLES}  # name kind from another source
    assert not any(p.kind == KIND for p in by["personagym:3"].probes)  # the only identity persona: no distractor
    assert by["li2024:1"].probes == ()
    assert with_choice_probes(ROLES, 3, seed=0) == with_choice_probes(ROLES, 3, seed=0)
    assert with_choice_probes(ROLES, 3, seed=0) != with_choice_probes(ROLES, 3, seed=1)
    assert with_choice_probes(ROLES, 0, seed=0) == ROLES
    assert with_choice_probes(ROLES[:1], 3, seed=0) == ROLES[:1]  # alone: nothing to choose against


def test_outcome_is_zero_at_chance_and_needs_a_strict_win():
    passed, log_odds, _ = outcome([-1.0, -1.0, -1.0, -1.0])
    assert not passed and log_odds == pytest.approx(0.0, abs=1e-12)
    passed, log_odds, best = outcome([-0.5, -2.0, -3.0])
    assert passed and best == 0 and log_odds > 0
    p = math.exp(-0.5) / (math.exp(-0.5) + math.exp(-2.0) + math.exp(-3.0))
    assert log_odds == pytest.approx(math.log(p / (1 - p)) - math.log(1 / 2))
    assert outcome([-3.0, -0.5, -2.0])[:1] == (False,) and outcome([-3.0, -0.5, -2.0])[1] < 0


def _direct_scores(model, chat, history, open_turn, question, candidates):
    """Mean log p per token of each candidate (and its end token) by one plain forward of the whole sequence:
    `history` (one row's real tokens, unpadded), the question, the candidate."""
    prompt = history + chat.user_turn_ids(question, open_turn)
    scores = []
    for text in candidates:
        target = chat._ids(text) + [chat.end_id]
        full = torch.tensor([prompt + target])
        with torch.no_grad():
            logits = model(full).logits[0].float()
        logp = torch.log_softmax(logits[len(prompt) - 1 : len(prompt) - 1 + len(target)], -1)
        scores.append(float(logp.gather(1, torch.tensor(target)[:, None]).mean()))
    return scores


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
@pytest.mark.parametrize("share", [False, True])
def test_choice_scores_equal_a_plain_forward_batched_and_after_history(backbone_factory, name, share):
    bb = backbone_factory(name)
    model, chat = bb.model.eval(), bb.chat
    personas = with_choice_probes(ROLES[:3], 2, seed=0)
    runner = ConversationRunner(model, chat, NoMechanism(), max_new_tokens=3, probe_max_new_tokens=3,
                                probe_batch=2, share_forks=share)
    conv = runner.start(personas, rows=3)  # three rows, one persona each, probes of every kind in one forked batch
    for turn in (0, 1):
        if turn:
            runner.say(conv, ["Tell me about the sea."] * 3)
        results = runner.probe(conv, [list(p.probes) for p in personas], turn)
        for row, p in enumerate(personas):
            choice = next(q for q in p.probes if q.kind == KIND)
            got = next(r for r in results[row][0] if r.kind == KIND)
            direct = _direct_scores(model, chat, conv.row_ids(row), conv.open_turn, choice.question,
                                    [choice.persona_answer, *choice.choices])
            passed, log_odds, best = outcome(direct)
            assert got.passed == passed and got.log_odds == pytest.approx(log_odds, abs=2e-4), (row, turn)
            assert got.answer == [choice.persona_answer, *choice.choices][best] and got.margin is None
            name_probe = next(r for r in results[row][0] if r.kind == "name")
            assert name_probe.log_odds is None and name_probe.margin is not None


@pytest.mark.skipif(not (DATA / "assistant_axis").is_dir(), reason="needs ../shared/data")
def test_evaluation_reports_forced_choice_for_every_named_persona(tmp_path):
    from persona_lit.config.check import check_cli
    from persona_lit.evaluation.runner import evaluate

    out = tmp_path / "eval"
    cfg = check_cli(["personas=test_split", "model=tiny-llama", "pool.sources=[role,personagym]",
                     "pool.max_personas=4", f"pool.data_dir={DATA}", "turns=1", "conversations=1", "probe_turns=[0,1]",
                     "max_new_tokens=3", "probe_max_new_tokens=3", "capability_exchanges=0", "logger=none",
                     "choice_distractors=1", "mechanism=repeat", f"out_dir={out}"], "evaluate")
    evaluate(cfg)
    results = json.loads((out / "results.json").read_text())
    for name in ("adherence/choice", "choice/log_odds", "vs_baseline/adherence/choice", "vs_baseline/choice/log_odds",
                 "adherence/choice_control"):
        assert name in results["metrics"], name
    probes = [p for line in (out / "transcript.jsonl").open() for p in json.loads(line)["probes"]]
    choice = [p for p in probes if p["kind"] == KIND]
    assert choice and all(isinstance(p["log_odds"], float) for p in choice)
    assert all(p["log_odds"] is None for p in probes if p["kind"] != KIND)
    assert all(len(by) and "adherence/choice" in by for by in results["by_persona"].values())
