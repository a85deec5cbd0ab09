"""`weight_steer`: W ← W + alpha·ΔW for every tensor of a ΔW file (persona_lit/steering/weight_diff.py).

The merge happens on attach; decoding then runs at base speed. The original weights are kept as
non-persistent buffers of a small module inside the model (so .to(device, dtype) moves and casts them
with the weights, and checkpoints never hold them); the merged weight is always computed from them,
(W_orig in fp32 + alpha·ΔW) cast to the weight's dtype, so restoring is a copy: bit-exact, any number of
times. `disabled()` puts the originals back and merges again on exit; alpha = 0 merges nothing (the base
model bit for bit). If the model was moved or cast after attach, the next forward merges again from the
moved originals. `control: random` replaces ΔW by a seeded random direction per tensor with that
tensor's norm of ΔW (the control of issue 11). Composition: `delta` may be a list of ΔW files (two personas'),
summed tensor by tensor with their own `weights` (W + alpha·Σ weight_i·ΔW_i). Every tensor of the file must match a parameter of the
model (name and shape), else a one-line error; the merged count is printed.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, ContextManager, Iterator

import torch
from torch import nn

from persona_lit.errors import UserError
from persona_lit.mechanisms.base import Mechanism
from persona_lit.steering.weight_diff import load_delta, random_like

KEY = "mechanism.options"
CONTROLS = (None, "random")


class Originals(nn.Module):
    """The merged parameters' original values, as buffers (they follow the model's .to())."""

    def __init__(self, tensors: list[torch.Tensor]):
        super().__init__()
        for i, t in enumerate(tensors):
            self.register_buffer(f"w{i}", t.detach().clone(), persistent=False)

    def get(self, i: int) -> torch.Tensor:
        return getattr(self, f"w{i}")


class WeightSteerMechanism(Mechanism):
    name = "weight_steer"
    turn_bound = False  # stateless per token: closing tokens may wait for the next forward
    attention_untouched = True  # weights, prompts or nothing: attention as the model has it

    # No defaults here: WeightSteerOptions (persona_lit/config/mechanisms.py) is the one place they are written.
    def __init__(self, delta: Any, alpha: float, control: str | None, seed: int, weights: Any = None):
        paths = [delta] if isinstance(delta, str) else list(delta or [])
        if not paths or not all(isinstance(p, str) and p.strip() for p in paths):
            raise UserError(f"{KEY}.delta={delta}: give the path of a ΔW file (.safetensors, written by "
                            f"evaluate.py task=weight_diff), or a list of them to compose")
        weights = [1.0] * len(paths) if weights is None else list(weights) if not isinstance(weights, str) else [weights]
        if len(weights) != len(paths):
            raise UserError(f"{KEY}.weights={weights}: {len(weights)} weights for {len(paths)} ΔW files; give one per "
                            f"file or null (all 1)")
        self.paths, self.weights = paths, [_number(w, "weights") for w in weights]
        if control not in CONTROLS:
            raise UserError(f"{KEY}.control={control!r}: unknown; allowed: null, random")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise UserError(f"{KEY}.seed={seed!r}: need an integer")
        self.delta_path = paths[0] if len(paths) == 1 else ", ".join(paths)
        self.control, self.seed = control, seed
        self._alpha = _number(alpha)
        self.names: list[str] = []
        self.delta: dict[str, torch.Tensor] = {}
        self._merged_as: tuple | None = None  # (device, dtype, alpha) of the weights now merged; None: originals
        self._depth = 0

    # attach ---------------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> nn.Module:
        model.requires_grad_(False)  # nothing trains
        from persona_lit.models.backbones import fingerprint

        delta: dict[str, torch.Tensor] = {}
        for i, (path, weight) in enumerate(zip(self.paths, self.weights)):
            key = f"{KEY}.delta" + (f"[{i}]" if len(self.paths) > 1 else "")
            one, meta = load_delta(path, key=key)
            if meta.get("fingerprint") and meta["fingerprint"] != fingerprint(model):
                raise UserError(f"{key}={path}: built for another base model (fingerprint {meta['fingerprint']}); "
                                f"allowed: a ΔW file built with this model=")
            for name, d in one.items():  # the composition: sum of weight_i * ΔW_i, tensor by tensor
                delta[name] = delta[name] + weight * d if name in delta else weight * d
        params = dict(model.named_parameters())
        odd = [k for k in sorted(delta) if k in params and not params[k].is_floating_point()]
        if odd:  # before the shape check: a 4-bit weight is stored packed, in another shape
            raise UserError(f"{KEY}.delta={self.delta_path}: {odd[0]} is a 4/8-bit weight (model.quantization), "
                            f"which ΔW cannot be merged into; allowed: model.quantization=null (fp32/bf16/fp16)")
        bad = [k for k in sorted(delta) if k not in params or tuple(params[k].shape) != tuple(delta[k].shape)]
        if bad:
            raise UserError(f"{KEY}.delta={self.delta_path}: {len(bad)} of {len(delta)} tensors match no parameter "
                            f"of this model by name and shape (e.g. {bad[0]}); allowed: a ΔW file of this model")
        self.names = sorted(delta)
        self.delta = random_like(delta, self.seed) if self.control == "random" else delta
        self.params = [params[k] for k in self.names]
        model.weight_steer = Originals(self.params)  # inside the model's tree: .to() reaches the buffers
        self.originals = model.weight_steer
        model.register_forward_pre_hook(self._check_merge)
        super().attach(model)
        merged = self.merge()
        print(f"persona_lit: weight_steer: {merged} of {len(delta)} ΔW tensors merged (alpha={self._alpha}, "
              f"control={self.control})", flush=True)
        if merged != len(delta):  # cannot happen after the checks above; the count is the contract
            raise UserError(f"{KEY}.delta={self.delta_path}: merged {merged} of {len(delta)} tensors")
        return model

    # alpha is changed in place by sweeps: the weights follow ---------------------------------------
    @property
    def alpha(self) -> float:
        return self._alpha

    @alpha.setter
    def alpha(self, value: float) -> None:
        self._alpha = _number(value)
        if self.names and self._depth == 0:
            self.merge()

    # merge / restore ------------------------------------------------------------------------------------
    def _signature(self) -> tuple:
        p = self.params[0]
        return (p.device, p.dtype, self._alpha)

    @torch.no_grad()
    def merge(self) -> int:
        """W = (W_orig + alpha·ΔW) for every tensor (W_orig itself at alpha 0); returns the count."""
        for i, (name, p) in enumerate(zip(self.names, self.params)):
            orig = self.originals.get(i)
            if self._alpha == 0.0:
                p.copy_(orig)
            else:
                d = self.delta[name].to(device=orig.device)
                p.copy_((orig.float() + self._alpha * d).to(p.dtype))
        self._merged_as = self._signature()
        return len(self.names)

    @torch.no_grad()
    def unmerge(self) -> None:
        for i, p in enumerate(self.params):
            p.copy_(self.originals.get(i))
        self._merged_as = None

    def _check_merge(self, module, args) -> None:
        if self._depth == 0 and self._merged_as != self._signature():
            self.merge()  # moved or cast since the last merge: merge again from the (moved) originals

    @contextlib.contextmanager
    def _off(self) -> Iterator[None]:
        if self._depth == 0:
            self.unmerge()
        self._depth += 1
        try:
            with self.switched_off():
                yield
        finally:
            self._depth -= 1
            if self._depth == 0:
                self.merge()

    def disabled(self) -> ContextManager:
        return self._off()

    def trainable_parameters(self):
        return iter(())


def _number(value: Any, key: str = "alpha") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise UserError(f"{KEY}.{key}={value!r}: need a finite number")
    return float(value)
