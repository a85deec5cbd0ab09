"""evaluate.py compare=[dirA,dirB,...]: earlier drift evaluations (their results.json) side by side.

Written to out_dir:
- compare.png: the summary a reader takes in at a glance. Turn on x; panels for name adherence, style
  adherence (when any run has it), likelihood margin, capability KL to base, history tokens and seconds per
  turn (when recorded); each run (mechanism) one coloured line with its 95% interval band; the baseline (the
  plain system prompt: a `none` run, else the runs' `_baseline` arm) and the control arm (no persona) drawn
  once per model and persona, in grey, dashed and dotted; a run's bleed arm (bleed=true: no persona, mechanism
  on), where it has one, dash-dotted in the run's colour on the name adherence and KL panels; one legend below
  the panels.
- compare_<family>.png: every metric of every arm per metric family (as report.py's plots), legend below.
- compare.md: per run and probe turn the headline numbers with their intervals (and, when any run has a bleed
  arm, its name adherence and KL to base), history tokens and seconds per turn; then every metric's mean by turn.

Every results.json is read and checked before anything is written: a damaged one is one UserError line.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

from persona_lit.errors import UserError  # noqa: E402
from persona_lit.evaluation.report import PLOTS, draw, line_style  # noqa: E402

# (metric, panel title, table column); style only where a run has it
HEADLINE = [("adherence/name", "name adherence", "name"), ("adherence/style", "style adherence", "style"),
            ("likelihood_margin", "likelihood margin (log p persona - log p default)", "margin"),
            ("capability/kl_to_base", "capability KL to base (nats/token)", "KL to base")]
BLEED = {"adherence/name": "bleed name", "capability/kl_to_base": "bleed KL"}  # the bleed arm's, in plot and table
GREY = "0.45"
_PER_TURN = ("turn", "mean", "ci_low", "ci_high")


def _number(v: Any) -> bool:
    return v is None or (isinstance(v, (int, float)) and not isinstance(v, bool))


def read_run(d: Path) -> dict[str, Any]:
    """One evaluation's results.json, checked enough for what compare draws (UserError: one line)."""
    path = Path(d) / "results.json"
    allowed = "allowed: the out_dir of a drift evaluation (evaluate.py), holding its results.json"
    try:
        res = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"compare: {path} not found ({allowed})") from None
    except json.JSONDecodeError as e:
        raise UserError(f"compare: {path}:{e.lineno}: not valid JSON ({allowed})") from None
    except (OSError, UnicodeDecodeError, RecursionError) as e:
        raise UserError(f"compare: {path}: cannot be read ({type(e).__name__}; {allowed})") from None
    if not isinstance(res, dict) or not isinstance(res.get("run"), dict) or not isinstance(res.get("metrics"), dict):
        raise UserError(f"compare: {path}: not a drift results.json (needs 'run' and 'metrics' objects; {allowed})")
    if not isinstance(res["run"].get("mechanism"), str):
        raise UserError(f"compare: {path}: run.mechanism is missing or not a string ({allowed})")
    for name, m in res["metrics"].items():
        ok = isinstance(m, dict) and all(isinstance(m.get(k), list) for k in _PER_TURN)
        if not ok or len({len(m[k]) for k in _PER_TURN}) != 1 or not all(
                _number(v) for k in _PER_TURN for v in m[k]) or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 10**9 for t in m["turn"]) or any(
                v is None for v in m["mean"]):
            shown = name if name.isprintable() else repr(name)
            raise UserError(f"compare: {path}: metrics.{shown} is not a per-turn metric (allowed: turn (integers), "
                            f"mean (numbers), ci_low, ci_high (numbers or null): lists of one length)")
    for key in ("history_tokens", "seconds_per_turn"):  # seconds_per_turn: absent in older results
        value = res.get(key, {})
        if not isinstance(value, dict) or not all(_number(v) and t.isascii() and t.isdigit() and len(t) < 10
                                                  for t, v in value.items()):
            raise UserError(f"compare: {path}: {key} is not an object of turn: number ({allowed})")
    return res


# What two runs of one model and persona set must share to be drawn as a comparison (results.json run.<key>).
PAIRED_ON = {"personas": "the evaluated personas", "streams": "the question streams",
             "protocol": "the protocol (free-running or replay, and its transcript)",
             "question_split": "the question split"}


