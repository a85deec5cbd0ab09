"""The drift protocol: persona arm and control arm over the same user turns, probes on forks, and
every metric per turn with an interval across conversations. Used by evaluate.py (and callbacks)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from persona_lit.conversation import ConversationRunner, TurnRecord
from persona_lit.metrics import PerTurnMean, ProbeAdherence, persona_projection
from persona_lit.personas import Persona


@dataclass
class ProtocolResult:
    persona_arm: list[list[TurnRecord]]
    control_arm: list[list[TurnRecord]]  # same turns, no persona, mechanism disabled: the base model
    groups: list[int] = field(default_factory=list)  # persona of each conversation (merged results); [] = one


def merge(results: Sequence[ProtocolResult]) -> ProtocolResult:
    """Several personas' results as one: their conversations pool into every interval, while each
    persona keeps its own projection direction."""
    out = ProtocolResult([], [], [])
    for g, r in enumerate(results):
        out.persona_arm += r.persona_arm
        out.control_arm += r.control_arm
        out.groups += [g] * len(r.persona_arm)
    return out


def run_protocol(runner: ConversationRunner, persona: Persona, streams: Sequence[Sequence[Any]],
                 probe_turns: Sequence[int], control: bool = True, progress: bool = True,
                 capability: Sequence[tuple[str, str]] = (), capability_tokens: int = 48,
                 batch: int = 8) -> ProtocolResult:
    """Conversations run `batch` at a time (one padded batch); `capability`: (question, reference answer)
    pairs for the capability cost (probing.py), scored at every probe turn in both arms."""
    if capability:
        runner.prepare_references(capability, capability_tokens)
    persona_arm, control_arm = [], []
    for k in range(0, len(streams), batch):
        group = streams[k : k + batch]
        where = f"{k + 1}-{k + len(group)}/{len(streams)}"
        persona_arm += runner.run(persona, group, probe_turns, progress=progress, desc=f"conversations {where}",
                                  capability=capability)
        if control:
            with runner.mechanism.disabled():
                control_arm += runner.run(None, group, probe_turns, probes=persona.probes, progress=progress,
                                          desc=f"control {where}", capability=capability)
    for records in persona_arm + control_arm:
        for r in records:
            r.persona = persona.key  # the control arm answers the same persona's probes, without it
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


def _per_turn(arm: list[list[TurnRecord]], probe_turns: list[int], name: str, value) -> dict[str, Any]:
    """{name: mean and t-interval across conversations per turn} of value(record), where it is not None."""
    metric, seen = PerTurnMean(probe_turns, max_conversations=max(1, len(arm))), False
    for c, records in enumerate(arm):
        for r in records:
            v = value(r)
            if v is not None and r.turn in probe_turns:
                metric.update(c, r.turn, v)
                seen = True
    return {name: metric.compute()} if seen else {}


def _mean_margin(r: TurnRecord) -> float | None:
    margins = [p.margin for p in r.probes if p.margin is not None]
    return sum(margins) / len(margins) if margins else None


def _record_metrics(arm: list[list[TurnRecord]], probe_turns: list[int], suffix: str) -> dict[str, Any]:
    out = _per_turn(arm, probe_turns, f"likelihood_margin{suffix}", _mean_margin)
    out.update(_per_turn(arm, probe_turns, f"capability/kl_to_base{suffix}",
                         lambda r: r.capability["kl_to_base"] if r.capability else None))
    out.update(_per_turn(arm, probe_turns, f"capability/perplexity{suffix}",
                         lambda r: math.exp(r.capability["nll"]) if r.capability else None))
    for key in ("persona", "coherence"):
        out.update(_per_turn(arm, probe_turns, f"judge/{key}{suffix}", lambda r: r.judge[key] if r.judge else None))
    return out


def _projection(result: ProtocolResult, probe_turns: list[int], layer: int) -> dict[str, Any]:
    """Needs the control arm and a probe at turn 0 (the direction is the turn-0 persona difference)."""
    if not result.control_arm or 0 not in probe_turns:
        return {}
    states = [({r.turn: r.reply_state[layer] for r in p if r.reply_state is not None},
               {r.turn: r.reply_state[layer] for r in c if r.reply_state is not None})
              for p, c in zip(result.persona_arm, result.control_arm)]
    groups = result.groups or [0] * len(states)
    directions = {g: torch.stack([p[0] - c[0] for (p, c), h in zip(states, groups) if h == g]).mean(0)
                  for g in set(groups)}
    metric = PerTurnMean(probe_turns, max_conversations=len(states))
    for k, ((p, c), g) in enumerate(zip(states, groups)):
        for turn, value in persona_projection(p, c, directions[g]).items():
            metric.update(k, turn, value)
    return {"projection": {**metric.compute(), "layer": layer}}


def summarize(result: ProtocolResult, probe_turns: list[int], layer: int | None = None) -> dict[str, Any]:
    metrics = _adherence(result.persona_arm, probe_turns, "")
    metrics.update(_record_metrics(result.persona_arm, probe_turns, ""))
    if result.control_arm:
        metrics.update(_adherence(result.control_arm, probe_turns, "_control"))
        metrics.update(_record_metrics(result.control_arm, probe_turns, "_control"))
        first = next((r.reply_state for r in result.persona_arm[0] if r.reply_state is not None), None)
        if first is not None:
            metrics.update(_projection(result, probe_turns, layer if layer is not None else first.shape[0] // 2))
    tokens: dict[str, list[int]] = {}
    for records in result.persona_arm:
        for r in records:
            tokens.setdefault(str(r.turn), []).append(r.history_tokens)
    return {"metrics": metrics, "history_tokens": {t: round(sum(v) / len(v)) for t, v in tokens.items()}}
