"""The drift protocol: persona arm (the mechanism), baseline arm (the persona as system prompt, mechanism
disabled), control arm (no persona) and, optionally, bleed arm (no persona, mechanism on) over the same user
turns, probes on forks, and every metric per turn with a seeded bootstrap interval over conversations,
clustered by persona (metrics/drift.py). Used by evaluate.py and callbacks."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import torch
from tqdm.auto import tqdm

from persona_lit.evaluation.conversation import ConversationRunner, TurnRecord
from persona_lit.metrics import PerTurnMean, ProbeAdherence, persona_projection
from persona_lit.personas.types import Persona
from persona_lit.steering.vectors import Direction


# The metrics see the complete list of records on one process (rank 0 after a gather, or the drift callback on
# rank 0 alone): they must not enter a collective the other ranks never join.
LOCAL = {"sync_on_compute": False, "dist_sync_on_step": False}
PROTOCOLS = ("free", "replay")
KL_STORE_BYTES = 2 * 2**30  # replay: the baseline's capability log-probs kept per batch for kl_to_none


@dataclass
class ProtocolResult:
    persona_arm: list[list[TurnRecord]]
    control_arm: list[list[TurnRecord]]  # same turns, no persona, mechanism disabled: the base model
    groups: list[int] = field(default_factory=list)  # persona of each conversation (merged results); [] = one
    baseline_arm: list[list[TurnRecord]] = field(default_factory=list)  # same turns, persona, mechanism disabled
    bleed_arm: list[list[TurnRecord]] = field(default_factory=list)  # same turns, no persona, mechanism on


def merge(results: Sequence[ProtocolResult]) -> ProtocolResult:
    """Several personas' results as one: their conversations pool into every interval (clustered by persona),
    while each persona keeps its own projection direction."""
    out = ProtocolResult([], [], [], [], [])
    for g, r in enumerate(results):
        out.persona_arm += r.persona_arm
        out.control_arm += r.control_arm
        out.baseline_arm += r.baseline_arm
        out.bleed_arm += r.bleed_arm
        out.groups += [g] * len(r.persona_arm)
    return out


def run_protocol(runner: ConversationRunner, persona: Persona, streams: Sequence[Sequence[Any]],
                 probe_turns: Sequence[int], control: bool = True, progress: bool = True,
                 capability: Sequence[tuple[str, str]] = (), capability_tokens: int = 48,
                 batch: int = 8, baseline: bool = True, bleed: bool = False) -> ProtocolResult:
    """One persona's protocol: run_personas with that persona alone."""
    return run_personas(runner, [persona], streams, probe_turns, control=control, progress=progress,
                        capability=capability, capability_tokens=capability_tokens, batch=batch, baseline=baseline,
                        bleed=bleed)[0]


