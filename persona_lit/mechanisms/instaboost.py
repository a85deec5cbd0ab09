"""`instaboost`: a constant bias on the attention logits of the system-prompt keys (InstABoost).

Guardieiro, Khare, Stein, Wong 2025, "Instruction Following by (Principled) Boosting Attention of Large Language
Models" (arXiv 2506.13734; code: github.com/BrachioLab/InstABoost). At every chosen layer and head, for query i and
key j, with S = QK^T / sqrt(d) + M the model's masked attention logits and P the system-prompt keys:

    S'_ij = S_ij + bias * [j in P]            a_i' = softmax(S'_i)

Equivalently (the paper's first version and its code, `prompt_attention_ablation_hook`): the attention weights on
the instruction keys are multiplied by e^bias and each row renormalised,

    a'_ij = a_ij * m_j / sum_l a_il * m_l,    m_j = e^bias if j in P else 1,

so `bias` = log of the reference code's `multiplier` (swept there over 1, 3, ..., 19: bias 0 .. 2.94). bias 0 is
the base model bit for bit (the layers call the model's own attention unchanged); a bias < 0 draws attention away
from the system prompt (a control). Applied to every query, the persona's own tokens included, as the reference
code does at every forward; which keys count as the system prompt, and how this stays exact with the KV cache:
system_attention.py. Nothing trains.
"""

from __future__ import annotations

from typing import Callable

import torch

from persona_lit.mechanisms.system_attention import SystemAttentionMechanism, additive_mask


class InstaBoostMechanism(SystemAttentionMechanism):
    name = "instaboost"

    # Defaults as in its options dataclass (persona_lit/config/mechanisms.py), where they are documented and typed
    # (a test keeps the two equal).
    def __init__(self, bias: float = 1.0, layers: int | list[int] | None = None):
        super().__init__(layers)
        self.bias = self.number(bias, "bias")

    def _idle(self) -> bool:
        return self.bias == 0.0

    def reweight(self, attention: Callable, module, query, key, value, mask, persona: torch.Tensor, **kwargs):
        boosted = additive_mask(mask, query, key.shape[-2]) + self.bias * persona[:, None, None, :].to(query.dtype)
        return attention(module, query, key, value, boosted, **kwargs)