def _paired_value(run: dict, key: str) -> Any:
    value = run.get(key)
    if key == "question_split" and isinstance(value, dict):
        return value.get("hash"), value.get("part")
    if key == "protocol" and value is None:
        return {"name": "free"}  # results written before protocols were named are free-running
    return value


def check_pairable(runs: list[tuple[Path, dict]]) -> None:
    """Runs of the same model and personas are compared turn by turn: they must share personas, streams,
    protocol and question split (where both record them); else one UserError line naming the first difference."""
    for i, (d, res) in enumerate(runs):
        for e, other in runs[:i]:
            if _context(res) != _context(other):
                continue
            for key, what in PAIRED_ON.items():
                mine, theirs = _paired_value(res["run"], key), _paired_value(other["run"], key)
                if key in res["run"] and key in other["run"] or key == "protocol":
                    if mine != theirs:
                        raise UserError(f"compare: {d} and {e} differ in {what} (run.{key}); allowed: runs of one "
                                        f"model and persona set on the same {what}")


def _labels(runs: list[tuple[Path, dict]]) -> list[str]:
    """The mechanism, with the directory name where two runs share a mechanism."""
    mechs = [res["run"]["mechanism"] for _, res in runs]
    return [m if mechs.count(m) == 1 else f"{m} ({d.name})" for (d, _), m in zip(runs, mechs)]


def _context(res: dict) -> str:
    run = res["run"]
    return f"{run.get('model', '?')} / {run.get('persona', '?')}"


def _references(runs: list[tuple[Path, dict]]) -> list[tuple[str, str, str, dict]]:
    """(label, line style, role, {metric: per-turn}) for the grey lines, once per model and persona: the baseline
    (a `none` run's own arm, else the first run's `_baseline` arm) and the control arm."""
    contexts = list(dict.fromkeys(_context(res) for _, res in runs))
    out = []
    for ctx in contexts:
        mine = [res for _, res in runs if _context(res) == ctx]
        tag = "" if len(contexts) == 1 else f", {ctx}"
        none = next((res for res in mine if res["run"]["mechanism"] == "none"), None)
        if none is not None:
            arms = ("_baseline", "_control", "_bleed")
            base = {**{n: m for n, m in none["metrics"].items() if not n.endswith(arms)},
                    "history_tokens": _series(none.get("history_tokens", {})),
                    "seconds_per_turn": _series(none.get("seconds_per_turn", {}))}
        else:
            owner = next((res for res in mine if any(n.endswith("_baseline") for n in res["metrics"])), None)
            base = {n[: -len("_baseline")]: m for n, m in owner["metrics"].items() if n.endswith("_baseline")} \
                if owner else {}
        out.append((f"none: persona as system prompt{tag}", "--", "baseline", base))
        owner = next((res for res in mine if any(n.endswith("_control") for n in res["metrics"])), None)
        control = {n[: -len("_control")]: m for n, m in owner["metrics"].items() if n.endswith("_control")} \
            if owner else {}
        out.append((f"control: no persona{tag}", ":", "control", control))
    return out


def _series(by_turn: dict[str, Any]) -> dict[str, list] | None:
    """{turn: value} (history tokens, seconds) as a per-turn metric without an interval."""
    turns = sorted((int(t), v) for t, v in by_turn.items() if v is not None)
    if not turns:
        return None
    return {"turn": [t for t, _ in turns], "mean": [v for _, v in turns], "ci_low": [None] * len(turns),
            "ci_high": [None] * len(turns)}


def _panels(runs: list[tuple[Path, dict]]) -> list[tuple[str, str]]:
    have = {n for _, res in runs for n in res["metrics"]}
    panels = [(name, title) for name, title, _ in HEADLINE if name in have]
    panels.append(("history_tokens", "history tokens (mean, after the turn)"))
    if any(res.get("seconds_per_turn") for _, res in runs):
        panels.append(("seconds_per_turn", "seconds per turn (answer generation, per batch)"))
    return panels


def _metric(res: dict, name: str) -> dict | None:
    if name in ("history_tokens", "seconds_per_turn"):
        return _series(res.get(name, {}))
    return res["metrics"].get(name)


def _legend_below(fig, axes, ncol: int) -> None:
    handles: dict[str, Any] = {}
    for ax in axes:
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    if handles:
        fig.legend(list(handles.values()), list(handles), loc="outside lower center",
                   ncol=min(ncol, len(handles)), fontsize=8, frameon=False)


