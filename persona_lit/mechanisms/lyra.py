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
A chosen sliding-window layer (Gemma-3) applies its window in that frame. Its entry in the model's own
cache is zero-width but reports its length (lyra_segments.py), so any layer set, layer 0 included, is exact.
"""

from __future__ import annotations

import copy
import inspect
from pathlib import Path
from typing import Any, ContextManager

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from persona_lit.models.backbones import decoder_layers, global_layers, layer_types
from persona_lit.errors import UserError
from persona_lit.mechanisms.base import Mechanism
from persona_lit.mechanisms.lyra_segments import SegmentCache, Segments, last_real, rotate


def default_layers(model: nn.Module) -> list[int]:
    """Gemma-3: its global (full-attention) layers. Llama: every 6th layer and the last (SmolLM2's 30
    layers -> 5, 11, 17, 23, 29), mirroring Gemma-3's 5:1 local:global layout."""
    types = layer_types(model)
    if "sliding_attention" in types:
        return global_layers(model)
    n = len(types)
    return sorted({i for i in range(n) if (i + 1) % 6 == 0} | {n - 1})


def frozen_copy(module: nn.Module) -> nn.Module:
    """A copy whose parameters are non-persistent buffers: it moves with the model (.to(device/dtype)),
    trains never, and stays out of state dicts and checkpoints."""
    clone = copy.deepcopy(module)
    for sub in clone.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None:
                del sub._parameters[name]
                # a bitsandbytes weight (Params4bit, Int8Params: not floating point) keeps its class and quantization
                # state, which its layer reads; deepcopy already made it the copy's own
                kept = p.requires_grad_(False) if not p.is_floating_point() else p.detach().clone()
                sub.register_buffer(name, kept, persistent=False)
    return clone


class LyraAttention(nn.Module):
    def __init__(self, base: nn.Module, mechanism: "LyraMechanism", layer_idx: int, layer_type: str,
                 keep_original: bool = False):
        super().__init__()
        self.base, self.layer_idx, self.layer_type = base, layer_idx, layer_type
        self._mechanism = [mechanism]  # a list: not registered as a submodule
        # When the layer trains, disabled() must still be the base model (the control arm, the distillation
        # teacher): a frozen copy of the original weights, registered (it moves with the model) but as
        # non-persistent buffers, out of the parameters, the state dict and the checkpoint.
        self.lyra_original = frozen_copy(base) if keep_original else None

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        mechanism = self._mechanism[0]
        ctx = kwargs.pop("lyra_ctx", None)
        if ctx is None:  # disabled, or no conversation/segments: the layer as it is (the original if disabled)
            layer = self.lyra_original if mechanism._disabled and self.lyra_original is not None else self.base
            return layer(hidden_states, position_embeddings, attention_mask, past_key_values, **kwargs)
        cos_sin = ctx.rope(self.layer_type, hidden_states)
        if ctx.train_mask is not None:
            return self.base(hidden_states, cos_sin, ctx.training_mask(self.layer_type, hidden_states.dtype), None,
                             **kwargs)
        segments = ctx.mechanism.segments.setdefault(self.layer_idx, Segments())
        mask = ctx.mask(segments, self.layer_type, hidden_states.dtype)
        store = SegmentCache(segments, ctx.part, ctx.new_valid, ctx.positions, past_key_values)
        return self.base(hidden_states, cos_sin, mask, store, **kwargs)


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
            self._rope[layer_type] = self.mechanism.rope(layer_type, hidden, self.positions)
        return self._rope[layer_type]

    def window(self, layer_type: str) -> int | None:
        return self.mechanism.sliding_window if layer_type == "sliding_attention" else None

    def mask(self, segments: Segments, layer_type: str, dtype: torch.dtype) -> torch.Tensor | None:
        """The chosen layers' mask for this call, built once per layer type (every chosen layer holds the same
        keys): every valid key stored before this call, the new tokens causally, and always oneself (so padded
        rows stay finite); on a sliding layer only keys less than the window behind in Lyra's frame. None
        when nothing needs masking (one new token, no padding, within the window): SDPA's fastest path."""
        window = self.window(layer_type)
        key = (tuple(segments.widths.items()), window)
        if key in self._masks:
            return self._masks[key]
        old_valid = segments.valid if segments.valid is not None else self.new_valid[:, :0]
        old_pos = segments.pos if segments.pos is not None else self.positions[:, :0]
        q = self.new_valid.shape[1]
        if q == 1 and bool(self.new_valid.all()) and bool(old_valid.all()) and (
                window is None or old_valid.shape[1] < window):
            self._masks[key] = None
            return None
        device = old_valid.device
        causal = torch.tril(torch.ones(q, q, dtype=torch.bool, device=device))
        eye = torch.eye(q, dtype=torch.bool, device=device)
        allowed = torch.cat([old_valid[:, None, :].expand(-1, q, -1), self.new_valid[:, None, :] & causal], 2)
        if window is not None:
            key_pos = torch.cat([old_pos, self.positions], 1)
            allowed &= (self.positions[:, :, None] - key_pos[:, None, :]) < window
        allowed[:, :, old_valid.shape[1]:] |= eye
        self._masks[key] = self.format_mask(allowed[:, None], dtype)
        return self._masks[key]

    def training_mask(self, layer_type: str, dtype: torch.dtype) -> torch.Tensor:
        window = self.window(layer_type)
        if window not in self._masks:
            allowed = self.train_mask
            if window is not None:
                t = allowed.shape[-1]
                near = (self.positions[:, :, None] - self.positions[:, None, :]) < window
                allowed = allowed & (near | torch.eye(t, dtype=torch.bool, device=near.device))[:, None]
            self._masks[window] = self.format_mask(allowed, dtype)
        return self._masks[window]

    def format_mask(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.mechanism.attn_implementation == "eager":  # additive float mask
            return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)
        return mask


