"""`lyra`: chosen attention layers attend to a fixed persona key/value segment plus the current turn.

The persona segment never grows and never fades. Every other layer sees the whole conversation as usual.
Two position frames: normal layers use the conversation's absolute positions; the chosen layers use
0..P-1 for the persona and P + offset-in-turn for the current turn, so turn 1 after the persona is
exactly the base model on persona + turn, and turn 50 looks the same to the chosen layers.

How it hooks in, without copying modeling code: each chosen `self_attn` is wrapped (the original kept as
`base`). The wrapper calls the original with (a) rotary embeddings for its own position frame, (b) its own
attention mask, and (c) a small segment store in place of the KV cache, whose `update()` returns
[persona ; current turn] keys/values. A forward pre-hook on the model reads the 2-D attention mask (and,
in training, the collator's `segment_ids`) once per call and works out each new token's frame position.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from persona_lit.backbones import decoder_layers, global_layers, layer_types
from persona_lit.errors import UserError
from persona_lit.mechanisms.base import Mechanism


def default_layers(model: nn.Module) -> list[int]:
    """Gemma-3: its global (full-attention) layers. Llama: every 6th layer and the last (SmolLM2's 30
    layers -> 5, 11, 17, 23, 29), mirroring Gemma-3's 5:1 local:global layout."""
    types = layer_types(model)
    if "sliding_attention" in types:
        return global_layers(model)
    n = len(types)
    return sorted({i for i in range(n) if (i + 1) % 6 == 0} | {n - 1})


