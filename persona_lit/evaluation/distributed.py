"""Evaluation on several devices: the conversations split across processes (Lightning Fabric, DDP), each
rank running the drift protocol on conversations rank, rank + world, ...; the records are gathered on
rank 0 and put back in the original conversation order, so the result equals one process's.

Fabric's DDP launcher starts ranks 1..N-1 by running the same command again (Hydra overrides included);
they join rank 0 at launch and at the one gather. Only rank 0 writes the report and logs.
"""

from __future__ import annotations

import dataclasses
from datetime import timedelta
from typing import Any, Sequence

import torch
import torch.distributed as dist

from persona_lit.build import resolve_device
from persona_lit.errors import UserError

ACCELERATORS = ("auto", "cpu", "cuda")
# A rank that finished its share waits in the gather for the slowest one: a long evaluation must not
# hit the process group's default 30-minute timeout. A rank that dies closes its sockets (gloo) or is
# killed by the launcher's observer, so a failure still ends the others.
GATHER_TIMEOUT = timedelta(hours=48)


def resolve_placement(device: Any, devices: Any, accelerator: Any) -> tuple[int, str | None]:
    """(devices, accelerator): accelerator is None for one process (then `device` says where)."""
    try:
        n = int(devices)
    except (TypeError, ValueError):
        n = 0
    if n < 1 or str(n) != str(devices).strip():
        raise UserError(f"devices={devices}: must be an integer >= 1 (the number of evaluation processes)")
    kind = "auto" if accelerator is None else str(accelerator).strip().lower()
    if kind not in ACCELERATORS:
        raise UserError(f"accelerator={accelerator}: unknown accelerator; allowed: {', '.join(ACCELERATORS)}")
    if n == 1:
        if kind != "auto" and str(device).strip().lower() == "auto":
            return 1, kind  # accelerator=cpu alone means device=cpu
        return 1, None
    named = "auto" if device is None else str(device).strip().lower()
    if named not in ACCELERATORS:
        resolve_device(device)  # an unknown value gets the device line
        raise UserError(f"device={device}: names one device; with devices={n} use accelerator=cuda "
                        f"(each process takes its own device)")
    if "auto" not in (named, kind) and named != kind:
        raise UserError(f"device={device} and accelerator={accelerator} disagree; with devices={n} set accelerator")
    kind = kind if kind != "auto" else named
    if kind == "auto":
        kind = "cuda" if torch.cuda.is_available() else "cpu"
    if kind == "cuda" and torch.cuda.device_count() < n:
        raise UserError(f"devices={n}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                        f"use devices<={torch.cuda.device_count()} or accelerator=cpu")
    return n, kind


@dataclasses.dataclass
class Shards:
    """This process's place among the evaluation processes."""

    fabric: Any

    @property
    def rank(self) -> int:
        return self.fabric.global_rank

    @property
    def world_size(self) -> int:
        return self.fabric.world_size

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device:
        return self.fabric.device

    def share(self, items: Sequence[Any]) -> list[Any]:
        """This rank's conversations: indices rank, rank + world, ..."""
        return list(items)[self.rank :: self.world_size]

    def gather(self, results: list[Any], total: int) -> list[Any] | None:
        """Rank 0: each result (one per persona) with the conversations of every rank back in their
        original order; the other ranks: None."""
        parts: list[Any] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(results, parts, dst=0)
        if not self.is_main:
            return None
        return [interleave([p[i] for p in parts], total) for i in range(len(results))]

    def close(self) -> None:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()


def launch(devices: int, accelerator: str) -> Shards:
    """Starts the other ranks (this process is rank 0 the first time; the relaunched ones join here)."""
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy

    try:
        fabric = Fabric(accelerator=accelerator, devices=devices, strategy=DDPStrategy(timeout=GATHER_TIMEOUT))
    except (ValueError, RuntimeError) as e:  # Lightning's MisconfigurationException is a ValueError
        raise UserError(f"devices={devices} accelerator={accelerator}: {str(e).splitlines()[0]}") from None
    fabric.launch()
    return Shards(fabric)


def interleave(parts: Sequence[Any], total: int) -> Any:
    """One dataclass from the per-rank ones: every field that is a list of conversations (a list whose
    items are lists, one per conversation of that rank) is put back in conversation order, however many
    arms the result has; any other field is rank 0's."""
    world = len(parts)
    sizes = [len(range(r, total, world)) for r in range(world)]
    values = {}
    for f in dataclasses.fields(parts[0]):
        column = [getattr(p, f.name) for p in parts]
        per_conversation = all(isinstance(v, list) and all(isinstance(x, list) for x in v) for v in column)
        if per_conversation and any(column):
            if [len(v) for v in column] != sizes:
                raise RuntimeError(f"gather: field {f.name} has {[len(v) for v in column]} conversations per "
                                   f"rank, expected {sizes}")
            values[f.name] = [column[i % world][i // world] for i in range(total)]
        else:
            values[f.name] = column[0]
    return dataclasses.replace(parts[0], **values)
