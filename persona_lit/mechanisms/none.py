"""`none`: the persona is only the system prompt. The baseline every other mechanism is compared with."""

from __future__ import annotations

from torch import nn

from persona_lit.mechanisms.base import Mechanism


class NoMechanism(Mechanism):
    name = "none"
    turn_bound = False  # stateless per token: closing tokens may wait for the next forward
    attention_untouched = True  # weights, prompts or nothing: attention as the model has it

    def attach(self, model: nn.Module) -> nn.Module:
        model.requires_grad_(False)  # nothing trains: the run measures the base model
        return super().attach(model)