class LyraMechanism(Mechanism):
    name = "lyra"
    uses_segments = True
    ATTENTION = ("eager", "sdpa")  # implementations that read the masks Lyra builds

    def __init__(self, layers: list[int] | None = None, train_layers: bool = False, history_window: int = 0,
                 lora_r: int = 0, lora_alpha: int | None = None):
        self.layers = list(layers) if layers is not None else None
        self.train_layers, self.history_window = train_layers, int(history_window)
        self.lora_r, self.lora_alpha = int(lora_r), lora_alpha
        if self.lora_r and not train_layers:
            raise UserError(f"mechanism.options.lora_r={lora_r}: a LoRA on the chosen layers needs "
                            "mechanism.options.train_layers=true")
        if self.history_window < 0:
            raise UserError(f"mechanism.options.history_window={history_window}: need an integer >= 0")
        self.segments: dict[int, Segments] = {}
        self.counts: dict[str, torch.Tensor] = {}
        self.part: str | None = None  # "persona", then "turn"; None outside a conversation
        self.persona_ids: list[torch.Tensor] = []

    def attach(self, model: nn.Module) -> nn.Module:
        self.attn_implementation = model.config._attn_implementation
        if self.attn_implementation not in self.ATTENTION:
            raise UserError(f"mechanism=lyra: model.attn_implementation={self.attn_implementation!r} cannot read "
                            f"Lyra's attention masks; allowed: {', '.join(self.ATTENTION)}")
        model.requires_grad_(False)
        layers = decoder_layers(model)
        self.layers = sorted(set(self.layers)) if self.layers is not None else default_layers(model)
        bad = [i for i in self.layers if not 0 <= i < len(layers)]
        if bad or not self.layers:
            raise UserError(f"mechanism.options.layers={self.layers}: need layer indices in 0..{len(layers) - 1}")
        self.layer_types = layer_types(model)
        config = getattr(model.config, "text_config", None) or model.config
        self.sliding_window = getattr(config, "sliding_window", None)
        if self.train_layers and not self.lora_r and any(
                not p.is_floating_point() for i in self.layers for p in layers[i].self_attn.parameters()):
            raise UserError("mechanism.options.train_layers=true: the chosen layers' weights are 4/8-bit (model."
                            "quantization) and cannot take gradients; allowed: mechanism.options.lora_r > 0 (a LoRA on "
                            "them) or model.quantization=null")
        for i in self.layers:
            wrapped = LyraAttention(layers[i].self_attn, self, i, self.layer_types[i],
                                    keep_original=self.train_layers)
            layers[i].self_attn = wrapped
            if self.train_layers and not self.lora_r:
                wrapped.base.requires_grad_(True)
        if self.lora_r:
            self._inject_lora(model)
        inner = model.get_decoder() if hasattr(model, "get_decoder") else model.model
        self.rotary = inner.rotary_emb
        self.rotary_takes_type = "layer_type" in inspect.signature(self.rotary.forward).parameters
        model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        return super().attach(model)

    def _inject_lora(self, model: nn.Module) -> None:
        """A PEFT LoRA (zero-initialised B, so training starts at frozen Lyra) on the chosen layers' linear
        projections only; the LoRA factors are the only trainable tensors."""
        from peft import LoraConfig, inject_adapter_in_model

        chosen = "|".join(map(str, self.layers))
        config = LoraConfig(r=self.lora_r, lora_alpha=self.lora_alpha or 2 * self.lora_r, lora_dropout=0.0,
                            target_modules=rf".*\.layers\.({chosen})\.self_attn\.base\.(q_proj|k_proj|v_proj|o_proj)")
        inject_adapter_in_model(config, model)
        dtype = model.get_input_embeddings().weight.dtype  # on a 4-bit layer PEFT makes them in its compute dtype
        for name, p in model.named_parameters():
            p.requires_grad_("lora_" in name)
            if "lora_" in name and p.dtype != dtype:
                p.data = p.data.to(dtype)

    def rope(self, layer_type: str, hidden: torch.Tensor, positions: torch.Tensor):
        """(cos, sin) of the model's own rotary embedding at `positions` for this layer type."""
        args = (hidden, positions) + ((layer_type,) if self.rotary_takes_type else ())
        return self.rotary(*args)

    # conversation state -------------------------------------------------------------------------
    def begin_conversation(self, persona=None) -> None:
        self.segments, self.counts, self.part, self.persona_ids = {}, {}, "persona", []

    def begin_turn(self) -> None:
        """Drops the last turn from the chosen layers. With history_window=N (an ablation), the last N real
        history tokens stay visible as a window between persona and turn, re-rotated to the frame positions
        P..P+n-1 right after the persona (P persona tokens, n <= N window tokens in that row), so the turn
        reads them as the tokens just before it, exactly as if they had been computed there."""
        if self.part is None:
            return
        for i, seg in self.segments.items():
            if "persona" not in seg.widths:
                continue
            cut = seg.keep_first("persona")  # the old window and turn are cut off
            if self.history_window > 0:
                k, v, valid, old = last_real(*cut, self.history_window)
                persona = self.counts["persona"].to(valid.device)
                new = persona[:, None] + (valid.long().cumsum(1) - 1).clamp(min=0)
                seg.append("window", self._rerotate(i, k, new - old), v, valid, new)
                self.counts["window"] = valid.long().sum(1)
        self.counts.pop("turn", None)
        self.part = "turn"

    def _rerotate(self, layer: int, k: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """Keys rotated at position p, rotated on by delta: R(delta) R(p) = R(p + delta). The embedding's
        cos/sin carry its attention scaling factor (1 for default, linear and llama3 RoPE), divided out
        here so that it is applied once, as at p + delta."""
        zero = torch.zeros_like(delta[:, :1])
        cos, sin = self.rope(self.layer_types[layer], k.float(), torch.cat([delta, zero], 1))
        scale = cos[:, -1:, :1]  # cos(0) * scaling
        return rotate(k.float(), cos[:, :-1].float() / scale, sin[:, :-1].float() / scale).to(k.dtype)

    def snapshot(self) -> Any:
        return {i: s.copy() for i, s in self.segments.items()}, dict(self.counts), self.part

    def restore(self, state: Any) -> None:
        self.segments, self.counts, self.part = state

    def select_rows(self, index: torch.Tensor) -> None:
        self.segments = {i: s.select(index) for i, s in self.segments.items()}
        self.counts = {p: c[index.to(c.device)] for p, c in self.counts.items()}

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
        ctx = None
        if self._disabled:
            pass
        elif segment_ids is not None:
            valid = (mask2d if mask2d is not None else torch.ones(batch, q, device=ref.device)).bool()
            ctx = self._training_context(segment_ids.to(ref.device), valid)
        elif self.part is not None:
            valid = mask2d[:, -q:].bool() if mask2d is not None else torch.ones(batch, q, dtype=torch.bool,
                                                                               device=ref.device)
            ctx = self._inference_context(valid, ids)
        if ctx is not None:  # travels with the call (decoder layer kwargs), so a checkpointed layer's
            kwargs["lyra_ctx"] = ctx  # recomputation in backward sees the same context as its forward
        return args, kwargs

    def _inference_context(self, valid: torch.Tensor, ids: torch.Tensor | None) -> _Context:
        """Frame positions: persona tokens 0..P-1; in a turn, P + window + the turn's real tokens so far."""
        zero = torch.zeros(valid.shape[0], dtype=torch.long, device=valid.device)
        start = self.counts.get("persona", zero)
        if self.part == "turn":
            start = start + self.counts.get("window", zero) + self.counts.get("turn", zero)
        elif ids is not None:
            self.persona_ids.append(ids.detach().cpu())
        positions = (start[:, None] + valid.long().cumsum(1) - 1).clamp(min=0)
        self.counts[self.part] = self.counts.get(self.part, zero) + valid.long().sum(1)
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
