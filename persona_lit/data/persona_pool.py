"""Many-persona training data (`data=persona_pool`): one mechanism for every training persona of the pool.

For each persona of the train part of the persona-disjoint split (persona_lit/personas/split.py; `data.pool`
holds the settings of evaluate.yaml's `pool:` node, `data.max_personas` keeps the first N, one per source in
turn), a conversation of `data.turns` user turns: the persona's own questions (roles, PersonaGym) alternating
with MT-bench questions (first turns only, since a second turn refers to the first; roleplay excluded) of the
train part of the question split (data/question_split.py, `data.question_split`; evaluation asks the test part),
drawn with a seed per persona. The answer to turn k comes from the base model with the persona *fresh*: it sees only
[persona system prompt ; user turn k] (greedy, `data.max_new_tokens`, mechanism disabled). A training example
is the whole conversation [persona ; u1 a1 ; u2 a2 ; ...] cut at `data.max_length`, labels on every answer,
segment 0 = the persona and segment k = turn k (so `module.distill_weight` works on it unchanged).

Control conversations (`data.control_fraction` of all conversations) ask the questions of a persona
conversation with no persona (the model's default system prompt, if it has one) and are answered by the base
model the same way, so the mechanism learns not to invent a persona where none was given. Their labels are
the base model's own no-persona answers, and the distillation teacher on them is the base model on
[no persona ; turn k]: both pull toward the base model; `module.kl_weight` is not needed (and would apply to
the persona conversations too, pulling them toward the drifting base model on the full history).

`data.val_personas` > 0 adds validation conversations of that many val-part personas (unseen in training).
The answers are generated once and cached as JSONL (persona_lit/data/cache.py) keyed by the model fingerprint
and every setting that changes them. The run's split is written to its Hydra run directory
(persona_pool.store_split, with question_split.json) so that `evaluate.py ckpt=<run> personas=test_split` evaluates on the personas the
run never saw. The run's `persona=` is not used for the training data.

    python train.py mechanism=lyra data=persona_pool data.max_personas=64 module.distill_weight=1.0
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import torch

from persona_lit.models.chat import ChatTokenizer
from persona_lit.data import cache
from persona_lit.data.dialogues import PersonaDialogueDataModule
from persona_lit.errors import UserError
from persona_lit.personas.types import Persona

FORMAT = "persona_lit.persona_pool_data.v1"


@dataclass(frozen=True)
class Plan:
    key: str | None  # the pool key of the persona; None: a control conversation (no persona)
    system: str | None  # the persona's system prompt; None: the model's default
    questions: tuple[str, ...]


def run_dir() -> Path | None:
    """The Hydra run directory when Hydra is active (train.py), else None (e.g. in-process tests)."""
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir) if HydraConfig.initialized() else None


def mt_bench_questions(path: str | None, ids: set[int]) -> list[str]:
    """MT-bench first turns of the questions `ids` (the train part of the question split) in file order, roleplay
    excluded (it asks the model to become someone else)."""
    from persona_lit.data.readers import read_mt_bench

    return [q.turns[0] for q in read_mt_bench(path) if q.category != "roleplay" and q.question_id in ids]


def conversation_questions(own: Sequence[str], mt: Sequence[str], turns: int, rng: random.Random) -> list[str]:
    """`turns` questions, the persona's own alternating with MT-bench ones (own first; only MT-bench when it has
    none); each source is shuffled, and shuffled again when a long conversation has used it up."""
    sources, queues, out = [list(own), list(mt)], [[], []], []
    if not any(sources):
        raise UserError("data=persona_pool: no questions (no MT-bench questions and no own questions)")
    while len(out) < turns:
        for source, queue in zip(sources, queues):
            if source and len(out) < turns:
                queue += [] if queue else rng.sample(source, len(source))
                out.append(queue.pop(0))
    return out


def _valid_record(r: dict[str, Any]) -> bool:
    """A cached conversation: {"persona": key or null, "system": text or null, "turns": [[question, answer], ...]}."""
    turns = r.get("turns")
    return all(isinstance(r.get(k), (str, type(None))) for k in ("persona", "system")) and isinstance(turns, list) \
        and all(isinstance(t, list) and len(t) == 2 and all(isinstance(x, str) for x in t) for t in turns)


class PersonaPoolDataModule(PersonaDialogueDataModule):
    """Conversations of many personas answered by the base model with the persona fresh (bind_model first).
    Loaders, resume state and length-bucketed batches are PersonaDialogueDataModule's."""

    def __init__(self, chat: ChatTokenizer, persona: Persona, *, pool: Any, max_personas: int | None, turns: int,
                 control_fraction: float, val_personas: int, mt_bench_path: str | None, max_new_tokens: int,
                 generation_batch: int, cache_dir: str, max_length: int, batch_size: int, seed: int,
                 num_workers: int, question_split: Any = None):
        super().__init__(chat, persona, with_system_prompt=False, max_length=max_length, batch_size=batch_size,
                         val_fraction=0.0, seed=seed, num_workers=num_workers, question_split=question_split)
        from omegaconf import DictConfig, OmegaConf

        self.pool_cfg = OmegaConf.to_container(pool, resolve=True) if isinstance(pool, DictConfig) else dict(pool)
        for key, value, low in (("data.turns", turns, 1), ("data.max_new_tokens", max_new_tokens, 1),
                                ("data.generation_batch", generation_batch, 1), ("data.val_personas", val_personas, 0),
                                ("data.max_personas", 1 if max_personas is None else max_personas, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UserError(f"{key}={value!r}: must be an integer >= {low}")
        if not 0 <= float(control_fraction) < 1:
            raise UserError(f"data.control_fraction={control_fraction}: must be in [0, 1)")
        self.max_personas, self.turns, self.control_fraction = max_personas, turns, float(control_fraction)
        self.val_personas, self.mt_bench_path = val_personas, mt_bench_path
        self.max_new_tokens, self.generation_batch, self.cache_dir = max_new_tokens, generation_batch, cache_dir
        self._model: torch.nn.Module | None = None
        self._disabled: Callable[[], ContextManager] | None = None
        self.split = None  # persona_pool.Split, set by setup
        self.questions = None  # question_split.QuestionSplit (MT-bench), set by setup
        self.cache_path: Path | None = None
        self.conversations: list[dict[str, Any]] = []  # the training conversations (records of the cache)

    def bind_model(self, model: torch.nn.Module, disabled: Callable[[], ContextManager]) -> None:
        """The model to answer with, and the context in which it is the base model (mechanism.disabled)."""
        self._model, self._disabled = model, disabled

    # which conversations ---------------------------------------------------------------------------------
    def plans(self) -> tuple[list[Plan], list[Plan]]:
        """(training plans: personas then controls, validation plans); sets self.split and writes it to the
        Hydra run directory when there is one."""
        from persona_lit.data import question_split as qs
        from persona_lit.personas import pool as pp, split as sp

        p = self.pool_cfg
        pool = pp.load_pool(p.get("sources"), p.get("data_dir") or "../shared/data")
        self.split = sp.split(pool, int(p.get("seed") or 0), list(p.get("fractions") or (0.8, 0.1, 0.1)))
        where = run_dir()
        if where is not None:
            stored = sp.store_split(where, p)
            assert stored.parts == self.split.parts, "the stored split differs from the one trained on"
            self.questions = qs.store_question_split(where, self.question_split, self.mt_bench_path)
        else:
            self.questions = qs.split_from_config(self.question_split, self.mt_bench_path)
        sources = self.split.pool_spec["sources"]
        mt = mt_bench_questions(self.mt_bench_path, self.questions.ids("train"))

        def persona_plans(part: str, limit: int | None) -> list[Plan]:
            out = []
            for key in sp.round_robin(self.split.parts[part], sources, limit):
                entry = pool.by_key[key]
                probes = {x.question.strip() for x in entry.persona.probes}
                own = [q for q in dict.fromkeys(q.strip() for q in entry.questions) if q and q not in probes]
                rng = random.Random(f"persona_lit.pool_data:{self.seed}:{key}")
                out.append(Plan(key, entry.persona.system_prompt,
                                tuple(conversation_questions(own, mt, self.turns, rng))))
            return out

        train = persona_plans("train", self.max_personas)
        n = len(train)
        n_control = int(n * self.control_fraction / (1 - self.control_fraction) + 0.5) if n else 0
        n_control = max(n_control, 1) if n and self.control_fraction > 0 else 0
        order = random.Random(f"persona_lit.pool_data:{self.seed}:controls").sample(range(n), n)
        controls = [Plan(None, None, train[order[i % n]].questions) for i in range(n_control)]
        return train + controls, persona_plans("val", self.val_personas) if self.val_personas else []

    # the base model answers once, persona fresh --------------------------------------------------------------
    def settings(self, fingerprint: str, plans: list[Plan]) -> dict[str, Any]:
        plan = json.dumps([[x.key, x.system, list(x.questions)] for x in plans], ensure_ascii=False)
        return {"format": FORMAT, "fingerprint": fingerprint, "pool": self.split.pool_spec,
                "pool_hash": self.split.pool_hash, "split_seed": self.split.seed, "fractions": self.split.fractions,
                "question_split": self.questions.hash if self.questions is not None else None,
                "max_personas": self.max_personas, "val_personas": self.val_personas, "turns": self.turns,
                "control_fraction": self.control_fraction, "seed": self.seed, "max_new_tokens": self.max_new_tokens,
                "decoding": "greedy", "plan": hashlib.sha256(plan.encode()).hexdigest()[:16]}

    def answers(self, plans: list[Plan]) -> list[dict[str, Any]]:
        """One record per plan, {"persona", "system", "turns": [[question, answer], ...]}: cached or generated."""
        if self._model is None:
            raise RuntimeError("PersonaPoolDataModule.bind_model(model, mechanism.disabled) must come before setup")
        from persona_lit.models.backbones import fingerprint

        settings = self.settings(fingerprint(self._model), plans)
        self.cache_path = path = cache.cache_path(self.cache_dir, "pool", settings)
        cached = cache.read_cache(path, settings, "persona_pool", _valid_record, "persona/system/turns")
        if cached is not None and len(cached) == len(plans):
            print(f"persona_lit: persona_pool data: {len(cached)} cached conversations from {path}", flush=True)
            return cached
        from persona_lit.steering.directions import generate

        pairs = list(dict.fromkeys((x.system, q) for x in plans for q in x.questions))
        print(f"persona_lit: persona_pool data: the base model answers {len(pairs)} (persona, question) pairs "
              f"({sum(x.key is not None for x in plans)} persona and {sum(x.key is None for x in plans)} control "
              f"conversations, {self.max_new_tokens} new tokens, greedy)", flush=True)
        assert self._disabled is not None
        with self._disabled(), torch.no_grad():
            samples = generate(self._model, self.chat, pairs, self.max_new_tokens, self.generation_batch,
                               progress="persona_pool teacher answers")
        answer = {pair: self.chat.decode(s.answer).strip() for pair, s in zip(pairs, samples)}
        records = [{"persona": x.key, "system": x.system, "turns": [[q, answer[(x.system, q)]] for q in x.questions]}
                   for x in plans]
        cache.write_cache(path, settings, records)
        print(f"persona_lit: persona_pool data cached in {path}", flush=True)
        return records

    # training examples: the whole conversation, labels on every answer ---------------------------------------
    def example(self, record: dict[str, Any]) -> tuple[list[int], list[bool], list[int]] | None:
        """[persona ; u1 a1 ; ...] cut at data.max_length; turns with an empty answer are left out."""
        messages = [{"role": "system", "content": record["system"]}] if record["system"] is not None else []
        for question, answer in record["turns"]:
            if answer:
                messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        ids, mask, segments = (x[: self.max_length] for x in self.chat.encode_segments(messages))
        return (ids, mask, segments) if any(mask) else None

    def setup(self, stage: str | None = None) -> None:
        if self.train_examples:
            return
        train, val = self.plans()
        records = self.answers(train + val)
        examples = [self.example(r) for r in records]
        pairs = [(e, r) for e, r in zip(examples[: len(train)], records) if e is not None]
        if not any(r["persona"] is not None for _, r in pairs):
            raise UserError(f"data=persona_pool: no usable training conversation (answers empty, or the persona "
                            f"alone fills data.max_length={self.max_length})")
        random.Random(self.seed).shuffle(pairs)
        self.train_examples, self.conversations = [e for e, _ in pairs], [r for _, r in pairs]
        self.val_examples = [e for e in examples[len(train):] if e is not None]

    def describe_rows(self, indices: Sequence[int]) -> str:
        """Training rows as the pool persona of their conversation (`control` for one without a persona)."""
        return "persona_pool conversations " + ", ".join(self.conversations[i]["persona"] or "control"
                                                         for i in indices)
