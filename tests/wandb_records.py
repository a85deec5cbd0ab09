"""Reads an offline W&B run's records (run-*.wandb): what a dashboard would show once synced. The file is W&B's
header (":W&B", a 2-byte magic, a version byte) followed by a LevelDB-style log: 32 KiB blocks of chunks, each a
4-byte CRC, a 2-byte little-endian length, a 1-byte type (1 full, 2 first, 3 middle, 4 last), then the bytes of a
protobuf `Record` (wandb.proto.wandb_internal_pb2)."""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK, HEADER, CHUNK = 32768, 7, 7


def records(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    out, pos, pending = [], HEADER, b""
    while pos + CHUNK <= len(data):
        left = BLOCK - pos % BLOCK
        if left < CHUNK:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if length == 0 and kind == 0:
            pos += left  # zero padding to the end of the block
            continue
        body = data[pos + CHUNK:pos + CHUNK + length]
        pos += CHUNK + length
        pending = body if kind in (1, 2) else pending + body
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
            pending = b""
    return out


def summary(run_dir: Path) -> dict[str, Any]:
    """The one offline run under run_dir/wandb: its name, group, job type, tags, config (nested, as JSON values),
    the keys of its history rows, and its metric definitions (name or glob -> step metric)."""
    files = sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    out: dict[str, Any] = {"config": {}, "history": [], "metrics": {}}
    for r in records(files[0]):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out.update(id=r.run.run_id, name=r.run.display_name, group=r.run.run_group, job_type=r.run.job_type,
                       tags=list(r.run.tags), project=r.run.project)
            out["config"].update({i.key: json.loads(i.value_json) for i in r.run.config.update})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in r.config.update})
        elif kind == "history":
            out["history"].append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item})
        elif kind == "metric":
            out["metrics"][r.metric.name or r.metric.glob_name] = r.metric.step_metric
    return out
