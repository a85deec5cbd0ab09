"""Contrastive persona data (`data=contrastive`): one side of a pos/neg pair, answered by the base model itself.

For a trait (assistant-axis traits/instructions/<name>.json: "pos" and "neg" instructions, 40 questions), a role
(roles/instructions/<name>.json against the default assistant's instructions) or a persona (its system prompt
against the model's default system prompt), every question is asked under every kept instruction of both
sides, and the base model answers greedily (mechanism disabled). The answers are generated once and cached as
JSONL, keyed by the model's fingerprint, the source and the generation settings: line 1 holds the settings,
each further line one answer. Training examples are [question, answer] **without** the instruction, so an
adapter trained on `side=pos` internalises the pos side and one trained on `side=neg` the other; their
difference is the persona direction in weight space (task=weight_diff).

Persona questions are the user turns of the persona's exchanges file, then the assistant-axis extraction
questions; the persona's probe questions are never among them (they are what the drift protocol asks).

    python train.py mechanism=lora data=contrastive data.trait=optimistic data.side=pos
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any, Callable, ContextManager, Sequence

import torch

from persona_lit.models.chat import ChatTokenizer
from persona_lit.data import cache
from persona_lit.data.dialogues import PersonaDialogueDataModule
from persona_lit.errors import UserError
from persona_lit.personas.types import Persona

SIDES = ("pos", "neg")
FORMAT = "persona_lit.contrastive.v1"


def _persona_source(persona: Persona, root: Path, questions: int):
    from persona_lit.steering.sources import Source, exchange_questions

    probes = {p.question.strip() for p in persona.probes}
    asked = exchange_questions(Path(persona.exchanges_path)) if persona.exchanges_path is not None else []
    extra = root / "extraction_questions.jsonl"
    if extra.is_file():
        for n, line in enumerate(extra.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    asked.append(str(json.loads(line)["question"]))
                except (ValueError, KeyError, TypeError):
                    raise UserError(f"{extra}:{n}: expected {{\"question\": text}}") from None
    asked = [q for q in dict.fromkeys(q.strip() for q in asked) if q and q not in probes][:questions]
    if not asked:
        raise UserError(f"persona={persona.key}: no questions (its exchanges file and {extra} hold none)")
    return Source(f"persona:{persona.key}", "persona", persona.key, [(persona.system_prompt, q) for q in asked],
                  [(None, q) for q in asked])


def contrastive_source(trait: str | None, role: str | None, persona: Persona, root: Path, model_name: str,
                       instructions: int, questions: int):
    """The (instruction, question) pairs of both sides: of data.trait or data.role if one is given, else of
    the run's persona (its system prompt against the model's default)."""
    given = {k: v for k, v in (("trait", trait), ("role", role)) if v not in (None, "")}
    if len(given) > 1:
        raise UserError(f"data.trait={trait}, data.role={role}: give at most one (neither: the run's persona=)")
    for key, value in (("data.instructions", instructions), ("data.questions", questions)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise UserError(f"{key}={value!r}: must be an integer >= 1")
    if not given:
        return _persona_source(persona, root, questions)
    from persona_lit.steering.sources import parse_source

    (kind, name), = given.items()
    try:
        return parse_source(f"{kind}:{name}", 0, root, model_name, instructions, questions)
    except UserError as e:  # its messages name task.sources[0]; here the key is data.<kind>
        raise UserError(str(e).replace(f"task.sources[0]={kind}:{name}", f"data.{kind}={name}")
                        .replace("task.assistant_axis_dir", "data.assistant_axis_dir")) from None


class ContrastiveDataModule(PersonaDialogueDataModule):
    """One side of contrastive persona data; needs the base model once (bind_model) to answer the questions.
    Loaders, resume state and length-bucketed batches are PersonaDialogueDataModule's."""

    # Defaults: conf/data/contrastive.yaml (the one place they are written).
    def __init__(self, chat: ChatTokenizer, persona: Persona, *, side: str, trait: str | None, role: str | None,
                 assistant_axis_dir: str, model_name: str, instructions: int, questions: int, max_new_tokens: int,
                 generation_batch: int, cache_dir: str, max_length: int, batch_size: int, val_fraction: float,
                 seed: int, num_workers: int):
        if not isinstance(persona, Persona):  # hydra.utils.instantiate hands a dataclass kwarg over as a DictConfig
            from omegaconf import OmegaConf

            persona = OmegaConf.to_object(persona)
        super().__init__(chat, persona, with_system_prompt=False, max_length=max_length, batch_size=batch_size,
                         val_fraction=val_fraction, seed=seed, num_workers=num_workers)
        if side not in SIDES:
            raise UserError(f"data.side={side!r}: unknown; allowed: pos, neg")
        for key, value in (("data.max_new_tokens", max_new_tokens), ("data.generation_batch", generation_batch),
                           ("data.batch_size", batch_size), ("data.max_length", max_length)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{key}={value!r}: must be an integer >= 1")
        if not 0 <= float(val_fraction) < 1:
            raise UserError(f"data.val_fraction={val_fraction}: must be in [0, 1)")
        self.chat, self.side = chat, side
        self.root = Path(str(assistant_axis_dir)).expanduser()
        self.source = contrastive_source(trait, role, persona, self.root, model_name, instructions, questions)
        self.instructions, self.questions = instructions, questions
        self.max_new_tokens, self.generation_batch = max_new_tokens, generation_batch
        self.cache_dir = Path(str(cache_dir))
        self._model: torch.nn.Module | None = None
        self._disabled: Callable[[], ContextManager] | None = None
        self.cache_path: Path | None = None
        self.records: list[dict[str, Any]] = []  # the training examples' answer records (describe_rows)

    # the base model answers once ------------------------------------------------------------------------
    def bind_model(self, model: torch.nn.Module, disabled: Callable[[], ContextManager]) -> None:
        """The model to answer with, and the context in which it is the base model (mechanism.disabled)."""
        self._model, self._disabled = model, disabled

    def settings(self, fingerprint: str) -> dict[str, Any]:
        return {"format": FORMAT, "fingerprint": fingerprint, "source": self.source.spec,
                "instructions": self.instructions, "questions": self.questions,
                "max_new_tokens": self.max_new_tokens, "decoding": "greedy"}

    def _cache_file(self, settings: dict[str, Any]) -> Path:
        return cache.cache_path(self.cache_dir, self.source.slug, settings)

    def answers(self) -> list[dict[str, Any]]:
        """Every (side, instruction, question, answer) record: from the cache, or generated and cached."""
        if self._model is None:
            raise RuntimeError("ContrastiveDataModule.bind_model(model, mechanism.disabled) must come before setup")
        from persona_lit.models.backbones import fingerprint

        settings = self.settings(fingerprint(self._model))
        path = self._cache_file(settings)
        self.cache_path = path
        cached = read_cache(path, settings)
        if cached is not None:
            print(f"persona_lit: contrastive data: {len(cached)} cached answers from {path}", flush=True)
            return cached
        from persona_lit.steering.directions import generate

        pairs = [("pos", s, q) for s, q in self.source.pos] + [("neg", s, q) for s, q in self.source.neg]
        print(f"persona_lit: contrastive data: the base model answers {len(pairs)} questions "
              f"({self.source.spec}, both sides, {self.max_new_tokens} new tokens, greedy)", flush=True)
        assert self._disabled is not None
        with self._disabled(), torch.no_grad():
            samples = generate(self._model, self.chat, [(s, q) for _, s, q in pairs], self.max_new_tokens,
                               self.generation_batch)
        records = [{"side": side, "instruction": system, "question": q, "answer": self.chat.decode(x.answer).strip()}
                   for (side, system, q), x in zip(pairs, samples)]
        cache.write_cache(path, settings, records)
        print(f"persona_lit: contrastive data cached in {path}", flush=True)
        return records

    # training examples: [question, answer] without the instruction ------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.train_examples:
            return
        pairs = []
        for r in (r for r in self.answers() if r["side"] == self.side and r["answer"]):
            ids, mask, segments = (x[: self.max_length] for x in self.chat.encode_segments(
                [{"role": "user", "content": r["question"]}, {"role": "assistant", "content": r["answer"]}]))
            if any(mask):
                pairs.append(((ids, mask, segments), r))
        if not pairs:
            raise UserError(f"data.side={self.side}: no usable answers for {self.source.spec} (all empty or cut at "
                            f"data.max_length={self.max_length})")
        random.Random(self.seed).shuffle(pairs)
        n_val = int(len(pairs) * self.val_fraction) if len(pairs) >= 10 else 0
        self.val_examples = [e for e, _ in pairs[:n_val]]
        self.train_examples, self.records = [e for e, _ in pairs[n_val:]], [r for _, r in pairs[n_val:]]

    def describe_rows(self, indices: Sequence[int]) -> str:
        """Training rows as their questions (in the cache file)."""
        return f"{self.cache_path} ({self.side} answers to: " + "; ".join(
            repr(self.records[i]["question"][:60]) for i in indices) + ")"


def read_cache(path: Path, settings: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The cached records if `path` holds answers made with exactly `settings`, else None (regenerate)."""
    return cache.read_cache(path, settings, "contrastive",
                            lambda r: r.get("side") in SIDES and isinstance(r.get("question"), str)
                            and isinstance(r.get("answer"), str), "side/question/answer")
