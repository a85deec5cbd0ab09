"""LoRA training-step throughput: PersonaLitModule + Lightning Trainer against a plain PyTorch + PEFT loop.

Both arms train the same LoRA (persona_lit's LoraMechanism, dropout 0) from identical weights on the
SAME fixed batches with AdamW (lr 2e-4, no weight decay, as conf/train.yaml), fp32 on CPU, in one run.
Each arm does WARMUP untimed steps, then `--steps` timed steps; the arms alternate over `--repeats`
(plain, lightning, plain, lightning, ...) and the median tokens/s per arm is reported, since the
machine is noisy. Tokens are non-padding tokens. The Lightning arm is timed by a callback from
on_train_batch_start of the first timed step to on_train_batch_end of the last, so Trainer setup
and teardown are excluded. After the same number of steps both arms' LoRA weights must agree.

Batches: the built-in persona `joyful_writer`, encoded by PersonaDialogueDataModule (system prompt,
labels on assistant tokens), whole dialogues packed greedily into rows of `--seq-len` tokens and
right-padded to exactly `--seq-len`.

    .venv/bin/python bench/train_step.py [--model smollm2-135m-instruct|tiny-llama] [--steps 8]
        [--batch-size 4] [--seq-len 256] [--repeats 3]
"""

from __future__ import annotations

import argparse
import copy
import functools
import gc
import logging
import statistics
import time
import warnings
from pathlib import Path

import lightning as L
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from persona_lit.models.backbones import load_backbone
from persona_lit.data.dialogues import IGNORE, Collator, PersonaDialogueDataModule
from persona_lit.mechanisms.lora import LoraMechanism
from persona_lit.training.module import PersonaLitModule
from persona_lit.personas.load import load_persona

CONF = Path(__file__).resolve().parent.parent / "conf"
PERSONA = "joyful_writer"
WARMUP = 2  # untimed steps per arm run
LORA = dict(r=16, alpha=32, dropout=0.0)
OPTIMIZER = functools.partial(torch.optim.AdamW, lr=2e-4, weight_decay=0.0)


def make_batches(chat, n: int, batch_size: int, seq_len: int) -> list[dict[str, torch.Tensor]]:
    """`n` batches of `batch_size` rows, each row whole persona dialogues packed up to `seq_len` tokens."""
    dm = PersonaDialogueDataModule(chat, load_persona(PERSONA), max_length=seq_len, batch_size=batch_size,
                                   val_fraction=0.0, seed=0)
    dm.setup("fit")
    examples, rows, i = dm.train_examples, [], 0
    while len(rows) < n * batch_size:  # cycle through the dialogues as often as needed
        ids, mask = [], []
        while len(ids) + len(examples[i % len(examples)][0]) <= seq_len:
            ids += examples[i % len(examples)][0]
            mask += examples[i % len(examples)][1]
            i += 1
        rows.append((ids, mask))
    collate = Collator(chat.pad_id)
    batches = []
    for b in range(n):
        batch = collate(rows[b * batch_size : (b + 1) * batch_size])
        pad = seq_len - batch["input_ids"].shape[1]
        fills = {"input_ids": chat.pad_id, "attention_mask": 0, "labels": IGNORE, "segment_ids": -1}
        batches.append({k: torch.nn.functional.pad(v, (0, pad), value=fills[k]) for k, v in batch.items()})
    return batches


def lora_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def real_tokens(batches) -> int:
    return int(sum(b["attention_mask"].sum() for b in batches))


def run_plain(pristine, batches, steps: int) -> tuple[float, dict[str, torch.Tensor]]:
    model, mechanism = copy.deepcopy(pristine)
    model.train()
    optimizer = OPTIMIZER(list(mechanism.trainable_parameters()))
    for i, batch in enumerate(batches[: WARMUP + steps]):
        if i == WARMUP:
            start = time.perf_counter()
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start, lora_state(model)


