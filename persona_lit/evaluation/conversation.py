"""Multi-turn conversations, several at once: the KV cache is reused across turns, probes run on forks.

History is never re-encoded: each turn feeds only its new tokens (the user turn and the assistant
header) on top of the cache, then decodes. An answer's closing tokens (its last token, the end of turn) are fed
with the next forward, the next turn's prompt or a probe's, as `generate` on the whole history would; only for a
mechanism whose state depends on the turn a token is fed in (Mechanism.turn_bound: Lyra, Triplet, steer) are they
fed at once, in a call of their own. A probe's answer on a fork is never closed (the fork is thrown away). (Exception:
a mechanism with `clean_history`, e.g. steering of the current turn only, gets each finished turn rolled back in the
cache and fed again with it disabled.) Several conversations are one padded batch: a row's slots are tokens or
padding, `mask` says which are real, and positions count real tokens only, so a row is the same conversation it
would be alone. (Exception: a sliding-window layer in transformers counts the padded slots inside its window, so on
Gemma-3 a batched row sees a few fewer old tokens there.) The cache's full-attention layers grow in place
(models/kv_cache.py), so a decoded token costs no copy of the history.

Decoding is our own short loop rather than `model.generate`: a row that has finished feeds padding
that is *masked*, so no mechanism ever stores tokens produced after a row's end of answer.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import torch
from tqdm.auto import tqdm

from persona_lit.models.backbones import compute_context, input_device, mixed_dtype
from persona_lit.models.kv_cache import new_cache, roll_back, rollback_point, select_rows
from persona_lit.models.shared_prefix import can_share, share_rows, sharing
from persona_lit.models.chat import ChatTokenizer
from persona_lit.mechanisms.base import Mechanism
from persona_lit.personas.types import Persona, Probe
from persona_lit.evaluation.probing import Probing, ProbeResult, per_row_probes


def per_row(value: Any, rows: int) -> list:
    """`value` for every one of `rows` rows, or already one per row (a list or tuple of `rows` entries)."""
    if isinstance(value, (list, tuple)):
        if len(value) != rows:
            raise ValueError(f"{len(value)} values for {rows} rows")
        return list(value)
    return [value] * rows


@dataclass
class TurnRecord:
    turn: int
    user: str
    answer: str
    category: str
    history_tokens: int
    probes: list[ProbeResult] = field(default_factory=list)
    reply_state: torch.Tensor | None = None  # (layers, hidden) at the start of the reply, mean over probes
    capability: dict[str, float] | None = None  # kl_to_base, nll on reference answers (see probing.py)
    judge: dict[str, float] | None = None  # persona, coherence 0-100 from an optional LLM judge (judge.py)
    persona: str = ""  # the persona whose probes were asked (set by the drift protocol)
    answer_ids: list[int] | None = None  # the answer's tokens (a replay transcript is made of them)
    capability_logprobs: list[torch.Tensor] | None = None  # kept for another arm's kl_to_none (run(keep_logprobs))
    stopped: str = ""  # on a conversation's last record: why no further turn ran (the context limit), if so
    seconds: float | None = None  # wall-clock seconds of this turn's answers, whole batch, no probes; turn 0: None


class Conversation:
    """`rows` conversations, as token slots [rows, S] and a real-token mask. `system_prompt`: one for every row, or
    a list with one per row (several personas in one batch)."""

    def __init__(self, system_prompt: str | None | Sequence[str | None], rows: int = 1):
        self.system_prompt = system_prompt
        self.tokens = torch.zeros(rows, 0, dtype=torch.long)
        self.mask = torch.zeros(rows, 0, dtype=torch.bool)
        self.cache: Any = None  # a transformers Cache covering the first cached_len slots
        self.open_turn = False  # Gemma: the persona left the first user turn open
        self.last_answer_ids: list[list[int]] | None = None  # the answers of the last say(), as tokens

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def system_prompts(self) -> list[str | None]:
        """Each row's system prompt."""
        return per_row(self.system_prompt, self.rows)

    def row_ids(self, row: int) -> list[int]:
        return self.tokens[row][self.mask[row]].tolist()

    @property
    def ids(self) -> list[int]:
        """The real tokens of the first (often only) conversation."""
        return self.row_ids(0)

    def append(self, rows: Sequence[Sequence[int]], pad_id: int, pad_left: bool = True) -> None:
        """New tokens per row, padded to one width: on the left by default, so every row ends with real
        tokens (the model continues all rows from their last column)."""
        width = max(len(r) for r in rows)
        tokens = torch.full((self.rows, width), pad_id, dtype=torch.long)
        mask = torch.zeros(self.rows, width, dtype=torch.bool)
        for b, r in enumerate(rows):
            cols = slice(width - len(r), width) if pad_left else slice(0, len(r))
            tokens[b, cols], mask[b, cols] = torch.tensor(r, dtype=torch.long), True
        self.tokens, self.mask = torch.cat([self.tokens, tokens], 1), torch.cat([self.mask, mask], 1)

    def select(self, index: torch.Tensor, device: torch.device | str = "cpu") -> "Conversation":
        """Rows `index` (repeats allowed) as a new conversation with its own copy of the cache."""
        return self._rows(index, select_rows(self.cache, index.to(device)))

    def share(self, index: torch.Tensor, device: torch.device | str = "cpu") -> "Conversation":
        """Rows `index` (repeats allowed) as a fork that reads this conversation's cache in place and caches only
        what it adds (models/shared_prefix.py); this conversation must not change while the fork is used."""
        return self._rows(index, share_rows(self.cache, index.to(device)))

    def _rows(self, index: torch.Tensor, cache: Any) -> "Conversation":
        system = self.system_prompt
        if isinstance(system, (list, tuple)):
            system = [system[i] for i in index.tolist()]
        other = Conversation(system, 0)
        other.tokens, other.mask, other.open_turn = self.tokens[index], self.mask[index], self.open_turn
        other.cache = cache
        return other


