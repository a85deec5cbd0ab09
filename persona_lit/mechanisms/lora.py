"""`lora`: a PEFT LoRA persona adapter on every linear projection of the decoder layers."""

from __future__ import annotations

from pathlib import Path
from typing import ContextManager

from torch import nn

from persona_lit.models.backbones import decoder_layers
from persona_lit.mechanisms.base import Mechanism


def linear_targets(model: nn.Module) -> list[str]:
    """Names of the linear projections in a decoder layer (q/k/v/o/gate/up/down for Llama and Gemma-3)."""
    layer = decoder_layers(model)[0]
    return sorted({name.rsplit(".", 1)[-1] for name, m in layer.named_modules() if isinstance(m, nn.Linear)})


class LoraMechanism(Mechanism):
    name = "lora"
    turn_bound = False  # stateless per token: closing tokens may wait for the next forward
    attention_untouched = True  # weights, prompts or nothing: attention as the model has it

    def __init__(self, r: int = 16, alpha: int = 32, dropout: float = 0.05, target_modules: list[str] | None = None,
                 init_lora_weights: bool | str = True):
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.target_modules = list(target_modules) if target_modules else None
        self.init_lora_weights = init_lora_weights

    def attach(self, model: nn.Module) -> nn.Module:
        from peft import LoraConfig, get_peft_model

        model.requires_grad_(False)
        config = LoraConfig(
            r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, task_type="CAUSAL_LM",
            target_modules=self.target_modules or linear_targets(model), init_lora_weights=self.init_lora_weights,
        )
        return super().attach(get_peft_model(model, config))

    def disabled(self) -> ContextManager:
        return self.model.disable_adapter()

    def export(self, directory, state=None) -> None:
        self.model.save_pretrained(Path(directory), **({"state_dict": state} if state is not None else {}))
