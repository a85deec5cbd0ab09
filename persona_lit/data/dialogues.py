"""PersonaDialogueDataModule: persona dialogues -> length-bucketed training batches, loss on assistant tokens."""

from __future__ import annotations

import random
from typing import Any, Iterator, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from persona_lit.models.chat import ChatTokenizer
from persona_lit.data.readers import read_dialogues
from persona_lit.errors import UserError
from persona_lit.personas.types import Persona

IGNORE = -100  # label value the loss skips


class Collator:
    """Right-pads a list of (ids, mask) examples; labels are the ids on assistant tokens, IGNORE elsewhere."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, examples: Sequence[tuple[list[int], list[bool], list[int]]]) -> dict[str, torch.Tensor]:
        width = max(len(e[0]) for e in examples)
        input_ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(examples), width), dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
        segments = torch.full((len(examples), width), -1, dtype=torch.long)  # turn per token, -1 on padding
        for row, (ids, mask, *segs) in enumerate(examples):
            n = len(ids)
            input_ids[row, :n] = torch.tensor(ids)
            attention[row, :n] = 1
            # Labels come from the assistant mask, not from comparing ids with pad: a real EOS that
            # equals the pad id is still trained, and padding never is.
            labels[row, :n] = torch.where(torch.tensor(mask), torch.tensor(ids), IGNORE)
            if segs:
                segments[row, :n] = torch.tensor(segs[0])
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels, "segment_ids": segments}


class IndexedCollator(Collator):
    """Collates (index, example) items: Collator's batch plus batch["index"], the examples' positions in the
    data set, which PersonaDialogueDataModule.describe_rows turns back into their source file lines."""

    def __call__(self, items: Sequence[tuple[int, tuple]]) -> dict[str, torch.Tensor]:
        batch = super().__call__([example for _, example in items])
        batch["index"] = torch.tensor([i for i, _ in items], dtype=torch.long)
        return batch


class BucketBatchSampler(Sampler[list[int]]):
    """Shuffled batches of similar length (little padding), the same for a given (seed, epoch).

    Splits batches across distributed ranks itself, and can skip the batches of an epoch already
    trained, so a resumed run sees exactly the batches an uninterrupted run would.
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int, shuffle: bool = True, pool: int = 16):
        self.lengths, self.batch_size, self.seed, self.shuffle, self.pool = list(lengths), batch_size, seed, shuffle, pool
        self.epoch, self.skip = 0, 0
        self.sampler = self  # Lightning calls set_epoch() on batch_sampler.sampler, not on the batch sampler

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _rank_world(self) -> tuple[int, int]:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            return torch.distributed.get_rank(), torch.distributed.get_world_size()
        return 0, 1

    def _all_batches(self) -> list[list[int]]:
        order = list(range(len(self.lengths)))
        rng = random.Random(self.seed * 100_003 + self.epoch)
        if self.shuffle:
            rng.shuffle(order)
        chunk = self.batch_size * self.pool
        batches = []
        for start in range(0, len(order), chunk):
            block = sorted(order[start : start + chunk], key=lambda i: self.lengths[i])
            batches += [block[i : i + self.batch_size] for i in range(0, len(block), self.batch_size)]
        if self.shuffle:
            rng.shuffle(batches)
        rank, world = self._rank_world()
        usable = len(batches) - len(batches) % world if world > 1 else len(batches)
        return batches[rank:usable:world]

    def __iter__(self) -> Iterator[list[int]]:
        batches, skip = self._all_batches(), self.skip
        self.skip = 0  # only the first epoch after a resume is partial
        yield from batches[skip:]

    def __len__(self) -> int:
        return len(self._all_batches())


def _plain(node: Any) -> dict[str, Any] | None:
    """A config node (DictConfig or mapping) as a plain dict; None stays None."""
    if node is None:
        return None
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)


