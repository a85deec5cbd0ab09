"""MTBenchDataModule: ordered multi-turn user turns from MT-bench, one stream per conversation."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Sequence

import lightning as L
from torch.utils.data import DataLoader

from persona_lit.data.readers import MTBenchQuestion, read_mt_bench
from persona_lit.errors import UserError


@dataclass(frozen=True)
class UserTurn:
    text: str
    question_id: int
    category: str
    index_in_question: int  # MT-bench's second turns refer to the first ("Rewrite your previous response")


def turn_stream(questions: Sequence[MTBenchQuestion], n_turns: int, seed: int | None,
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


class MTBenchDataModule(L.LightningDataModule):
    """Serves `conversations` streams of `turns` user turns each (stream k uses seed `seed + k`)."""

    def __init__(self, mt_bench_path: str | None = None, turns: int = 8, conversations: int = 1, seed: int | None = 0,
                 exclude_categories: Sequence[str] = ("roleplay",)):
        super().__init__()
        self.mt_bench_path, self.turns, self.conversations = mt_bench_path, turns, conversations
        self.seed, self.exclude_categories = seed, list(exclude_categories)
        self.streams: list[list[UserTurn]] = []

    def setup(self, stage: str | None = None) -> None:
        if self.turns < 1 or self.conversations < 1:
            raise UserError(f"turns={self.turns} and conversations={self.conversations} must both be >= 1")
        questions = read_mt_bench(self.mt_bench_path)
        self.streams = [
            turn_stream(questions, self.turns, None if self.seed is None else self.seed + k, self.exclude_categories)
            for k in range(self.conversations)
        ]

    def predict_dataloader(self) -> DataLoader:
        return DataLoader(self.streams, batch_size=None)