def summary_plot(runs: list[tuple[Path, dict]], path: Path) -> None:
    """compare.png: see the module docstring."""
    panels, labels = _panels(runs), _labels(runs)
    cols = 3 if len(panels) > 4 else 2
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows + 1.0), squeeze=False,
                             layout="constrained")
    flat = axes.flatten()
    references = _references(runs)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (name, title) in zip(flat, panels):
        for label, style, role, metrics in references:
            m = metrics.get(name)
            if m:
                _draw_band(ax, m, label, GREY, style, alpha=0.08)
        k = 0
        for (_, res), label in zip(runs, labels):
            if res["run"]["mechanism"] == "none":
                continue  # drawn once, in grey, as the baseline
            m = _metric(res, name)
            if m:
                _draw_band(ax, m, label, colours[k % len(colours)])
            bleed = res["metrics"].get(f"{name}_bleed") if name in BLEED else None
            if bleed:
                _draw_band(ax, bleed, f"{label}: bleed (no persona)", colours[k % len(colours)], "-.", alpha=0.06)
            k += 1
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("turn")
        ax.grid(alpha=0.3)
    for ax in flat[len(panels):]:
        ax.set_visible(False)
    _legend_below(fig, flat[: len(panels)], ncol=4)
    fig.suptitle("persona_lit comparison: mean by turn, 95% interval bands", fontsize=11)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _draw_band(ax, m: dict, label: str, colour: str, style: str = "-", alpha: float = 0.15) -> None:
    """The mean by turn and, between neighbouring turns that both have one, its interval as a band."""
    ax.plot(m["turn"], m["mean"], style, marker="o", ms=3, color=colour, label=label)
    has = [lo is not None and hi is not None for lo, hi in zip(m["ci_low"], m["ci_high"])]
    if any(has):
        ax.fill_between(m["turn"], [lo if h else math.nan for lo, h in zip(m["ci_low"], has)],
                        [hi if h else math.nan for hi, h in zip(m["ci_high"], has)], where=has, color=colour,
                        alpha=alpha)


def _at(m: dict, key: str, i: int) -> Any:
    """m[key][i] for an optional per-turn list (n, interval), None where it is absent or malformed."""
    values = m.get(key)
    return values[i] if isinstance(values, list) and len(values) == len(m["turn"]) else None


def _cell(m: dict | None, turn: int, digits: int = 2) -> str:
    if not m or turn not in m["turn"]:
        return "—"
    i = m["turn"].index(turn)
    mean, low, high = m["mean"][i], m["ci_low"][i], m["ci_high"][i]
    if low is None or high is None:
        return f"{mean:.{digits}f} ({'n=1' if _at(m, 'n', i) == 1 else 'no CI'})"
    wilson = _at(m, "interval", i) == "wilson"
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]" + ("ᵂ" if wilson else "")


def headline_table(runs: list[tuple[Path, dict]]) -> list[str]:
    """Per run and probe turn: the headline metrics with 95% intervals, history tokens, seconds per turn."""
    have = {n for _, res in runs for n in res["metrics"]}
    cols = [(name, col) for name, _, col in HEADLINE if name in have or name == "adherence/name"]
    bleed = [(f"{name}_bleed", col) for name, col in BLEED.items() if f"{name}_bleed" in have]
    cols += bleed  # runs with bleed=true: their bleed arm (no persona, mechanism on)
    lines = ["| run | turn | " + " | ".join(col for _, col in cols) + " | control KL | history tokens | s/turn |",
             "|---|---|" + "---|" * (len(cols) + 3)]
    rows = [(label, res, "") for (_, res), label in zip(runs, _labels(runs))]
    rows += [(label, {"metrics": metrics}, role) for label, _, role, metrics in _references(runs)
             if role == "baseline" and metrics and not any(r["run"]["mechanism"] == "none" for _, r in runs)]
    for label, res, role in rows:
        turns = sorted({t for name, _ in cols for t in (res["metrics"].get(name) or {}).get("turn", [])})
        for turn in turns:
            tokens = res.get("history_tokens", {}).get(str(turn))
            seconds = res.get("seconds_per_turn", {}).get(str(turn))
            kl_control = res["metrics"].get("capability/kl_to_base_control")
            cells = [_cell(res["metrics"].get(n), turn, 3 if n.startswith("capability/") else 2) for n, _ in cols]
            lines.append(f"| {label} | {turn} | " + " | ".join(cells)
                         + f" | {_cell(kl_control, turn, 3)} | {'—' if tokens is None else f'{tokens:.0f}'} "
                         f"| {'—' if seconds is None else f'{seconds:.2f}'} |")
    return lines


