"""Evaluation outputs: results.json, transcript.jsonl, PNG plots and report.md (several evaluations side by side:
compare.py)."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

from persona_lit.evaluation.conversation import TurnRecord  # noqa: E402
from persona_lit.metrics.drift import detectable_difference, holm, t_interval  # noqa: E402


def write_transcripts(path: Path, arms: dict[str, list[list[TurnRecord]]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for arm, conversations in arms.items():
            for c, records in enumerate(conversations):
                for r in records:
                    # tensors stay out of JSON; timings too (results.json has their means), so that the same
                    # run gives the same transcript
                    row = {k: v for k, v in asdict(r).items() if k not in ("reply_state", "seconds", "answer_ids",
                                                                                   "capability_logprobs")}
                    f.write(json.dumps({"arm": arm, "conversation": c, **row}, ensure_ascii=False) + "\n")


PLOTS = {"adherence": ("adherence/", "probe adherence"), "margin": ("likelihood_margin", "log p persona - log p default"),
         "choice": ("choice/log_odds", "forced choice: log-odds of own identity over chance"),
         "projection": ("projection", "projection (1 = turn 0, 0 = no persona)"),
         "kl_to_base": ("capability/kl_to_base", "KL(model || base, no persona), nats/token"),
         "kl_to_none": ("capability/kl_to_none", "KL(mechanism || none, same history), nats/token"),
         "perplexity": ("capability/perplexity", "perplexity of reference answers"),
         "judge": ("judge/", "LLM judge score (0-100)")}
ARM_STYLE = {"_control": "--", "_baseline": ":", "_bleed": "-."}  # the mechanism's own arm: solid


def line_style(name: str) -> str:
    return next((style for suffix, style in ARM_STYLE.items() if name.endswith(suffix)), "-")


def draw(ax, m: dict[str, Any], label: str, style: str, alpha: float = 0.15) -> None:
    """The mean by turn, and its 95% interval where there is one: shaded between neighbouring turns that
    both have one, an error bar at each such turn; turns without an interval (n=1) get neither."""
    line = ax.plot(m["turn"], m["mean"], style, marker="o", label=label)[0]
    has = [lo is not None and hi is not None for lo, hi in zip(m["ci_low"], m["ci_high"])]
    if not any(has):
        return
    nan = float("nan")
    ax.fill_between(m["turn"], [lo if h else nan for lo, h in zip(m["ci_low"], has)],
                    [hi if h else nan for hi, h in zip(m["ci_high"], has)], where=has, alpha=alpha,
                    color=line.get_color())
    points = [(t, v, lo, hi) for t, v, lo, hi, h in zip(m["turn"], m["mean"], m["ci_low"], m["ci_high"], has) if h]
    ax.errorbar([p[0] for p in points], [p[1] for p in points],
                yerr=[[p[1] - p[2] for p in points], [p[3] - p[1] for p in points]], fmt="none",
                ecolor=line.get_color(), alpha=0.6, capsize=3)


def plot_metrics(out_dir: Path, metrics: dict[str, dict[str, Any]], title: str) -> list[str]:
    """One PNG per metric family: mechanism solid, baseline (persona as system prompt) dotted, control arm
    dashed, bleed arm (no persona, mechanism on) dash-dotted, 95% intervals shaded where there are any."""
    written = []
    for stem, (prefix, ylabel) in PLOTS.items():
        names = [n for n in metrics if n.startswith(prefix)]
        if not names:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for name in names:
            draw(ax, metrics[name], name, line_style(name))
        ax.set_xlabel("turn")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out_dir / f"{stem}.png", dpi=120)
        plt.close(fig)
        written.append(f"{stem}.png")
    return written


def interval_cell(m: dict[str, Any], i: int) -> str:
    """The 95% interval of turn i as a table cell, or why there is none."""
    n, low, high = int(m["n"][i]), m["ci_low"][i], m["ci_high"][i]
    if low is None or high is None:
        return "no data" if n == 0 else "n=1: no interval" if n == 1 else f"n={n}, all equal: no interval"
    digits = next((d for d in range(3, 9) if f"{low:.{d}f}" != f"{high:.{d}f}"), 9)  # never shown zero-width
    return f"[{low:.{digits}f}, {high:.{digits}f}]" + (
        " (Wilson)" if m.get("interval", [None] * (i + 1))[i] == "wilson" else "")


def _units(m: dict[str, Any], i: int) -> str:
    unit = m.get("unit", ["conversations"] * (i + 1))[i]
    return f"{int(m['n'][i])} {unit[:-1] if int(m['n'][i]) == 1 else unit}"


def _verdict(m: dict[str, Any], i: int, lower_is_better: bool = False) -> str:
    low, high = m["ci_low"][i], m["ci_high"][i]
    if low is None or high is None:
        return "no interval"
    if lower_is_better:  # a cost (capability KL): a difference above 0 is worse
        low, high = -high, -low
    return "better" if low > 0 else "worse" if high < 0 else "no clear difference"


def _tested_verdict(mean: float, p: float | None, lower_is_better: bool = False) -> str:
    """A verdict from a Holm-adjusted p-value: better/worse (Holm) where it is below 0.05."""
    if p is None:
        return "no test (n < 2)"
    if p >= 0.05:
        return "no clear difference (Holm)"
    good = mean < 0 if lower_is_better else mean > 0
    return "better (Holm)" if good else "worse (Holm)"


def _fmt_p(p: float | None) -> str:
    return "-" if p is None else f"{p:.3g}"


def comparison_rows(results: dict[str, Any], prefix: str) -> list[dict[str, Any]]:
    """Every (metric, turn) of the `prefix` differences (vs_baseline, bleed_vs_control): its p-value, its
    Holm-adjusted p-value over the family (every row but the declared headline, run.headline), whether it is the
    headline, and its verdict: the headline by its 95% interval, every other row by its Holm-adjusted p."""
    metrics, head = results["metrics"], results["run"].get("headline") or {}
    rows = []
    for full, m in metrics.items():
        if not full.startswith(prefix + "/"):
            continue
        name = full[len(prefix) + 1 :]
        for i, turn in enumerate(m["turn"]):
            p = (m.get("p") or [None] * len(m["turn"]))[i]
            rows.append({"name": name, "i": i, "turn": turn, "p": p, "m": m,
                         "headline": prefix == "vs_baseline" and name == head.get("metric")
                         and turn == head.get("turn")})
    family = [r for r in rows if not r["headline"]]
    for r, adjusted in zip(family, holm([r["p"] for r in family])):
        r["p_holm"] = adjusted
    for r in rows:
        cost = r["name"].startswith("capability/")
        if r["headline"]:
            r["p_holm"], r["verdict"] = None, _verdict(r["m"], r["i"], cost) + " (headline)"
        else:
            r["verdict"] = _tested_verdict(r["m"]["mean"][r["i"]], r["p_holm"], cost)
    return rows


def versus_baseline(results: dict[str, Any]) -> list[str]:
    """The question a user runs the demo for: did the mechanism beat the plain system prompt?"""
    run, metrics = results["run"], results["metrics"]
    lines = [f"## Did {run['mechanism']} beat the plain system prompt?", ""]
    if run["mechanism"] == "none":
        return lines + ["The mechanism is `none`: its persona arm is itself the plain system-prompt baseline.", ""]
    rows = comparison_rows(results, "vs_baseline")
    if not rows:
        return lines + ["No baseline arm in this run (baseline=false): nothing to compare with.", ""]
    head = run.get("headline") or {}
    declared = any(r["headline"] for r in rows)
    lines += ["Mechanism and baseline (the same persona as system prompt, mechanism disabled) on the same turns; "
              "the difference is paired by conversation. "
              + (f"The headline, declared before the run (`headline.metric={head.get('metric')}`, "
                 f"`headline.turn={head.get('turn')}`), is better/worse where its 95% interval excludes 0. "
                 if declared else f"The declared headline ({head.get('metric')} at turn {head.get('turn')}) "
                 "was not measured in this run. ")
              + "Every other row is one of many comparisons: its p-value (a sign-flip randomization test over the "
              "same units) is Holm-corrected over all of them, and its verdict, marked (Holm), is better/worse "
              "where the corrected p is below 0.05 (for capability KL to base, a cost, a difference below 0 is "
              "better).", "",
              "| metric | turn | mechanism | 95% CI | baseline | 95% CI | difference | 95% CI | n | p | p (Holm) "
              "| verdict |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    lines_after = detectable_line(results)
    for r in sorted(rows, key=lambda r: not r["headline"]):
        name, i, diff = r["name"], r["i"], r["m"]
        mech, base = metrics[name], metrics[f"{name}_baseline"]
        label = f"**{name}**" if r["headline"] else name
        lines.append(f"| {label} | {r['turn']} | {mech['mean'][i]:.3f} | {interval_cell(mech, i)} "
                     f"| {base['mean'][i]:.3f} | {interval_cell(base, i)} | {diff['mean'][i]:+.3f} "
                     f"| {interval_cell(diff, i)} | {_units(diff, i)} | {_fmt_p(r['p'])} | {_fmt_p(r['p_holm'])} "
                     f"| {r['verdict']} |")
    return lines + [""] + lines_after


def detectable_line(results: dict[str, Any]) -> list[str]:
    """report.md's statement of power: the smallest headline difference this run could detect, from the spread of
    the personas' own paired differences (results.json by_persona)."""
    head = results["run"].get("headline") or {}
    name, turn = f"vs_baseline/{head.get('metric')}", head.get("turn")
    values = []
    for metrics in (results.get("by_persona") or {}).values():
        m = metrics.get(name)
        if m and turn in m["turn"]:
            values.append(m["mean"][m["turn"].index(turn)])
    if len(values) < 2:
        return [f"Smallest detectable headline difference: not estimable from {len(values)} persona(s) (the unit is the "
                "persona; evaluate several, e.g. personas=test_split pool.max_personas=32).", ""]
    mde = detectable_difference(values)
    what = "no spread among the personas' differences" if mde is None else f"±{mde:.3f}"
    return [f"Smallest detectable headline difference ({head.get('metric')} at turn {turn}; two-sided 5% test, 80% "
            f"power, from the spread of {len(values)} personas' paired differences): {what}.", ""]


