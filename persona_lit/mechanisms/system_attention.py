"""What `instaboost` and `split_softmax` share: which key slots hold the system prompt, and how a chosen layer's
attention gets to reweight them.

System-prompt keys. In a conversation (conversation.py) the persona segment is what the runner feeds after
begin_conversation() and before the first begin_turn(): BOS and the system message, or on Gemma-3 the opened first
user turn holding the system prompt (models/chat.py persona_ids; the model's default system prompt when there is no
persona). In a training batch it is `segment_ids == 0` (models/chat.py encode_segments). Left out of both: each row's
first real token (BOS, or ChatML's first `<|im_start|>`), the attention sink every sequence starts with, which is
not part of the instruction (InstABoost's reference code boosts the instruction's own tokens only). A forward
pre-hook on the model keeps one flag per slot of the model's KV cache ([rows, slots]: a real system-prompt token or
not) and appends the new slots' flags on every call, so cached decoding sees the same keys as one full forward.
A chosen layer's keys are the last `kv` slots (a sliding-window cache layer returns only its recent slots).

Chosen layers. Each `self_attn` is wrapped (the original kept as `base`, PEFT style). `base` gets a private copy of
its config naming the attention function registered here (transformers' AttentionInterface); the model's own
config, and so the masks it builds, stay as they were. That function receives the layer's query, keys (after the
cache update), values and the model's mask, and calls the model's own attention (`sdpa`, or the modeling file's
eager function) either unchanged, when the mechanism is idle, disabled or no system-prompt key is visible (the
base model bit for bit), or as the mechanism reweights it. Only `eager` and `sdpa` are supported.
"""

from __future__ import annotations

import copy
import math
import sys
from typing import Any, Callable, ContextManager

import torch
from torch import nn

from persona_lit.models.backbones import decoder_layers
from persona_lit.errors import UserError
from persona_lit.mechanisms.base import Mechanism

ATTENTION = ("eager", "sdpa")
FUNCTION = "persona_lit_system_attention"  # the name registered in transformers' AttentionInterface


def _attention(module: nn.Module, query, key, value, attention_mask, **kwargs):
    """The registered attention function: hands the call to the SystemAttention that wraps `module`."""
    wrapper = kwargs.pop("system_attention", None)
    if wrapper is None:
        raise RuntimeError(f"{type(module).__name__} was called without its SystemAttention wrapper")
    return wrapper.attend(module, query, key, value, attention_mask, **kwargs)


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if FUNCTION not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(FUNCTION, _attention)


def model_attention(base: nn.Module, implementation: str) -> Callable:
    """The attention function the model itself calls in `base` (its modeling file's eager one for `eager`)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    eager = getattr(sys.modules[type(base).__module__], "eager_attention_forward", None)
    if implementation == "eager" and eager is None:
        raise UserError(f"model.attn_implementation=eager: {type(base).__name__} has no eager attention function "
                        f"to reweight; allowed: sdpa")
    return ALL_ATTENTION_FUNCTIONS.get_interface(implementation, eager)


class SystemAttention(nn.Module):
    """A chosen layer's self-attention: the original as `base`, its attention routed through `attend`."""

    def __init__(self, base: nn.Module, mechanism: "SystemAttentionMechanism", implementation: str):
        super().__init__()
        self.base = base
        self._mechanism = [mechanism]  # a list: not registered as a submodule
        self._original = model_attention(base, implementation)
        config = copy.copy(base.config)  # private: the model's config (and the masks it builds) stay as they are
        config._attn_implementation_internal = FUNCTION
        base.config = config

    def forward(self, *args, **kwargs):
        return self.base(*args, system_attention=self, **kwargs)

    def attend(self, module, query, key, value, attention_mask, **kwargs):
        mechanism = self._mechanism[0]
        persona = mechanism.persona_keys(key.shape[-2])
        if persona is None:
            return self._original(module, query, key, value, attention_mask, **kwargs)
        return mechanism.reweight(self._original, module, query, key, value, attention_mask, persona, **kwargs)


def additive_mask(mask: torch.Tensor | None, query: torch.Tensor, kv: int) -> torch.Tensor:
    """The model's attention mask for this call as an additive float mask [B|1, 1, q, kv] in the query's dtype.
    None (SDPA's no-mask shortcut: no padding, and one query or a fresh causal block) is the causal mask whose
    last query sees every key."""
    dtype, q = query.dtype, query.shape[-2]
    if mask is not None and mask.shape[-1] != kv:
        raise ValueError(f"attention mask has {mask.shape[-1]} key columns for {kv} keys")
    if mask is not None and mask.dtype != torch.bool:
        return mask.to(dtype)
    if mask is None:
        rows = torch.arange(q, device=query.device)[:, None] + (kv - q)
        mask = (torch.arange(kv, device=query.device)[None, :] <= rows)[None, None]
    return torch.zeros(mask.shape, dtype=dtype, device=query.device).masked_fill(~mask, torch.finfo(dtype).min)


