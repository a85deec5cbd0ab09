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


def write_transcripts(path: Path, conversations: list[list[TurnRecord]]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for c, records in enumerate(conversations):
            for r in records:
                f.write(json.dumps({"conversation": c, **asdict(r)}, ensure_ascii=False) + "\n")


def plot_adherence(path: Path, metrics: dict[str, dict[str, list[float]]], title: str) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, m in metrics.items():
        ax.plot(m["turn"], m["mean"], marker="o", label=name)
        ax.fill_between(m["turn"], m["ci_low"], m["ci_high"], alpha=0.2)
    ax.set_xlabel("turn")
    ax.set_ylabel("probe adherence")
    ax.set_ylim(-0.05, 1.05)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown_report(results: dict[str, Any]) -> str:
    lines = [f"# persona_lit evaluation: {results['run']['mechanism']} on {results['run']['model']}", "",
             f"Persona: **{results['run']['persona']}**. Checkpoint: `{results['run']['ckpt']}`. "
             f"{results['run']['conversations']} conversation(s) of {results['run']['turns']} MT-bench turns, "
             f"{'sampled' if results['run']['do_sample'] else 'greedy'} decoding.", ""]
    for name, m in results["metrics"].items():
        lines += [f"## {name}", "", "| turn | history tokens | adherence | 95% CI | n |", "|---|---|---|---|---|"]
        for i, turn in enumerate(m["turn"]):
            tokens = results["history_tokens"].get(str(turn), 0)
            lines.append(f"| {turn} | {tokens} | {m['mean'][i]:.2f} | [{m['ci_low'][i]:.2f}, {m['ci_high'][i]:.2f}] "
                         f"| {int(m['n'][i])} |")
        lines.append("")
    lines += ["Turn 0 is the persona alone: drift is relative to it.", "", "![adherence](adherence.png)", ""]
    return "\n".join(lines)


def write_report(out_dir: Path, results: dict[str, Any], conversations: list[list[TurnRecord]]) -> None:
    (out_dir / "results.json").write_text(json.dumps(results, indent=2))
    write_transcripts(out_dir / "transcript.jsonl", conversations)
    plot_adherence(out_dir / "adherence.png", results["metrics"],
                   f"{results['run']['mechanism']} / {results['run']['persona']}")
    (out_dir / "report.md").write_text(markdown_report(results))
