"""A persona direction file, and forward hooks on decoder-block outputs (the one place both live).

A direction is stored as safetensors: `direction` [layers, hidden] float32 (mean activation with the
persona minus without, unnormalised) and `activation_norm` [layers] (the mean L2 norm of the residual
stream over the same tokens without the persona: the unit in which steering strength alpha is given, so
one alpha means the same on any model). Everything else is string metadata (see Direction.meta).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors import SafetensorError
from safetensors.torch import safe_open, save_file
from torch import nn

from persona_lit.models.backbones import decoder_layers
from persona_lit.errors import UserError
from persona_lit.outputs import staged_file

FORMAT = "persona_lit.direction/1"
CONVENTION = "index L = output of decoder block L (residual stream after it) = hidden_states[L + 1]"


@dataclass
class Direction:
    vectors: torch.Tensor  # [layers, hidden] float32: mean(with persona) - mean(without)
    activation_norm: torch.Tensor  # [layers]: mean ||h|| without the persona over the same tokens
    meta: dict[str, Any] = field(default_factory=dict)  # model, fingerprint, token_role, persona, source, samples...

    @property
    def layers(self) -> int:
        return self.vectors.shape[0]

    def unit(self, layer: int) -> torch.Tensor:
        """The direction at `layer`, normalised to length 1 (a zero vector stays zero)."""
        v = self.vectors[layer].float()
        n = v.norm()
        return v / n if n > 0 else v

    def save(self, path: str | Path) -> Path:
        """Atomic (temporary file + rename). Metadata values are JSON-encoded strings."""
        path = Path(path)
        meta = {k: json.dumps(v) for k, v in self.meta.items()}
        meta.update(format=json.dumps(FORMAT), layer_convention=json.dumps(CONVENTION),
                    direction_norm=json.dumps([round(float(x), 6) for x in self.vectors.float().norm(dim=-1)]))
        tensors = {"direction": self.vectors.float().contiguous().cpu(),
                   "activation_norm": self.activation_norm.float().contiguous().cpu()}
        with staged_file(path) as tmp:
            save_file(tensors, tmp, metadata=meta)
        return path


def load_direction(path: str | Path, key: str = "direction", fingerprint: str | None = None,
                   layers: int | None = None) -> Direction:
    """Reads a direction file (never unpickles). `key` names the config key in error lines; a
    `fingerprint` or `layers` given must match the file's, or it is a UserError."""
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise UserError(f"{key}={path}: file not found (a .safetensors direction written by task=direction)")
    try:
        with safe_open(str(p), framework="pt") as f:
            raw = f.metadata() or {}
            names = set(f.keys())
            tensors = {n: f.get_tensor(n) for n in names & {"direction", "activation_norm"}}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{key}={path}: not a safetensors file ({str(e).splitlines()[0] if str(e) else e})") from None
    try:
        meta = {k: json.loads(v) for k, v in raw.items()}
    except json.JSONDecodeError:
        raise UserError(f"{key}={path}: corrupted metadata (not JSON values)") from None
    if meta.get("format") != FORMAT or set(tensors) != {"direction", "activation_norm"}:
        raise UserError(f"{key}={path}: not a persona_lit direction file (format {meta.get('format')!r}, "
                        f"tensors {sorted(names)}; expected {FORMAT} with direction, activation_norm)")
    vectors, norms = tensors["direction"], tensors["activation_norm"]
    if vectors.ndim != 2 or norms.shape != (vectors.shape[0],) or not torch.isfinite(vectors).all():
        raise UserError(f"{key}={path}: direction {tuple(vectors.shape)} and activation_norm {tuple(norms.shape)} "
                        f"do not fit ([layers, hidden] and [layers], finite)")
    if layers is not None and vectors.shape[0] != layers:
        raise UserError(f"{key}={path}: direction has {vectors.shape[0]} layers, this model has {layers} "
                        f"(model {meta.get('model')!r})")
    if fingerprint is not None and meta.get("fingerprint") not in (None, fingerprint):
        raise UserError(f"{key}={path}: extracted on another base model ({meta.get('model')!r}, fingerprint "
                        f"{meta.get('fingerprint')!r}); this model has fingerprint {fingerprint}")
    for k in ("format", "layer_convention"):
        meta.pop(k, None)
    return Direction(vectors.float(), norms.float(), meta)


def block_output(output: Any) -> torch.Tensor:
    """The hidden states a decoder block returned (a tensor in transformers 5; a tuple's first item before)."""
    return output[0] if isinstance(output, tuple) else output


def with_block_output(output: Any, hidden: torch.Tensor) -> Any:
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


@contextlib.contextmanager
def block_hooks(model: nn.Module, fns: dict[int, Callable[[torch.Tensor, dict[str, Any]], torch.Tensor | None]]
                ) -> Iterator[None]:
    """Forward hooks on decoder blocks: fns[L](hidden [B, T, H], the block's kwargs) sees block L's output
    and may return a replacement (None keeps it). Removed on exit, also on error."""
    blocks = decoder_layers(model)
    for layer in fns:
        if not 0 <= layer < len(blocks):
            raise UserError(f"layer {layer}: this model has decoder blocks 0..{len(blocks) - 1}")
    handles = []

    def make(fn):
        def hook(module, args, kwargs, output):
            new = fn(block_output(output), kwargs)
            return None if new is None else with_block_output(output, new)
        return hook

    try:
        for layer, fn in fns.items():
            handles.append(blocks[layer].register_forward_hook(make(fn), with_kwargs=True))
        yield
    finally:
        for h in handles:
            h.remove()
