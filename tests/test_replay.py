"""protocol=replay: a transcript read teacher-forced gives every record (answers, probe verdicts, margins,
forced choice, capability cost, history length) that generating it gave, under every mechanism on both model
families; every arm reads the one transcript the base model with the persona wrote; results.json says so."""

import dataclasses
import json

import pytest
from omegaconf import OmegaConf

from persona_lit.build import attach_mechanism
from persona_lit.evaluation.choice import with_choice_probes
from persona_lit.evaluation.conversation import ConversationRunner
from persona_lit.evaluation.protocol import _transcript, run_personas, transcript_hash
from persona_lit.personas.load import load_persona

MECHANISMS = {"none": {}, "repeat": {"every": 1}, "lyra": {"layers": [1]}, "triplet": {"layers": [1, 2]},
              "instaboost": {"bias": 1.0, "layers": [0, 2]}, "split_softmax": {"exponent": 0.5, "layers": [1]}}
TURNS = ["Name a colour.", "Tell me about the sea.", "What is two plus two?"]
CAPABILITY = [("What is the capital of France?", "The capital of France is Paris.")]


def _personas():
    """Two pack personas, each with a name probe, a style probe (generated, checked, margin) and forced choice."""
    few = [dataclasses.replace(p, probes=(p.name_probe(), next(q for q in p.probes if q.kind == "style")))
           for p in (load_persona("pirate_mentor"), load_persona("stoic"))]
    return with_choice_probes(few, 1, seed=0)


def _same(a, b):
    assert [r.answer_ids for r in a] == [r.answer_ids for r in b]
    assert [r.history_tokens for r in a] == [r.history_tokens for r in b]
    for x, y in zip(a, b):
        assert [(p.passed, p.answer) for p in x.probes] == [(p.passed, p.answer) for p in y.probes], x.turn
        for p, q in zip(x.probes, y.probes):
            for v, w in ((p.margin, q.margin), (p.log_odds, q.log_odds)):
                assert (v is None) == (w is None) and (v is None or abs(v - w) < 1e-4), (x.turn, p.kind, v, w)
        if x.capability:
            assert abs(x.capability["kl_to_base"] - y.capability["kl_to_base"]) < 1e-5


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gemma3"])
@pytest.mark.parametrize("mechanism", list(MECHANISMS))
def test_replaying_its_own_answers_gives_every_record_again(backbone_factory, model, mechanism):
    bb = backbone_factory(model)
    net, mech = attach_mechanism(bb, OmegaConf.create({"name": mechanism, "options": MECHANISMS[mechanism]}))
    net.eval()
    personas = _personas()
    runner = ConversationRunner(net, bb.chat, mech, max_new_tokens=5, probe_max_new_tokens=3, probe_batch=4)
    runner.prepare_references(CAPABILITY, 8)
    streams = [TURNS, TURNS[::-1]]
    free = runner.run(personas, streams, [0, 1, 3], capability=CAPABILITY, progress=False)
    again = runner.run(personas, streams, [0, 1, 3], capability=CAPABILITY, progress=False,
                       replay=_transcript(free))
    for a, b in zip(free, again):
        _same(a, b)


