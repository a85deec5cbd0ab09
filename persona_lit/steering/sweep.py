"""`task=steer_sweep`: guidance on steering strength. The drift protocol runs once per alpha with mechanism=steer
(activation steering) or mechanism=weight_steer (W + alpha·ΔW; its control=random too), the attached mechanism's
alpha changed in place (one model load), and each alpha's adherence is set against its capability cost (KL to
the base model), per probe turn with the intervals of persona_lit.evaluation.protocol.summarize. Several sweeps side by side:
task=sweep_compare (steering/sweep_compare.py).

The steered arm: by default (task.system_prompt=false) the persona's probes with no system prompt, so the
direction alone carries the persona and alpha=0 is the base model with no persona (the drift protocol's control
arm). With task.system_prompt=true the persona prompt stays and alpha=0 is mechanism=none. task.reference adds
the `none` arm (persona as system prompt, steering off) as a reference point when it is not alpha=0 already.

The measure (task.metric): `adherence` (the fraction of task.probe_kind probes passed) or `margin` (the
likelihood margin log p(persona answer) - log p(default answer) per token over every probe: continuous, so it
still moves on a small model whose answers pass no probe at any alpha).

Recommendation rule (written into report.md): at the rule's turn T (task.turn, default the last probe turn),
an alpha qualifies when its measure beats alpha=0 (the lower end of its 95% interval, or its
mean where it has no interval, is above alpha=0's mean) and its mean KL to base is at most task.max_kl. The
recommended range runs from the smallest to the largest qualifying alpha.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from persona_lit.evaluation.protocol import merge, run_personas, summarize
from persona_lit.errors import UserError
from persona_lit.evaluation.runner import conversation_batch, drift_inputs, drift_placement, drift_setup
from persona_lit.outputs import staged_dir

KL = "capability/kl_to_base"
METRICS = ("adherence", "margin")
MECHANISMS = ("steer", "weight_steer")  # mechanisms whose strength is an in-place `alpha`


def settings(mech: Any) -> dict[str, Any]:
    """What the swept mechanism is, besides alpha (written into results.json and the report)."""
    if mech.name == "steer":
        return {"layers": mech.layers, "positions": mech.positions, "history": mech.history, "cap": mech.cap}
    return {"delta": mech.delta_path, "weights": mech.weights, "control": mech.control, "seed": mech.seed}


def describe(run: dict[str, Any]) -> str:
    if run.get("mechanism", "steer") == "steer":
        return (f"mechanism=steer at blocks {run['layers']} (positions={run['positions']}, history={run['history']}, "
                f"cap={run['cap']}); alpha in units of each layer's activation norm")
    control = "" if run.get("control") is None else f", control={run['control']} (seed {run.get('seed')})"
    return f"mechanism=weight_steer, W + alpha·ΔW with ΔW from {run['delta']}{control}"


def measure(metric: str, kind: str) -> tuple[str, str]:
    """(results key, axis label) of task.metric."""
    if metric == "margin":
        return "likelihood_margin", "likelihood margin (persona - default), nats/token"
    return f"adherence/{kind}", f"{kind} adherence"


def _check(cfg: DictConfig) -> tuple[list[float], float]:
    task = cfg.task
    alphas = list(task.alphas) if task.alphas is not None else []
    if not alphas or not all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a)
                             for a in alphas):
        raise UserError(f"task.alphas={alphas}: need a non-empty list of numbers, e.g. [0, 1, 2, 4, 8]")
    if len(set(alphas)) != len(alphas) or 0 not in alphas:
        raise UserError(f"task.alphas={alphas}: need distinct values including 0 (the reference of the rule)")
    if str(task.metric) not in METRICS:
        raise UserError(f"task.metric={task.metric}: unknown; allowed: {', '.join(METRICS)}")
    max_kl = task.max_kl
    if isinstance(max_kl, bool) or not isinstance(max_kl, (int, float)) or not max_kl > 0:
        raise UserError(f"task.max_kl={max_kl}: need a number > 0 (nats per token)")
    if not cfg.ckpt and cfg.mechanism.name not in MECHANISMS:
        raise UserError(f"mechanism={cfg.mechanism.name}: task=steer_sweep needs mechanism=steer or weight_steer")
    if int(cfg.devices) != 1:
        raise UserError(f"devices={cfg.devices}: task=steer_sweep runs in one process; use devices=1")
    if cfg.judge.url:
        raise UserError(f"judge.url={cfg.judge.url}: task=steer_sweep does not run the judge; leave judge.url null")
    if int(cfg.capability_exchanges) < 1:
        raise UserError(f"capability_exchanges={cfg.capability_exchanges}: task=steer_sweep needs the KL to base; "
                        f"set capability_exchanges >= 1")
    return sorted(float(a) for a in alphas), float(max_kl)


def run_task(cfg: DictConfig) -> Path:
    out_dir = Path(cfg.out_dir)
    alphas, max_kl = _check(cfg)
    turns, _, chosen = drift_inputs(cfg)
    _, _, device = drift_placement(cfg)
    setup = drift_setup(cfg, turns, chosen, device)
    mech, runner, probe_turns = setup.mechanism, setup.runner, setup.probe_turns
    if mech.name not in MECHANISMS:
        raise UserError(f"ckpt={cfg.ckpt}: a {mech.name} checkpoint; task=steer_sweep needs mechanism=steer or "
                        f"weight_steer")
    turn = probe_turns[-1] if cfg.task.turn is None else int(cfg.task.turn)
    if turn not in probe_turns:
        raise UserError(f"task.turn={cfg.task.turn}: not a probe turn; allowed: {probe_turns}")
    kind = str(cfg.task.probe_kind)
    kinds = sorted({p.kind for persona in setup.personas for p in persona.probes})
    if kind not in kinds:
        raise UserError(f"task.probe_kind={kind}: the personas' probes have kinds {kinds}")
    metric = str(cfg.task.metric)
    key, label = measure(metric, kind)
    with_prompt = bool(cfg.task.system_prompt)
    steered = [p if with_prompt else dataclasses.replace(p, system_prompt=None) for p in setup.personas]

    streams = turns.persona_streams([p.key for p in setup.personas])  # the evaluation's: each unit its own

    def arm(personas) -> dict[str, Any]:
        results = run_personas(runner, personas, streams, probe_turns, control=False, baseline=False,
                               capability=setup.capability, capability_tokens=int(cfg.capability_tokens),
                               batch=conversation_batch(cfg, setup, streams, runner.device))
        return summarize(merge(results), probe_turns)["metrics"]

    before, sweep = mech.alpha, []
    try:
        for alpha in alphas:
            mech.alpha = alpha
            sweep.append({"alpha": alpha, "metrics": arm(steered)})
    finally:
        mech.alpha = before
    reference = None
    if cfg.task.reference and not with_prompt:
        with mech.disabled():
            reference = arm(setup.personas)
    rule = recommend(sweep, key, label, turn, max_kl)
    results = {
        "run": {"ckpt": str(cfg.ckpt), "model": setup.backbone.name, "mechanism": mech.name,
                "persona": ", ".join(p.name for p in setup.personas), "turns": int(cfg.turns),
                "conversations": int(cfg.conversations), "probe_turns": probe_turns, "device": str(device),
                "precision": setup.precision, **settings(mech)},
        "task": {"alphas": alphas, "system_prompt": with_prompt, "turn": turn, "probe_kind": kind, "metric": metric,
                 "max_kl": max_kl},
        "sweep": sweep, "reference_none": reference, "recommendation": rule, "config": setup.config,
    }
    with staged_dir(out_dir) as tmp:
        (tmp / "results.json").write_text(json.dumps(results, indent=2))
        plot(tmp / "sweep.png", sweep, reference, key, label, turn, max_kl, results["run"])
        (tmp / "report.md").write_text(report(results))
    print(f"persona_lit: steering sweep written to {out_dir} (report.md, results.json, sweep.png)")
    return out_dir


def at_turn(m: dict[str, Any] | None, turn: int) -> tuple[float, float | None, float | None] | None:
    """(mean, ci_low, ci_high) of a per-turn metric at `turn`, None where it was not measured."""
    if not m or turn not in m["turn"]:
        return None
    i = m["turn"].index(turn)
    return None if m["mean"][i] is None else (m["mean"][i], m["ci_low"][i], m["ci_high"][i])


def recommend(sweep: list[dict[str, Any]], key: str, label: str, turn: int, max_kl: float) -> dict[str, Any]:
    text = (f"At turn {turn}, an alpha qualifies when its {label} beats alpha=0 (the lower end of its 95% "
            f"interval, or its mean where it has no interval, is above alpha=0's mean) and its mean KL to the base "
            f"model is at most max_kl={max_kl:g} nats/token. Recommended: the smallest to the largest qualifying "
            f"alpha.")
    zero = at_turn(next(s for s in sweep if s["alpha"] == 0)["metrics"].get(key), turn)
    chosen = []
    for s in sweep:
        adh, kl = at_turn(s["metrics"].get(key), turn), at_turn(s["metrics"].get(KL), turn)
        if s["alpha"] == 0 or adh is None or kl is None or zero is None:
            continue
        floor = adh[1] if adh[1] is not None else adh[0]
        if floor > zero[0] and kl[0] <= max_kl:
            chosen.append(s["alpha"])
    return {"rule": text, "alphas": chosen, "range": [min(chosen), max(chosen)] if chosen else None}


def _fmt(v: tuple | None) -> str:
    if v is None:
        return "-"
    return f"{v[0]:.3f}" + (f" [{v[1]:.3f}, {v[2]:.3f}]" if v[1] is not None and v[2] is not None else " (no interval)")


def report(results: dict[str, Any]) -> str:
    run, task, rec = results["run"], results["task"], results["recommendation"]
    turn = task["turn"]
    key, label = measure(task.get("metric", "adherence"), task["probe_kind"])
    first = results["run"]["probe_turns"][0]
    arm = ("the persona prompt kept (alpha=0 = mechanism=none)" if task["system_prompt"] else
           "no system prompt (alpha=0 = the base model with no persona; the direction alone carries the persona)")
    lines = [f"# Steering strength sweep: {run['persona']} on {run['model']}", "",
             f"{describe(run)}. Steered arm: {arm}. "
             f"{run['conversations']} conversations of {run['turns']} turns; means with 95% intervals over "
             f"conversations (clustered by persona).", "",
             f"| alpha | {label}, turn {first} | {label}, turn {turn} | KL to base, turn {turn} "
             f"| perplexity, turn {turn} | qualifies |", "|---|---|---|---|---|---|"]
    rows = [(f"{s['alpha']:g}", s["metrics"], "yes" if s["alpha"] in rec["alphas"] else "")
            for s in results["sweep"]]
    if results["reference_none"]:
        rows.append(("none (persona prompt, no steering)", results["reference_none"], "reference"))
    for label, m, mark in rows:
        adh = m.get(key)
        lines.append(f"| {label} | {_fmt(at_turn(adh, first))} | {_fmt(at_turn(adh, turn))} | "
                     f"{_fmt(at_turn(m.get(KL), turn))} | {_fmt(at_turn(m.get('capability/perplexity'), turn))} "
                     f"| {mark} |")
    lines += ["", "## Recommended alpha", "", f"Rule: {rec['rule']}", ""]
    if rec["range"]:
        lines.append(f"**Recommended alpha range: {rec['range'][0]:g} to {rec['range'][1]:g}** "
                     f"(qualifying: {', '.join(f'{a:g}' for a in rec['alphas'])}).")
    else:
        lines.append("**No alpha qualified**: none beat alpha=0 within the KL budget at this turn (try more "
                     "conversations, other layers, or a larger task.max_kl).")
    lines += ["", "Per-turn values of every metric, for every alpha: results.json (`sweep`). Plot: sweep.png.", ""]
    return "\n".join(lines)


def plot(path: Path, sweep, reference, key: str, label: str, turn: int, max_kl: float, run: dict[str, Any]) -> None:
    """The measure (adherence or margin) against KL to base at `turn`, one labelled point per alpha, 95% interval bars where there are."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    points = [(f"α={s['alpha']:g}", s["metrics"], "o") for s in sweep]
    if reference:
        points.append(("none (prompt)", reference, "*"))
    xs, ys = [], []
    for label, m, marker in points:
        adh, kl = at_turn(m.get(key), turn), at_turn(m.get(KL), turn)
        if adh is None or kl is None:
            continue
        xerr = [[kl[0] - kl[1]], [kl[2] - kl[0]]] if kl[1] is not None else None
        yerr = [[adh[0] - adh[1]], [adh[2] - adh[0]]] if adh[1] is not None else None
        ax.errorbar([kl[0]], [adh[0]], xerr=xerr, yerr=yerr, fmt=marker, capsize=3, markersize=8 if marker == "*" else 5,
                    color="tab:orange" if marker == "*" else "tab:blue")
        ax.annotate(label, (kl[0], adh[0]), textcoords="offset points", xytext=(5, 5), fontsize=8)
        if marker == "o":
            xs.append(kl[0])
            ys.append(adh[0])
    ax.plot(xs, ys, "-", color="tab:blue", alpha=0.3)
    ax.axvline(max_kl, color="grey", linestyle="--", linewidth=1, label=f"max_kl = {max_kl:g}")
    ax.set_xlabel(f"KL(model || base), nats/token, turn {turn}")
    ax.set_ylabel(f"{label}, turn {turn}")
    where = f"blocks {run['layers']}" if run.get("mechanism", "steer") == "steer" else "weight_steer" + (
        f", control={run['control']}" if run.get("control") else "")
    ax.set_title(f"steering strength: {run['persona']} ({run['model']}, {where})", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
