"""The drift protocol: persona arm and control arm over the same user turns, probes on forks, and
every metric per turn with an interval across conversations. Used by evaluate.py (and callbacks)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from persona_lit.conversation import ConversationRunner, TurnRecord
from persona_lit.metrics import PerTurnMean, ProbeAdherence, persona_projection
from persona_lit.personas import Persona


@dataclass
class ProtocolResult:
    persona_arm: list[list[TurnRecord]]
    control_arm: list[list[TurnRecord]]  # same turns, no persona, mechanism disabled: the base model


def run_protocol(runner: ConversationRunner, persona: Persona, streams: Sequence[Sequence[Any]],
                 probe_turns: Sequence[int], control: bool = True, progress: bool = True) -> ProtocolResult:
    persona_arm, control_arm = [], []
    for k, stream in enumerate(streams):
        persona_arm.append(runner.run(persona, stream, probe_turns, progress=progress,
                                      desc=f"conversation {k + 1}/{len(streams)}"))
        if control:
            with runner.mechanism.disabled():
                control_arm.append(runner.run(None, stream, probe_turns, probes=persona.probes, progress=progress,
                                              desc=f"control {k + 1}/{len(streams)}"))
    return ProtocolResult(persona_arm, control_arm)


def _adherence(arm: list[list[TurnRecord]], probe_turns: list[int], suffix: str) -> dict[str, Any]:
    kinds = sorted({p.kind for records in arm for r in records for p in r.probes})
    metrics = {kind: ProbeAdherence(probe_turns) for kind in kinds}
    for records in arm:
        for r in records:
            for kind in kinds:
                verdicts = [p.passed for p in r.probes if p.kind == kind]
                if verdicts:
                    metrics[kind].update(r.turn, verdicts)
    return {f"adherence/{k}{suffix}": m.compute() for k, m in metrics.items()}


def _margin(arm: list[list[TurnRecord]], probe_turns: list[int], suffix: str) -> dict[str, Any]:
    metric = PerTurnMean(probe_turns, max_conversations=max(1, len(arm)))
    for c, records in enumerate(arm):
        for r in records:
            margins = [p.margin for p in r.probes if p.margin is not None]
            if margins:
                metric.update(c, r.turn, sum(margins) / len(margins))
    return {f"likelihood_margin{suffix}": metric.compute()} if any(metric.compute()["n"]) else {}


def _projection(result: ProtocolResult, probe_turns: list[int], layer: int) -> dict[str, Any]:
    """Needs the control arm and a probe at turn 0 (the direction is the turn-0 persona difference)."""
    if not result.control_arm or 0 not in probe_turns:
        return {}
    states = [({r.turn: r.reply_state[layer] for r in p if r.reply_state is not None},
               {r.turn: r.reply_state[layer] for r in c if r.reply_state is not None})
              for p, c in zip(result.persona_arm, result.control_arm)]
    direction = torch.stack([p[0] - c[0] for p, c in states]).mean(0)
    metric = PerTurnMean(probe_turns, max_conversations=len(states))
    for k, (p, c) in enumerate(states):
        for turn, value in persona_projection(p, c, direction).items():
            metric.update(k, turn, value)
    return {"projection": {**metric.compute(), "layer": layer}}


def summarize(result: ProtocolResult, probe_turns: list[int], layer: int | None = None) -> dict[str, Any]:
    metrics = _adherence(result.persona_arm, probe_turns, "")
    metrics.update(_margin(result.persona_arm, probe_turns, ""))
    if result.control_arm:
        metrics.update(_adherence(result.control_arm, probe_turns, "_control"))
        metrics.update(_margin(result.control_arm, probe_turns, "_control"))
        first = next((r.reply_state for r in result.persona_arm[0] if r.reply_state is not None), None)
        if first is not None:
            metrics.update(_projection(result, probe_turns, layer if layer is not None else first.shape[0] // 2))
    tokens: dict[str, list[int]] = {}
    for records in result.persona_arm:
        for r in records:
            tokens.setdefault(str(r.turn), []).append(r.history_tokens)
    return {"metrics": metrics, "history_tokens": {t: round(sum(v) / len(v)) for t, v in tokens.items()}}