def test_every_arm_reads_the_transcript_the_base_model_wrote(backbone_factory):
    bb = backbone_factory("tiny-gemma3")  # tiny-llama's random weights answer only newlines
    net, mech = attach_mechanism(bb, OmegaConf.create({"name": "instaboost", "options": {"bias": 2.0}}))
    net.eval()
    runner = ConversationRunner(net, bb.chat, mech, max_new_tokens=5, probe_max_new_tokens=3)
    personas = _personas()
    free, = run_personas(runner, personas[:1], {personas[0].key: [TURNS]}, [0, 3], progress=False, bleed=True)
    replay, = run_personas(runner, personas[:1], {personas[0].key: [TURNS]}, [0, 3], progress=False, bleed=True,
                           protocol="replay", baseline=False)  # replay runs the baseline arm: it writes
    written = [r.answer_ids for r in replay.baseline_arm[0]]
    assert written == [r.answer_ids for r in free.baseline_arm[0]]  # the base model with the persona, greedy
    for arm in (replay.persona_arm, replay.control_arm, replay.bleed_arm):
        assert [r.answer_ids for r in arm[0]] == written
    assert [r.answer_ids for r in free.control_arm[0]] != written  # free-running, each arm writes its own
    net2, none = attach_mechanism(backbone_factory("tiny-gemma3"), OmegaConf.create({"name": "none", "options": {}}))
    none_runner = ConversationRunner(net2.eval(), bb.chat, none, max_new_tokens=5, probe_max_new_tokens=3)
    plain, = run_personas(none_runner, personas[:1], {personas[0].key: [TURNS]}, [0, 3], progress=False,
                          protocol="replay")
    assert transcript_hash(plain) == transcript_hash(replay)  # `none` writes the same transcript: runs pair
    with pytest.raises(ValueError, match="protocol='loop'"):
        run_personas(runner, personas[:1], [TURNS], [0], progress=False, protocol="loop")


def test_evaluate_records_the_protocol_and_transcript(tmp_path):
    from persona_lit.config.check import check_cli
    from persona_lit.evaluation.runner import evaluate

    out = tmp_path / "eval"
    cfg = check_cli(["model=tiny-llama", "mechanism=repeat", "personas=[pirate_mentor,stoic]", "turns=2",
                     "conversations=1", "probe_turns=[0,2]", "max_new_tokens=3", "probe_max_new_tokens=3",
                     "capability_exchanges=1", "logger=none", "protocol=replay", f"out_dir={out}"], "evaluate")
    evaluate(cfg)
    run = json.loads((out / "results.json").read_text())["run"]
    assert run["protocol"]["name"] == "replay" and len(run["protocol"]["transcript"]) == 16
    rows = [json.loads(line) for line in (out / "transcript.jsonl").open()]
    by_arm = {}
    for r in rows:
        by_arm.setdefault(r["arm"], []).append((r["conversation"], r["turn"], r["answer"]))
    assert by_arm["persona"] == by_arm["baseline"] == by_arm["control"] and len(by_arm["persona"]) == 6


@pytest.mark.parametrize("bias", [0.0, 2.0])
@pytest.mark.parametrize("budget", [None, 1])
def test_replay_scores_kl_to_none_on_the_same_history(backbone_factory, monkeypatch, capsys, bias, budget):
    """kl_to_none is 0 where the mechanism is the base model (instaboost bias 0) though history moved KL to base
    (so each row is paired with its own baseline row), > 0 where it is not; also with one conversation per batch
    (a log-prob budget too small for more), which is said in one line."""
    from persona_lit.evaluation import protocol

    if budget is not None:
        monkeypatch.setattr(protocol, "KL_STORE_BYTES", budget)
    bb = backbone_factory("tiny-gemma3")
    net, mech = attach_mechanism(bb, OmegaConf.create({"name": "instaboost", "options": {"bias": bias}}))
    runner = ConversationRunner(net.eval(), bb.chat, mech, max_new_tokens=5, probe_max_new_tokens=3)
    personas = _personas()
    streams = {p.key: [TURNS, TURNS[::-1]] for p in personas}
    results = run_personas(runner, personas, streams, [0, 3], protocol="replay", capability=CAPABILITY,
                           capability_tokens=8)
    assert ("1 conversations per batch" in capsys.readouterr().out) == (budget is not None)
    for result in results:
        for records in result.persona_arm:
            scored = [r for r in records if r.capability]
            assert [r.turn for r in scored] == [0, 3]
            for r in scored:
                kl = r.capability["kl_to_none"]
                assert (kl == pytest.approx(0.0, abs=1e-6)) if bias == 0 else kl > 1e-4
            assert scored[-1].capability["kl_to_base"] > 1e-4  # the history alone moves the model
        assert all(r.capability_logprobs is None for rows in result.baseline_arm for r in rows)  # freed
