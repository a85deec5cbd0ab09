"""Commits an evaluation's compact result under results/: its results.json less the transcript-sized parts, the
command that ran it, and its report.md, so that the README's headline table (scripts/tables.py) is generated from
what is committed.

    .venv/bin/python scripts/results.py OUT_DIR NAME --command "python evaluate.py ..."

writes results/NAME.json and results/NAME.md. The run's commit and schema come from its results.json.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "results"


def compact(results: dict, name: str, command: str, measured_on: str) -> dict:
    """What a reader needs to trust and re-check a run: every metric (pooled, and per persona), the run's
    settings, personas, streams, splits, protocol, commit; not the model config."""
    run = dict(results["run"])
    return {"name": name, "command": command, "measured_on": measured_on, "schema": results.get("schema"),
            "run": run, "metrics": results["metrics"], "by_persona": results.get("by_persona", {}),
            "history_tokens": results.get("history_tokens", {}), "seconds_per_turn": results.get("seconds_per_turn", {})}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", type=Path, help="an evaluate.py out_dir (results.json, report.md)")
    ap.add_argument("name", help="the result's name under results/ (letters, digits, - and _)")
    ap.add_argument("--command", required=True, help="the command line that ran the evaluation")
    ap.add_argument("--measured-on", required=True, help="the machine it ran on, e.g. '2-core x86 CPU (AMX bf16)'")
    args = ap.parse_args()
    if not args.name.replace("-", "").replace("_", "").isalnum():
        print(f"results: name {args.name!r}: allowed: letters, digits, - and _", file=sys.stderr)
        return 2
    source = args.out_dir / "results.json"
    if not source.is_file():
        print(f"results: {source} not found; allowed: the out_dir of a finished evaluate.py run", file=sys.stderr)
        return 2
    results = json.loads(source.read_text(encoding="utf-8"))
    RESULTS.mkdir(exist_ok=True)
    target = RESULTS / f"{args.name}.json"
    tmp = target.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(compact(results, args.name, args.command, args.measured_on), indent=1) + "\n")
    tmp.replace(target)
    shutil.copyfile(args.out_dir / "report.md", RESULTS / f"{args.name}.md")
    print(f"results: wrote {target.relative_to(REPO)} and results/{args.name}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
