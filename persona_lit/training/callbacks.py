"""Lightning callbacks: memory per step, progress lines for log files, throughput, a stop at a non-finite loss, the final safetensors export."""

from __future__ import annotations

import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ThroughputMonitor

from persona_lit.training.checkpoint import FINAL_NAME, save_checkpoint, trainable_state
from persona_lit.errors import UserError
from persona_lit.outputs import _umask


def peak_memory_mb() -> float:
    """Peak accelerator memory if there is one, else the process's peak resident set size."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return torch.cuda.max_memory_allocated() / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # macOS reports bytes, Linux KiB


class PeakMemory(L.Callback):
    """Logs train/peak_mem_mb every step (tokens per second: Lightning's ThroughputMonitor, see throughput())."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: dict[str, Any], batch_idx: int) -> None:
        pl_module.log("train/peak_mem_mb", peak_memory_mb(), batch_size=batch["input_ids"].shape[0])


def _rows(batch: dict[str, Any]) -> int:
    return int(batch["input_ids"].shape[0])


def _tokens(batch: dict[str, Any]) -> int:
    return int(batch["attention_mask"].sum())  # real, unpadded tokens


def throughput(window: int = 2) -> ThroughputMonitor:
    """Lightning's ThroughputMonitor on our batches: train/device/items_per_sec is real (unpadded) tokens per
    second, train/device/samples_per_sec conversations per second, over the last `window` steps."""
    return ThroughputMonitor(batch_size_fn=_rows, length_fn=_tokens, window_size=window)


class LogProgress(L.Callback):
    """Where stderr is not a terminal (nohup, a batch job), the progress bar leaves nothing a log file keeps: every
    `every_s` seconds, and at the last step, one line: step, loss, seconds per step, tokens per second, time
    left."""

    def __init__(self, every_s: float = 30.0, stream: Any = None):
        self.every_s, self.stream = float(every_s), stream

    def on_train_start(self, trainer, pl_module) -> None:
        self._t0 = self._last = time.perf_counter()
        self._step0, self._tokens = trainer.global_step, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch: dict[str, Any], batch_idx: int) -> None:
        self._tokens += _tokens(batch)
        now, step, total = time.perf_counter(), trainer.global_step, trainer.max_steps
        if now - self._last < self.every_s and step != total:
            return
        self._last = now
        done = max(step - self._step0, 1)
        per_step = (now - self._t0) / done
        loss = trainer.callback_metrics.get("train/loss")
        left = f", {_clock(per_step * (total - step))} left" if total and total > 0 else ""
        print(f"persona_lit: step {step}/{total if total and total > 0 else '?'}"
              + (f", loss {float(loss):.4f}" if loss is not None else "")
              + f", {per_step:.2f} s/step, {self._tokens / max(now - self._t0, 1e-9):.0f} tokens/s{left}",
              file=self.stream or sys.stderr, flush=True)


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class StopOnNonFiniteLoss(L.Callback):
    """Stops training at the first NaN or infinite training loss, before its backward pass and optimizer step:
    no weights, no last.ckpt and no final.safetensors ever hold it. The error names the step, the batch's source
    rows (batch["index"] through the data module's describe_rows), the mechanism and the last checkpoint, which
    was written before it and is kept. Every process stops at the same step (the decision is reduced over them)."""

    def on_train_batch_start(self, trainer, pl_module, batch: dict[str, Any], batch_idx: int) -> None:
        self._batch = batch

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        values = loss.detach().float().flatten()
        bad = not bool(torch.isfinite(values).all())
        if not trainer.strategy.reduce_boolean_decision(bad, all=False):
            return
        what = f"the training loss is {values[~torch.isfinite(values)][0].item()}" if bad else \
            "another process's training loss is not finite"
        index, data = self._batch.get("index"), trainer.datamodule
        if not bad:
            rows = "on that process"
        elif index is not None and hasattr(data, "describe_rows"):
            rows = data.describe_rows(index.tolist())
        else:
            rows = "not recorded by this data module"
        saved = trainer.checkpoint_callback
        if saved is not None and saved.last_model_path and Path(saved.last_model_path).is_file():
            step = getattr(saved, "_last_global_step_saved", "?")
            kept = f"the last checkpoint, {saved.last_model_path} (step {step}), is kept"
        else:
            kept = "no checkpoint was written before it"
        raise UserError(f"{what} at step {trainer.global_step} (mechanism {pl_module.mechanism.name}; batch rows: "
                        f"{rows}); training stopped before updating from it, {kept} (lower module.optimizer.lr, "
                        f"or check those rows)")


