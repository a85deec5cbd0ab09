"""Trainable state + run config in one safetensors file: small, pickle-free, self-describing."""

from __future__ import annotations

import errno
import io
import json
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import nn

from persona_lit.errors import UserError
from persona_lit.outputs import staged_file

FORMAT_VERSION = "1"
FINAL_NAME = "final.safetensors"


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors, whole. Under FSDP2 (trainer=fsdp2) a parameter is a sharded DTensor: gathered here,
    a collective, so every rank must call this."""
    def whole(p: torch.Tensor) -> torch.Tensor:
        return p.full_tensor() if hasattr(p, "full_tensor") else p

    return {name: whole(p.detach()).contiguous().cpu() for name, p in model.named_parameters() if p.requires_grad}


def write_atomic(path: str | Path, data: bytes) -> Path:
    """`data` written to a temporary file beside `path`, then renamed onto it: a kill leaves the old file whole.
    A write that fails (disk full, file size limit, read-only) is a UserError naming the file and the cause; the
    temporary file is removed and the old file kept. Serialized in memory first so that every write error is an
    OSError from Python (torch.save and safetensors report them as RuntimeError / SafetensorError)."""
    path = Path(path)
    try:
        with staged_file(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(data)
    except OSError as e:
        cause = e.strerror or str(e)
        if e.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            cause += " (free some space, or write the run elsewhere: hydra.run.dir=...)"
        kept = "; the previous file is kept" if path.is_file() else ""
        raise UserError(f"cannot write {path}: {cause}{kept}") from None
    return path


def save_checkpoint(path: str | Path, tensors: dict[str, torch.Tensor], config: dict[str, Any], fingerprint: str) -> Path:
    """Atomic: written to a temporary file in the same directory, then renamed into place."""
    meta = {"persona_lit": json.dumps({"version": FORMAT_VERSION, "fingerprint": fingerprint, "config": config})}
    return write_atomic(path, safetensors_bytes(tensors, metadata=meta))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint writer (last.ckpt) made atomic with write_atomic. Lightning's own stages the file in
    the system temp directory and, when that is another filesystem (a local /tmp, the run on shared storage),
    copies it into place: a kill during the copy leaves a truncated last.ckpt, and a full disk a traceback."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        if storage_options is not None or "://" in str(path):  # remote storage: Lightning's fsspec writer
            return super().save_checkpoint(checkpoint, path, storage_options)
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        write_atomic(path, buffer.getbuffer())


def resolve_checkpoint_path(ckpt: str | Path) -> Path:
    """A .safetensors file, or a run directory holding checkpoints/final.safetensors."""
    path = Path(ckpt).expanduser()
    if path.is_dir():
        for candidate in (path / "checkpoints" / FINAL_NAME, path / FINAL_NAME):
            if candidate.is_file():
                return candidate
        raise UserError(f"ckpt={ckpt}: no {FINAL_NAME} in this directory or its checkpoints/ folder")
    if not path.is_file():
        raise UserError(f"ckpt={ckpt}: file not found (give a .safetensors checkpoint or a run directory)")
    if path.suffix != ".safetensors":
        raise UserError(f"ckpt={ckpt}: not a .safetensors checkpoint (Lightning .ckpt files are for ckpt_path= "
                        f"resuming; evaluate.py reads the {FINAL_NAME} written beside them)")
    return path


def read_checkpoint(ckpt: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, header) where header has version, fingerprint and config. Never unpickles."""
    path = resolve_checkpoint_path(ckpt)
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = (f.metadata() or {}).get("persona_lit")
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"ckpt={path}: corrupted or not a safetensors file ({' '.join(str(e).split())[:300]})") from None
    if raw is None:
        raise UserError(f"ckpt={path}: a safetensors file without persona_lit metadata (not written by train.py)")
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, RecursionError):
        raise UserError(f"ckpt={path}: corrupted persona_lit metadata") from None
    if not isinstance(header, dict) or not isinstance(header.get("config"), dict):
        raise UserError(f"ckpt={path}: corrupted persona_lit metadata (allowed: a JSON object with version, "
                        f"fingerprint and config, as train.py writes it)")
    return tensors, header


def load_trainable(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Loads exactly the trainable tensors; a missing or unknown name is an error, not a silent no-op."""
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or unexpected:
        name = (missing or unexpected)[0]
        raise UserError(f"{where}: checkpoint does not fit this model and mechanism "
                        f"({len(missing)} missing, {len(unexpected)} unexpected tensors, e.g. {name!r})")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in tensors.items():
            if params[name].shape != value.shape:
                raise UserError(f"{where}: tensor {name!r} has shape {tuple(value.shape)}, "
                                f"the model has {tuple(params[name].shape)}")
            params[name].copy_(value.to(params[name].dtype))
