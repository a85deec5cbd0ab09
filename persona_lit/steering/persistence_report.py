"""Outputs of task=persistence: results.json, report.md, persistence.png, traces.safetensors and
transcript.jsonl (written together through outputs.staged_dir), and the W&B curves (loggers.make_logger)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from persona_lit.training.loggers import make_logger  # noqa: E402
from persona_lit.metrics.drift import unit_interval  # noqa: E402
from persona_lit.outputs import staged_dir  # noqa: E402
from persona_lit.steering.persistence import (ArmTrace, centre, curve, format_half_life, half_life,  # noqa: E402
                                              half_life_stats, release_mean_stats)

DEFINITIONS = {
    "projection": "p_t = output of decoder block measure_layer (index L = block L's output) at the position from "
                  "which generated token t was sampled, dotted with the persona direction's unit vector at that "
                  "layer (read before any steering hook on that block)",
    "centred": "c_t = (p_t - b) / (s - b); b = mean projection of the control run (same question and seed, "
               "steering disabled) over all its generated tokens; s = mean p_t over the steered phase "
               "(t < n_steer); 1 = steered level, 0 = unsteered level",
    "half_life": "first release index r (0 = first unsteered token) whose forward window mean of c over "
                 "r..r+window-1 (shorter at the end) is < 0.5; censored (>= n_release) when there is none",
    "release_mean": "per run the mean of c_t over the release phase (no censoring); ranks the personas",
    "intervals": "95% Student-t over runs (question x seed); none for n = 1 or when all runs agree",
}


def _finite(x: Any) -> Any:
    """NaN/inf -> None, recursively (results.json stays valid JSON)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return x


def summarize(info: dict[str, Any], names: list[str], directions, runs, control: ArmTrace,
              steered: list[ArmTrace]) -> tuple[dict[str, Any], dict[str, dict[str, torch.Tensor]]]:
    """results.json's content, and per persona the centred traces and half-lives (for the trace file)."""
    n, m, layer = info["n_steer"], info["n_release"], info["measure_layer"]
    personas, arrays = {}, {}
    for i, name in enumerate(names):
        p, q = steered[i].projection[..., 0], control.projection[..., i]
        c, level = centre(p, q, n)
        hl, censored = half_life(c[:, n:], info["window"])
        norm = float(directions[i].activation_norm[layer])
        kept = level[~torch.isnan(level)]
        missing = int(torch.isnan(level).sum())
        personas[name] = {
            "direction": info["directions"][i],
            "half_life": {**half_life_stats(hl, censored, m), "per_run": hl.tolist(),
                          "censored_runs": censored.tolist()},
            "release_mean": release_mean_stats(c, n),
            "level": {**unit_interval(kept.tolist()), "unit": "projection (s - b)",
                      "in_activation_norms": (kept / norm).mean().item() if len(kept) else math.nan,
                      "activation_norm": norm},
            "no_steered_level": missing,
            "message": (f"{missing} of {len(runs)} runs have no steered level (steered phase equal to the control: "
                        f"alpha = 0 or steering off; or n_steer = 0): their centred projection is undefined (NaN) "
                        f"and they are left out" if missing else ""),
            "end_of_turns_per_run": {"steered": steered[i].turn_end.sum(1).double().mean().item(),
                                     "control": control.turn_end.sum(1).double().mean().item()},
            "curve": curve(c),
            "raw_mean": {"steered": p.mean(0).tolist(), "control": q.mean(0).tolist()},
        }
        arrays[name] = {"centred": c, "half_life": hl, "censored": censored, "steered": p, "control": q}
    order = sorted(names, key=lambda k: -personas[k]["release_mean"]["mean"]
                   if math.isfinite(personas[k]["release_mean"]["mean"]) else math.inf)
    results = {"run": info, "definitions": DEFINITIONS, "personas": personas, "ranking": order}
    return _finite(results), arrays


