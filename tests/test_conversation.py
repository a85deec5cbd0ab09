"""The conversation runner reuses the KV cache across turns; that must equal re-encoding the history."""

import pytest
import torch

from persona_lit.conversation import Conversation, ConversationRunner
from persona_lit.mechanisms.none import NoMechanism
from persona_lit.personas import load_persona

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
    with_probes = runner.run(persona, TURNS[:3], probe_turns=[0, 1, 2, 3], progress=False)
    without = runner.run(persona, TURNS[:3], probe_turns=[], progress=False)
    assert [r.answer for r in with_probes] == [r.answer for r in without]
    assert [r.history_tokens for r in with_probes] == [r.history_tokens for r in without]
    assert [len(r.probes) for r in with_probes] == [len(persona.probes)] * 4
    # a probe answer at turn 0 is the answer to persona + probe alone
    ids, answers = naive_transcript(bb.model, bb.chat, persona.system_prompt, [persona.probes[0].question], 6)
    assert with_probes[0].probes[0].answer == bb.chat.decode(answers[0])
