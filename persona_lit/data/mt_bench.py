"""MTBenchDataModule: ordered multi-turn user turns from MT-bench, one stream per conversation."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from dataclasses import dataclass
from typing import Collection, Sequence

import lightning as L
from torch.utils.data import DataLoader

from persona_lit.data.readers import MTBenchQuestion, default_mt_bench_path, read_jsonl, read_mt_bench
from persona_lit.errors import UserError


@dataclass(frozen=True)
class UserTurn:
    text: str
    question_id: int
    category: str
    index_in_question: int  # MT-bench's second turns refer to the first ("Rewrite your previous response")


def turn_stream(questions: Sequence[MTBenchQuestion], n_turns: int, seed: int | str | None,
                exclude_categories: Sequence[str] = ()) -> list[UserTurn]:
    """The first `n_turns` user turns of a conversation; both turns of a question stay adjacent.

    seed=None keeps file order; any other seed shuffles the questions (not the turns within one).
    """
    pool = [q for q in questions if q.category not in set(exclude_categories)]
    if not pool:
        raise UserError(f"no MT-bench questions left after excluding {list(exclude_categories)}")
    if seed is not None:
        pool = pool[:]
        random.Random(seed).shuffle(pool)
    turns: list[UserTurn] = []
    while len(turns) < n_turns:  # long conversations cycle through the questions again
        for q in pool:
            turns += [UserTurn(t, q.question_id, q.category, i) for i, t in enumerate(q.turns)]
    return turns[:n_turns]


def neutral_exchanges(count: int, avoid_question_ids: set[int] = frozenset(), questions_path: str | None = None,
                      answers_path: str | None = None, only: Collection[int] | None = None) -> list[tuple[str, str]]:
    """`count` (first-turn question, reference answer) pairs for the capability cost, preferring questions
    the conversations do not ask; in file order, so every run scores the same exchanges. `only`: from these
    question ids alone (the evaluated part of the question split, so no reference was a training turn)."""
    if count <= 0:
        return []
    questions = {q.question_id: q for q in read_mt_bench(questions_path)}
    root = Path(questions_path) if questions_path else default_mt_bench_path()
    answers = Path(answers_path) if answers_path else root.parent / "reference_answer" / "gpt-4.jsonl"
    if not answers.is_file():
        raise UserError(f"capability_exchanges={count}: reference answers not found at {answers} "
                        "(FastChat layout: reference_answer/gpt-4.jsonl beside question.jsonl; 0 turns this off)")
    pairs = []
    for where, record in read_jsonl(answers):
        q, turns = questions.get(record.get("question_id")), (record.get("choices") or [{}])[0].get("turns")
        if q is None or not isinstance(turns, list) or not turns:
            raise UserError(f"{where}: needs a known 'question_id' and 'choices[0].turns'")
        if only is not None and q.question_id not in only:
            continue
        pairs.append((q.question_id in avoid_question_ids, q.turns[0], str(turns[0])))
    pairs.sort(key=lambda p: p[0])  # stable: unasked questions first, file order within
    return [(q, a) for _, q, a in pairs[:count]]


def references_fingerprint(exchanges: Sequence[tuple[str, str]], max_tokens: int) -> str | None:
    """A short hash of the capability references (and their token budget) a run scored KL to base on: runs compare on
    that KL only where it is equal (which questions are unasked depends on the turns, so a longer run can score other
    references). None where there are none."""
    if not exchanges:
        return None
    payload = json.dumps([max_tokens, [list(pair) for pair in exchanges]], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:12]


class MTBenchDataModule(L.LightningDataModule):
    """Serves (from the questions `question_ids`, default all) `conversations` streams of `turns` user turns each: `streams` (stream k uses seed `seed + k`), and
    stream(key, k), conversation k of the persona `key`, its own order of the questions (seeded from seed, key and
    k), so that no two (persona, conversation) units share a stream. seed=None: file order for every stream."""

    def __init__(self, mt_bench_path: str | None = None, turns: int = 8, conversations: int = 1, seed: int | None = 0,
                 exclude_categories: Sequence[str] = ("roleplay",), question_ids: Collection[int] | None = None):
        super().__init__()
        self.mt_bench_path, self.turns, self.conversations = mt_bench_path, turns, conversations
        self.seed, self.exclude_categories = seed, list(exclude_categories)
        self.question_ids = None if question_ids is None else set(question_ids)  # a part of the question split
        self.split_info: dict | None = None  # what results.json records of that split (question_split.for_evaluation)
        self.streams: list[list[UserTurn]] = []

    def setup(self, stage: str | None = None) -> None:
        if self.turns < 1 or self.conversations < 1:
            raise UserError(f"turns={self.turns} and conversations={self.conversations} must both be >= 1")
        questions = read_mt_bench(self.mt_bench_path)
        if self.question_ids is not None:
            questions = [q for q in questions if q.question_id in self.question_ids]
            if not questions:
                raise UserError("question_split: the chosen part holds no question of this MT-bench file")
        self.questions = questions
        self.streams = [
            turn_stream(questions, self.turns, None if self.seed is None else self.seed + k, self.exclude_categories)
            for k in range(self.conversations)
        ]

    def stream(self, key: str, k: int) -> list[UserTurn]:
        """Conversation k of the persona `key`: its own shuffle of the questions (a string seed: stable)."""
        seed = None if self.seed is None else f"persona_lit.stream:{self.seed}:{key}:{k}"
        return turn_stream(self.questions, self.turns, seed, self.exclude_categories)

    def persona_streams(self, keys: Sequence[str], ks: Sequence[int] | None = None) -> dict[str, list[list[UserTurn]]]:
        """{key: [stream(key, k) for k in ks]} (ks: every conversation)."""
        ks = range(self.conversations) if ks is None else ks
        return {key: [self.stream(key, k) for k in ks] for key in keys}

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.streams, batch_size=None)