def run_personas(runner: ConversationRunner, personas: Sequence[Persona], streams: Sequence[Sequence[Any]],
                 probe_turns: Sequence[int], control: bool = True, progress: bool = True,
                 capability: Sequence[tuple[str, str]] = (), capability_tokens: int = 48,
                 batch: int = 8, baseline: bool = True, bleed: bool = False,
                 protocol: str = "free") -> list[ProtocolResult]:
    """Every persona on its streams: one ProtocolResult per persona, its conversations in stream order. `streams`:
    {persona key: that persona's streams} (MTBenchDataModule.persona_streams: each unit its own), or one list of
    streams every persona runs on.
    The (persona, stream) conversations run `batch` at a time (one padded batch, personas mixed: a row is the
    conversation it would be alone); `capability`: (question, reference answer) pairs for the capability cost
    (probing.py), scored at every probe turn in every arm.

    Arms on the same turns: persona (the mechanism), control (no persona, mechanism disabled) and, with
    a mechanism other than `none`: with `baseline`, baseline (the persona as system prompt, mechanism disabled:
    what `none` would do); with `bleed`, bleed (no persona, mechanism on: does it invent a persona, at what
    capability cost; it answers the persona's probes, as the control arm does). The bleed arm runs last, so
    the other arms are the same with or without it.

    `protocol`: "free" (each arm writes its own answers: its probes see its own history) or "replay" (one
    transcript per (persona, stream), written by the base model with the persona: the baseline arm, or the
    persona arm under `none`, generates it; every other arm reads it teacher-forced, so all arms are probed on the
    same history and their paired differences compare like with like). Replay runs the baseline arm first."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol={protocol!r}; allowed: {', '.join(PROTOCOLS)}")
    if capability:
        runner.prepare_references(capability, capability_tokens)
    replay = protocol == "replay"
    baseline = (baseline or replay) and runner.mechanism.name != "none"  # there the persona arm is the baseline
    bleed = bleed and runner.mechanism.name != "none"  # there it is the control arm
    keys = [p.key for p in personas]
    if len(set(keys)) != len(keys):
        twice = next(k for k in keys if keys.count(k) > 1)
        raise ValueError(f"persona {twice!r} is given twice; each persona's results are kept under its key")
    own = streams if isinstance(streams, Mapping) else {k: list(streams) for k in keys}
    counts = {len(own[k]) for k in keys}
    if len(counts) > 1:
        raise ValueError(f"every persona needs as many streams; got {sorted(counts)}")
    units = [(p, s) for p in personas for s in own[p.key]]
    if replay and capability and runner.model is not None:  # the baseline's kept log-probs bound the batch
        vocab = runner.model.get_output_embeddings().weight.shape[0]
        per_row = len(probe_turns) * len(capability) * capability_tokens * vocab * 4
        if batch * per_row > KL_STORE_BYTES:
            batch = max(1, KL_STORE_BYTES // per_row)
            if progress:
                print(f"persona_lit: replay: {batch} conversations per batch, so that the baseline's capability "
                      f"log-probs kept for kl_to_none stay under {KL_STORE_BYTES / 2**30:.0f} GiB", flush=True)
    arms: dict[str, list[list[TurnRecord]]] = {"persona": [], "control": [], "baseline": [], "bleed": []}
    names = [a for a, on in (("persona", True), ("baseline", baseline), ("control", control), ("bleed", bleed)) if on]
    batches = math.ceil(len(units) / batch)
    bars = {a: tqdm(total=batches * max((len(s) for _, s in units), default=0), position=i, unit="turn",
                    desc=f"{a} arm ({len(units)} conversations, {batches} batches)", disable=not progress,
                    dynamic_ncols=True) for i, a in enumerate(names)}  # one bar per arm, over all its batches
    try:
        for k in range(0, len(units), batch):
            who, group = [p for p, _ in units[k : k + batch]], [s for _, s in units[k : k + batch]]
            nobody, probes = [None] * len(who), [p.probes for p in who]
            common = dict(progress=progress, capability=capability)
            transcript = None
            written = None
            if replay and baseline:  # the base model with the persona writes the transcript
                with runner.mechanism.disabled():
                    written = runner.run(who, group, probe_turns, bar=bars["baseline"], keep_logprobs=True,
                                         **common)
                arms["baseline"] += written
                transcript = _transcript(written)
            mine = runner.run(who, group, probe_turns, bar=bars["persona"], replay=transcript, against=written,
                              **common)  # replay: kl_to_none against the baseline on the same history
            for records in written or []:
                for r in records:
                    r.capability_logprobs = None
            arms["persona"] += mine
            if replay and transcript is None:  # `none`: its persona arm is the base model with the persona
                transcript = _transcript(mine)
            with runner.mechanism.disabled():
                if baseline and not replay:
                    arms["baseline"] += runner.run(who, group, probe_turns, bar=bars["baseline"], **common)
                if control:
                    arms["control"] += runner.run(nobody, group, probe_turns, probes=probes, bar=bars["control"],
                                                  replay=transcript, **common)
            if bleed:
                arms["bleed"] += runner.run(nobody, group, probe_turns, probes=probes, bar=bars["bleed"],
                                            replay=transcript, **common)
    finally:
        for b in bars.values():
            b.close()
    out, n = [], counts.pop() if counts else 0
    for i, persona in enumerate(personas):
        mine = {arm: records[i * n : (i + 1) * n] for arm, records in arms.items()}
        for records in (r for arm in mine.values() for r in arm):
            for r in records:
                r.persona = persona.key  # the control and bleed arms answer the same persona's probes, without it
        out.append(ProtocolResult(mine["persona"], mine["control"], [], mine["baseline"], mine["bleed"]))
    return out


def _transcript(records: list[list[TurnRecord]]) -> list[list[list[int]]]:
    """Per conversation, each turn's answer tokens (turn 0, the persona alone, has none)."""
    return [[list(r.answer_ids or []) for r in rows[1:]] for rows in records]