def _at(metrics: dict[str, Any], name: str, turn: int) -> float | None:
    m = metrics.get(name)
    return m["mean"][m["turn"].index(turn)] if m and turn in m["turn"] else None


def turn0_effect(results: dict[str, Any]) -> dict[str, Any] | None:
    """Which personas the plain system prompt moved at all: a persona whose fresh score (turn 0, the persona as
    system prompt, mechanism off: the baseline arm, or `none`'s own arm) on the headline metric is not above the
    control arm's (no persona) at turn 0 has no persona effect to drift from, so its later drift means nothing.
    Returns the metric, the personas with and without an effect, and the headline difference (mechanism minus
    baseline at the headline turn) over the personas with one: mean and 95% t-interval over persona values.
    None without by_persona, a control arm or a turn 0."""
    head = results["run"].get("headline") or {}
    name, turn = head.get("metric"), head.get("turn")
    fresh_name = name if results["run"].get("mechanism") == "none" else f"{name}_baseline"
    kept, apart, diffs = [], [], []
    for key, metrics in (results.get("by_persona") or {}).items():
        fresh, control = _at(metrics, fresh_name, 0), _at(metrics, f"{name}_control", 0)
        if fresh is None or control is None:
            return None
        if fresh > control:
            kept.append(key)
            d = _at(metrics, f"vs_baseline/{name}", turn)
            if d is not None:
                diffs.append(d)
        else:
            apart.append(key)
    if not kept and not apart:
        return None
    mean, low, high = t_interval(diffs) if diffs else (None, None, None)
    return {"metric": name, "turn": turn, "with_effect": kept, "without_effect": apart,
            "difference": {"mean": mean, "ci_low": low, "ci_high": high, "n": len(diffs)} if diffs else None}


