"""Evaluation throughput: seconds per (arm, conversation, turn) of the headline evaluation setting, this engine
against a baseline commit's engine checked out into a temporary git worktree, in the same run.

The setting: SmolLM2-135M-Instruct, `--rows` conversations of mixed unseen test personas in one batch (rows/2
personas of the pool's test split x 2 conversations), 64 new tokens a turn, probes at turns 0, 1, 16, 32, 48 (those
<= --turns), to turn --turns, the persona arm alone (mechanism=none: one arm). Each engine runs `evaluate.py` as a
whole process (model load included) from its own tree; the figure is the process's wall time over rows x turns.
Both engines run as committed, each from a git worktree of its commit (this one: HEAD). The runs go
baseline, this engine fp32, this engine bf16, each once. Beside the speed, the bf16 run's probe
verdicts are compared with the fp32 run's (same conversations, same probes): how many agree, and the largest
difference of any reported metric.

    .venv/bin/python bench/eval_throughput.py [--turns 48] [--rows 8] [--baseline 074003e]
        [--precisions fp32,bf16] [--json bench/results/eval_throughput.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROBE_TURNS = [0, 1, 16, 32, 48]


def evaluate_args(turns: int, rows: int, precision: str, out_dir: Path) -> list[str]:
    probe_turns = [t for t in PROBE_TURNS if t <= turns]
    return ["evaluate.py", "mechanism=none", "model=smollm2-135m-instruct", "personas=test_split",
            f"pool.max_personas={rows // 2}", "conversations=2", f"conversation_batch={rows}", f"turns={turns}",
            f"probe_turns=[{','.join(map(str, probe_turns))}]", "max_new_tokens=64", "control=false",
            "baseline=false", "logger=none", f"precision={precision}", f"out_dir={out_dir}",
            f"pool.data_dir={REPO.parent / 'shared' / 'data'}"]  # absolute: the baseline runs from its own tree


def run_engine(tree: Path, args: list[str], log: Path) -> float:
    """Runs evaluate.py from `tree` (its own persona_lit first on the path); returns its wall-clock seconds."""
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(tree), "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run([sys.executable, *args], cwd=tree, env=env, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"eval_throughput: {' '.join(args[:1])} in {tree} failed (exit {proc.returncode}); see {log}")
    return seconds


def imported_from(tree: Path) -> str:
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", "import persona_lit, os; print(os.path.dirname(persona_lit.__file__))"],
                         cwd=tree, env=env, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def verdicts(out_dir: Path) -> dict[tuple, bool]:
    """(conversation, turn, question) -> passed, from a run's transcript.jsonl."""
    got = {}
    for line in (out_dir / "transcript.jsonl").open():
        record = json.loads(line)
        for p in record["probes"]:
            got[(record["arm"], record["conversation"], p["turn"], p["question"])] = bool(p["passed"])
    return got


def largest_metric_difference(a: Path, b: Path) -> tuple[float, str]:
    ma, mb = (json.loads((d / "results.json").read_text())["metrics"] for d in (a, b))
    worst, where = 0.0, ""
    for name in sorted(set(ma) & set(mb)):
        for turn, x, y in zip(ma[name]["turn"], ma[name]["mean"], mb[name]["mean"]):
            if x is not None and y is not None and abs(x - y) > worst:
                worst, where = abs(x - y), f"{name} at turn {turn}"
    return worst, where


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--turns", type=int, default=48)
    ap.add_argument("--rows", type=int, default=8, help="conversations in the batch (even: rows/2 personas x 2)")
    ap.add_argument("--baseline", default="074003e", help="the commit whose engine is the baseline")
    ap.add_argument("--baseline-precision", default="fp32")
    ap.add_argument("--precisions", default="fp32,bf16", help="this engine's precisions to run")
    ap.add_argument("--json", type=Path, default=None, help="write the figures here (bench/results/...)")
    args = ap.parse_args()
    if args.rows < 2 or args.rows % 2:
        sys.exit(f"--rows={args.rows}: must be an even number >= 2 (rows/2 personas x 2 conversations)")
    work = Path(tempfile.mkdtemp(prefix="persona_lit_eval_throughput."))
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True, check=True).stdout.strip()
    if subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                      text=True).stdout.strip():
        print(f"eval_throughput: the working tree has uncommitted changes; this engine is HEAD ({commit}) as committed")
    trees = {"baseline": work / "baseline", "this": work / "this"}
    for name, rev in (("baseline", args.baseline), ("this", commit)):  # both engines as committed, in their own trees
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", "-q", str(trees[name]), rev], check=True)
    base_tree = trees["baseline"]
    try:
        for tree in trees.values():
            if Path(imported_from(tree)) != tree / "persona_lit":
                sys.exit(f"eval_throughput: persona_lit imports from {imported_from(tree)}, not from {tree}")
        runs = [("baseline", base_tree, args.baseline_precision)] + [
            ("this", trees["this"], p) for p in args.precisions.split(",")]
        rows = []
        for engine, tree, precision in runs:
            out = work / f"{engine}_{precision}"
            seconds = run_engine(tree, evaluate_args(args.turns, args.rows, precision, out), work / f"{engine}_{precision}.log")
            per = seconds / (args.rows * args.turns)
            rows.append({"engine": engine, "commit": args.baseline if engine == "baseline" else commit,
                         "precision": precision, "seconds": round(seconds, 1), "per_arm_conversation_turn": round(per, 3),
                         "out": str(out)})
            print(f"{engine:9s} {rows[-1]['commit']:>9s} {precision}: {seconds:7.1f} s, {per:.3f} s per (arm, "
                  f"conversation, turn)", flush=True)
        base = rows[0]["per_arm_conversation_turn"]
        for r in rows:
            r["speedup"] = round(base / r["per_arm_conversation_turn"], 2)
        agreement = None
        mine = {r["precision"]: Path(r["out"]) for r in rows if r["engine"] == "this"}
        if {"fp32", "bf16"} <= set(mine):
            a, b = verdicts(mine["fp32"]), verdicts(mine["bf16"])
            same = sum(a[k] == b.get(k) for k in a)
            worst, where = largest_metric_difference(mine["fp32"], mine["bf16"])
            agreement = {"verdicts": len(a), "agree": same, "largest_metric_difference": round(worst, 4),
                         "where": where}
            print(f"bf16 vs fp32 (this engine): {same}/{len(a)} probe verdicts agree; largest metric difference "
                  f"{worst:.4f} ({where})")
        print(f"speedup over {args.baseline} ({args.baseline_precision}): " +
              ", ".join(f"{r['precision']} {r['speedup']:.2f}x" for r in rows if r["engine"] == "this"))
        if args.json:
            for r in rows:
                r.pop("out")
            payload = {"meta": {"turns": args.turns, "rows": args.rows, "baseline": args.baseline,
                                "setting": " ".join(evaluate_args(args.turns, args.rows, "P", Path("OUT"))[1:]),
                                "machine": f"{platform.machine()}, {os.cpu_count()} cores",
                                "omp_threads": os.environ.get("OMP_NUM_THREADS"),
                                "measured_on": time.strftime("%Y-%m-%d")},
                       "runs": rows, "bf16_vs_fp32": agreement}
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(payload, indent=1) + "\n")
            print(f"written {args.json}")
    finally:
        for tree in trees.values():
            subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tree)], check=False)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