def plot(path: Path, results: dict[str, Any]) -> None:
    """Left: mean centred projection per generated token with its 95% band, one line per persona; right:
    each run's half-life (censored runs as open markers at n_release), the median as a bar."""
    run = results["run"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2), gridspec_kw={"width_ratios": [3, 1]})
    for k, (name, r) in enumerate(results["personas"].items()):
        cv = r["curve"]
        mean = [math.nan if v is None else v for v in cv["mean"]]
        line = ax.plot(cv["token"], mean, label=name, lw=1.3)[0]
        if any(lo is not None for lo in cv["ci_low"]):
            lo = [math.nan if v is None else v for v in cv["ci_low"]]
            hi = [math.nan if v is None else v for v in cv["ci_high"]]
            ax.fill_between(cv["token"], lo, hi, alpha=0.18, color=line.get_color())
        hl = r["half_life"]
        values = [(v, c) for v, c in zip(hl["per_run"], hl["censored_runs"]) if v is not None]
        bx.scatter([k] * len(values), [v for v, _ in values], s=18, color=line.get_color(),
                   facecolors=["none" if c else line.get_color() for _, c in values])
        if hl["median"] is not None:
            bx.plot([k - 0.3, k + 0.3], [hl["median"]] * 2, color=line.get_color(), lw=2)
    ax.axvline(run["n_steer"] - 0.5, color="k", ls=":", lw=1)
    for y in (0.0, 0.5, 1.0):
        ax.axhline(y, color="grey", ls="--" if y == 0.5 else "-", lw=0.6)
    ax.set_xlabel(f"generated token (steering released after {run['n_steer']})")
    ax.set_ylabel("centred projection (1 = steered, 0 = control)")
    ax.set_title(f"{run['model']}: alpha {run['alpha']}, steer {run['steer_layers']}, measure {run['measure_layer']}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    bx.set_xticks(range(len(results["personas"])), list(results["personas"]), rotation=30, fontsize=8)
    bx.set_ylabel("half-life (tokens after release)")
    bx.set_title("per run (open = censored)", fontsize=9)
    bx.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _cell(s: dict[str, Any], digits: int = 2) -> str:
    if s["mean"] is None:
        return "n/a"
    ci = f" [{s['ci_low']:.{digits}f}, {s['ci_high']:.{digits}f}]" if s["ci_low"] is not None else " (no interval)"
    return f"{s['mean']:.{digits}f}{ci}"


def report(results: dict[str, Any], command: str) -> str:
    run = results["run"]
    decoding = f"sampled, temperature {run['temperature']:g}, top_p {run['top_p']:g}" if run["do_sample"] else "greedy"
    lines = [f"# Steer-then-release persistence: {run['model']}", "",
             f"Steering: mechanism=steer, alpha {run['alpha']} (activation norms), layers {run['steer_layers']}, "
             f"positions {run['positions']}, for the first {run['n_steer']} generated tokens; then "
             f"{run['n_release']} tokens unsteered, one KV-cached pass (steered states stay in the cache). "
             f"Measured at block {run['measure_layer']}'s output. {len(run['questions'])} questions x "
             f"{len(run['seeds'])} seeds = {run['runs']} runs per persona ("
             f"{decoding}"
             f"); on an end of turn the user says {run['continue_text']!r} and generation goes on.", "",
             *([f"Command: `{command}`", ""] if command else []), "## Definitions", ""]
    lines += [f"- {k}: {v}." for k, v in results["definitions"].items()]
    lines += ["- At steered positions every block after a steered layer carries the added vector in its residual "
              "stream, so the steered level includes the addition itself; at release positions nothing is added.",
              "", "## Results (slowest decay first)", "",
              "| persona | release mean c [95% CI] | half-life | steered level s-b (activation norms) | "
              "ends of turn per run (steered / control) |", "|---|---|---|---|---|"]
    for name in results["ranking"]:
        r = results["personas"][name]
        hl = format_half_life(r["half_life"])
        level = r["level"]["in_activation_norms"]
        eot = r["end_of_turns_per_run"]
        lines.append(f"| {name} | {_cell(r['release_mean'])} | {hl} | "
                     f"{'n/a' if level is None else f'{level:.3f}'} | {eot['steered']:.1f} / {eot['control']:.1f} |")
    notes = [r["message"] for r in results["personas"].values() if r["message"]]
    if notes:
        lines += ["", "## No steered level", ""] + [f"- {n}: {r['message']}" for n, r in results["personas"].items()
                                                    if r["message"]]
    lines += ["", "Units: a run is one question with one seed; each interval is over runs. `>=` marks a lower bound "
              "(censored runs: the window mean never fell below 0.5 within n_release tokens).", "",
              "![persistence](persistence.png)", ""]
    return "\n".join(lines)


def write_outputs(out_dir: Path, results: dict[str, Any], arrays, names: list[str], runs, control: ArmTrace,
                  steered: list[ArmTrace], chat, command: str) -> None:
    with staged_dir(out_dir) as tmp:
        (tmp / "results.json").write_text(json.dumps(results, indent=1), encoding="utf-8")
        plot(tmp / "persistence.png", results)
        (tmp / "report.md").write_text(report(results, command), encoding="utf-8")
        tensors = {"control/tokens": control.tokens.int(), "control/turn_end": control.turn_end}
        for i, name in enumerate(names):
            a = arrays[name]
            tensors.update({f"{name}/tokens": steered[i].tokens.int(), f"{name}/turn_end": steered[i].turn_end,
                            f"{name}/steered_projection": a["steered"].float(),
                            f"{name}/control_projection": a["control"].float(),
                            f"{name}/centred": a["centred"].float(), f"{name}/half_life": a["half_life"].float(),
                            f"{name}/censored": a["censored"]})
        meta = {"runs": json.dumps([{"question": q, "seed": s} for q, s in runs]),
                "personas": json.dumps(names), "definitions": json.dumps(DEFINITIONS),
                "n_steer": str(results["run"]["n_steer"]), "n_release": str(results["run"]["n_release"])}
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "traces.safetensors"), metadata=meta)
        n = results["run"]["n_steer"]
        with (tmp / "transcript.jsonl").open("w", encoding="utf-8") as f:  # special tokens kept: ends of turn show
            for arm, trace in [("control", control), *zip(names, steered)]:
                for r, (q, s) in enumerate(runs):
                    ids = trace.tokens[r].tolist()
                    f.write(json.dumps({"arm": arm, "question": results["run"]["questions"][q], "seed": s,
                                        "first_tokens": chat.tokenizer.decode(ids[:n]),
                                        "after": chat.tokenizer.decode(ids[n:]),
                                        "ends_of_turn": int(trace.turn_end[r].sum())}, ensure_ascii=False) + "\n")