def transcript_hash(result: ProtocolResult) -> str:
    """sha256 (16 hex digits) of a replay's transcript: each conversation's user turns and answer tokens, from the
    arm that wrote it (baseline, or persona under `none`). Runs pair on replay only where it is equal."""
    import hashlib
    import json

    source = result.baseline_arm or result.persona_arm
    payload = [[[r.user, list(r.answer_ids or [])] for r in rows[1:]] for rows in source]
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]


def _groups(result: ProtocolResult) -> list[int]:
    return result.groups or [0] * len(result.persona_arm)


def _kinds(arm: list[list[TurnRecord]]) -> list[str]:
    return sorted({p.kind for records in arm for r in records for p in r.probes})


def _passed(r: TurnRecord, kind: str) -> list[bool]:
    return [p.passed for p in r.probes if p.kind == kind]


def _fraction_passed(r: TurnRecord, kind: str) -> float | None:
    verdicts = _passed(r, kind)
    return sum(verdicts) / len(verdicts) if verdicts else None


def _adherence(arm: list[list[TurnRecord]], groups: list[int], probe_turns: list[int], suffix: str) -> dict[str, Any]:
    """Per probe kind: each conversation's fraction of probes passed at a turn, interval over conversations."""
    metrics = {kind: ProbeAdherence(probe_turns, **LOCAL) for kind in _kinds(arm)}
    for c, (records, g) in enumerate(zip(arm, groups)):
        for r in records:
            if r.turn in probe_turns:
                for kind, metric in metrics.items():
                    metric.update(c, r.turn, _passed(r, kind), group=g)
    return {f"adherence/{k}{suffix}": m.compute() for k, m in metrics.items()}


def _per_turn(arm: list[list[TurnRecord]], groups: list[int], probe_turns: list[int], name: str,
              value, bounds: tuple[float, float] | None = None) -> dict[str, Any]:
    """{name: mean and interval across conversations per turn} of value(record), where it is not None;
    `bounds`: the value's range (the interval is clipped to it)."""
    metric, seen = PerTurnMean(probe_turns, bounds=bounds, **LOCAL), False
    for c, (records, g) in enumerate(zip(arm, groups)):
        for r in records:
            v = value(r)
            if v is not None and r.turn in probe_turns:
                metric.update(c, r.turn, v, group=g)
                seen = True
    return {name: metric.compute()} if seen else {}


def _mean_margin(r: TurnRecord) -> float | None:
    margins = [p.margin for p in r.probes if p.margin is not None]
    return sum(margins) / len(margins) if margins else None


def _mean_log_odds(r: TurnRecord) -> float | None:
    values = [p.log_odds for p in r.probes if p.log_odds is not None]
    return sum(values) / len(values) if values else None