def family_plots(runs: list[tuple[Path, dict]], out_dir: Path) -> list[str]:
    """compare_<family>.png: every metric (every arm) of each family, one legend below the axes."""
    written = []
    for stem, (prefix, ylabel) in PLOTS.items():
        fig, ax = plt.subplots(figsize=(8, 5.5), layout="constrained")
        drawn = False
        for (d, res), label in zip(runs, _labels(runs)):
            for name, m in res["metrics"].items():
                if name.startswith(prefix):
                    draw(ax, m, f"{label}: {name}", line_style(name), alpha=0.1)
                    drawn = True
        if drawn:
            ax.set_xlabel("turn")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            _legend_below(fig, [ax], ncol=2)
            fig.savefig(out_dir / f"compare_{stem}.png", dpi=120)
            written.append(f"compare_{stem}.png")
        plt.close(fig)
    return written


def _reference_note(runs: list[tuple[Path, dict]]) -> list[str]:
    """A warning where runs scored KL to base on different capability references (results.json
    run.capability_references; older results have none and are not judged)."""
    refs = {d.name: res["run"].get("capability_references") for d, res in runs}
    if len({r for r in refs.values() if isinstance(r, str)}) < 2:
        return []
    return ["", "**KL to base is not comparable across these runs**: they scored it on different capability "
                "references (" + ", ".join(f"{name}: {ref}" for name, ref in refs.items() if isinstance(ref, str))
            + "; the references are the MT-bench questions a run's conversations do not ask, so they change with "
              "turns and conversations). Compare KL only between runs with the same fingerprint."]


def compare_runs(run_dirs: list[Path], out_dir: Path) -> list[str]:
    """Reads every run first (a damaged one fails before anything is written), then writes compare.png,
    compare_<family>.png and compare.md; returns their names."""
    if not run_dirs:
        raise UserError("compare=[]: give one or more evaluate.py output directories")
    runs = [(Path(d), read_run(Path(d))) for d in run_dirs]
    check_pairable(runs)
    summary_plot(runs, out_dir / "compare.png")
    written = ["compare.png"] + family_plots(runs, out_dir)
    lines = ["# persona_lit comparison", "", "![compare.png](compare.png)", "",
             "Runs: " + "; ".join(f"**{label}** = `{d}` ({_context(res)})"
                                  for (d, res), label in zip(runs, _labels(runs))) + ".", "",
             "## Headline numbers by probe turn", "",
             "Mean [95% interval] (ᵂ: Wilson, all units agreed; n=1: one unit, no interval). The baseline is the "
             "persona as plain system prompt (`none`); control KL: the control arm (no persona) of the same run; "
             "bleed name, bleed KL (runs with bleed=true): its bleed arm (no persona, mechanism on). "
             "History tokens: mean tokens in the history after the turn; s/turn: mean wall-clock seconds of the "
             "turn's answer generation per conversation batch (probes excluded).", ""]
    note = _reference_note(runs)
    if note:
        print("persona_lit: warning: these runs scored KL to base on different capability references, so their KL "
              "is not comparable (compare.md names them)")
    lines += headline_table(runs) + note
    lines += ["", "## Every metric, mean by turn", "", "| run | mechanism | model | persona | metric | mean by turn |",
              "|---|---|---|---|---|---|"]
    for d, res in runs:
        run = res["run"]
        for name, m in res["metrics"].items():
            lines.append(f"| {d.name} | {run['mechanism']} | {run.get('model', '?')} | {run.get('persona', '?')} "
                         f"| {name} | " + ", ".join(f"{t}: {'—' if v is None else f'{v:.2f}'}"
                                                     for t, v in zip(m["turn"], m["mean"])) + " |")
    (out_dir / "compare.md").write_text("\n".join(lines + [""] + [f"![{w}]({w})" for w in written[1:]]) + "\n")
    return written + ["compare.md"]