def log_results(cfg, results: dict[str, Any], out_dir: Path) -> None:
    """Mean centred curves per persona with the generated token as the step, the half-lives and the plot."""
    run = results["run"]
    logger = make_logger(cfg.logger, str(out_dir), _finite({k: v for k, v in run.items() if k != "questions"}),
                         tags=[run["model"], "persistence"], group="steer",
                         name=f"persistence-{'+'.join(run['personas'])}")
    if not logger:
        return
    try:
        steps = run["n_steer"] + run["n_release"]
        for t in range(steps):
            values = {f"persistence/{name}/centred": r["curve"]["mean"][t] for name, r in results["personas"].items()
                      if r["curve"]["mean"][t] is not None}
            if t == steps - 1:
                for name, r in results["personas"].items():
                    values.update({f"persistence/{name}/{k}": v for k, v in (
                        ("half_life_median", r["half_life"]["median"]), ("half_life_mean", r["half_life"]["mean"]),
                        ("release_mean", r["release_mean"]["mean"])) if v is not None})
            if values:
                logger.log_metrics(values, step=t)
        if cfg.logger.kind == "wandb":
            logger.log_image("persistence/curves", [str(out_dir / "persistence.png")])
    finally:
        logger.finalize("success")
        if cfg.logger.kind == "wandb":
            import wandb

            wandb.finish()