class StepTimer(L.Callback):
    """Seconds from on_train_batch_start of step `first` to on_train_batch_end of step `last`."""

    def __init__(self, first: int, last: int):
        self.first, self.last, self.seconds = first, last, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx: int) -> None:
        if trainer.global_step == self.first:
            self._start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx: int) -> None:
        if trainer.global_step == self.last + 1:  # global_step counts optimizer steps already taken
            self.seconds = time.perf_counter() - self._start


def run_lightning(pristine, batches, steps: int) -> tuple[float, dict[str, torch.Tensor]]:
    model, mechanism = copy.deepcopy(pristine)
    module = PersonaLitModule(model, mechanism, optimizer=OPTIMIZER)
    timer = StepTimer(WARMUP, WARMUP + steps - 1)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=WARMUP + steps, max_epochs=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, callbacks=[timer])
    trainer.fit(module, train_dataloaders=DataLoader(batches[: WARMUP + steps], batch_size=None, shuffle=False))
    assert trainer.global_step == WARMUP + steps and timer.seconds is not None, "Lightning did not run every step"
    return timer.seconds, lora_state(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", choices=["smollm2-135m-instruct", "tiny-llama"])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per arm run")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for noise in (".*does not have many workers.*", ".*`validation_step` but have no `val_dataloader`.*",
                  ".*LeafSpec.*", ".*is_gradient_checkpointing.*"):
        warnings.filterwarnings("ignore", message=noise)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)

    backbone = load_backbone(OmegaConf.load(CONF / "model" / f"{args.model}.yaml"))
    torch.manual_seed(0)  # LoRA A init; every arm run deep-copies this one model, so all start identical
    mechanism = LoraMechanism(**LORA)
    pristine = (mechanism.attach(backbone.model), mechanism)
    batches = make_batches(backbone.chat, WARMUP + args.steps, args.batch_size, args.seq_len)
    timed = batches[WARMUP:]
    tokens = real_tokens(timed)
    shape = "x".join(map(str, batches[0]["input_ids"].shape))
    print(f"model {args.model}, LoRA r={LORA['r']} alpha={LORA['alpha']} dropout 0, AdamW lr 2e-4, fp32, CPU "
          f"({torch.get_num_threads()} threads)")
    print(f"batches {shape} (persona {PERSONA}, packed dialogues), {WARMUP} warmup + {args.steps} timed steps per "
          f"arm run, {tokens} non-padding tokens timed ({tokens / (len(timed) * timed[0]['input_ids'].numel()):.0%})")
    print("lightning arm timed by a callback: on_train_batch_start of the first timed step to on_train_batch_end "
          "of the last (Trainer setup excluded)")

    rates: dict[str, list[float]] = {"plain": [], "lightning": []}
    final: dict[str, list[dict[str, torch.Tensor]]] = {"plain": [], "lightning": []}
    print(f"\n{'repeat':<8}{'arm':<11}{'s/step':>8}{'tokens/s':>10}")
    for r in range(args.repeats):
        for arm, run in (("plain", run_plain), ("lightning", run_lightning)):
            seconds, state = run(pristine, batches, args.steps)
            rates[arm].append(tokens / seconds)
            final[arm].append(state)
            print(f"{r + 1:<8}{arm:<11}{seconds / args.steps:>8.3f}{tokens / seconds:>10.1f}", flush=True)
            gc.collect()

    start = lora_state(pristine[0])
    ref = final["plain"][0]
    diff = max((s[n] - ref[n]).abs().max().item() for arm in final for s in final[arm] for n in ref)
    moved = max((ref[n] - start[n]).abs().max().item() for n in ref)
    median = {arm: statistics.median(v) for arm, v in rates.items()}
    print(f"\n{'arm':<11}{'tokens/s (median)':>18}")
    for arm in ("plain", "lightning"):
        print(f"{arm:<11}{median[arm]:>18.1f}")
    print(f"\nLoRA weights after {WARMUP + args.steps} steps ({len(ref)} tensors), every run vs plain run 1: "
          f"max abs diff {diff:.2e} (weights moved up to {moved:.2e} from init)")
    print(f"ratio lightning/plain: {median['lightning'] / median['plain']:.2f} (target >= 0.95)")


if __name__ == "__main__":
    main()
