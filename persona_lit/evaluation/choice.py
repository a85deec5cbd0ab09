"""Forced-choice probes: does the model, at this point of the conversation, prefer its persona's own identity
over other personas' and over the default assistant's? A number for every persona with a name or identity probe,
even where a small model cannot generate the answer.

For each evaluated persona with a `name` or `identity` probe, a probe of kind `choice` asks that probe's question
and scores, teacher-forced on forks (no decoding), the persona's own reference answer against `distractors`
reference answers of other evaluated personas (the same probe kind, the same source first; drawn with a seed from
(seed, persona key)) and the default assistant's answer. The candidates' scores are their mean log-probability per
token (length-normalized: a Synthetic-Persona-Chat fact list and "I am a pirate." compete fairly). Per probe:

- passed (`adherence/choice`): the persona's own answer scores highest (chance 1 / candidates);
- log-odds over chance (`choice/log_odds`): with p the softmax of the scores over the candidates,
  log(p_own / (1 - p_own)) - log(1 / (candidates - 1)); 0 at chance, > 0 above.

Li et al. 2024 prompts (instructions, not identities) and a persona evaluated alone get no choice probe.
"""

from __future__ import annotations

import dataclasses
import math
import random
from typing import Sequence

from persona_lit.personas.types import Persona, Probe

KIND = "choice"
SOURCE_KINDS = ("name", "identity")  # probes whose reference answer states who the persona is
DEFAULT_IDENTITY = "I am an AI assistant, here to help you with your questions."


def _source_probe(persona: Persona) -> Probe | None:
    return next((p for kind in SOURCE_KINDS for p in persona.probes if p.kind == kind and p.persona_answer), None)


def _source_of(key: str) -> str:
    return key.split(":", 1)[0] if ":" in key else "pack"


def with_choice_probes(personas: Sequence[Persona], distractors: int, seed: int | None) -> list[Persona]:
    """The personas, each with one `choice` probe added where it has a name or identity probe and another
    evaluated persona gives a distractor (distractors=0: unchanged)."""
    if distractors <= 0:
        return list(personas)
    own = {p.key: _source_probe(p) for p in personas}
    out = []
    for persona in personas:
        probe = own[persona.key]
        if probe is None:
            out.append(persona)
            continue
        others = [(k, q) for k, q in own.items() if k != persona.key and q is not None and q.kind == probe.kind
                  and q.persona_answer.strip() != probe.persona_answer.strip()]
        rng = random.Random(f"persona_lit.choice:{seed}:{persona.key}")  # str seeds are stable
        rng.shuffle(others)
        others.sort(key=lambda kq: _source_of(kq[0]) != _source_of(persona.key))  # stable: same source first
        wrong = tuple(dict.fromkeys(q.persona_answer for _, q in others[:distractors]))
        if not wrong:
            out.append(persona)
            continue
        default = probe.assistant_answer or DEFAULT_IDENTITY
        choice = Probe(probe.question, probe.check, KIND, probe.persona_answer, default, wrong + (default,))
        out.append(dataclasses.replace(persona, probes=persona.probes + (choice,)))
    return out


def outcome(scores: Sequence[float]) -> tuple[bool, float, int]:
    """(own answer strictly highest, log-odds over chance, index of the highest) of candidate scores, own first."""
    n = len(scores)
    top = max(scores)
    weights = [math.exp(s - top) for s in scores]
    p_own = weights[0] / sum(weights)
    p_own = min(max(p_own, 1e-12), 1 - 1e-12)
    log_odds = math.log(p_own / (1 - p_own)) - math.log(1 / (n - 1))
    best = max(range(n), key=lambda i: scores[i])
    return scores[0] > max(scores[1:]), log_odds, best