class ExportCheckpoint(L.Callback):
    """At the end of training, writes the mechanism's standard artifact (e.g. a PEFT adapter directory) and then
    checkpoints/final.safetensors (trainable state + run config): both staged and renamed into place, so a kill
    leaves the previous ones, and a final.safetensors means a complete export."""

    def __init__(self, dirpath: str):
        self.dirpath = Path(dirpath)

    def on_train_end(self, trainer, pl_module) -> None:
        state = trainable_state(pl_module.model)  # on every rank: FSDP2 gathers its shards here
        if not trainer.is_global_zero:
            return
        export_staged(pl_module.mechanism, self.dirpath / "peft_adapter", state)
        path = save_checkpoint(self.dirpath / FINAL_NAME, state, pl_module.run_config, pl_module.fingerprint)
        print(f"persona_lit: checkpoint written to {path}")


def export_staged(mechanism, directory: Path, state: dict[str, torch.Tensor] | None = None) -> None:
    """mechanism.export into a temporary sibling of `directory`, which then replaces it (nothing if the
    mechanism has no artifact). `state`: the whole trainable tensors (trainable_state), when the model's own are
    sharded."""
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}."))
        try:
            mechanism.export(tmp, state)
            if not any(tmp.iterdir()):
                tmp.rmdir()
                return
            os.chmod(tmp, 0o777 & ~_umask())
            old = directory.rename(tmp.with_name(tmp.name + ".old")) if directory.exists() else None
            tmp.rename(directory)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except OSError as e:
        raise UserError(f"cannot write {directory}: {e.strerror or e}") from None


class DriftCallback(L.Callback):
    """Every `every_n_val_epochs` validation epochs, a short drift protocol (persona arm only, a few
    MT-bench turns) on the model being trained; logs `val_drift/<metric>/turn_<t>` at the current step
    (the training step is its x-axis, as for train/* and val/*; evaluate.py's drift/* are against the turn).
    `baseline=True` adds the baseline arm (the persona as system prompt, mechanism disabled) at twice the cost.

    Under DDP it runs on rank 0 alone (the other ranks wait for it in their next collective): the protocol's
    metrics are computed rank-locally (persona_lit.evaluation.protocol.LOCAL, no sync on compute), so rank 0 never enters
    a collective the other ranks do not join."""

    def __init__(self, chat, persona, every_n_val_epochs: int = 1, turns: int = 4, probe_turns=(0, 4),
                 max_new_tokens: int = 32, seed: int = 0, mt_bench_path: str | None = None, baseline: bool = False,
                 question_split: Any = None):
        self.chat, self.persona, self.every, self.baseline = chat, persona, every_n_val_epochs, baseline
        self.turns, self.probe_turns, self.max_new_tokens = turns, [t for t in probe_turns if t <= turns], max_new_tokens
        self.seed, self.mt_bench_path, self._epochs = seed, mt_bench_path, 0
        self.question_split = question_split  # the training data's MT-bench split: the callback asks its val part

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.sanity_checking or not self.every:
            return
        self._epochs += 1
        if self._epochs % self.every or not trainer.is_global_zero:
            return
        from persona_lit.evaluation.conversation import ConversationRunner
        from persona_lit.data import read_mt_bench, turn_stream
        from persona_lit.evaluation.protocol import run_protocol, summarize

        from persona_lit.data.question_split import split_from_config

        val = split_from_config(self.question_split, self.mt_bench_path).ids("val")
        questions = [q for q in read_mt_bench(self.mt_bench_path) if q.question_id in val]
        stream = turn_stream(questions, self.turns, self.seed, ["roleplay"])
        runner = ConversationRunner(pl_module.model, self.chat, pl_module.mechanism, self.max_new_tokens,
                                    self.max_new_tokens)
        was_training = pl_module.model.training
        pl_module.model.eval()
        try:
            result = run_protocol(runner, self.persona, [stream], self.probe_turns, control=False, progress=False,
                                  baseline=self.baseline)
        finally:
            pl_module.model.train(was_training)
        values = {f"val_drift/{name}/turn_{t}": v for name, m in summarize(result, self.probe_turns)["metrics"].items()
                  for t, v in zip(m["turn"], m["mean"])}
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)
