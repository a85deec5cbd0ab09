"""`steer`: activation addition along a persona direction, and activation capping (a persona floor).

At each chosen decoder block L (index L = the block's output, the residual stream after it; see
persona_lit/steering/vectors.py) a forward hook replaces the block's output h by

    h + alpha * n_L * u_L (+ steer_delta_L)        then, with `cap`:   h + max(0, cap * n_L - h.u_L) * u_L

u_L is the direction file's vector at L normalised to length 1 and n_L the layer's typical activation
norm (from the same file), so alpha is in units of that norm and one alpha means the same on any model.
Capping lifts the projection on u_L to a floor and leaves states already above it alone (the stabiliser
of the assistant-axis work): a persona floor instead of a push; with a cap, alpha may be 0.

Positions: `all` steers every token; `prompt` the persona segment, user turns and assistant headers;
`response` the assistant's own tokens. In a model call that carries `assistant_mask` (training: the
labelled tokens) the mask decides; otherwise the conversation phase does: begin_turn() -> prompt,
begin_answer() (the runner, once the prompt is fed) -> response, so every generated token and the
closing end token count as response.

History: `steered` keeps whatever the steered forwards wrote into the KV cache; `clean` sets
`clean_history`, so the conversation runner caches the persona segment and every finished turn with
the mechanism disabled (re-encoding the turn after its answer): only the current turn is steered.

The unit vectors live as non-persistent buffers of a small module inside each steered block (so
.to(device, dtype) moves them and checkpoints never hold them); `train_vector` adds a zero-initialised
`steer_delta` parameter per steered layer, the only thing that trains.
"""

from __future__ import annotations

import math
from typing import Any, ContextManager

import torch
from torch import nn

from persona_lit.models.backbones import decoder_layers, fingerprint, layer_types
from persona_lit.errors import UserError
from persona_lit.mechanisms.base import Mechanism
from persona_lit.steering.vectors import block_output, load_direction, with_block_output

POSITIONS = ("all", "prompt", "response")
HISTORIES = ("steered", "clean")
# Cache layers the conversation runner can roll back to a turn's first slot (conversation.py, clean history).
ROLLBACK_LAYER_TYPES = ("full_attention", "sliding_attention", "chunked_attention")
KEY = "mechanism.options"


