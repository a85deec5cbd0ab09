"""`split_softmax`: the share of attention on the system prompt raised by a power law (split-softmax).

Li, Liu, Bashkansky, Bau, Viégas, Pfister, Wattenberg 2024, "Measuring and Controlling Instruction (In)Stability in
Language Model Dialogs" (arXiv 2402.10962, section 6, "split-softmax"; its repository, github.com/likenneth/
persona_drift, holds the benchmark but no split-softmax code). At every chosen layer, head and query, with a_j the
softmax attention weights and P the system-prompt keys, the softmax is split in two parts, the system prompt's
share pi and the rest's 1 - pi, and the first is reshaped by a power law:

    pi  = sum_{j in P} a_j
    a'_j = a_j * pi^k / pi                  for j in P
    a'_j = a_j * (1 - pi^k) / (1 - pi)      otherwise

so each row still sums to 1 (pi^k + (1 - pi^k)), the weights within each part keep their proportions, and with
0 < k < 1 the system prompt's share grows (pi^k > pi), most where it has decayed most. k is `exponent`: 1 is the
base model bit for bit (the layers call the model's own attention unchanged), k > 1 lowers the share (a control).
pi = 0 (no system-prompt key in view, e.g. past a sliding window) or pi = 1 leave the row as it is.

How, without copying modeling code: the layer's own attention function (sdpa or its eager one) is called three
times. Once as the base model calls it (out = sum_j a_j v_j over all keys); once on the values [1_P, 1 - 1_P] (per
key, 2 wide), whose output is the two shares pi and 1 - pi; and once on the system-prompt keys alone (the slots
that hold one in any row, gathered, the rest of them masked per row), whose output is the system prompt's part
normalised within it, so part = pi * that and rest = out - part. Nothing as wide as the values is copied: the KV
cache is read as the base model reads it, plus one more pass over the keys (an earlier form concatenated
[v 1_P, v (1 - 1_P), 1_P, 1 - 1_P] over the whole cache at every layer and step, 1.9x the base decode at 5k history
tokens). The two parts are combined as above in float32 (1 - pi^k as -expm1(k log pi), log pi from
log1p(-(1-pi)) near 1, for accuracy at both ends). Applied to every query, as `instaboost` is; which keys count as
the system prompt, and how this stays exact with the KV cache: system_attention.py. Nothing trains.
"""

from __future__ import annotations

from typing import Callable

import torch

from persona_lit.mechanisms.system_attention import SystemAttentionMechanism, additive_mask


def split_softmax(part: torch.Tensor, rest: torch.Tensor, pi: torch.Tensor, other: torch.Tensor,
                  exponent: float) -> torch.Tensor:
    """pi^k/pi * part + (1 - pi^k)/(1 - pi) * rest, where part = sum_P a_j v_j, rest = sum_notP a_j v_j and
    pi, other (= 1 - pi) the two shares [..., 1]; in float32, returned in part's dtype."""
    pi, other = pi.float().clamp(0, 1), other.float().clamp(0, 1)
    log_pi = torch.where(other < 0.5, torch.log1p(-other), torch.log(pi))
    scale_part = torch.where(pi > 0, torch.exp((exponent - 1) * log_pi), torch.ones_like(pi))
    scale_rest = torch.where((other > 0) & (pi > 0), -torch.expm1(exponent * log_pi) / other, torch.ones_like(pi))
    return (scale_part * part.float() + scale_rest * rest.float()).to(part.dtype)


class SplitSoftmaxMechanism(SystemAttentionMechanism):
    name = "split_softmax"

    # Defaults as in its options dataclass (persona_lit/config/mechanisms.py), where they are documented and typed
    # (a test keeps the two equal).
    def __init__(self, exponent: float = 0.5, layers: int | list[int] | None = None):
        super().__init__(layers)
        self.exponent = self.number(exponent, "exponent", low=0.0)

    def _idle(self) -> bool:
        return self.exponent == 1.0

    def reweight(self, attention: Callable, module, query, key, value, mask, persona: torch.Tensor, **kwargs):
        full = additive_mask(mask, query, key.shape[-2])  # [B|1, 1, q, kv]; SDPA's None spelled out
        out, _ = attention(module, query, key, value, full, **kwargs)  # [B, q, heads, d]: sum_j a_j v_j
        inside = persona[:, None, :, None].to(value.dtype).expand(value.shape[0], value.shape[1], -1, 1)
        shares, _ = attention(module, query, key, torch.cat([inside, 1 - inside], -1), full, **kwargs)
        cols = persona.any(0).nonzero().flatten()  # the system prompt's slots in any row (a short stretch)
        own = persona[:, cols][:, None, None, :]  # this row's own system-prompt keys among them
        within = torch.where(own, full[..., cols], torch.finfo(full.dtype).min)  # finite: a row seeing none is
        normed, _ = attention(module, query, key[:, :, cols], value[:, :, cols], within, **kwargs)  # uniform, x 0
        pi, other = shares[..., :1].float(), shares[..., 1:].float()
        part = torch.where(pi > 0, pi * normed.float(), 0.0)
        mixed = split_softmax(part, out.float() - part, pi, other, self.exponent)
        return mixed.to(out.dtype).contiguous(), None
