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


RENDERERS = {"eval_throughput": eval_throughput}


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
