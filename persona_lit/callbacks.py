"""Lightning callbacks: throughput and memory per step, and the final safetensors export."""

from __future__ import annotations

import resource
import sys
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch

from persona_lit.checkpoint import FINAL_NAME, save_checkpoint, trainable_state


def peak_memory_mb() -> float:
    """Peak accelerator memory if there is one, else the process's peak resident set size."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # macOS reports bytes, Linux KiB


class ThroughputMonitor(L.Callback):
    """Logs train/tokens_per_s (real, unpadded tokens) and train/peak_mem_mb every step."""

    def on_train_batch_start(self, trainer, pl_module, batch: dict[str, Any], batch_idx: int) -> None:
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: dict[str, Any], batch_idx: int) -> None:
        seconds = time.perf_counter() - self._start
        tokens = int(batch["attention_mask"].sum())
        pl_module.log("train/tokens_per_s", tokens / max(seconds, 1e-9), batch_size=batch["input_ids"].shape[0])
        pl_module.log("train/peak_mem_mb", peak_memory_mb(), batch_size=batch["input_ids"].shape[0])


class ExportCheckpoint(L.Callback):
    """At the end of training, writes checkpoints/final.safetensors (trainable state + run config) and
    the mechanism's standard artifact (e.g. a PEFT adapter directory) beside it."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)

    def on_train_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        path = save_checkpoint(self.dirpath / FINAL_NAME, trainable_state(pl_module.model), pl_module.run_config,
                               pl_module.fingerprint)
        pl_module.mechanism.export(self.dirpath / "peft_adapter")
        print(f"persona_lit: checkpoint written to {path}")
