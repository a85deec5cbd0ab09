"""Probes and scoring on forks of a conversation, batched: what the drift protocol measures at a turn.

Every probe question of every conversation is one row of a forked batch, `probe_batch` rows at a time; nothing
asked here enters the main history. Items go in waves (every row's first item, then every row's second, ...), so
a chunk that holds each row once runs on the conversation itself and is rolled back after (no copy of the cache),
and other chunks copy only their rows (ConversationRunner.on_fork). Scoring pads on the right, so each row's real
tokens are computed exactly as alone.

Capability cost: a few neutral exchanges (an MT-bench question and its reference answer) are scored at
each probe turn. `kl_to_base` is KL(P_model || P_base) over the reference answer's tokens, where P_base
is the base model with no persona and no history; `nll` is the reference answer's mean negative log
likelihood (perplexity = exp). In the control arm the same numbers measure what history alone does.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch

from persona_lit.evaluation.choice import outcome as choice_outcome
from persona_lit.personas.types import Probe


@dataclass
class ProbeResult:
    turn: int
    question: str
    kind: str
    answer: str
    passed: bool
    margin: float | None = None  # mean log p per token: persona answer minus default-assistant answer
    log_odds: float | None = None  # a forced-choice probe's log-odds over chance (evaluation/choice.py)


@dataclass(frozen=True)
class ScoreItem:
    row: int  # the conversation (row) to score after
    question: str
    answer: str
    max_tokens: int | None = None  # None: the whole answer and the end token
    keep_logprobs: bool = False


@dataclass
class Scored:
    mean_logp: float  # mean log p per answer token
    state: torch.Tensor  # (layers, hidden) at the start of the reply
    logprobs: torch.Tensor | None = None  # (answer tokens, vocab), if asked for


def _kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per position from log-probabilities over the vocabulary; rounding can make a KL of two equal
    distributions a hair below 0, which is no KL: clamped at 0."""
    return (logp.exp() * (logp - logq)).sum(-1).clamp(min=0.0)


def per_row_probes(probes: Sequence[Probe] | Sequence[Sequence[Probe]], rows: int) -> list[list[Probe]]:
    """Probes for every row (a flat sequence), or already one list per row."""
    if any(isinstance(p, (list, tuple)) for p in probes):
        if len(probes) != rows:
            raise ValueError(f"probe lists for {len(probes)} rows, the conversation has {rows}")
        return [list(p) for p in probes]
    return [list(probes)] * rows


def by_wave(rows: Sequence[Sequence]) -> list:
    """Every row's items, the first item of each row first, then the second, ...: a chunk of conv.rows items then
    covers rows 0..rows-1 in order and runs on the conversation itself (no copy of the cache: on_fork)."""
    return [row[j] for j in range(max((len(r) for r in rows), default=0)) for row in rows if j < len(row)]


def _chunks(items: list, size: int):
    for i in range(0, len(items), size):
        yield items[i : i + size]


