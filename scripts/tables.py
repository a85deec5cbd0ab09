"""Writes the generated tables of README.md and docs/ from the committed artifacts, or checks them (--check, run by
the tests): a table can never disagree with its source.

A generated block sits between `<!-- generated: NAME -->` and `<!-- end generated -->`; NAME is one of RENDERERS.

    .venv/bin/python scripts/tables.py [--check]
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BLOCK = re.compile(r"(<!-- generated: (?P<name>[\w-]+) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)


def eval_throughput() -> str:
    """bench/results/eval_throughput*.json: seconds per (arm, conversation, turn), each engine, and the ratio."""
    lines = ["| machine | setting | engine | precision | s per (arm, conversation, turn) | vs baseline |",
             "|---|---|---|---|---:|---:|"]
    notes = []
    for path in sorted((REPO / "bench" / "results").glob("eval_throughput*.json")):
        data = json.loads(path.read_text())
        meta = data["meta"]
        setting = f"{meta['rows']} rows, {meta['turns']} turns"
        for r in data["runs"]:
            engine = f"{meta['baseline']} (before)" if r["engine"] == "baseline" else "this engine"
            lines.append(f"| {meta['machine']} | {setting} | {engine} | {r['precision']} | "
                         f"{r['per_arm_conversation_turn']:.3f} | {r['speedup']:.2f}x |")
        agree = data.get("bf16_vs_fp32")
        if agree:
            notes.append(f"{setting}: bf16 and fp32 probe verdicts agree on {agree['agree']} of {agree['verdicts']}; "
                         f"the largest metric difference is {agree['largest_metric_difference']:.4f} "
                         f"({agree['where']}).")
        notes.append(f"{setting}: measured on {meta['measured_on']} (`{path.relative_to(REPO)}`).")
    return "\n".join(lines + [""] + [f"- {n}" for n in notes]) + "\n"


HEADLINE_METRICS = ("choice/log_odds", "adherence/choice", "adherence/name", "adherence/identity",
                    "likelihood_margin", "capability/kl_to_base")


def headline() -> str:
    """results/*.json (scripts/results.py): per committed run, at its declared headline turn, the mechanism beside the
    plain system prompt (`none`, the baseline arm) and the control arm (no persona), the paired difference with
    its interval, the Holm-corrected p of every row but the declared headline; then the run's footing."""
    sys.path.insert(0, str(REPO))
    from persona_lit.evaluation.report import _fmt_p, comparison_rows, interval_cell, turn0_effect

    out, loaded = [], []
    for path in sorted((REPO / "results").glob("*.json")):
        res = json.loads(path.read_text())
        loaded.append(res)
        run, metrics = res["run"], res["metrics"]
        head = run["headline"]
        rows = {(r["name"], r["turn"]): r for r in comparison_rows(res, "vs_baseline")}
        split = run.get("persona_split") or {}
        out += [f"**{res['name']}**: `{run['mechanism']}` on {run['model']}, {len(run['personas'])} unseen test "
                f"personas ({', '.join(sorted(set(split.get('sources', {}).values())))}) x {run['conversations']} "
                f"conversations, {run['protocol']['name']} protocol, turn {head['turn']} "
                f"(~{res['history_tokens'].get(str(head['turn']), 0):.0f} history tokens), {run['precision']}; "
                f"declared headline `{head['metric']}`.", "",
                f"| metric (turn {head['turn']}) | {run['mechanism']} | none (baseline arm) | no persona (control) "
                f"| difference | 95% CI | p (Holm) | verdict |", "|---|---|---|---|---|---|---|---|"]
        for name in HEADLINE_METRICS:
            r = rows.get((name, head["turn"]))
            if r is None:
                continue
            i, diff = r["i"], r["m"]
            mech, base, control = metrics[name], metrics[f"{name}_baseline"], metrics.get(f"{name}_control")
            label = f"**{name}**" if r["headline"] else name
            ctrl = f"{control['mean'][i]:.3f}" if control and head["turn"] in control["turn"] else "-"
            out.append(f"| {label} | {mech['mean'][i]:.3f} {interval_cell(mech, i)} | {base['mean'][i]:.3f} "
                       f"{interval_cell(base, i)} | {ctrl} | {diff['mean'][i]:+.3f} | {interval_cell(diff, i)} "
                       f"| {'headline' if r['headline'] else _fmt_p(r['p_holm'])} | {r['verdict']} |")
        if "capability/kl_to_none" in metrics:
            m = metrics["capability/kl_to_none"]
            cells = ", ".join(f"turn {t}: {v:.4f} {interval_cell(m, i)}" for i, (t, v) in
                              enumerate(zip(m["turn"], m["mean"])))
            out += ["", f"KL of `{run['mechanism']}` to `none` on the same history (replay), nats per token: {cells}."]
        effect = turn0_effect(res)
        if effect is not None:
            d = effect["difference"]
            total = len(effect["with_effect"]) + len(effect["without_effect"])
            out += ["", f"Turn-0 effect: {len(effect['with_effect'])} of {total} personas score above the control arm "
                    f"on {effect['metric']} at turn 0"
                    + (f"; the other {len(effect['without_effect'])} have no persona effect to lose "
                       f"({', '.join(effect['without_effect'])})." if effect["without_effect"] else ".")
                    + ("" if d is None or d["ci_low"] is None else
                       f" Over the {d['n']} with one, the headline difference is {d['mean']:+.3f} "
                       f"[{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] (t over personas).")]
        out += ["", f"Measured on {res['measured_on']} at commit `{str(run.get('commit'))[:12]}`: `{res['command']}` "
                f"(`{path.relative_to(REPO)}`, report: `results/{path.stem}.md`).", ""]
    out += versus_training_free(loaded) + protocol_agreement(loaded)
    return "\n".join(out) if out else "No committed results yet (`results/`).\n"


def _headline_values(res: dict) -> dict[str, float]:
    """Per persona: the declared headline's paired difference (mechanism minus baseline) at its turn."""
    head = res["run"]["headline"]
    out = {}
    for key, metrics in (res.get("by_persona") or {}).items():
        m = metrics.get(f"vs_baseline/{head['metric']}")
        if m and head["turn"] in m["turn"]:
            out[key] = m["mean"][m["turn"].index(head["turn"])]
    return out


def protocol_agreement(loaded: list[dict]) -> list[str]:
    """For each mechanism measured under both protocols on the same model, personas and headline: how far the
    free-running and replay views agree (the pooled headline difference under each, and over the personas both
    measured, the correlation of their per-persona differences and the mean absolute gap)."""
    lines = []
    for free in (r for r in loaded if r["run"]["protocol"]["name"] == "free"):
        for replay in (r for r in loaded if r["run"]["protocol"]["name"] == "replay"):
            a, b = free["run"], replay["run"]
            if (a["mechanism"], a["model"], a["headline"]) != (b["mechanism"], b["model"], b["headline"]):
                continue
            fa, fb = _headline_values(free), _headline_values(replay)
            both = sorted(set(fa) & set(fb))
            if len(both) < 3:
                continue
            x, y = [fa[k] for k in both], [fb[k] for k in both]
            mx, my = sum(x) / len(x), sum(y) / len(y)
            sx = sum((v - mx) ** 2 for v in x) ** 0.5
            sy = sum((v - my) ** 2 for v in y) ** 0.5
            r = "undefined (no spread)" if sx == 0 or sy == 0 else \
                f"{sum((u - mx) * (v - my) for u, v in zip(x, y)) / (sx * sy):.2f}"
            gap = sum(abs(u - v) for u, v in zip(x, y)) / len(both)
            lines += [f"Free-running against replay, `{a['mechanism']}` ({a['headline']['metric']} at turn "
                      f"{a['headline']['turn']}, mechanism minus baseline): {mx:+.3f} free, {my:+.3f} replay over the "
                      f"{len(both)} personas both measured; per-persona correlation {r}, mean absolute gap "
                      f"{gap:.3f} (`{free['name']}`, `{replay['name']}`).", ""]
    return lines


def _paired_key(res: dict) -> tuple:
    """What two results must share for their per-persona headline differences to pair: model, protocol, the evaluated
    personas, the question split, the conversations and the headline."""
    run = res["run"]
    return (run["model"], run["protocol"]["name"],
            tuple(run["persona_split"]["keys"]), (run.get("question_split") or {}).get("hash"),
            run["headline"]["metric"], run["headline"]["turn"], run["conversations"])


def versus_training_free(loaded: list[dict]) -> list[str]:
    """Each mechanism trained on the pool (a result with a checkpoint) against each training-free mechanism measured
    on the same footing (_paired_key): the difference of their headline differences per persona (both minus the
    same `none` arm; under replay that arm is the same computation, so this is the trained mechanism minus the
    training-free one; where the two runs' transcripts differ, each difference is against its own run's `none` arm,
    and the line says so), mean and 95% t-interval over personas. One comparison per pair, declared with the
    headline metric: the interval excluding 0 is the verdict."""
    sys.path.insert(0, str(REPO))
    from persona_lit.metrics.drift import t_interval

    lines = []
    for trained in (r for r in loaded if r["run"].get("ckpt") not in (None, "None")):
        for free in (r for r in loaded if r["run"].get("ckpt") in (None, "None")):
            if _paired_key(trained) != _paired_key(free):
                continue
            a, b = _headline_values(trained), _headline_values(free)
            both = sorted(set(a) & set(b))
            if len(both) < 2:
                continue
            mean, low, high = t_interval([a[k] - b[k] for k in both])
            head = trained["run"]["headline"]
            if low == high:  # every persona the same difference: no spread, no interval
                shown, verdict = f"{mean:+.3f} for every persona (no interval)", "no interval, no verdict"
            else:
                shown = f"{mean:+.3f} [{low:+.3f}, {high:+.3f}] (paired over {len(both)} personas, t)"
                verdict = "better" if low > 0 else "worse" if high < 0 else "no clear difference"
            ta, tb = trained["run"]["protocol"].get("transcript"), free["run"]["protocol"].get("transcript")
            footing = ("the same transcript" if ta == tb else
                       f"transcripts differ ({ta} and {tb}: each against its own run's `none` arm)")
            lines += [f"`{trained['run']['mechanism']}` (trained, `{trained['name']}`) against "
                      f"`{free['run']['mechanism']}` (training-free, `{free['name']}`) on {head['metric']} at turn "
                      f"{head['turn']}, each minus `none`, {footing}: {shown}: {verdict}.", ""]
    return lines


RENDERERS = {"eval_throughput": eval_throughput, "headline": headline}


def render(text: str) -> str:
    def block(m: re.Match) -> str:
        name = m.group("name")
        if name not in RENDERERS:
            raise SystemExit(f"tables: unknown generated block {name!r}; allowed: {', '.join(RENDERERS)}")
        return m.group(1) + RENDERERS[name]() + m.group(4)

    return BLOCK.sub(block, text)


def files() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="exit 1 if a generated block is out of date")
    args = ap.parse_args()
    stale = []
    for path in files():
        if not path.exists():
            continue
        text = path.read_text()
        new = render(text)
        if new != text:
            stale.append(path)
            if not args.check:
                path.write_text(new)
    if args.check and stale:
        print(f"tables: out of date: {', '.join(str(p.relative_to(REPO)) for p in stale)}; run "
              f"python scripts/tables.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
