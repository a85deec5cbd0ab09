"""The conversation runner reuses the KV cache across turns; that must equal re-encoding the history."""

import pytest
import torch

from persona_lit.evaluation.conversation import Conversation, ConversationRunner
from persona_lit.mechanisms.none import NoMechanism
from persona_lit.personas.load import load_persona

TURNS = ["Tell me about volcanoes.", "Now summarize that in one line.", "What rhymes with orange?",
         "Give me three tips for sleeping well.", "Thanks! What was my first question?"]


def naive_transcript(model, chat, system, turns, max_new_tokens):
    """Re-encodes the whole history for every turn, no cache: the slow reference."""
    ids, answers = [], []
    for text in turns:
        ids += chat.turn_ids(text, first=not ids, system=system)
        input_ids = torch.tensor([ids])
        out = model.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=True,
                             max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=[chat.end_id],
                             pad_token_id=chat.pad_id)
        new = out[0, len(ids):].tolist()
        if new and new[-1] == chat.end_id:
            new = new[:-1]
        ids += new + chat.close_assistant()
        answers.append(new)
    return ids, answers


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_cached_conversation_equals_reencoding(backbone_factory, name):
    bb = backbone_factory(name)  # tiny-gemma3's sliding window is 16 tokens: the history outgrows it at once
    runner = ConversationRunner(bb.model, bb.chat, NoMechanism(), max_new_tokens=12)
    conv = Conversation("You are Cato, a terse stoic.")
    for text in TURNS:
        runner.say(conv, text)
    ids, _ = naive_transcript(bb.model, bb.chat, "You are Cato, a terse stoic.", TURNS, 12)
    assert conv.ids == ids


def test_probes_never_enter_the_history(backbone_factory):
    bb = backbone_factory("tiny-llama")
    persona = load_persona("joyful_writer")
    runner = ConversationRunner(bb.model, bb.chat, NoMechanism(), max_new_tokens=8, probe_max_new_tokens=6)
    with_probes = runner.run(persona, [TURNS[:3]], probe_turns=[0, 1, 2, 3], progress=False)[0]
    without = runner.run(persona, [TURNS[:3]], probe_turns=[], progress=False)[0]
    assert [r.answer for r in with_probes] == [r.answer for r in without]
    assert [r.history_tokens for r in with_probes] == [r.history_tokens for r in without]
    assert [len(r.probes) for r in with_probes] == [len(persona.probes)] * 4
    # a probe answer at turn 0 is the answer to persona + probe alone
    ids, answers = naive_transcript(bb.model, bb.chat, persona.system_prompt, [persona.probes[0].question], 6)
    assert with_probes[0].probes[0].answer == bb.chat.decode(answers[0])


STREAMS = [TURNS[:3], TURNS[2:5], ["Hi.", "Write a haiku about rain, please, with a title.", "Why?"]]


def mechanism_for(bb, kind):
    from omegaconf import OmegaConf

    from persona_lit.build import attach_mechanism
    from tests.test_triplet import perturb

    if kind == "none":
        return bb.model, NoMechanism()
    kind, _, layers = kind.partition(":")  # lyra:0,2 = Lyra on layers 0 and 2
    options = {"lyra": {"layers": [int(i) for i in layers.split(",")] if layers else None},
               "triplet": {"memory_tokens": 24}, "repeat": {"every": 2},
               "split_softmax": {"exponent": 0.5, "layers": [1, 3]}, "instaboost": {"bias": 2.0}}[kind]
    model, mech = attach_mechanism(bb, OmegaConf.create({"name": kind, "options": options}))
    if kind == "triplet":
        perturb(model, gate=2.0)  # the branch on, so its memory matters
    return model, mech


def assert_same_records(got, want):
    """One conversation's records: the same answers, history lengths and probe verdicts; margins, capability and
    reply states within 1e-4."""
    assert [r.answer for r in got] == [r.answer for r in want]
    assert [r.history_tokens for r in got] == [r.history_tokens for r in want]
    for a, b in zip(got, want):
        assert [(p.answer, p.passed) for p in a.probes] == [(p.answer, p.passed) for p in b.probes]
        assert [p.margin for p in a.probes] == pytest.approx([p.margin for p in b.probes], abs=1e-4)
        if b.capability is not None:
            assert a.capability == pytest.approx(b.capability, abs=1e-4)
            assert torch.allclose(a.reply_state, b.reply_state, atol=1e-4)


