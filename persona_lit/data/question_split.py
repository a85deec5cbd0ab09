"""The seeded, question-disjoint train/val/test split of MT-bench, so that no evaluation turn or capability
reference was ever a training turn.

MT-bench is both the source of evaluation conversations (both turns of each question) and of training user
turns (first turns, data=persona_pool; reference answers as history, data=persona_dialogues' filler turns). The
split is per category (stratified): each category's question ids are shuffled with a seed derived from (seed,
category) and cut into test, val and train shares of at least one question each. Training reads only `train`;
an evaluation reads `questions.part` (default `test`; `val` to choose settings; `all` turns the split off and
is refused with a checkpoint trained on the split), and its capability references (the reference answers of
reasoning, math and coding questions) come from the same part.

The split is stored with every training run (QUESTION_SPLIT_FILE, beside persona_split.json) and its hash goes
into results.json, so two runs are paired only on the same questions.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from persona_lit.data.readers import MTBenchQuestion, read_mt_bench
from persona_lit.errors import UserError

PARTS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.4, 0.2, 0.4)  # of 10 questions per category: 4 train, 2 val, 4 test
QUESTION_SPLIT_FILE = "question_split.json"
QUESTION_SPLIT_FORMAT = "persona_lit.question_split/1"


def questions_hash(questions: Sequence[MTBenchQuestion]) -> str:
    """sha256 (16 hex digits) of every question's id, category and turns: another question file, another hash."""
    payload = json.dumps([[q.question_id, q.category, list(q.turns)] for q in questions], ensure_ascii=False)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class QuestionSplit:
    seed: int
    fractions: dict[str, float]
    questions_hash: str  # of the question file the split was cut from
    parts: dict[str, list[int]]  # part -> question ids, in file order

    @property
    def hash(self) -> str:
        payload = json.dumps({"seed": self.seed, "fractions": self.fractions, "questions": self.questions_hash,
                              "parts": self.parts}, sort_keys=True)
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:16]

    def ids(self, part: str) -> set[int]:
        """The question ids of `part` (train, val, test) or of every part (`all`)."""
        if part == "all":
            return {i for p in PARTS for i in self.parts[p]}
        return set(self.parts[part])

    def to_json(self) -> dict[str, Any]:
        return {"format": QUESTION_SPLIT_FORMAT, "seed": self.seed, "fractions": self.fractions,
                "questions_hash": self.questions_hash, "hash": self.hash, **{p: self.parts[p] for p in PARTS}}


def check_fractions(fractions: Sequence[float] | Mapping[str, float], where: str = "questions.fractions") \
        -> dict[str, float]:
    values = [fractions[p] for p in PARTS] if isinstance(fractions, Mapping) else list(fractions)
    if len(values) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values) \
            or any(v <= 0 for v in values) or abs(sum(values) - 1.0) > 1e-6:
        raise UserError(f"{where}={list(values)}: expected three shares (train, val, test), each > 0, summing to 1")
    return {p: float(v) for p, v in zip(PARTS, values)}


def question_split(questions: Sequence[MTBenchQuestion], seed: int = 0,
                   fractions: Sequence[float] | Mapping[str, float] = DEFAULT_FRACTIONS) -> QuestionSplit:
    """Question-disjoint train/val/test ids, stratified by category, deterministic for (questions, seed,
    fractions). A category with fewer than 3 questions goes to train whole (it cannot be split three ways)."""
    shares = check_fractions(fractions)
    parts: dict[str, set[int]] = {p: set() for p in PARTS}
    categories = list(dict.fromkeys(q.category for q in questions))
    for category in categories:
        ids = [q.question_id for q in questions if q.category == category]
        if len(ids) < 3:
            parts["train"].update(ids)
            continue
        shuffled = ids[:]
        random.Random(f"persona_lit.questions:{int(seed)}:{category}").shuffle(shuffled)  # str seeds are stable
        n_test = max(1, round(len(ids) * shares["test"]))
        n_val = max(1, round(len(ids) * shares["val"]))
        while n_test + n_val > len(ids) - 1:
            n_test, n_val = (n_test - 1, n_val) if n_test >= n_val else (n_test, n_val - 1)
        parts["test"].update(shuffled[:n_test])
        parts["val"].update(shuffled[n_test : n_test + n_val])
        parts["train"].update(shuffled[n_test + n_val :])
    order = [q.question_id for q in questions]
    return QuestionSplit(int(seed), shares, questions_hash(questions), {p: [i for i in order if i in parts[p]]
                                                                        for p in PARTS})


