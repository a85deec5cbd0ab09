"""Data: JSONL readers (errors name file:line) and the LightningDataModules."""

from persona_lit.data.dialogues import BucketBatchSampler, Collator, PersonaDialogueDataModule
from persona_lit.data.mt_bench import MTBenchDataModule, UserTurn, turn_stream
from persona_lit.data.readers import read_dialogues, read_jsonl, read_mt_bench

__all__ = ["BucketBatchSampler", "Collator", "MTBenchDataModule", "PersonaDialogueDataModule", "UserTurn",
           "read_dialogues", "read_jsonl", "read_mt_bench", "turn_stream"]