class EarlyEndRunner(ConversationRunner):
    """Greedy, but a row ends its answer when its real-token count is a multiple of 7: a row-local rule, so
    rows of one batch end at different steps (random tiny models rarely pick the end token by themselves)."""

    def forward_new(self, conv, **kwargs):
        self.lengths = conv.mask.sum(1)
        return super().forward_new(conv, **kwargs)

    def _pick(self, logits):
        return torch.where(self.lengths % 7 == 0, self.chat.end_id, logits.argmax(-1))


@pytest.mark.parametrize("kind", ["none", "lyra:1,3", "lyra:0", "lyra:3", "lyra:0,1,2,3", "triplet"])
def test_batched_conversations_and_probes_equal_one_at_a_time(backbone_factory, kind):
    """Three conversations of different lengths as one padded batch, probes 2 rows at a time, against
    each conversation alone with one probe row at a time: same answers, verdicts, margins, capability."""
    import dataclasses

    bb = backbone_factory("tiny-llama")
    model, mech = mechanism_for(bb, kind)
    persona = load_persona("joyful_writer")
    persona = dataclasses.replace(persona, probes=persona.probes[:3])
    exchanges = [("What is 2 + 2?", "2 + 2 = 4."), ("Name a prime.", "Seven is a prime number.")]
    batched = EarlyEndRunner(model, bb.chat, mech, max_new_tokens=10, probe_max_new_tokens=6, probe_batch=2)
    batched.prepare_references(exchanges, 8)
    together = batched.run(persona, STREAMS, probe_turns=[0, 2, 3], progress=False, capability=exchanges)
    single = EarlyEndRunner(model, bb.chat, mech, max_new_tokens=10, probe_max_new_tokens=6, probe_batch=1)
    single.prepare_references(exchanges, 8)
    for stream, rows in zip(STREAMS, together):
        alone = single.run(persona, [stream], probe_turns=[0, 2, 3], progress=False, capability=exchanges)[0]
        assert_same_records(rows, alone)
    grown = {b.history_tokens - a.history_tokens for rows in together for a, b in zip(rows, rows[1:])}
    assert len(grown) > 2  # turns of different lengths in one batch: padding was in play


@pytest.mark.parametrize("kind", ["none", "split_softmax", "instaboost", "repeat"])
def test_closing_tokens_left_to_the_next_forward_equal_feeding_them_at_once(backbone_factory, kind):
    """A mechanism that is not turn-bound has each answer's closing tokens fed with the next forward (the next
    turn's prompt, a probe's, a capability score's): one model call fewer per turn, and the same answers, probe
    verdicts, margins, capability and reply states as feeding them at once, on a padded batch of three."""
    import dataclasses

    bb = backbone_factory("tiny-llama")
    model, mech = mechanism_for(bb, kind)
    assert mech.turn_bound is False
    persona = load_persona("joyful_writer")
    persona = dataclasses.replace(persona, probes=persona.probes[:2])
    exchanges = [("What is 2 + 2?", "2 + 2 = 4.")]
    results, calls = {}, {}
    for bound in (False, True):
        mech.turn_bound = bound
        runner = EarlyEndRunner(model, bb.chat, mech, max_new_tokens=10, probe_max_new_tokens=6, probe_batch=2)
        runner.prepare_references(exchanges, 8)
        count = []
        hook = model.register_forward_hook(lambda *a: count.append(1))
        try:
            results[bound] = runner.run(persona, STREAMS, probe_turns=[0, 2], progress=False, capability=exchanges)
        finally:
            hook.remove()
        calls[bound] = len(count)
    del mech.turn_bound
    assert calls[False] == calls[True] - 3  # the closing calls of 3 turns (probe forks are never closed)
    for later, now in zip(results[False], results[True]):
        assert_same_records(later, now)


