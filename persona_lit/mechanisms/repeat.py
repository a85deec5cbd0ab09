"""`repeat`: the persona's system prompt re-inserted into the history every k user turns (the cheap baseline).

Before user turns k, 2k, 3k, ... of a conversation the runner inserts the persona's system prompt again
(`turn_prefix`, conversation.py): as a system message where the chat format has a system role (ChatML, Llama 3),
and where it has none mid-conversation (Gemma: the persona opens the first user turn) at the start of the user
message, "<system prompt>\n\n<user text>", as the persona itself is written there. The copies stay in the history:
they are what this baseline pays, and every TurnRecord's `history_tokens` (the report's history tokens per turn)
counts them. Probes on forks ask on top of the history as it stands and get no copy of their own.

`every: 0` (or more turns than the conversation has) is `none` exactly; disabled() (the baseline and control arms)
inserts nothing. Nothing trains, and training batches are not changed.
"""

from __future__ import annotations

from typing import ContextManager

from torch import nn

from persona_lit.errors import UserError
from persona_lit.mechanisms.base import Mechanism


class RepeatMechanism(Mechanism):
    name = "repeat"
    turn_bound = False  # stateless per token: closing tokens may wait for the next forward
    attention_untouched = True  # weights, prompts or nothing: attention as the model has it

    # Defaults as in its options dataclass (persona_lit/config/mechanisms.py), where they are documented and typed
    # (a test keeps the two equal).
    def __init__(self, every: int = 4):
        if isinstance(every, bool) or not isinstance(every, int) or every < 0:
            raise UserError(f"mechanism.options.every={every!r}: need an integer >= 0 (0: never re-insert)")
        self.every = every
        self.system_prompt: str | None | list[str | None] = None  # one per row where rows differ

    def attach(self, model: nn.Module) -> nn.Module:
        model.requires_grad_(False)
        return super().attach(model)

    def trainable_parameters(self):
        return iter(())

    def disabled(self) -> ContextManager:
        return self.switched_off()

    def begin_conversation(self, persona=None) -> None:
        prompt = lambda p: p.system_prompt if p is not None else None  # noqa: E731
        self.system_prompt = [prompt(p) for p in persona] if isinstance(persona, (list, tuple)) else prompt(persona)

    def turn_prefix(self, turn: int) -> str | None | list[str | None]:
        if self._disabled or not self.every or not self.system_prompt or turn % self.every:
            return None
        return self.system_prompt  # a list where the rows hold different personas
