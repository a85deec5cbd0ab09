"""`triplet`: a gated residual cross-attention from the current tokens to a memory of earlier hidden states.

Each chosen layer's `self_attn` is wrapped (the original kept as `base`) and returns
    base(x) + linkage * gain * gate * o(SDPA(q(x), k(memory), v(memory)))
with x the attention block's input (the normed hidden states). q/k/v/o start as trainable copies of the
layer's own projections (GQA kept: num_key_value_heads heads, expanded only inside SDPA); Gemma-3's q/k
norms are reused from the base layer. The gate starts at 0, so a fresh mechanism is the base model, and
linkage 0 skips the branch entirely (bit for bit the base model).

Memory, per chosen layer: the keys/values of detached x of earlier tokens. Rule: the token with index t
(its count of real tokens before it in its row) reads exactly the real tokens with index in [t-N, t-1],
N = `memory_tokens`: never itself, never the future, never padding. Training (model.train()) applies that
rule inside each sequence under a strict causal mask: no state, no cross-batch memory. In eval mode the
memory is state: it grows with every forwarded token (prefill, each decode step, across turns; never
reset per turn) and is trimmed to what later tokens can still read, so one row holds its last N tokens.
A call on an empty HF cache (a new sequence) or `begin_conversation` starts a fresh memory. Because the
read rule depends only on token indices, chunked/cached decoding equals one full forward.

Positions: keys are stored after RoPE, rotated with the model's own cos/sin for each token's absolute
position (what the wrapper receives as `position_embeddings`). Positions never change once written, so
rotating once at write time is exact and saves re-rotating N keys per decode step. We store projected
keys/values rather than hidden states for the same reason: re-projecting N = 512 states to k and v at
three layers of SmolLM2 costs ~2.5x the whole model's per-token matmuls; the projections do not change
while a conversation runs, so the stored keys/values are exactly what re-projection would give.
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass, field
from typing import Any, ContextManager

import torch
import torch.nn.functional as F
from torch import nn

from persona_lit.models.backbones import decoder_layers
from persona_lit.errors import UserError
from persona_lit.mechanisms.base import Mechanism

# The original used layers 16, 24, 30 of a 32-layer Llama (0-based): 52%, 77% and 97% of depth, i.e.
# mid-to-late layers that carry abstract features, and not the last one (its read would have only one MLP
# left to act on). We keep those relative depths: SmolLM2 (30 layers) -> 15, 22, 28; Gemma-3-270M
# (18 layers) -> 9, 13, 16. On Gemma-3 these are sliding-window layers, on purpose: the memory spans at
# most N = 512 tokens, the same as their window, so the seeded projections and their local RoPE read
# distances they were trained on, while the global layers 5/11/17 keep their long-range role untouched.
DEPTHS = (16 / 31, 24 / 31, 30 / 31)


def default_layers(model: nn.Module) -> list[int]:
    n = len(decoder_layers(model))
    return sorted({round(f * (n - 1)) for f in DEPTHS})


@dataclass
class Memory:
    """Written tokens of a batch: per-layer post-RoPE keys/values [B, kv_heads, M, d], and per column its
    validity and token index [B, M]. Tensors are replaced, never changed in place: a snapshot is a copy
    of the dict."""

    valid: torch.Tensor
    idx: torch.Tensor
    count: torch.Tensor  # [B] real tokens written so far: the next token's index
    kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)

    @classmethod
    def empty(cls, batch: int, device: torch.device) -> "Memory":
        z = torch.zeros(batch, 0, dtype=torch.long, device=device)
        return cls(z.bool(), z, torch.zeros(batch, dtype=torch.long, device=device))


@dataclass
class _Context:
    """One model call: what every chosen layer reads and where it writes."""

    mask: torch.Tensor  # [B, 1, q, M + q] bool: may query i read key j
    weight: torch.Tensor  # [B, q, 1]: linkage * gain, 0 on rows with no readable key (a first token)
    read: dict[int, tuple[torch.Tensor, torch.Tensor]]  # memory keys/values before this call
    write: dict[int, tuple[torch.Tensor, torch.Tensor]] | None  # None in training: no state
    keep_from: int  # first column still readable by later tokens


def _copy_linear(linear: nn.Linear, dtype: torch.dtype) -> nn.Linear:
    """A trainable copy; of a bitsandbytes 4/8-bit projection (no gradients), a float nn.Linear in the model's
    float `dtype` holding the quantized layer's own dequantized weight (PEFT's dequantize_bnb_weight; not
    dequantize_module_weight, whose .to(cpu) of an 8-bit weight drops its scales once the layer has run)."""
    if linear.weight.is_floating_point():
        new = copy.deepcopy(linear)
    else:
        from peft.utils.integrations import dequantize_bnb_weight

        new = nn.utils.skip_init(nn.Linear, linear.in_features, linear.out_features, bias=linear.bias is not None,
                                 device=linear.weight.device, dtype=dtype)
        with torch.no_grad():
            new.weight.copy_(dequantize_bnb_weight(linear.weight, state=getattr(linear, "state", None)))
            if linear.bias is not None:
                new.bias.copy_(linear.bias)
    new.requires_grad_(True)
    return new


class TripletAttention(nn.Module):
    def __init__(self, base: nn.Module, mechanism: "TripletMechanism", layer_idx: int, dtype: torch.dtype):
        super().__init__()
        self.base, self.layer_idx = base, layer_idx
        self._mechanism = [mechanism]  # a list: not registered as a submodule
        self.triplet_q, self.triplet_k = _copy_linear(base.q_proj, dtype), _copy_linear(base.k_proj, dtype)
        self.triplet_v, self.triplet_o = _copy_linear(base.v_proj, dtype), _copy_linear(base.o_proj, dtype)
        weight = self.triplet_q.weight
        self.triplet_gate = nn.Parameter(torch.zeros(1, dtype=weight.dtype, device=weight.device))
        # The model family's own RoPE function (Llama and Gemma-3 modeling modules both define it).
        self._apply_rope = sys.modules[type(base).__module__].apply_rotary_pos_emb

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, past_key_values=None, **kwargs):
        out, weights = self.base(hidden_states, position_embeddings=position_embeddings,
                                 attention_mask=attention_mask, past_key_values=past_key_values, **kwargs)
        ctx = kwargs.pop("triplet_ctx", None)
        if ctx is None:  # linkage 0 or disabled(): the base layer, untouched
            return out, weights
        signal = self._read(hidden_states, position_embeddings, ctx)
        # out + signal * gate * weight in one op; gate 0 adds exact zeros (the base output bit for bit)
        return torch.addcmul(out, signal, self.triplet_gate * ctx.weight), weights

    def _read(self, x: torch.Tensor, position_embeddings, ctx: _Context) -> torch.Tensor:
        b, q, _ = x.shape
        head_dim = self.base.head_dim

        def heads(linear: nn.Linear, inp: torch.Tensor) -> torch.Tensor:
            return linear(inp).view(b, q, -1, head_dim).transpose(1, 2)

        mem_in = x.detach()  # memory holds detached hidden states: its keys train k/v, not earlier layers
        qs, ks, vs = heads(self.triplet_q, x), heads(self.triplet_k, mem_in), heads(self.triplet_v, mem_in)
        if hasattr(self.base, "q_norm"):  # Gemma-3 normalises q and k per head before RoPE
            qs, ks = self.base.q_norm(qs), self.base.k_norm(ks)
        qs, ks = self._apply_rope(qs, ks, *position_embeddings)
        if self.layer_idx in ctx.read:
            old_k, old_v = ctx.read[self.layer_idx]
            ks, vs = torch.cat([old_k, ks], 2), torch.cat([old_v, vs], 2)
        if ctx.write is not None:
            ctx.write[self.layer_idx] = (ks[:, :, ctx.keep_from:].detach(), vs[:, :, ctx.keep_from:].detach())
        attn = F.scaled_dot_product_attention(qs, ks, vs, attn_mask=ctx.mask, scale=self.base.scaling,
                                              enable_gqa=qs.shape[1] != ks.shape[1])
        return self.triplet_o(attn.transpose(1, 2).reshape(b, q, -1))


class TripletMechanism(Mechanism):
    name = "triplet"

    def __init__(self, layers: list[int] | None = None, linkage: float = 1.0, gain: float = 1.0,
                 memory_tokens: int = 512):
        if not 0.0 <= float(linkage) <= 1.0:
            raise UserError(f"mechanism.options.linkage={linkage}: need a number in 0..1")
        if int(memory_tokens) < 1:
            raise UserError(f"mechanism.options.memory_tokens={memory_tokens}: need an integer >= 1")
        self.layers = list(layers) if layers is not None else None
        self.linkage, self.gain, self.memory_tokens = float(linkage), float(gain), int(memory_tokens)
        self.memory: Memory | None = None

    def attach(self, model: nn.Module) -> nn.Module:
        model.requires_grad_(False)
        layers = decoder_layers(model)
        self.layers = self.layers if self.layers is not None else default_layers(model)
        bad = [i for i in self.layers if not 0 <= i < len(layers)]
        if bad or not self.layers:
            raise UserError(f"mechanism.options.layers={self.layers}: need layer indices in 0..{len(layers) - 1}")
        dtype = model.get_input_embeddings().weight.dtype  # the float dtype, also of a quantized model
        for i in self.layers:
            layers[i].self_attn = TripletAttention(layers[i].self_attn, self, i, dtype)
        model.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        return super().attach(model)

    # conversation state ---------------------------------------------------------------------------
    def begin_conversation(self, persona=None) -> None:
        self.memory = None

    # begin_turn: the base no-op. The memory carries over from turn to turn; that is the point.

    def snapshot(self) -> Any:
        m = self.memory
        return None if m is None else Memory(m.valid, m.idx, m.count, dict(m.kv))

    def restore(self, state: Any) -> None:
        self.memory = state

    def select_rows(self, index: torch.Tensor) -> None:
        m = self.memory
        if m is not None:
            self.memory = Memory(m.valid[index], m.idx[index], m.count[index],
                                 {i: (k[index], v[index]) for i, (k, v) in m.kv.items()})

    def memory_size(self) -> int:
        """Token columns the memory holds (the same for every chosen layer)."""
        return 0 if self.memory is None else self.memory.valid.shape[1]

    def disabled(self) -> ContextManager:
        return self.switched_off()

    # per-call context -----------------------------------------------------------------------------
    def _before_forward(self, module, args, kwargs):
        if self._disabled or self.linkage == 0.0:  # the base model: nothing read, nothing written
            return args, kwargs
        ids = kwargs.get("input_ids", args[0] if args else None)
        ref = ids if ids is not None else kwargs["inputs_embeds"]
        batch, q, device = ref.shape[0], ref.shape[1], ref.device
        mask2d = kwargs.get("attention_mask")
        valid = mask2d[:, -q:].bool() if mask2d is not None else torch.ones(batch, q, dtype=torch.bool, device=device)
        stateful = not module.training  # eval: the memory is conversation state; train: teacher forcing
        cache = kwargs.get("past_key_values")
        if not stateful or self.memory is None or cache is None or cache.get_seq_length() == 0:
            mem = Memory.empty(batch, device)  # training, or a new sequence: nothing written before
        else:
            mem = self.memory
            if mem.count.shape[0] != batch:
                raise ValueError(f"triplet: the memory holds {mem.count.shape[0]} rows, this call has {batch} "
                                f"(call mechanism.begin_conversation() before a new batch)")
        idx_q = mem.count[:, None] + valid.long().cumsum(1) - 1  # pads repeat their row's last index
        keys_valid, keys_idx = torch.cat([mem.valid, valid], 1), torch.cat([mem.idx, idx_q], 1)
        ki, qi = keys_idx[:, None, :], idx_q[:, :, None]
        allowed = keys_valid[:, None, :] & (ki < qi) & (ki >= qi - self.memory_tokens)
        has_any = allowed.any(-1, keepdim=True)
        allowed = allowed | ~has_any  # an empty row would give NaN in SDPA; its signal is zeroed instead
        write, keep_from = None, 0
        if stateful:
            count = mem.count + valid.long().sum(1)
            alive = (keys_valid & (keys_idx >= count[:, None] - self.memory_tokens)).any(0)
            keep_from = int(alive.long().argmax()) if bool(alive.any()) else alive.numel()
            self.memory = Memory(keys_valid[:, keep_from:], keys_idx[:, keep_from:], count)
            write = self.memory.kv
        weight = has_any.to(module.dtype) * (self.linkage * self.gain)
        # The call's context travels with the call (decoder layer kwargs), so a checkpointed layer's recomputation
        # in backward reads the same memory and mask as its forward did.
        kwargs["triplet_ctx"] = _Context(allowed[:, None], weight, mem.kv, write, keep_from)
        return args, kwargs