class Probing:
    """Mixed into ConversationRunner (which provides model, chat, mechanism, on_fork, say, forward_new)."""

    def score(self, conv, items: Sequence[ScoreItem]) -> list[Scored]:
        """Log-probabilities of fixed answers, by forward passes on forks: nothing is generated."""
        out: list[Scored] = []
        for chunk in _chunks(list(items), self.fork_rows(conv)):
            out += self.on_fork(conv, [it.row for it in chunk], self._score_fork, chunk)
        return out

    @torch.no_grad()
    def _score_fork(self, fork, chunk: list[ScoreItem]) -> list[Scored]:
        if self.mechanism is not None:
            self.mechanism.begin_turn()
        pending = fork.tokens.shape[1] - self._cached(fork)  # slots fed before the prompts (an answer's closing)
        prompts = [self.chat.user_turn_ids(it.question, fork.open_turn) for it in chunk]
        targets = [self.chat._ids(it.answer)[: it.max_tokens] if it.max_tokens else
                   self.chat._ids(it.answer) + [self.chat.end_id] for it in chunk]
        fork.append([p + t for p, t in zip(prompts, targets)], self.chat.pad_id, pad_left=False)
        extra = {}
        if getattr(self.mechanism, "uses_assistant_mask", False):  # e.g. steer positions=response: the scored
            width = pending + max(len(p) + len(t) for p, t in zip(prompts, targets))
            answer = torch.zeros(len(chunk), width, dtype=torch.bool)
            for i, (p, t) in enumerate(zip(prompts, targets)):  # answer is the response, as if generated
                answer[i, pending + len(p) : pending + len(p) + len(t)] = True
            extra["assistant_mask"] = answer.to(self.device)
        result = self.forward_new(fork, output_hidden_states=True, **extra)
        scored = []
        for i, (prompt, target) in enumerate(zip(prompts, targets)):
            start = pending + len(prompt) - 1
            logp = torch.log_softmax(result.logits[i, start : start + len(target)].float(), -1)
            token_logp = logp.gather(1, torch.tensor(target, device=logp.device)[:, None])
            state = torch.stack([h[i, start].float().cpu() for h in result.hidden_states[1:]])
            scored.append(Scored(float(token_logp.mean()), state, logp.cpu() if chunk[i].keep_logprobs else None))
        return scored

    def probe(self, conv, probes: Sequence[Probe] | Sequence[Sequence[Probe]],
              turn: int) -> list[tuple[list[ProbeResult], torch.Tensor | None]]:
        """Per conversation: every probe (the same for every row, or a list per row) answered (generated) and
        scored, and the mean reply-start state (None for a row without probes). A forced-choice probe (one with
        `choices`) is scored only: its candidates teacher-forced, the highest mean log p per token is its answer."""
        rows = per_row_probes(probes, conv.rows)
        pairs = by_wave([[(b, p) for p in row] for b, row in enumerate(rows)])
        if not pairs:
            return [([], None) for _ in range(conv.rows)]
        asked = [(b, p) for b, p in pairs if not p.choices]
        generated: list[str] = []
        for chunk in _chunks(asked, self.fork_rows(conv)):
            generated += self.on_fork(conv, [b for b, _ in chunk], self.say, [p.question for _, p in chunk],
                                      self.probe_max_new_tokens, close=False)
        answers = iter(generated)
        candidates = [[p.persona_answer, *p.choices] if p.choices else [p.persona_answer, p.assistant_answer]
                      for _, p in pairs]
        where = [(k, j) for j in range(max(map(len, candidates))) for k, texts in enumerate(candidates)
                 if j < len(texts)]  # every pair's first candidate, then every second, ...: waves of rows (by_wave)
        scored = self.score(conv, [ScoreItem(pairs[k][0], pairs[k][1].question, candidates[k][j]) for k, j in where])
        per_pair: list[list[Scored]] = [[None] * len(texts) for texts in candidates]  # type: ignore[list-item]
        for (k, j), s in zip(where, scored):
            per_pair[k][j] = s
        out: list[tuple[list[ProbeResult], list[torch.Tensor]]] = [([], []) for _ in range(conv.rows)]
        for (b, p), texts, scores in zip(pairs, candidates, per_pair):
            results, states = out[b]
            if p.choices:
                passed, log_odds, best = choice_outcome([s.mean_logp for s in scores])
                results.append(ProbeResult(turn, p.question, p.kind, texts[best], passed, None, log_odds))
                continue
            answer = next(answers)
            margin = scores[0].mean_logp - scores[1].mean_logp if p.persona_answer and p.assistant_answer else None
            results.append(ProbeResult(turn, p.question, p.kind, answer, bool(p.check(answer)), margin))
            states.append(scores[0].state)
        return [(results, torch.stack(states).mean(0) if states else None) for results, states in out]

    def prepare_references(self, exchanges: Sequence[tuple[str, str]], max_tokens: int) -> None:
        """The base model's log-probs on each reference answer, with no persona and no history. Call it
        outside any disabled() context (mechanisms' off switches do not nest)."""
        self.capability_tokens = max_tokens
        todo = [(q, a) for q, a in exchanges if (q, a, max_tokens) not in self.references]
        if not todo:
            return
        with self.mechanism.disabled() if self.mechanism is not None else contextlib.nullcontext():
            conv = self.start(None)
            scored = self.score(conv, [ScoreItem(0, q, a, max_tokens, True) for q, a in todo])
        for (q, a), s in zip(todo, scored):
            self.references[(q, a, max_tokens)] = s.logprobs

    def capability_cost(self, conv, exchanges: Sequence[tuple[str, str]],
                        against: Sequence[list[torch.Tensor] | None] | None = None,
                        keep: bool = False) -> tuple[list[dict[str, float]], list[list[torch.Tensor]] | None]:
        """(per conversation: mean KL to the base model and mean NLL over the exchanges' answer tokens, and with
        `against` (per row, another arm's log-probs on the same exchanges after the same history, or None)
        `kl_to_none`, the mean KL to that arm; with `keep`, each row's log-probs per exchange, else None)."""
        n = self.capability_tokens
        items = [ScoreItem(b, q, a, n, True) for q, a in exchanges for b in range(conv.rows)]
        scored = self.score(conv, items)
        out, kept = [], []
        for b in range(conv.rows):
            kls, nlls, mine = [], [], []
            for it, s in zip(items, scored):
                if it.row != b:
                    continue
                ref = self.references[(it.question, it.answer, n)]
                kls.append(_kl(s.logprobs, ref))
                nlls.append(-s.mean_logp * len(ref))
                mine.append(s.logprobs)
            tokens = sum(len(k) for k in kls)
            cost = {"kl_to_base": float(torch.cat(kls).mean()), "nll": sum(nlls) / tokens}
            other = against[b] if against is not None else None
            if other is not None:
                cost["kl_to_none"] = float(torch.cat([_kl(p, q) for p, q in zip(mine, other)]).mean())
            out.append(cost)
            kept.append(mine)
        return out, kept if keep else None
