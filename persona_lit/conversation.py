"""Multi-turn conversation runner: the KV cache is reused across turns, probes run on a fork of it.

History is never re-encoded: each turn feeds only its new tokens (the user turn and the assistant
header) on top of the cache, then generates. A probe copies the cache, asks its question, and the
copy is dropped, so the probe and its answer never enter the main history.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from persona_lit.chat import ChatTokenizer
from persona_lit.mechanisms.base import Mechanism
from persona_lit.personas import Persona, Probe


@dataclass
class ProbeResult:
    turn: int
    question: str
    kind: str
    answer: str
    passed: bool
    margin: float | None = None  # mean log p per token: persona answer minus default-assistant answer


@dataclass
class TurnRecord:
    turn: int
    user: str
    answer: str
    category: str
    history_tokens: int
    probes: list[ProbeResult] = field(default_factory=list)
    reply_state: torch.Tensor | None = None  # (layers, hidden) at the start of the reply, mean over probes


class Conversation:
    """One conversation's token history and the model's cache of it."""

    def __init__(self, system_prompt: str | None):
        self.system_prompt = system_prompt
        self.ids: list[int] = []
        self.cache: Any = None  # a transformers Cache covering all of self.ids between turns
        self.open_turn = False  # Gemma: the persona left the first user turn open

    def fork(self) -> "Conversation":
        other = Conversation(self.system_prompt)
        other.ids, other.cache, other.open_turn = list(self.ids), copy.deepcopy(self.cache), self.open_turn
        return other


class ConversationRunner:
    def __init__(self, model: torch.nn.Module, chat: ChatTokenizer, mechanism: Mechanism | None = None,
                 max_new_tokens: int = 64, probe_max_new_tokens: int = 48, do_sample: bool = False,
                 temperature: float = 0.7, top_p: float = 0.95):
        self.model, self.chat, self.mechanism = model, chat, mechanism
        self.max_new_tokens, self.probe_max_new_tokens = max_new_tokens, probe_max_new_tokens
        self.sampling = dict(do_sample=do_sample, temperature=temperature, top_p=top_p) if do_sample else dict(do_sample=False)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _cached(self, conv: Conversation) -> int:
        return 0 if conv.cache is None else conv.cache.get_seq_length()

    @torch.no_grad()
    def extend(self, conv: Conversation, ids: list[int]) -> None:
        """Adds `ids` to the history and runs every not-yet-cached token through the model once."""
        conv.ids += ids
        todo = conv.ids[self._cached(conv):]
        if not todo:
            return
        out = self.model(input_ids=torch.tensor([todo], device=self.device),
                         attention_mask=torch.ones(1, len(conv.ids), dtype=torch.long, device=self.device),
                         past_key_values=conv.cache, use_cache=True)
        conv.cache = out.past_key_values

    def start(self, persona: Persona | None) -> Conversation:
        """A new conversation holding the persona segment (run through the model once)."""
        system = persona.system_prompt if persona else None
        if self.mechanism is not None:
            self.mechanism.begin_conversation(persona)
        conv = Conversation(system)
        conv.open_turn = self.chat.opens_user_turn(system)
        self.extend(conv, self.chat.persona_ids(system))
        return conv

    @torch.no_grad()
    def say(self, conv: Conversation, user_text: str, max_new_tokens: int | None = None) -> str:
        """Appends one user turn and the model's answer to `conv`; returns the answer text."""
        if not conv.ids:
            self.extend(conv, self.chat.persona_ids(conv.system_prompt))
            conv.open_turn = self.chat.opens_user_turn(conv.system_prompt)
        if self.mechanism is not None:
            self.mechanism.begin_turn()
        conv.ids += self.chat.user_turn_ids(user_text, conv.open_turn)
        conv.open_turn = False
        input_ids = torch.tensor([conv.ids], device=self.device)
        out = self.model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), past_key_values=conv.cache,
            max_new_tokens=max_new_tokens or self.max_new_tokens, eos_token_id=[self.chat.end_id],
            pad_token_id=self.chat.pad_id, return_dict_in_generate=True, **self.sampling,
        )
        new = out.sequences[0, input_ids.shape[1] :].tolist()
        if new and new[-1] == self.chat.end_id:
            new = new[:-1]
        conv.cache = out.past_key_values
        conv.ids += new
        # Close the answer and cache it now, so the next turn starts from a fully cached history.
        self.extend(conv, self.chat.close_assistant())
        return self.chat.decode(new)

    @torch.no_grad()
    def score(self, conv: Conversation, question: str, answer: str) -> tuple[float, torch.Tensor]:
        """(mean log p per token of `answer` after `question`, hidden states (layers, hidden) at the start
        of the reply), by one forward on a fork: nothing is generated and nothing enters the history."""
        fork = conv.fork()
        if self.mechanism is not None:
            self.mechanism.begin_turn()
        prompt = self.chat.user_turn_ids(question, fork.open_turn)
        target = self.chat._ids(answer) + [self.chat.end_id]
        ids = prompt + target
        out = self.model(input_ids=torch.tensor([ids], device=self.device), past_key_values=fork.cache,
                         attention_mask=torch.ones(1, len(fork.ids) + len(ids), dtype=torch.long, device=self.device),
                         use_cache=True, output_hidden_states=True)
        logp = torch.log_softmax(out.logits[0, len(prompt) - 1 : -1].float(), -1)
        mean_logp = float(logp.gather(1, torch.tensor(target, device=self.device)[:, None]).mean())
        start = len(prompt) - 1
        return mean_logp, torch.stack([h[0, start].float().cpu() for h in out.hidden_states[1:]])

    def _on_fork(self, fn, *args):
        state = self.mechanism.snapshot() if self.mechanism is not None else None
        try:
            return fn(*args)
        finally:
            if self.mechanism is not None:
                self.mechanism.restore(state)  # the probe's turn never reaches the main conversation

    def probe(self, conv: Conversation, probes: Sequence[Probe], turn: int) -> tuple[list[ProbeResult], torch.Tensor | None]:
        results, states = [], []
        for p in probes:
            answer = self._on_fork(self.say, conv.fork(), p.question, self.probe_max_new_tokens)
            logp_persona, state = self._on_fork(self.score, conv, p.question, p.persona_answer)
            margin = None
            if p.persona_answer and p.assistant_answer:
                margin = logp_persona - self._on_fork(self.score, conv, p.question, p.assistant_answer)[0]
            states.append(state)
            results.append(ProbeResult(turn, p.question, p.kind, answer, bool(p.check(answer)), margin))
        return results, torch.stack(states).mean(0) if states else None

    def run(self, persona: Persona | None, user_turns: Iterable[Any], probe_turns: Sequence[int],
            probes: Sequence[Probe] | None = None, progress: bool = True, desc: str = "conversation") -> list[TurnRecord]:
        """Turn 0 is the persona alone (probes only); user turn k is turn k. `user_turns` yields objects
        with `.text` and `.category` (MT-bench UserTurns) or plain strings. `probes` defaults to the
        persona's; pass them with persona=None for the control arm."""
        conv = self.start(persona)
        probes = list(probes if probes is not None else (persona.probes if persona else []))
        records = [TurnRecord(0, "", "", "", len(conv.ids))]
        if 0 in probe_turns:
            records[0].probes, records[0].reply_state = self.probe(conv, probes, 0)
        turns = list(user_turns)
        for t, turn in enumerate(tqdm(turns, desc=desc, unit="turn", disable=not progress), start=1):
            text, category = (turn, "") if isinstance(turn, str) else (turn.text, turn.category)
            answer = self.say(conv, text)
            record = TurnRecord(t, text, answer, category, len(conv.ids))
            if t in probe_turns:
                record.probes, record.reply_state = self.probe(conv, probes, t)
            records.append(record)
        return records