def _record_metrics(arm: list[list[TurnRecord]], groups: list[int], probe_turns: list[int],
                    suffix: str) -> dict[str, Any]:
    out = _per_turn(arm, groups, probe_turns, f"likelihood_margin{suffix}", _mean_margin)
    out.update(_per_turn(arm, groups, probe_turns, f"choice/log_odds{suffix}", _mean_log_odds))
    out.update(_per_turn(arm, groups, probe_turns, f"capability/kl_to_base{suffix}", _kl_to_base, (0.0, math.inf)))
    out.update(_per_turn(arm, groups, probe_turns, f"capability/kl_to_none{suffix}",
                         lambda r: r.capability.get("kl_to_none") if r.capability else None, (0.0, math.inf)))
    out.update(_per_turn(arm, groups, probe_turns, f"capability/perplexity{suffix}",
                         lambda r: math.exp(r.capability["nll"]) if r.capability else None, (1.0, math.inf)))
    for key in ("persona", "coherence"):
        out.update(_per_turn(arm, groups, probe_turns, f"judge/{key}{suffix}",
                             lambda r, key=key: r.judge[key] if r.judge else None))
    return out


def _kl_to_base(r: TurnRecord) -> float | None:
    return r.capability["kl_to_base"] if r.capability else None


def _paired(arm: list[list[TurnRecord]], other: list[list[TurnRecord]], groups: list[int], probe_turns: list[int],
            values: dict[str, Any], prefix: str) -> dict[str, Any]:
    """`arm` minus `other`, paired by conversation (the same turns in both arms): per turn the mean difference
    and its interval over conversations' paired differences (the cluster bootstrap of every metric: personas,
    then conversations within them, are resampled with each conversation's difference kept whole)."""
    out = {}
    for name, value in values.items():
        bounds = (-1.0, 1.0) if name.startswith("adherence/") else None  # a difference of two proportions
        metric, seen, unpaired = PerTurnMean(probe_turns, bounds=bounds, test_zero=True, **LOCAL), False, set()
        for c, (mine, theirs, g) in enumerate(zip(arm, other, groups)):
            theirs_at = {r.turn: value(r) for r in theirs}
            for r in mine:
                a, b = value(r), theirs_at.get(r.turn)
                if r.turn in probe_turns and a is not None and b is not None:
                    metric.update(c, r.turn, a - b, group=g)
                    seen = True
                elif r.turn in probe_turns and (a is None) != (b is None):
                    unpaired.add(r.turn)
        if unpaired:  # one arm has the value, the other not: that conversation is out of this difference
            print(f"persona_lit: warning: {prefix}/{name}: at turn(s) {', '.join(map(str, sorted(unpaired)))} some "
                  f"conversations have it in one arm only and are left out of the paired difference (see its n)",
                  flush=True)
        if seen:
            out[f"{prefix}/{name}"] = metric.compute()
    return out


def _versus_baseline(result: ProtocolResult, probe_turns: list[int]) -> dict[str, Any]:
    """Mechanism minus baseline, paired by conversation (see _paired): adherence by kind, likelihood margin and
    capability KL to base (the mechanism's capability cost over the plain system prompt at the same turn)."""
    values = {f"adherence/{kind}": functools.partial(_fraction_passed, kind=kind) for kind in _kinds(result.persona_arm)}
    values["likelihood_margin"] = _mean_margin
    values["choice/log_odds"] = _mean_log_odds
    values["capability/kl_to_base"] = _kl_to_base
    return _paired(result.persona_arm, result.baseline_arm, _groups(result), probe_turns, values, "vs_baseline")


def _bleed_versus_control(result: ProtocolResult, probe_turns: list[int]) -> dict[str, Any]:
    """Bleed minus control (no persona in either; the mechanism on, then off), paired by conversation (see
    _paired): adherence by kind (a persona the mechanism invents) and capability KL to base (its cost)."""
    values = {f"adherence/{kind}": functools.partial(_fraction_passed, kind=kind) for kind in _kinds(result.bleed_arm)}
    values["capability/kl_to_base"] = _kl_to_base
    return _paired(result.bleed_arm, result.control_arm, _groups(result), probe_turns, values, "bleed_vs_control")