def turn0_lines(results: dict[str, Any]) -> list[str]:
    """report.md: the personas set apart for having no turn-0 effect, and the headline without them."""
    effect = turn0_effect(results)
    if effect is None:
        return []
    lines = ["## Personas without a turn-0 effect", "",
             f"At turn 0 (the persona alone), {len(effect['with_effect'])} of "
             f"{len(effect['with_effect']) + len(effect['without_effect'])} personas score above the control arm (no "
             f"persona) on {effect['metric']}; the others have no persona effect to lose, so their drift means "
             "nothing" + (f": {', '.join(effect['without_effect'])}." if effect["without_effect"] else ".")]
    d = effect["difference"]
    if d is not None:
        ci = "n=1: no interval" if d["ci_low"] is None else f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
        lines.append(f"The headline difference (mechanism minus baseline at turn {effect['turn']}) over the "
                     f"{d['n']} personas with an effect: {d['mean']:+.3f}, 95% t-interval over personas {ci}.")
    return lines + [""]


def bleed_versus_control(results: dict[str, Any]) -> list[str]:
    """With a bleed arm: does the mechanism, given no persona, invent one (adherence above the control arm's)
    or cost capability (KL to base above the control arm's)?"""
    run, metrics = results["run"], results["metrics"]
    rows = comparison_rows(results, "bleed_vs_control")
    if not rows:
        return []
    lines = [f"## Does {run['mechanism']} act without a persona? (bleed arm)", "",
             "Bleed arm (no persona, mechanism on) and control arm (no persona, mechanism off) on the same turns, "
             "answering the persona's probes; the difference is paired by conversation. Higher/lower (Holm): its "
             "sign-flip p-value, Holm-corrected over the rows of this table, is below 0.05 (adherence higher: a "
             "persona the mechanism invents; KL higher: its capability cost without a persona).", "",
             "| metric | turn | bleed | 95% CI | control | 95% CI | difference | 95% CI | n | p | p (Holm) | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name, i, diff = r["name"], r["i"], r["m"]
        bleed, control = metrics[f"{name}_bleed"], metrics[f"{name}_control"]
        verdict = _tested_verdict(diff["mean"][i], r["p_holm"]).replace("better", "higher").replace("worse", "lower")
        lines.append(f"| {name} | {r['turn']} | {bleed['mean'][i]:.3f} | {interval_cell(bleed, i)} "
                     f"| {control['mean'][i]:.3f} | {interval_cell(control, i)} | {diff['mean'][i]:+.3f} "
                     f"| {interval_cell(diff, i)} | {_units(diff, i)} | {_fmt_p(r['p'])} | {_fmt_p(r['p_holm'])} "
                     f"| {verdict} |")
    return lines + [""]


EXPLAIN = ("Turn 0 is the persona alone: drift is relative to it. Intervals are over independent units, never "
           "over probes: each conversation gives one value per turn (for adherence, the fraction of its probes "
           "passed), and the 95% interval is a seeded percentile bootstrap (2000 resamples) of the mean over "
           "conversations. Turn 0 is the same for every conversation of a persona (no user turn yet), so it "
           "counts once per persona. With several personas pooled, the mean is over persona means (n = personas) "
           "and the bootstrap resamples personas, then conversations within each drawn persona. With few units "
           "(n < 5) a percentile bootstrap is narrow: read those intervals as rough. One unit has no interval "
           "(\"n=1: no interval\"). When all units are equal there is no spread: adherence then shows the Wilson "
           "interval with units as trials (marked Wilson), other metrics show no interval. History tokens and "
           "s/turn (wall-clock seconds of the turn's answers for one conversation batch, probes excluded) are "
           "means over the mechanism's conversations. Arms: the mechanism; the baseline (the same "
           "persona as system prompt, mechanism disabled: `none`); the control (no persona, base model), which "
           "shows what history alone does; with bleed=true, the bleed arm (no persona, mechanism on), which shows "
           "whether the mechanism invents a persona or costs capability where none was given. Capability: KL to "
           "the base model with no persona and no history, and perplexity, on neutral MT-bench reference answers "
           "scored at each probe turn.")


def markdown_report(results: dict[str, Any], plots: list[str]) -> str:
    run = results["run"]
    lines = [f"# persona_lit evaluation: {run['mechanism']} on {run['model']}", "",
             f"Persona: **{run['persona']}**. Checkpoint: `{run['ckpt']}`. {run['conversations']} conversation(s) "
             f"of {run['turns']} MT-bench turns, {'sampled' if run['do_sample'] else 'greedy'} decoding. "
             "Baseline arm: the same persona as system prompt, mechanism disabled. Control arm: the same turns, "
             "no persona, base model." + (" Bleed arm: the same turns, no persona, mechanism on."
                                          if any(n.endswith("_bleed") for n in results["metrics"]) else ""), ""]
    lines += versus_baseline(results)
    lines += turn0_lines(results)
    lines += bleed_versus_control(results)
    for name, m in results["metrics"].items():
        lines += [f"## {name}", "", "| turn | history tokens | s/turn | mean | 95% CI | n |",
                  "|---|---|---|---|---|---|"]
        for i, turn in enumerate(m["turn"]):
            tokens = results["history_tokens"].get(str(turn), 0)
            seconds = results.get("seconds_per_turn", {}).get(str(turn))
            lines.append(f"| {turn} | {tokens} | {'—' if seconds is None else f'{seconds:.2f}'} | {m['mean'][i]:.3f} "
                         f"| {interval_cell(m, i)} | {_units(m, i)} |")
        lines.append("")
    lines += [EXPLAIN, ""]
    lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path, results: dict[str, Any], persona_arm: list[list[TurnRecord]],
                 control_arm: list[list[TurnRecord]], baseline_arm: list[list[TurnRecord]] | None = None,
                 bleed_arm: list[list[TurnRecord]] | None = None) -> None:
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    arms = {"persona": persona_arm, "baseline": baseline_arm or [], "control": control_arm, "bleed": bleed_arm or []}
    write_transcripts(out_dir / "transcript.jsonl", {k: v for k, v in arms.items() if v})
    plots = plot_metrics(out_dir, results["metrics"], f"{results['run']['mechanism']} / {results['run']['persona']}")
    (out_dir / "report.md").write_text(markdown_report(results, plots))
