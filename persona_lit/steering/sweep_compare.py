"""`task=sweep_compare`: several steering sweeps (task=steer_sweep out_dirs) side by side, e.g. activation steering
(mechanism=steer), weight steering (mechanism=weight_steer) and its random-direction control on one persona.

Their alphas are in different units (activation-norm units vs multiples of ΔW), so the comparison that matters
is at matched capability cost: each sweep's measure (its task.metric: adherence or likelihood margin) against
its KL to the base model at the sweeps' common turn, one line per sweep, with the persona prompt (steering
off) as the reference point. The second panel shows each measure against alpha on the sweep's own scale.
Outputs: compare.png, report.md (one table), results.json.

    python evaluate.py task=sweep_compare "task.runs=[outputs/sweep_act,outputs/sweep_w,outputs/sweep_rand]" \
      "task.labels=[activation,weight,random ΔW]" out_dir=outputs/sweep_compare
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from persona_lit.errors import UserError
from persona_lit.outputs import staged_dir
from persona_lit.steering.sweep import KL, at_turn, measure

COLORS = ["tab:blue", "tab:green", "tab:red", "tab:purple", "tab:brown", "tab:gray"]


def load_sweeps(runs: Any, labels: Any) -> list[dict[str, Any]]:
    if isinstance(runs, str) or not runs or len(runs) < 2:
        raise UserError(f"task.runs={runs!r}: need a list of at least two task=steer_sweep out_dirs")
    labels = list(labels) if labels else []
    if labels and len(labels) != len(runs):
        raise UserError(f"task.labels={labels}: {len(labels)} labels for {len(runs)} runs; give one per run or none")
    out = []
    for i, run in enumerate(runs):
        path = Path(str(run)) / "results.json"
        try:
            results = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:
            raise UserError(f"task.runs[{i}]={run}: no readable results.json of task=steer_sweep there "
                            f"({type(e).__name__})") from None
        if not isinstance(results, dict) or "sweep" not in results or "task" not in results:
            raise UserError(f"task.runs[{i}]={run}: results.json is not a task=steer_sweep result (no 'sweep')")
        problem = _shape_problem(results)
        if problem:
            raise UserError(f"task.runs[{i}]={run}: results.json is not a task=steer_sweep result ({problem}); "
                            f"allowed: the results.json that task=steer_sweep writes")
        results["label"] = str(labels[i]) if labels else _label(results["run"])
        out.append(results)
    first = out[0]["task"]
    for i, r in enumerate(out[1:], 1):
        for k in ("metric", "probe_kind", "turn", "system_prompt"):
            if r["task"].get(k) != first.get(k):
                raise UserError(f"task.runs[{i}]={runs[i]}: task.{k}={r['task'].get(k)!r} but {first.get(k)!r} in "
                                f"task.runs[0]; allowed: sweeps with the same {k}")
        if r["run"]["persona"] != out[0]["run"]["persona"] or r["run"]["model"] != out[0]["run"]["model"]:
            raise UserError(f"task.runs[{i}]={runs[i]}: another persona or model than task.runs[0]; compare sweeps "
                            f"of one persona on one model")
    return out


def _number(v: Any, none: bool = False) -> bool:
    return (v is None and none) or (isinstance(v, (int, float)) and not isinstance(v, bool))


def _per_turn_problem(m: Any) -> str:
    """'' for a per-turn metric as summarize writes it ({turn, mean, ci_low, ci_high} lists of one length) or null."""
    if m is None:
        return ""
    if not isinstance(m, dict) or not all(isinstance(m.get(k), list) for k in ("turn", "mean", "ci_low", "ci_high")):
        return "a per-turn metric without turn, mean, ci_low, ci_high lists"
    if len({len(m[k]) for k in ("turn", "mean", "ci_low", "ci_high")}) != 1 or not all(
            isinstance(t, int) for t in m["turn"]) or not all(
            _number(v, none=True) for k in ("mean", "ci_low", "ci_high") for v in m[k]) or any(
            (lo is None) != (hi is None) for lo, hi in zip(m["ci_low"], m["ci_high"])):
        return "a per-turn metric whose lists differ in length or hold other than numbers"
    return ""


def _shape_problem(results: dict[str, Any]) -> str:
    """What table() and plot() need of a steer_sweep results.json, or '' when it is all there."""
    task, run, sweep = results.get("task"), results.get("run"), results.get("sweep")
    if not isinstance(task, dict) or not isinstance(task.get("metric"), str) \
            or not isinstance(task.get("probe_kind"), str) or not isinstance(task.get("turn"), int):
        return "task needs metric, probe_kind and turn"
    if not isinstance(run, dict) or "persona" not in run or "model" not in run:
        return "run needs persona and model"
    if not isinstance(sweep, list) or not all(isinstance(p, dict) and _number(p.get("alpha"))
                                              and isinstance(p.get("metrics"), dict) for p in sweep):
        return "sweep must be a list of {alpha, metrics}"
    key = measure(task["metric"], task["probe_kind"])[0]
    reference = results.get("reference_none")
    if reference is not None and not isinstance(reference, dict):
        return "reference_none must be metrics or null"
    for metrics in [p["metrics"] for p in sweep] + ([reference] if reference else []):
        problem = next(filter(None, (_per_turn_problem(metrics.get(k)) for k in (key, KL, "capability/perplexity"))),
                       "")
        if problem:
            return problem
    return ""


def _label(run: dict[str, Any]) -> str:
    if run.get("mechanism", "steer") == "steer":
        return f"activation steer (blocks {run.get('layers')})"
    return "weight steer" + (f" ({run['control']} control)" if run.get("control") else "")


def _fmt(v: tuple | None) -> str:
    if v is None:
        return "-"
    return f"{v[0]:.2f}" + (f" [{v[1]:.2f}, {v[2]:.2f}]" if v[1] is not None else "")


def table(sweeps: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], str]:
    task = sweeps[0]["task"]
    key, label = measure(task["metric"], task["probe_kind"])
    turn = task["turn"]
    rows, lines = [], [f"| run | alpha | {label}, turn {turn} | KL to base | reference perplexity |", "|---|---|---|---|---|"]
    for s in sweeps:
        points = [(f"{p['alpha']:g}", p["metrics"]) for p in s["sweep"]]
        for alpha, m in points:
            row = {"run": s["label"], "alpha": float(alpha), "measure": at_turn(m.get(key), turn),
                   "kl": at_turn(m.get(KL), turn), "perplexity": at_turn(m.get("capability/perplexity"), turn)}
            rows.append(row)
            lines.append(f"| {s['label']} | {alpha} | {_fmt(row['measure'])} | {_fmt(row['kl'])} | "
                         f"{_fmt(row['perplexity'])} |")
    ref = next((s["reference_none"] for s in sweeps if s.get("reference_none")), None)
    if ref:
        lines.append(f"| persona prompt, no steering | - | {_fmt(at_turn(ref.get(key), turn))} | "
                     f"{_fmt(at_turn(ref.get(KL), turn))} | {_fmt(at_turn(ref.get('capability/perplexity'), turn))} |")
    return rows, "\n".join(lines)


def plot(path: Path, sweeps: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    task = sweeps[0]["task"]
    key, label = measure(task["metric"], task["probe_kind"])
    turn = task["turn"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.5))
    for i, s in enumerate(sweeps):
        color = COLORS[i % len(COLORS)]
        pts = [(p["alpha"], at_turn(p["metrics"].get(KL), turn), at_turn(p["metrics"].get(key), turn))
               for p in s["sweep"]]
        pts = [(a, k, m) for a, k, m in pts if k is not None and m is not None]
        if not pts:
            continue
        for a, k, m in pts:
            yerr = [[m[0] - m[1]], [m[2] - m[0]]] if m[1] is not None else None
            ax.errorbar([k[0]], [m[0]], yerr=yerr, fmt="o", color=color, capsize=2, markersize=4)
            bx.errorbar([a], [m[0]], yerr=yerr, fmt="o", color=color, capsize=2, markersize=4)
        ax.plot([k[0] for _, k, _ in pts], [m[0] for *_, m in pts], "-", color=color, alpha=0.6, label=s["label"])
        bx.plot([a for a, *_ in pts], [m[0] for *_, m in pts], "-", color=color, alpha=0.6, label=s["label"])
    ref = next((s["reference_none"] for s in sweeps if s.get("reference_none")), None)
    if ref and at_turn(ref.get(key), turn) and at_turn(ref.get(KL), turn):
        m, k = at_turn(ref.get(key), turn), at_turn(ref.get(KL), turn)
        ax.plot([k[0]], [m[0]], "*", color="tab:orange", markersize=12, label="persona prompt (no steering)")
        bx.axhline(m[0], color="tab:orange", linestyle="--", linewidth=1, label="persona prompt (no steering)")
    ax.set_xscale("symlog", linthresh=0.05)
    ax.set_xlabel(f"KL(model || base), nats/token, turn {turn} (symlog)")
    ax.set_ylabel(f"{label}, turn {turn}")
    ax.set_title("at matched capability cost", fontsize=9)
    bx.set_xlabel("alpha (each run's own units)")
    bx.set_title("against strength", fontsize=9)
    for a in (ax, bx):
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    fig.suptitle(f"{sweeps[0]['run']['persona']} on {sweeps[0]['run']['model']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_task(cfg: Any) -> Path:
    sweeps = load_sweeps(cfg.task.runs, cfg.task.labels)
    rows, md = table(sweeps)
    out_dir = Path(cfg.out_dir)
    task = sweeps[0]["task"]
    text = (f"# Steering sweeps side by side: {sweeps[0]['run']['persona']} on {sweeps[0]['run']['model']}\n\n"
            f"Turn {task['turn']}, measure: {measure(task['metric'], task['probe_kind'])[1]}; means with 95% "
            f"intervals over conversations. Alphas are in each run's own units: compare at equal KL (compare.png, "
            f"left).\n\n" + "\n".join(f"- {s['label']}: {Path(str(r))}" for s, r in zip(sweeps, cfg.task.runs))
            + "\n\n" + md + "\n")
    with staged_dir(out_dir) as tmp:
        (tmp / "results.json").write_text(json.dumps({"runs": [str(r) for r in cfg.task.runs], "rows": rows}, indent=1))
        (tmp / "report.md").write_text(text)
        plot(tmp / "compare.png", sweeps)
    print(md)
    print(f"persona_lit: sweep comparison written to {out_dir} (report.md, results.json, compare.png)")
    return out_dir