class PersonaDialogueDataModule(L.LightningDataModule):
    def __init__(self, chat: ChatTokenizer, persona: Persona, sources: Sequence[str] | None = None,
                 with_system_prompt: bool = True, max_length: int = 512, batch_size: int = 4,
                 val_fraction: float = 0.1, seed: int = 0, num_workers: int = 0, max_examples: int | None = None,
                 chain_turns: int = 1, filler_turns: int = 0, question_split: Any = None):
        super().__init__()
        self.chat, self.persona = chat, persona
        self.sources = list(sources) if sources else []
        self.with_system_prompt, self.max_length, self.batch_size = with_system_prompt, max_length, batch_size
        self.val_fraction, self.seed, self.num_workers, self.max_examples = val_fraction, seed, num_workers, max_examples
        self.chain_turns, self.filler_turns = chain_turns, filler_turns
        self.question_split = _plain(question_split)  # MT-bench's split (data/question_split.py): training reads train
        self.train_examples: list[tuple[list[int], list[bool], list[int]]] = []
        self.val_examples: list[tuple[list[int], list[bool], list[int]]] = []
        self._resume: dict[str, int] = {}
        self.train_sources: list[tuple[tuple[str, int], ...]] = []  # per train example: its (file, record) pairs

    def _paths(self) -> list[str]:
        if self.sources:
            return self.sources
        if self.persona.exchanges_path is None:
            raise UserError(f"persona {self.persona.name!r} has no exchanges file; set data.sources=[PATH.jsonl]")
        return [str(self.persona.exchanges_path)]

    def _encode(self, messages: list[dict[str, str]]) -> tuple[list[int], list[bool], list[int]] | None:
        if self.with_system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.persona.system_prompt}] + messages
        ids, mask, segments = (x[: self.max_length] for x in self.chat.encode_segments(messages))
        return (ids, mask, segments) if any(mask) else None  # truncation cut every assistant token: nothing to learn

    def _chain(self, dialogues: list[list[dict[str, str]]]) -> list[list[dict[str, str]]]:
        """Long conversations for memory mechanisms: `chain_turns` persona dialogues in a row, each after
        `filler_turns` MT-bench exchanges (reference answers) that are history only, never labels."""
        if self.chain_turns <= 1 and self.filler_turns <= 0:
            return dialogues
        from persona_lit.data.question_split import split_from_config
        from persona_lit.data.readers import read_mt_bench_exchanges

        rng = random.Random(self.seed)
        train_ids = split_from_config(self.question_split, None).ids("train") if self.filler_turns > 0 else set()
        filler = read_mt_bench_exchanges(only=train_ids) if self.filler_turns > 0 else []
        if self.filler_turns > len(filler):
            raise UserError(f"data.filler_turns={self.filler_turns}: the train part of the MT-bench question split "
                            f"has {len(filler)} turns with reference answers; allowed: 0 to {len(filler)}")
        chained = []
        for start in range(0, len(dialogues), max(1, self.chain_turns)):
            conversation = []
            for d in dialogues[start : start + self.chain_turns]:
                for f in rng.sample(filler, self.filler_turns) if filler else []:
                    conversation += [dict(m, train=False) for m in f]
                conversation += [m for m in d if m["role"] != "system"]
            chained.append(conversation)
        return chained

    def setup(self, stage: str | None = None) -> None:
        if self.train_examples:
            return
        if self.with_system_prompt:
            persona_len = len(self.chat.encode([{"role": "system", "content": self.persona.system_prompt}])[0])
            if persona_len + 16 > self.max_length:
                raise UserError(f"persona {self.persona.name!r} is {persona_len} tokens; data.max_length="
                                f"{self.max_length} leaves no room for a dialogue (raise data.max_length)")
        dialogues, sources = [], []
        for path in self._paths():
            found = read_dialogues(path)
            dialogues += found
            sources += [(path, k) for k in range(len(found))]
        if not dialogues:
            raise UserError(f"empty data set: no records in {', '.join(self._paths())}")
        sources, step = sources[: self.max_examples], max(1, self.chain_turns)  # _chain joins `step` dialogues
        dialogues = self._chain(dialogues[: self.max_examples])
        groups = [tuple(sources[i : i + step]) for i in range(0, len(sources), step)]
        pairs = [(e, g) for e, g in zip(map(self._encode, dialogues), groups) if e is not None]
        if not pairs:
            raise UserError(f"empty data set: every example lost its assistant text at data.max_length={self.max_length}")
        random.Random(self.seed).shuffle(pairs)  # the same order as shuffling the examples alone
        examples = [e for e, _ in pairs]
        n_val = int(len(examples) * self.val_fraction) if len(examples) >= 10 else 0
        self.val_examples, self.train_examples = examples[:n_val], examples[n_val:]
        self.train_sources = [g for _, g in pairs[n_val:]]

    def describe_rows(self, indices: Sequence[int]) -> str:
        """Training examples (positions in train_examples, as in batch["index"]) as their source lines:
        `file.jsonl lines 3, 17`."""
        lines: dict[str, list[int]] = {}
        for i in indices:
            for path, k in self.train_sources[i]:
                lines.setdefault(path, []).append(k)
        parts = []
        for path, records in lines.items():
            with open(path, encoding="utf-8") as f:  # record k is the k-th non-blank line (read_jsonl)
                numbers = [n for n, line in enumerate(f, start=1) if line.strip()]
            parts.append(f"{path} line{'s' if len(records) > 1 else ''} "
                         + ", ".join(str(numbers[k]) for k in sorted(set(records))))
        return "; ".join(parts)

    def _loader(self, examples, shuffle: bool) -> DataLoader:
        sampler = BucketBatchSampler([len(e[0]) for e in examples], self.batch_size, self.seed, shuffle)
        if shuffle and self._resume:
            sampler.set_epoch(self._resume["epoch"])
            sampler.skip = self._resume["batches_done"]
            self._resume = {}
        if shuffle:  # training batches carry batch["index"], for describe_rows
            return DataLoader(list(enumerate(examples)), batch_sampler=sampler,
                              collate_fn=IndexedCollator(self.chat.pad_id), num_workers=self.num_workers)
        return DataLoader(examples, batch_sampler=sampler, collate_fn=Collator(self.chat.pad_id),
                          num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_examples, shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        return self._loader(self.val_examples, shuffle=False) if self.val_examples else []

    def state_dict(self) -> dict[str, Any]:
        loop = self.trainer.fit_loop if self.trainer is not None else None
        if loop is None:
            return {}
        done = loop.epoch_loop.batch_progress.current.processed
        return {"epoch": self.trainer.current_epoch, "batches_done": done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = dict(state) if state else {}