def test_capability_cost_is_zero_for_the_base_model_without_history_and_grows_with_a_persona(backbone_factory):
    from persona_lit.evaluation.protocol import run_protocol, summarize

    bb = backbone_factory("tiny-llama")
    persona = load_persona("stoic")
    runner = ConversationRunner(bb.model, bb.chat, NoMechanism(), max_new_tokens=8, probe_max_new_tokens=4)
    exchanges = [("What is 2 + 2?", "2 + 2 = 4, because two and two make four.")]
    result = run_protocol(runner, persona, [TURNS[:2]], [0, 2], capability=exchanges, capability_tokens=12,
                          progress=False)
    metrics = summarize(result, [0, 2])["metrics"]
    control_kl, persona_kl = metrics["capability/kl_to_base_control"]["mean"], metrics["capability/kl_to_base"]["mean"]
    assert control_kl[0] == pytest.approx(0.0, abs=1e-6)  # the base model, no persona, no history: the reference
    assert persona_kl[0] > 1e-3 and control_kl[1] > 1e-3  # a persona, or history, moves the distribution
    assert all(p > 1 for p in metrics["capability/perplexity"]["mean"])


@pytest.mark.parametrize("name,kind", [("tiny-llama", "none"), ("tiny-llama", "lyra:0,2"), ("tiny-llama", "triplet"),
                                       ("tiny-llama", "repeat"), ("tiny-llama", "split_softmax"),
                                       ("tiny-llama", "instaboost"), ("tiny-gemma3", "lyra")])
def test_personas_mixed_in_one_batch_equal_each_persona_alone(backbone_factory, name, kind):
    """run_personas batches conversations of different personas together (system prompts and probes of
    different lengths; a batch holds the end of one persona and the start of the next): every arm's answers,
    verdicts, margins and capability equal each persona's protocol run alone, one conversation at a time."""
    import dataclasses

    from persona_lit.evaluation.protocol import run_personas, run_protocol

    bb = backbone_factory(name, **({"tiny.sliding_window": 4096} if name == "tiny-gemma3" else {}))
    model, mech = mechanism_for(bb, kind)
    personas = [dataclasses.replace(p, probes=p.probes[:n]) for p, n in
                zip(map(load_persona, ["joyful_writer", "stoic", "botanist"]), [2, 1, 3])]
    personas = personas[:2] if name == "tiny-gemma3" else personas  # its 262k-token vocabulary is slow on a CPU
    exchanges = [("What is 2 + 2?", "2 + 2 = 4.")]
    streams = STREAMS[:2]

    def runner(probe_batch):
        return EarlyEndRunner(model, bb.chat, mech, max_new_tokens=8, probe_max_new_tokens=5, probe_batch=probe_batch)

    common = dict(probe_turns=[0, 2, 3], progress=False, capability=exchanges, capability_tokens=6, bleed=True)
    mixed = run_personas(runner(3), personas, streams, batch=3, **common)  # a batch straddles two personas
    assert len(mixed) == len(personas)
    for persona, together in zip(personas, mixed):
        alone = run_protocol(runner(1), persona, streams, batch=1, **common)
        for arm in ("persona_arm", "baseline_arm", "control_arm", "bleed_arm"):
            a_arm, b_arm = getattr(together, arm), getattr(alone, arm)
            assert len(a_arm) == len(b_arm) == (0 if kind == "none" and arm in ("baseline_arm", "bleed_arm") else 2)
            for rows, single in zip(a_arm, b_arm):
                assert [r.answer for r in rows] == [r.answer for r in single], (persona.key, arm)
                assert [r.history_tokens for r in rows] == [r.history_tokens for r in single]
                assert {r.persona for r in rows} == {persona.key}
                for a, b in zip(rows, single):
                    assert [(p.question, p.answer, p.passed) for p in a.probes] == \
                        [(p.question, p.answer, p.passed) for p in b.probes]
                    assert [p.margin for p in a.probes] == pytest.approx([p.margin for p in b.probes], abs=1e-4)
                    if b.capability is not None:
                        assert a.capability == pytest.approx(b.capability, abs=1e-4)
                        assert torch.allclose(a.reply_state, b.reply_state, atol=1e-4)