class SystemAttentionMechanism(Mechanism):
    """Base of the attention reweighting baselines: the persona-key bookkeeping and the chosen layers. A subclass
    sets `name`, `_idle()` (the parameter at its identity value) and `reweight()`."""

    uses_segments = True  # training batches: segment 0 is the system prompt
    turn_bound = False  # after the persona segment every fed token is "turn": it may be fed in any later forward
    key = "mechanism.options"

    def __init__(self, layers: int | list[int] | None = None):
        if layers is not None:
            layers = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
            if not isinstance(layers, (list, tuple)) or not layers or \
                    not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
                raise UserError(f"{self.key}.layers={layers!r}: need null (every layer), a layer index or a "
                                f"non-empty list of them")
        self.layers = None if layers is None else sorted(set(layers))
        self.flags: torch.Tensor | None = None  # [rows, slots]: the slot holds a real system-prompt token
        self._phase: str | None = None  # "persona" after begin_conversation, "turn" after begin_turn
        self._active = False  # this call: some system-prompt key exists and the mechanism acts

    @staticmethod
    def number(value: Any, key: str, low: float | None = None) -> float:
        """A finite number (> low if given), or a one-line UserError."""
        ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(float(value))
        if not ok or (low is not None and float(value) <= low):
            need = "a finite number" + (f" > {low:g}" if low is not None else "")
            raise UserError(f"{SystemAttentionMechanism.key}.{key}={value!r}: need {need}")
        return float(value)

    # attach ---------------------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> nn.Module:
        implementation = model.config._attn_implementation
        if implementation not in ATTENTION:
            raise UserError(f"mechanism={self.name}: model.attn_implementation={implementation!r} cannot be "
                            f"reweighted; allowed: {', '.join(ATTENTION)}")
        model.requires_grad_(False)
        blocks = decoder_layers(model)
        self.layers = self.layers if self.layers is not None else list(range(len(blocks)))
        bad = [i for i in self.layers if not 0 <= i < len(blocks)]
        if bad:
            raise UserError(f"{self.key}.layers={self.layers}: layer {bad[0]} is out of range; this model has "
                            f"decoder layers 0..{len(blocks) - 1}")
        _register()
        for i in self.layers:
            blocks[i].self_attn = SystemAttention(blocks[i].self_attn, self, implementation)
        model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        model.register_forward_hook(lambda *a: setattr(self, "_active", False))
        return super().attach(model)

    def trainable_parameters(self):
        return iter(())

    # protocol ---------------------------------------------------------------------------------------
    def _idle(self) -> bool:
        raise NotImplementedError

    def disabled(self) -> ContextManager:
        return self.switched_off()

    def begin_conversation(self, persona=None) -> None:
        self._phase = "persona"

    def begin_turn(self) -> None:
        self._phase = "turn"

    def snapshot(self) -> Any:
        return self.flags, self._phase

    def restore(self, state: Any) -> None:
        self.flags, self._phase = state

    def select_rows(self, index: torch.Tensor) -> None:
        if self.flags is not None:
            self.flags = self.flags[index.to(self.flags.device)]

    # per call ---------------------------------------------------------------------------------------
    def _before_forward(self, module, args, kwargs):
        """Appends this call's slots to `flags`: real tokens of the persona segment (or of segment 0), except each
        row's first real token."""
        segment_ids = kwargs.pop("segment_ids", None)
        ids = kwargs.get("input_ids", args[0] if args else None)
        ref = ids if ids is not None else kwargs["inputs_embeds"]
        rows, q = ref.shape[0], ref.shape[1]
        cache = kwargs.get("past_key_values")
        past = cache.get_seq_length() if cache is not None else 0
        mask = kwargs.get("attention_mask")
        real = mask.bool() if mask is not None else torch.ones(rows, past + q, dtype=torch.bool, device=ref.device)
        new_real = real[:, -q:]
        first = new_real & (real.long().cumsum(1)[:, -q:] == 1)
        if segment_ids is not None:
            persona = segment_ids.to(ref.device) == 0
        else:
            persona = torch.full_like(new_real, self._phase == "persona")
        new = persona & new_real & ~first
        if past == 0 or self.flags is None:
            if past:
                raise RuntimeError(f"mechanism={self.name}: a call on a cache of {past} slots it has not seen")
            self.flags = new
        else:
            if self.flags.shape != (rows, past):
                raise RuntimeError(f"mechanism={self.name}: persona flags for {tuple(self.flags.shape)} slots, but "
                                   f"the cache holds ({rows}, {past})")
            self.flags = torch.cat([self.flags, new], 1)
        self._active = not self._disabled and not self._idle() and bool(self.flags.any())
        return args, kwargs

    def persona_keys(self, kv: int) -> torch.Tensor | None:
        """[B, kv] bool: which of a chosen layer's keys (the last kv slots) are system-prompt tokens; None when
        the layer is to run as the base model."""
        return self.flags[:, -kv:] if self._active else None

    def reweight(self, attention: Callable, module, query, key, value, mask, persona: torch.Tensor, **kwargs):
        """The layer's attention output (as `attention` returns it) with the system-prompt keys reweighted."""
        raise NotImplementedError