def split_from_config(cfg: Mapping[str, Any] | None, mt_bench_path: str | None) -> QuestionSplit:
    """The split of a `questions:` config node (seed, fractions; missing keys: the defaults)."""
    cfg = dict(cfg or {})
    seed = cfg.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"questions.seed={seed!r}: must be an integer")
    return question_split(read_mt_bench(mt_bench_path), seed, cfg.get("fractions") or DEFAULT_FRACTIONS)


def write_question_split(path: str | os.PathLike, s: QuestionSplit) -> Path:
    from persona_lit.outputs import write_json

    return write_json(path, s.to_json())


def read_question_split(path: str | os.PathLike, mt_bench_path: str | None) -> QuestionSplit:
    """A stored split, recomputed from its seed and fractions on today's question file and refused (one line) where
    that differs: another question file, or a split that was edited."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read the question split ({type(e).__name__}); allowed: a "
                        f"{QUESTION_SPLIT_FORMAT} file written by train.py") from None
    if not isinstance(raw, dict) or raw.get("format") != QUESTION_SPLIT_FORMAT:
        raise UserError(f"{path}: not a question split ({QUESTION_SPLIT_FORMAT})")
    again = split_from_config({"seed": raw.get("seed"), "fractions": raw.get("fractions")}, mt_bench_path)
    if again.to_json() != raw:
        raise UserError(f"{path}: question split {raw.get('hash')!r} does not match the questions at hand (hash "
                        f"{again.hash} from seed {again.seed} on question file {again.questions_hash}); evaluate "
                        f"with the MT-bench file the run was trained with")
    return again


def store_question_split(run_dir: str | os.PathLike, cfg: Mapping[str, Any] | None,
                         mt_bench_path: str | None) -> QuestionSplit:
    """For a training run: the split of `cfg`, written to run_dir/QUESTION_SPLIT_FILE."""
    s = split_from_config(cfg, mt_bench_path)
    write_question_split(Path(run_dir) / QUESTION_SPLIT_FILE, s)
    return s


def for_evaluation(cfg: Any) -> tuple[QuestionSplit, dict[str, Any]]:
    """The split an evaluation asks from, and what results.json records of it (run.question_split). First that
    applies: the split stored by the checkpoint's training run (its train part is then refused); the
    `question_split` settings. A checkpoint trained on MT-bench without a stored split is said so (it may have
    practised any question)."""
    node = dict(cfg.get("question_split") or {})
    part = str(node.get("part") or "test")
    if part not in (*PARTS, "all"):
        raise UserError(f"question_split.part={part}: allowed: {', '.join(PARTS)}, all")
    s, note = None, "from question_split.*"
    if cfg.get("ckpt"):
        from persona_lit.personas.split import _run_dir_and_config

        run_dir, config = _run_dir_and_config(str(cfg.ckpt))
        stored = run_dir / QUESTION_SPLIT_FILE
        data = config.get("data") if isinstance(config.get("data"), dict) else {}
        if stored.is_file():
            s, note = read_question_split(stored, cfg.get("mt_bench_path")), f"the training run's split {stored}"
            if part in ("train", "all"):
                raise UserError(f"question_split.part={part}: the checkpoint trained on the train part of {stored}; "
                                f"allowed: val, test")
        elif str(data.get("_target_", "")).endswith("PersonaPoolDataModule") or int(data.get("filler_turns") or 0):
            note = (f"from question_split.*; the checkpoint's run stored no {QUESTION_SPLIT_FILE}: it may have trained "
                    f"on any MT-bench question, this one included")
            print(f"persona_lit: warning: {note}", flush=True)
    if s is None:
        s = split_from_config(node, cfg.get("mt_bench_path"))
    return s, {"part": part, "hash": s.hash, "seed": s.seed, "fractions": s.fractions,
               "questions_hash": s.questions_hash, "ids": sorted(s.ids(part)), "from": note}