def _projection(arm: list[list[TurnRecord]], control: list[list[TurnRecord]], groups: list[int],
                probe_turns: list[int], layer: int, name: str, axis: Direction | None = None) -> dict[str, Any]:
    """Needs the control arm and a probe at turn 0. The direction is the arm's turn-0 persona difference, or
    `axis`'s vector at `layer` (a task=direction file: every run on one axis)."""
    if not control or not arm or 0 not in probe_turns:
        return {}
    states = [({r.turn: r.reply_state[layer] for r in p if r.reply_state is not None},
               {r.turn: r.reply_state[layer] for r in c if r.reply_state is not None})
              for p, c in zip(arm, control)]
    if not all(0 in p and 0 in c for p, c in states):
        return {}
    if axis is not None:
        directions = {g: axis.vectors[layer] for g in set(groups)}
    else:
        directions = {g: torch.stack([p[0] - c[0] for (p, c), h in zip(states, groups) if h == g]).mean(0)
                      for g in set(groups)}
    metric = PerTurnMean(probe_turns, **LOCAL)
    for k, ((p, c), g) in enumerate(zip(states, groups)):
        for turn, value in persona_projection(p, c, directions[g]).items():
            if turn in probe_turns:
                metric.update(k, turn, value, group=g)
    source = str(axis.meta.get("source", "direction file")) if axis is not None else "turn-0 difference"
    return {name: {**metric.compute(), "layer": layer, "axis": source}}


def summarize(result: ProtocolResult, probe_turns: list[int], layer: int | None = None,
              axis: Direction | None = None) -> dict[str, Any]:
    """Every metric per probe turn for each arm present (suffixes: none for the mechanism, `_baseline`,
    `_control`, `_bleed`), `vs_baseline/...`: mechanism minus baseline, and `bleed_vs_control/...`: bleed minus
    control (adherence by kind, capability/kl_to_base), each paired by conversation. `axis`: project on
    a saved direction (checked against the model: steering.directions.projection_axis) instead.
    Beside them, from the persona arm: `history_tokens` (mean tokens in the history after each turn) and
    `seconds_per_turn` (mean wall-clock seconds the turn's answer took for its conversation batch, probes
    excluded; turn 0 has none), both keyed by the turn as a string."""
    groups, metrics = _groups(result), {}
    arms = {"": result.persona_arm, "_baseline": result.baseline_arm, "_control": result.control_arm,
            "_bleed": result.bleed_arm}
    for suffix, arm in arms.items():
        if arm:
            metrics.update(_adherence(arm, groups, probe_turns, suffix))
            metrics.update(_record_metrics(arm, groups, probe_turns, suffix))
    first = next((r.reply_state for r in result.persona_arm[0] if r.reply_state is not None), None) \
        if result.persona_arm else None
    if first is not None:
        layer = layer if layer is not None else first.shape[0] // 2
        for suffix in ("", "_baseline"):
            metrics.update(_projection(arms[suffix], result.control_arm, groups, probe_turns, layer,
                                       f"projection{suffix}", axis))
    if result.baseline_arm:
        metrics.update(_versus_baseline(result, probe_turns))
    if result.bleed_arm and result.control_arm:
        metrics.update(_bleed_versus_control(result, probe_turns))
    tokens: dict[str, list[int]] = {}
    seconds: dict[str, list[float]] = {}
    for records in result.persona_arm:
        for r in records:
            tokens.setdefault(str(r.turn), []).append(r.history_tokens)
            if r.seconds is not None:
                seconds.setdefault(str(r.turn), []).append(r.seconds)
    return {"metrics": metrics, "history_tokens": {t: round(sum(v) / len(v)) for t, v in tokens.items()},
            "seconds_per_turn": {t: round(sum(v) / len(v), 4) for t, v in seconds.items()}}