class SteerVector(nn.Module):
    """One steered block's vector: the unit direction (a buffer: it follows the model's device and dtype),
    the layer's activation norm, and the optional trainable `steer_delta`."""

    def __init__(self, unit: torch.Tensor, norm: float, train: bool):
        super().__init__()
        self.register_buffer("steer_unit", unit.clone(), persistent=False)
        self.norm = float(norm)
        self.steer_delta = nn.Parameter(torch.zeros_like(unit)) if train else None

    def push(self, alpha: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """alpha * n_L * u_L (+ steer_delta), in `dtype` on `device` (the block's output's)."""
        v = self.steer_unit * (alpha * self.norm)
        if self.steer_delta is not None:
            v = v + self.steer_delta
        return v.to(device=device, dtype=dtype)


def _number(value: Any, key: str, allow_none: bool = False) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        allowed = "null or a finite number" if allow_none else "a finite number"
        raise UserError(f"{KEY}.{key}={value!r}: need {allowed}")
    return float(value)


class SteerMechanism(Mechanism):
    name = "steer"
    attention_untouched = True  # it adds to the residual stream: attention as the model has it

    # Defaults as in its options dataclass (persona_lit/config/mechanisms.py), where they are documented and typed
    # (a test keeps the two equal).
    def __init__(self, direction: str | None = None, layers: int | list[int] | None = None, alpha: float = 0.25,
                 positions: str = "all", cap: float | None = None, history: str = "steered",
                 train_vector: bool = False):
        if direction is None or not str(direction).strip():
            raise UserError(f"{KEY}.direction={direction}: give the path of a persona direction file "
                            f"(.safetensors, written by task=direction)")
        if positions not in POSITIONS:
            raise UserError(f"{KEY}.positions={positions!r}: unknown; allowed: {', '.join(POSITIONS)}")
        if history not in HISTORIES:
            raise UserError(f"{KEY}.history={history!r}: unknown; allowed: {', '.join(HISTORIES)}")
        if not isinstance(train_vector, bool):
            raise UserError(f"{KEY}.train_vector={train_vector!r}: need true or false")
        if layers is not None:
            layers = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
            if not isinstance(layers, (list, tuple)) or not layers or \
                    not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
                raise UserError(f"{KEY}.layers={layers!r}: need null, a layer index or a non-empty list of them")
        self.direction_path, self.layers = str(direction), None if layers is None else sorted(set(layers))
        self.alpha, self.cap = _number(alpha, "alpha"), _number(cap, "cap", allow_none=True)
        self.positions, self.history, self.train_vector = positions, history, train_vector
        self.direction = None
        self.vectors: dict[int, SteerVector] = {}
        self._phase = "prompt"
        self._call_mask: torch.Tensor | None = None

    # attach ---------------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> nn.Module:
        model.requires_grad_(False)
        blocks = decoder_layers(model)
        n = len(blocks)
        self.direction = load_direction(self.direction_path, key=f"{KEY}.direction", fingerprint=fingerprint(model),
                                        layers=n)
        if self.layers is None:
            self.layers = [n // 2]  # the middle block
        bad = [i for i in self.layers if not 0 <= i < n]
        if bad:
            raise UserError(f"{KEY}.layers={self.layers}: layer {bad[0]} is out of range; this model has "
                            f"decoder blocks 0..{n - 1}")
        for i in self.layers:
            norm = float(self.direction.activation_norm[i])
            if float(self.direction.vectors[i].norm()) == 0 or not norm > 0:
                raise UserError(f"{KEY}.layers={self.layers}: the direction file {self.direction_path} has a zero "
                                f"vector or activation norm at layer {i}; choose other layers")
        if self.history == "clean":
            odd = sorted(set(layer_types(model)) - set(ROLLBACK_LAYER_TYPES))
            if odd:
                raise UserError(f"{KEY}.history=clean: this model's KV cache has {odd[0]!r} layers, which cannot "
                                f"be rolled back to re-encode a turn; allowed here: history=steered")
        weight = model.get_input_embeddings().weight  # floating point even in a quantized model
        for i in self.layers:
            vec = SteerVector(self.direction.unit(i).to(device=weight.device, dtype=weight.dtype),
                              float(self.direction.activation_norm[i]), self.train_vector)
            blocks[i].steer = vec  # inside the model's tree: .to() and named_parameters() reach it
            self.vectors[i] = vec
            blocks[i].register_forward_hook(self._hook(i), with_kwargs=True)
        model.register_forward_pre_hook(self._take_mask, with_kwargs=True)
        model.register_forward_hook(self._drop_mask)
        return super().attach(model)

    def trainable_parameters(self):
        return (v.steer_delta for v in self.vectors.values() if v.steer_delta is not None)

    # protocol ---------------------------------------------------------------------------------------
    @property
    def uses_assistant_mask(self) -> bool:
        return self.positions != "all"

    @property
    def clean_history(self) -> bool:  # with nothing to add the cache is clean already: no re-encoding
        return self.history == "clean" and not self._disabled and not self._idle()

    def _idle(self) -> bool:
        return self.alpha == 0.0 and self.cap is None and not self.train_vector

    def disabled(self) -> ContextManager:
        return self.switched_off()

    def begin_conversation(self, persona=None) -> None:
        self._phase = "prompt"

    def begin_turn(self) -> None:
        self._phase = "prompt"

    def begin_answer(self) -> None:
        self._phase = "response"

    def snapshot(self) -> Any:
        return self._phase

    def restore(self, state: Any) -> None:
        self._phase = state

    # hooks ------------------------------------------------------------------------------------------
    def _take_mask(self, module, args, kwargs):
        mask = kwargs.pop("assistant_mask", None)
        self._call_mask = None if mask is None else mask.bool()
        return args, kwargs

    def _drop_mask(self, *args) -> None:
        self._call_mask = None

    def _where(self, hidden: torch.Tensor) -> bool | torch.Tensor:
        """True: every position; False: none; else a bool mask [B, T, 1] of the positions to steer."""
        if self.positions == "all":
            return True
        if self._call_mask is not None:
            response = self._call_mask[:, -hidden.shape[1]:].to(hidden.device)[..., None]
            return response if self.positions == "response" else ~response
        return self._phase == self.positions

    def _hook(self, layer: int):
        def hook(module, args, kwargs, output):
            if self._disabled or self._idle():
                return None  # nothing to add: the block's output untouched (bit for bit)
            where = self._where(block_output(output))
            if where is False:
                return None
            return with_block_output(output, self.steer(block_output(output), layer, where))
        return hook

    def steer(self, h: torch.Tensor, layer: int, where: bool | torch.Tensor = True) -> torch.Tensor:
        """Block `layer`'s output `h` [B, T, H] as steered at positions `where`."""
        vec, new = self.vectors[layer], h
        if self.alpha != 0.0 or vec.steer_delta is not None:
            new = new + vec.push(self.alpha, h.dtype, h.device)
        if self.cap is not None:
            unit = vec.steer_unit.to(device=h.device, dtype=h.dtype)
            deficit = (self.cap * vec.norm - (new.float() @ unit.float())[..., None]).clamp(min=0)
            new = torch.where(deficit > 0, new + deficit.to(h.dtype) * unit, new)
        return new if where is True else torch.where(where, new, h)
