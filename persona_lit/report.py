"""Evaluation outputs: results.json, transcript.jsonl, PNG plots and report.md."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402

from persona_lit.conversation import TurnRecord  # noqa: E402
from persona_lit.errors import UserError  # noqa: E402


def write_transcripts(path: Path, arms: dict[str, list[list[TurnRecord]]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for arm, conversations in arms.items():
            for c, records in enumerate(conversations):
                for r in records:
                    row = {k: v for k, v in asdict(r).items() if k != "reply_state"}  # tensors stay out of JSON
                    f.write(json.dumps({"arm": arm, "conversation": c, **row}, ensure_ascii=False) + "\n")


PLOTS = {"adherence": ("adherence/", "probe adherence"), "margin": ("likelihood_margin", "log p persona - log p default"),
         "projection": ("projection", "projection (1 = turn 0, 0 = no persona)"),
         "kl_to_base": ("capability/kl_to_base", "KL(model || base, no persona), nats/token"),
         "perplexity": ("capability/perplexity", "perplexity of reference answers"),
         "judge": ("judge/", "LLM judge score (0-100)")}


def plot_metrics(out_dir: Path, metrics: dict[str, dict[str, Any]], title: str) -> list[str]:
    """One PNG per metric family, persona arm solid, control arm dashed, 95% intervals shaded."""
    written = []
    for stem, (prefix, ylabel) in PLOTS.items():
        names = [n for n in metrics if n.startswith(prefix)]
        if not names:
            continue
        fig, ax = plt.subplots(figsize=(7, 4))
        for name in names:
            m = metrics[name]
            style = "--" if name.endswith("_control") else "-"
            ax.plot(m["turn"], m["mean"], style, marker="o", label=name)
            ax.fill_between(m["turn"], m["ci_low"], m["ci_high"], alpha=0.15)
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


def markdown_report(results: dict[str, Any], plots: list[str]) -> str:
    run = results["run"]
    lines = [f"# persona_lit evaluation: {run['mechanism']} on {run['model']}", "",
             f"Persona: **{run['persona']}**. Checkpoint: `{run['ckpt']}`. {run['conversations']} conversation(s) "
             f"of {run['turns']} MT-bench turns, {'sampled' if run['do_sample'] else 'greedy'} decoding. "
             "Control arm: the same turns, no persona, base model.", ""]
    for name, m in results["metrics"].items():
        lines += [f"## {name}", "", "| turn | history tokens | mean | 95% CI | n |", "|---|---|---|---|---|"]
        for i, turn in enumerate(m["turn"]):
            tokens = results["history_tokens"].get(str(turn), 0)
            lines.append(f"| {turn} | {tokens} | {m['mean'][i]:.3f} | [{m['ci_low'][i]:.3f}, {m['ci_high'][i]:.3f}] "
                         f"| {int(m['n'][i])} |")
        lines.append("")
    lines += ["Turn 0 is the persona alone: drift is relative to it. Adherence intervals are Wilson intervals over "
              "probes; margin, projection and capability intervals are t-intervals over conversations. Capability: "
              "KL to the base model with no persona and no history, and perplexity, on neutral MT-bench reference "
              "answers scored at each probe turn; the control arm shows what history alone does.", ""]
    lines += [f"![{p}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path, results: dict[str, Any], persona_arm: list[list[TurnRecord]],
                 control_arm: list[list[TurnRecord]]) -> None:
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    write_transcripts(out_dir / "transcript.jsonl", {"persona": persona_arm, "control": control_arm})
    plots = plot_metrics(out_dir, results["metrics"], f"{results['run']['mechanism']} / {results['run']['persona']}")
    (out_dir / "report.md").write_text(markdown_report(results, plots))


def compare_runs(run_dirs: list[Path], out_dir: Path) -> list[str]:
    """Overlays the curves of several evaluations (their results.json) into one plot per metric family
    and one markdown table: for users without W&B."""
    runs = []
    for d in run_dirs:
        path = Path(d) / "results.json"
        if not path.is_file():
            raise UserError(f"compare: {path} not found (give evaluate.py output directories)")
        try:
            runs.append((Path(d), json.loads(path.read_text())))
        except json.JSONDecodeError as e:
            raise UserError(f"compare: {path}:{e.lineno}: not valid JSON") from None
    written = []
    lines = ["# persona_lit comparison", "", "| run | mechanism | model | persona | metric | mean by turn |",
             "|---|---|---|---|---|---|"]
    for stem, (prefix, ylabel) in PLOTS.items():
        fig, ax = plt.subplots(figsize=(8, 4.5))
        drawn = False
        for d, res in runs:
            for name, m in res["metrics"].items():
                if not name.startswith(prefix):
                    continue
                label = f"{res['run']['mechanism']}:{d.name} {name}"
                ax.plot(m["turn"], m["mean"], "--" if name.endswith("_control") else "-", marker="o", label=label)
                ax.fill_between(m["turn"], m["ci_low"], m["ci_high"], alpha=0.1)
                drawn = True
                lines.append(f"| {d.name} | {res['run']['mechanism']} | {res['run']['model']} | {res['run']['persona']} "
                             f"| {name} | " + ", ".join(f"{t}: {v:.2f}" for t, v in zip(m["turn"], m["mean"])) + " |")
        if drawn:
            ax.set_xlabel("turn")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(out_dir / f"compare_{stem}.png", dpi=120)
            written.append(f"compare_{stem}.png")
        plt.close(fig)
    (out_dir / "compare.md").write_text("\n".join(lines + [""] + [f"![{w}]({w})" for w in written]) + "\n")
    return written + ["compare.md"]