@contextlib.contextmanager
def native_gqa(device: torch.device, width: int):
    """On the CPU, a masked call of `width` > 1 new tokens attends with grouped K/V heads natively (`enable_gqa`,
    transformers' own switch TRANSFORMERS_SDPA_FORCE_GQA) instead of copying them to every query head (`repeat_kv`):
    the same values bit for bit on the CPU (tests/test_engine.py), 2x faster at 60 new tokens over 5k in fp32. A
    one-token call keeps transformers' own path (the query heads packed per K/V head), which is faster there (5x in
    bf16: the CPU's enable_gqa kernel is slow for a single query). On CUDA transformers' choice stands."""
    if device.type != "cpu" or width <= 1 or os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA") is not None:
        yield
        return
    os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] = "1"
    try:
        yield
    finally:
        del os.environ["TRANSFORMERS_SDPA_FORCE_GQA"]


class ConversationRunner(Probing):
    def __init__(self, model: torch.nn.Module, chat: ChatTokenizer, mechanism: Mechanism | None = None,
                 max_new_tokens: int = 64, probe_max_new_tokens: int = 48, do_sample: bool = False,
                 temperature: float = 0.7, top_p: float = 0.95, probe_batch: int = 8, min_new_tokens: int = 0,
                 max_context: int | None = None, share_forks: bool = True):
        self.model, self.chat, self.mechanism = model, chat, mechanism
        self.max_context = max_context  # None: the model's config.max_position_embeddings (context_limit)
        self.max_new_tokens, self.probe_max_new_tokens = max_new_tokens, probe_max_new_tokens
        self.do_sample, self.temperature, self.top_p = do_sample, temperature, top_p
        self.min_new_tokens = min_new_tokens  # benchmarks: equal work per turn (the end token is held back)
        self.probe_batch = max(1, int(probe_batch))  # rows per forked forward (bounds the copied caches)
        self.references: dict[tuple, torch.Tensor] = {}  # capability: base-model log-probs per exchange
        self._mixed = mixed_dtype(model) if model is not None else None  # a bf16 base with float32 trainables
        self.share_forks = share_forks  # probe forks read the conversation's cache in place where they can

    @property
    def device(self) -> torch.device:
        """Where every tensor given to the model goes. The token bookkeeping (Conversation.tokens/mask,
        decoded tokens, sampling) stays on the CPU; forward_new moves the slots it feeds."""
        return input_device(self.model)

    def _cached(self, conv: Conversation) -> int:
        return 0 if conv.cache is None else conv.cache.get_seq_length()

    @torch.no_grad()
    def forward_new(self, conv: Conversation, **kwargs) -> Any:
        """Runs every not-yet-cached slot through the model once; returns the model output (or None)."""
        start = self._cached(conv)
        if start == conv.tokens.shape[1]:
            return None
        if conv.cache is None:
            conv.cache = new_cache(self.model)
        mask = conv.mask.to(self.device)
        positions = (mask.long().cumsum(1) - 1).clamp(min=0)[:, start:]
        with native_gqa(self.device, conv.tokens.shape[1] - start), compute_context(self.model, self._mixed):
            out = self.model(input_ids=conv.tokens[:, start:].to(self.device), attention_mask=mask.long(),
                             position_ids=positions, past_key_values=conv.cache, use_cache=True, **kwargs)
        conv.cache = out.past_key_values
        return out

    def extend(self, conv: Conversation, ids: Sequence[int] | Sequence[Sequence[int]]) -> None:
        """Adds `ids` (the same for every row, or one list per row) to the history and caches them."""
        rows = ids if ids and isinstance(ids[0], (list, tuple)) else [list(ids)] * conv.rows
        conv.append(rows, self.chat.pad_id)
        self.forward_new(conv, logits_to_keep=1)

    def start(self, persona: Persona | None | Sequence[Persona | None], rows: int = 1) -> Conversation:
        """`rows` new conversations holding the persona segment (run through the model once); `persona`: one for
        every row, or a list with one per row (the mechanism is told so: Mechanism.begin_conversation)."""
        if self.mechanism is not None:
            self.mechanism.begin_conversation(persona)
        system = [p.system_prompt if p else None for p in persona] if isinstance(persona, (list, tuple)) else (
            persona.system_prompt if persona else None)
        conv = Conversation(system, rows)
        self._open(conv)
        return conv

    def _open(self, conv: Conversation) -> None:
        """Feeds each row's persona segment (the first tokens of a conversation)."""
        systems = conv.system_prompts
        opens = {self.chat.opens_user_turn(s) for s in systems}
        if len(opens) > 1:
            raise ValueError("rows with and without a system prompt cannot share a batch on this chat format")
        ids = self.chat.persona_ids(systems[0]) if len(set(systems)) == 1 else [
            self.chat.persona_ids(s) for s in systems]
        with self._history_context():
            self.extend(conv, ids)
        conv.open_turn = opens.pop()

    def _clean(self) -> bool:
        return self.mechanism is not None and self.mechanism.clean_history

    def _history_context(self):
        """Where history is cached: with the mechanism disabled when it asks for a clean history."""
        return self.mechanism.disabled() if self._clean() else contextlib.nullcontext()

    def user_turn_ids(self, text: str, open_turn: bool, reminder: str | None = None) -> list[int]:
        """One user turn; a `reminder` (Mechanism.turn_prefix) before it as a system message, or at the start of
        the user message where the chat format has no system role mid-conversation (Gemma) or the turn is open."""
        if reminder is None:
            return self.chat.user_turn_ids(text, open_turn)
        if open_turn or self.chat.fmt.system_in_first_user:
            return self.chat.user_turn_ids(f"{reminder}\n\n{text}", open_turn)
        return self.chat.message_ids("system", reminder)[0] + self.chat.user_turn_ids(text)

    @torch.no_grad()
    def say(self, conv: Conversation, user_text: str | Sequence[str], max_new_tokens: int | None = None,
            reminder: str | None | Sequence[str | None] = None, close: bool = True,
            given: Sequence[Sequence[int]] | None = None) -> list[str]:
        """Appends one user turn per row (one text for all, or one each) and the model's answers; `reminder`: a
        system prompt re-inserted before the turn (see user_turn_ids), one for all rows or one each. `close=False`
        (a probe on a fork that is thrown away): the answers are not closed and the turn is not re-encoded.
        `given`: each row's answer tokens, read teacher-forced instead of generated (protocol=replay). The answers'
        tokens (without the end token) are left in conv.last_answer_ids."""
        if conv.tokens.shape[1] == 0:
            self._open(conv)
        if self.mechanism is not None:
            self.mechanism.begin_turn()
        mark = rollback_point(conv.cache) if self._clean() and close else None
        texts, reminders = per_row(user_text, conv.rows), per_row(reminder, conv.rows)
        conv.append([self.user_turn_ids(t, conv.open_turn, r) for t, r in zip(texts, reminders)], self.chat.pad_id)
        conv.open_turn = False
        answers = self._decode(conv, max_new_tokens or self.max_new_tokens) if given is None else \
            self._teacher_force(conv, given)
        conv.last_answer_ids = answers
        if not close:
            return [self.chat.decode(a) for a in answers]
        conv.append([self.chat.close_assistant()] * conv.rows, self.chat.pad_id)  # fed later, or now if turn-bound
        if mark is not None:  # clean history: the finished turn is cached again, unsteered
            conv.cache = roll_back(conv.cache, mark)
            with self.mechanism.disabled():
                self.forward_new(conv, logits_to_keep=1)
        elif self.mechanism is not None and self.mechanism.turn_bound:
            self.forward_new(conv, logits_to_keep=1)
        return [self.chat.decode(a) for a in answers]

    def _teacher_force(self, conv: Conversation, given: Sequence[Sequence[int]]) -> list[list[int]]:
        """Each row's given answer read as if it had been generated: the prompt is fed, the mechanism told the
        answer begins, then the answer's tokens (padding after a shorter row's, as _decode leaves it; the last
        token uncached, as _decode leaves it)."""
        answers = [list(a) for a in per_row(list(given), conv.rows)]
        self.forward_new(conv, logits_to_keep=1)
        if self.mechanism is not None:
            self.mechanism.begin_answer()
        width = max((len(a) for a in answers), default=0)
        if width == 0:
            return answers
        conv.append(answers, self.chat.pad_id, pad_left=False)
        slots = conv.tokens.shape[1] - 1  # the last slot stays uncached
        if slots > self._cached(conv):
            last_tokens, last_mask = conv.tokens[:, -1:], conv.mask[:, -1:]
            conv.tokens, conv.mask = conv.tokens[:, :-1], conv.mask[:, :-1]
            self.forward_new(conv, logits_to_keep=1)
            conv.tokens, conv.mask = torch.cat([conv.tokens, last_tokens], 1), torch.cat([conv.mask, last_mask], 1)
        return answers

    def _decode(self, conv: Conversation, max_new_tokens: int) -> list[list[int]]:
        """Greedy or sampled decoding of every row; a row's end token and what follows are masked slots
        (close_assistant() writes the end token again). The last token is left uncached, as generate does."""
        done = torch.zeros(conv.rows, dtype=torch.bool)
        answers: list[list[int]] = [[] for _ in range(conv.rows)]
        for step in range(max_new_tokens):
            logits = self.forward_new(conv, logits_to_keep=1).logits[:, -1].float().cpu()
            if step == 0 and self.mechanism is not None:
                self.mechanism.begin_answer()  # the prompt is fed; from here on the answer's tokens
            if step < self.min_new_tokens:
                logits[:, self.chat.end_id] = -torch.inf
            token = torch.where(done, torch.full_like(done, self.chat.pad_id, dtype=torch.long), self._pick(logits))
            real = ~done & (token != self.chat.end_id)
            done |= token == self.chat.end_id
            conv.tokens = torch.cat([conv.tokens, token[:, None]], 1)
            conv.mask = torch.cat([conv.mask, real[:, None]], 1)
            for b in real.nonzero().flatten().tolist():
                answers[b].append(int(token[b]))
            if bool(done.all()):
                break
        return answers

    def _pick(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.do_sample:
            return logits.argmax(-1)
        probs = torch.softmax(logits / self.temperature, -1)
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > self.top_p  # nucleus: keep the smallest set reaching top_p
        sorted_p[drop] = 0
        return order.gather(1, torch.multinomial(sorted_p, 1)).squeeze(1)

    def shares(self, conv: Conversation) -> bool:
        """Whether forks of conv share its cache (models/shared_prefix.py): a mechanism that leaves attention alone,
        an sdpa model, a cache whose full-attention layers grow in place."""
        return self.share_forks and (self.mechanism is None or self.mechanism.attention_untouched) and \
            can_share(self.model, conv.cache)

    def fork_rows(self, conv: Conversation) -> int:
        """Rows per forked forward: `probe_batch`, or `probe_batch` per conversation row where forks share the
        conversation's cache (a fork row then holds only its own prompt and answer)."""
        return self.probe_batch * (conv.rows if self.shares(conv) else 1)

    def on_fork(self, conv: Conversation, index: Sequence[int], fn, *args, **kwargs):
        """fn(fork, *args, **kwargs) on rows `index` of conv; the conversation and the mechanism's state are
        untouched afterwards. Rows 0..rows-1 in order need no copy: fn runs on conv itself, and what it added (slots,
        cache entries, mechanism state) is taken back; other rows share conv's cache where they can (shares), else
        are copied out (Conversation.select)."""
        index = list(index)
        state = self.mechanism.snapshot() if self.mechanism is not None else None
        whole = index == list(range(conv.rows))
        width, open_turn, point = conv.tokens.shape[1], conv.open_turn, rollback_point(conv.cache) if whole else None
        try:
            if whole:
                return fn(conv, *args, **kwargs)
            index_t = torch.tensor(index, dtype=torch.long)
            if self.mechanism is not None:
                self.mechanism.select_rows(index_t.to(self.device))
            if self.shares(conv):
                fork = conv.share(index_t, self.device)
                with sharing(fork.cache):
                    return fn(fork, *args, **kwargs)
            return fn(conv.select(index_t, self.device), *args, **kwargs)
        finally:
            if whole:
                conv.tokens, conv.mask, conv.open_turn = conv.tokens[:, :width], conv.mask[:, :width], open_turn
                conv.cache = roll_back(conv.cache, point)
            if self.mechanism is not None:
                self.mechanism.restore(state)  # the probe's turn never reaches the main conversation

    def context_limit(self) -> int | None:
        """Positions the model may use: `max_context`, else config.max_position_embeddings (Gemma-3: of its text
        config); None when unknown (no model: nothing is checked)."""
        if self.max_context:
            return int(self.max_context)
        config = getattr(self.model, "config", None)
        config = getattr(config, "text_config", None) or config
        limit = getattr(config, "max_position_embeddings", None)
        return int(limit) if limit else None

    def tokens_needed(self, conv: Conversation, texts: Sequence[str], reminder: str | None | Sequence[str | None],
                      probes: Sequence[Probe] = (), capability: Sequence[tuple[str, str]] = ()) -> int:
        """The most positions any row can reach if the next turn runs (its prompt, max_new_tokens, the closing)
        and then, on a fork, its probes and capability exchanges. Positions count real tokens (padding is not
        counted), so this is the longest row's real tokens plus the worst case of what comes."""
        history = max((len(conv.row_ids(b)) for b in range(conv.rows)), default=0)
        turn = max(len(self.user_turn_ids(t, conv.open_turn, r)) for t, r in zip(texts, per_row(reminder, len(texts))))
        close = len(self.chat.close_assistant())
        fork = [len(self.chat.user_turn_ids(p.question)) + close + max(self.probe_max_new_tokens, *(
            len(self.chat._ids(a)) + 1 for a in (p.persona_answer, p.assistant_answer))) for p in probes]
        fork += [len(self.chat.user_turn_ids(q)) + getattr(self, "capability_tokens", 0) for q, _ in capability]
        return history + turn + self.max_new_tokens + close + max(fork, default=0)

    def run(self, persona: Persona | None | Sequence[Persona | None], streams: Sequence[Iterable[Any]],
            probe_turns: Sequence[int], probes: Sequence[Probe] | Sequence[Sequence[Probe]] | None = None,
            progress: bool = True, desc: str = "conversations",
            capability: Sequence[tuple[str, str]] = (), bar: Any = None,
            replay: Sequence[Sequence[Sequence[int]]] | None = None, keep_logprobs: bool = False,
            against: Sequence[Sequence[TurnRecord]] | None = None) -> list[list[TurnRecord]]:
        """All `streams` (equally long) as one batch. Turn 0 is the persona alone (probes only); user turn k
        is turn k. A stream yields objects with `.text` and `.category` (MT-bench UserTurns) or strings.
        `persona`: one for every stream, or a list with one per stream (several personas in one batch).
        `probes` defaults to each row's persona's; pass them (for all rows, or a list per row) with persona=None
        for the control arm. `capability`: (question, reference answer) pairs scored at probe turns against the
        base model (probing.py).

        `bar`: a tqdm bar to advance by one per turn (run_personas: one per arm), else one of its own.
        `replay`: per row, the answer tokens of each turn (a transcript): read teacher-forced, not generated; the
        conversation runs as many turns as the shortest row's transcript holds. `keep_logprobs`: each probe turn's
        record keeps the capability log-probs; `against`: per row, another arm's records that kept them on the same
        history (a replay), for `kl_to_none` in the capability cost.

        The context limit (context_limit()): a turn that could take any row past it is not run; the batch stops
        after its last turn that fits, with a warning, and its last records say so in `stopped` (never wraps)."""
        streams = [list(s) for s in streams]
        personas = per_row(persona, len(streams))
        if isinstance(persona, (list, tuple)) and all(p is personas[0] for p in personas):
            persona = personas[0]  # one persona for the whole batch: the mechanism sees it as before
        conv = self.start(persona, rows=len(streams))
        row_probes = [list(p.probes) if p else [] for p in personas] if probes is None else per_row_probes(
            probes, conv.rows)
        probes = [p for ps in row_probes for p in ps]  # every row's, for the context-limit check
        records = [[TurnRecord(0, "", "", "", len(conv.row_ids(b)))] for b in range(conv.rows)]

        def measure(turn: int) -> None:
            if turn not in probe_turns:
                return
            for b, (results, state) in enumerate(self.probe(conv, row_probes, turn)):
                records[b][-1].probes, records[b][-1].reply_state = results, state
            if capability:
                other = None if against is None else [
                    next((r.capability_logprobs for r in rows if r.turn == turn), None) for rows in against]
                costs, kept = self.capability_cost(conv, capability, other, keep_logprobs)
                for b, cost in enumerate(costs):
                    records[b][-1].capability = cost
                    records[b][-1].capability_logprobs = kept[b] if kept is not None else None

        measure(0)
        n_turns = min((len(s) for s in streams), default=0)
        if replay is not None:
            n_turns = min([n_turns] + [len(r) for r in replay])
        limit = self.context_limit()
        own = bar is None
        if own:
            bar = tqdm(total=n_turns, desc=desc, unit="turn", disable=not progress)
        for t in range(1, n_turns + 1):
            turns = [s[t - 1] for s in streams]
            texts = [x if isinstance(x, str) else x.text for x in turns]
            reminder = self.mechanism.turn_prefix(t) if self.mechanism else None
            if limit is not None:
                at_probe = t in probe_turns
                need = self.tokens_needed(conv, texts, reminder, probes if at_probe else (),
                                          capability if at_probe else ())
                if need > limit:
                    why = (f"context limit: turn {t} could need {need} positions > {limit} (the model's context); "
                           f"stopped after turn {t - 1} of {n_turns}")
                    warnings.warn(f"{desc}: {why}", stacklevel=2)
                    for rows in records:
                        rows[-1].stopped = why
                    break
            began = time.perf_counter()
            extra = {"reminder": reminder} if reminder is not None else {}
            if replay is not None:
                extra["given"] = [r[t - 1] for r in replay]
            conv.last_answer_ids = None
            answers = self.say(conv, texts, **extra)
            ids = conv.last_answer_ids or [None] * conv.rows
            if self.model is not None and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # the turn's kernels done before the clock stops
            seconds = time.perf_counter() - began
            for b, (x, answer) in enumerate(zip(turns, answers)):
                records[b].append(TurnRecord(t, texts[b], answer, "" if isinstance(x, str) else x.category,
                                             len(conv.row_ids(b)), seconds=seconds, answer_ids=ids[b]))
            measure(t)
            bar.set_postfix_str(f"history {max(r[-1].history_tokens for r in records)} tokens", refresh=False)
            bar.update(1)
        if own:
            bar.close()
        return records
