"""The small protocol every memory mechanism follows.

A mechanism changes a Hugging Face causal LM in place, PEFT-style: it wraps modules and keeps the
originals as base layers, never copies modeling code. Its own parameters carry one name prefix.
"""

from __future__ import annotations

import contextlib
from typing import Any, ContextManager, Iterator, Sequence

from torch import nn

from persona_lit.personas.types import Persona


class Mechanism:
    name: str = "base"
    uses_segments: bool = False  # True: the model call takes the collator's `segment_ids` (turn per token)
    uses_assistant_mask: bool = False  # True: the model call takes `assistant_mask` (labels != IGNORE) in training
    # True: the conversation runner caches the history (the persona segment and each finished turn, re-encoded
    # after its answer) with the mechanism disabled, so the mechanism acts on the current turn's tokens only.
    clean_history: bool = False
    # True (the safe default): what the mechanism does to a token depends on the turn or phase in which it is fed
    # (Lyra's segments, Triplet's memory, steer's prompt/response), so the runner feeds each turn's tokens within
    # it. False: a token's treatment does not depend on when it is fed, so the runner leaves an answer's closing
    # tokens to the next forward (the next turn's prompt, or a probe's) instead of a model call of their own.
    turn_bound: bool = True
    # True: the model's attention function is left as it is (the mechanism changes weights, residuals or prompts),
    # so the runner's probe forks may share the conversation's cache (models/shared_prefix.py).
    attention_untouched: bool = False

    def attach(self, model: nn.Module) -> nn.Module:
        """Wrap `model`; return the model to use from now on (PEFT returns a wrapper)."""
        self.model = model
        return model

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        return (p for p in self.model.parameters() if p.requires_grad)

    def disabled(self) -> ContextManager:
        """Inside this context the model behaves exactly as the base model."""
        return contextlib.nullcontext()

    _disabled = False  # read by the forward hooks of mechanisms that switch off with switched_off()

    @contextlib.contextmanager
    def switched_off(self):
        before, self._disabled = self._disabled, True
        try:
            yield
        finally:
            self._disabled = before

    def begin_conversation(self, persona: Persona | None | Sequence[Persona | None]) -> None:
        """Called before the first turn of a conversation (e.g. build a persona cache). `persona`: the batch's
        persona, or a list with one per row when its rows hold different personas."""

    def begin_turn(self) -> None:
        """Called before each new user turn (e.g. drop the last turn's segment)."""

    def turn_prefix(self, turn: int) -> str | None | list[str | None]:
        """A system prompt for the runner to re-insert into the history before user turn `turn` (1, 2, ...), or
        None (mechanism=repeat; conversation.py says where it goes); a list, one per row, where rows hold
        different personas. Probes never get one."""
        return None

    def begin_answer(self) -> None:
        """Called once a turn's prompt slots are fed: later forwards feed the answer (generated tokens, end)."""

    def snapshot(self) -> Any:
        """Conversation state to put back after a probe on a fork (see restore); None if stateless."""
        return None

    def restore(self, state: Any) -> None:
        """Puts back what snapshot() returned."""

    def select_rows(self, index) -> None:
        """Keep rows `index` (a long tensor, repeats allowed) of the batched conversation state, as the
        conversation runner does with the KV cache for probes on forks. Called between snapshot/restore."""

    def export(self, directory, state=None) -> None:
        """Write a standard artifact other tools can load (e.g. a PEFT adapter directory), if any. `state`: the
        whole trainable tensors by parameter name, given where the model's own are sharded (FSDP2)."""