@dataclass
class Segments:
    """Keys/values of one chosen layer, stored joined in the order persona, window, current turn: k and v
    [B, kv_heads, N, d], valid [B, N], and each part's width. Only the last part grows, so a decoding
    step is one cat, as in a plain KV cache. Tensors are replaced, never changed in place: a snapshot
    is a shallow copy."""

    k: torch.Tensor | None = None
    v: torch.Tensor | None = None
    valid: torch.Tensor | None = None
    widths: dict[str, int] = field(default_factory=dict)  # in order: persona, window, turn

    def parts(self) -> list[str]:
        return list(self.widths)

    def part_valid(self, part: str) -> torch.Tensor:
        start = 0
        for p, w in self.widths.items():
            if p == part:
                return self.valid[:, start : start + w]
            start += w
        raise KeyError(part)

    def append(self, part: str, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor) -> None:
        if self.widths and part in self.widths and list(self.widths)[-1] != part:
            raise ValueError(f"lyra: only the last part grows, not {part!r}")
        if self.k is None:
            self.k, self.v, self.valid = k, v, valid
        else:
            self.k, self.v = torch.cat([self.k, k], 2), torch.cat([self.v, v], 2)
            self.valid = torch.cat([self.valid, valid], 1)
        self.widths = {**self.widths, part: self.widths.get(part, 0) + k.shape[2]}

    def keep_first(self, part: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keeps the parts up to and including `part`; returns (k, v, valid) of what was cut off."""
        names = list(self.widths)
        width = sum(self.widths[p] for p in names[: names.index(part) + 1])
        cut = (self.k[:, :, width:], self.v[:, :, width:], self.valid[:, width:])
        self.k, self.v, self.valid = self.k[:, :, :width], self.v[:, :, :width], self.valid[:, :width]
        self.widths = {p: self.widths[p] for p in names[: names.index(part) + 1]}
        return cut

    def select(self, index: torch.Tensor) -> "Segments":
        if self.k is None:
            return Segments()
        return Segments(self.k[index], self.v[index], self.valid[index], dict(self.widths))

    def tokens(self) -> int:
        return 0 if self.k is None else self.k.shape[2]


class _SegmentCache:
    """Stands in for the KV cache inside a chosen layer: stores the new keys/values in the current part
    and returns the keys/values the layer may attend to. The model's own cache gets zero-width entries
    so its length bookkeeping (positions, masks of the other layers) stays right at no memory cost."""

    def __init__(self, segments: Segments, part: str, valid: torch.Tensor, real_cache: Any):
        self.segments, self.part, self.valid, self.real_cache = segments, part, valid, real_cache

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.real_cache is not None:
            self.real_cache.update(k[..., :0], v[..., :0], layer_idx, *args, **kwargs)
        self.segments.append(self.part, k, v, self.valid)
        return self.segments.k, self.segments.v


class LyraAttention(nn.Module):
    def __init__(self, base: nn.Module, mechanism: "LyraMechanism", layer_idx: int, layer_type: str,
                 keep_original: bool = False):
        super().__init__()
        self.base, self.layer_idx, self.layer_type = base, layer_idx, layer_type
        self._mechanism = [mechanism]  # a list: not registered as a submodule
        # When the layer trains, disabled() must still be the base model (the control arm, the distillation
        # teacher): a frozen copy of the original weights, kept out of the state dict and the checkpoint.
        self._original = [copy.deepcopy(base).requires_grad_(False)] if keep_original else []

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        mechanism = self._mechanism[0]
        ctx = mechanism.ctx
        if ctx is None:  # disabled, or no conversation/segments: the layer as it is (the original if disabled)
            layer = self.base
            if mechanism._disabled and self._original:
                layer = self._original[0] = self._original[0].to(hidden_states.device)
            return layer(hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs)
        cos_sin = ctx.rope(self.layer_type, hidden_states)
        if ctx.train_mask is not None:
            mask = ctx.format_mask(ctx.train_mask, hidden_states.dtype)
            return self.base(hidden_states, cos_sin, mask, None, **kwargs)
        segments = ctx.mechanism.segments.setdefault(self.layer_idx, Segments())
        store = _SegmentCache(segments, ctx.part, ctx.new_valid, past_key_values)
        return self.base(hidden_states, cos_sin, ctx.mask(segments, hidden_states.dtype), store, **kwargs)


class _Context:
    """Per model call: frame positions of the new tokens and the masks the chosen layers use."""

    def __init__(self, mechanism: "LyraMechanism", positions: torch.Tensor, new_valid: torch.Tensor,
                 part: str | None = None, train_mask: torch.Tensor | None = None):
        self.mechanism, self.positions, self.new_valid, self.part, self.train_mask = (
            mechanism, positions, new_valid, part, train_mask)
        self._rope: dict[str, Any] = {}
        self._masks: dict[tuple, Any] = {}

    def rope(self, layer_type: str, hidden: torch.Tensor):
        if layer_type not in self._rope:
            rotary = self.mechanism.rotary
            args = (hidden, self.positions) + ((layer_type,) if self.mechanism.rotary_takes_type else ())
            self._rope[layer_type] = rotary(*args)
        return self._rope[layer_type]

    def mask(self, segments: Segments, dtype: torch.dtype) -> torch.Tensor | None:
        """The chosen layers' mask for this call, built once (every chosen layer holds the same parts).
        None when nothing needs masking (one new token, no padding): SDPA then takes its fastest path."""
        key = tuple(segments.widths.items())
        if key not in self._masks:
            before = {p: segments.part_valid(p) for p in segments.parts()}
            if self.new_valid.shape[1] == 1 and all(bool(t.all()) for t in (self.new_valid, *before.values())):
                self._masks[key] = None
            else:
                self._masks[key] = self.format_mask(self.segment_mask(before), dtype)
        return self._masks[key]

    def segment_mask(self, before: dict[str, torch.Tensor]) -> torch.Tensor:
        """[B, 1, q, K]: every valid persona/window key, the current part causally, and always oneself
        (so padded rows stay finite)."""
        q = self.new_valid.shape[1]
        parts = [p for p in ("persona", "window", "turn") if p in before or p == self.part]
        cols = []
        for p in parts:
            old = before.get(p, self.new_valid[:, :0])
            old_cols = old[:, None, :].expand(-1, q, -1)
            if p != self.part:
                cols.append(old_cols)
                continue
            causal = torch.tril(torch.ones(q, q, dtype=torch.bool, device=old.device))
            new_cols = (self.new_valid[:, None, :] & causal) | torch.eye(q, dtype=torch.bool, device=old.device)
            cols += [old_cols, new_cols]
        return torch.cat(cols, dim=2)[:, None]

    def format_mask(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.mechanism.attn_implementation == "eager":  # additive float mask
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        return mask


class LyraMechanism(Mechanism):
    name = "lyra"
    uses_segments = True

    def __init__(self, layers: list[int] | None = None, train_layers: bool = False, history_window: int = 0,
                 lora_r: int = 0, lora_alpha: int | None = None):
        self.layers = list(layers) if layers is not None else None
        self.train_layers, self.history_window = train_layers, int(history_window)
        self.lora_r, self.lora_alpha = int(lora_r), lora_alpha
        if self.lora_r and not train_layers:
            raise UserError(f"mechanism.options.lora_r={lora_r}: a LoRA on the chosen layers needs "
                            "mechanism.options.train_layers=true")
        self.segments: dict[int, Segments] = {}
        self.counts: dict[str, torch.Tensor] = {}
        self.part: str | None = None  # "persona", then "turn"; None outside a conversation
        self.persona_ids: list[torch.Tensor] = []
        self.ctx: _Context | None = None

    def attach(self, model: nn.Module) -> nn.Module:
        model.requires_grad_(False)
        layers = decoder_layers(model)
        self.layers = self.layers if self.layers is not None else default_layers(model)
        bad = [i for i in self.layers if not 0 <= i < len(layers)]
        if bad or not self.layers:
            raise UserError(f"mechanism.options.layers={self.layers}: need layer indices in 0..{len(layers) - 1}")
        types = layer_types(model)
        for i in self.layers:
            wrapped = LyraAttention(layers[i].self_attn, self, i, types[i], keep_original=self.train_layers)
            layers[i].self_attn = wrapped
            if self.train_layers and not self.lora_r:
                wrapped.base.requires_grad_(True)
        if self.lora_r:
            self._inject_lora(model)
        inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        self.rotary = inner.rotary_emb
        self.rotary_takes_type = "layer_type" in inspect.signature(self.rotary.forward).parameters
        self.attn_implementation = model.config._attn_implementation
        model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        model.register_forward_hook(lambda *a: setattr(self, "ctx", None))
        return super().attach(model)

    def _inject_lora(self, model: nn.Module) -> None:
        """A PEFT LoRA (zero-initialised B, so training starts at frozen Lyra) on the chosen layers' linear
        projections only; the LoRA factors are the only trainable tensors."""
        from peft import LoraConfig, inject_adapter_in_model

        chosen = "|".join(map(str, self.layers))
        config = LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha or 2 * self.lora_r, lora_dropout=0.0,
                            target_modules=rf".*\.layers\.({chosen})\.self_attn\.base\.(q_proj|k_proj|v_proj|o_proj)")
        inject_adapter_in_model(config, model)
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)

    # conversation state -------------------------------------------------------------------------
    def begin_conversation(self, persona=None) -> None:
        self.segments, self.counts, self.part, self.persona_ids = {}, {}, "persona", []

    def begin_turn(self) -> None:
        if self.part is None:
            return
        for seg in self.segments.values():
            if "persona" not in seg.widths:
                continue
            k, v, valid = seg.keep_first("persona")  # the old window and turn are cut off
            if self.history_window > 0 and valid.shape[1]:
                # Ablation: keep the last N history tokens visible. Their keys keep the turn-frame positions
                # they were rotated at (re-rotating needs each token's rotation delta); see the README note.
                n = self.history_window
                seg.append("window", k[:, :, -n:], v[:, :, -n:], valid[:, -n:])
        self.counts.pop("turn", None)
        self.part = "turn"

    def snapshot(self) -> Any:
        return ({i: Segments(s.k, s.v, s.valid, dict(s.widths)) for i, s in self.segments.items()},
                dict(self.counts), self.part)

    def restore(self, state: Any) -> None:
        self.segments, self.counts, self.part = state

    def select_rows(self, index: torch.Tensor) -> None:
        self.segments = {i: s.select(index) for i, s in self.segments.items()}
        self.counts = {p: c[index] for p, c in self.counts.items()}

    def memory_tokens(self) -> int:
        """Keys held by the chosen layers (persona + window + current turn), summed over layers."""
        return sum(s.tokens() for s in self.segments.values())

    def disabled(self) -> ContextManager:
        return self.switched_off()

    # per-call context ---------------------------------------------------------------------------
    def _before_forward(self, module, args, kwargs):
        segment_ids = kwargs.pop("segment_ids", None)
        ids = kwargs.get("input_ids", args[0] if args else None)
        ref = ids if ids is not None else kwargs["inputs_embeds"]
        batch, q = ref.shape[0], ref.shape[1]
        mask2d = kwargs.get("attention_mask")
        if self._disabled:
            self.ctx = None
        elif segment_ids is not None:
            valid = (mask2d if mask2d is not None else torch.ones(batch, q, device=ref.device)).bool()
            self.ctx = self._training_context(segment_ids.to(ref.device), valid)
        elif self.part is not None:
            valid = mask2d[:, -q:].bool() if mask2d is not None else torch.ones(batch, q, dtype=torch.bool,
                                                                               device=ref.device)
            self.ctx = self._inference_context(valid, ids)
        else:
            self.ctx = None
        return args, kwargs

    def _inference_context(self, valid: torch.Tensor, ids: torch.Tensor | None) -> _Context:
        zero = torch.zeros(valid.shape[0], dtype=torch.long, device=valid.device)
        start = self.counts.get("persona", zero)
        if self.part == "turn":
            start = start + self.counts.get("window", zero) + self.counts.get("turn", zero)
        elif ids is not None:
            self.persona_ids.append(ids.detach().cpu())
        positions = (start[:, None] + valid.long().cumsum(1) - 1).clamp(min=0)
        self.counts[self.part] = self.counts.get(self.part, zero) + valid.long().sum(1)
        if self.part == "turn" and self.history_window > 0:
            seen = min(self.history_window, max((s.widths.get("window", 0) for s in self.segments.values()),
                                                default=0))
            self.counts["window"] = torch.full_like(zero, seen)
        return _Context(self, positions, valid, part=self.part)

    def _training_context(self, seg: torch.Tensor, valid: torch.Tensor) -> _Context:
        """Teacher forcing: token i sees token j iff j <= i, j is real, and j is persona or in i's turn."""
        t = seg.shape[1]
        causal = torch.tril(torch.ones(t, t, dtype=torch.bool, device=seg.device))
        same = seg[:, :, None] == seg[:, None, :]
        offset = ((same & causal & valid[:, None, :]).sum(2) - 1).clamp(min=0)  # index within own segment
        persona_len = ((seg == 0) & valid).sum(1, keepdim=True)
        positions = torch.where(seg == 0, offset, persona_len + offset)
        allowed = causal & valid[:, None, :] & (same | (seg == 0)[:, None, :])
        allowed |= torch.eye(t, dtype=torch.bool, device=seg.device)
        return _Context(self, positions, valid, train_mask=allowed[:, None])

    # persona cache file ---------------------------------------------------------------------------
    def save_persona(self, path: str | Path) -> None:
        """The persona segment as token ids in safetensors: no pickled cache class, no RoPE settings."""
        if not self.persona_ids:
            raise UserError("no persona segment to save: run a conversation's persona through the model first")
        save_file({"persona_ids": torch.cat(self.persona_ids, 1).contiguous()}, str(path),
                  metadata={"layers": ",".join(map(str, self.layers))})


def load_persona_ids(path: str | Path) -> torch.Tensor:
    try:
        return load_file(str(path))["persona_ids"]
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        raise UserError(f"persona cache {path}: cannot read ({e})") from None
