"""What a W&B dashboard shows, read from offline runs' own record files (tests/wandb_records.py): two training runs
that differ in one setting carry the whole resolved config (module.* included) and readable names, group and job
type; the training step is the x-axis of train/*; an evaluation of a checkpoint is linked to its training run and
joins its group, logs each metric with its interval bounds, and has the turn as the x-axis of drift/*."""

import json
import os
import subprocess
import sys

from tests.conftest import REPO
from tests.wandb_records import summary

TINY = ["model=tiny-llama", "mechanism=lora", "logger=wandb", "trainer.max_steps=2",
        "trainer.enable_progress_bar=false", "persona=stoic"]


def offline(*args, cwd):
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONWARNINGS": "ignore", "WANDB_SILENT": "true"}
    env.pop("WANDB_API_KEY", None)
    done = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_runs_that_differ_in_one_setting_compare_and_an_evaluation_links_its_training_run(tmp_path):
    runs = {}
    for lr in ("1e-2", "1e-3"):
        offline(str(REPO / "train.py"), *TINY, f"module.optimizer.lr={lr}", f"hydra.run.dir={tmp_path}/lr{lr}",
                cwd=tmp_path)
        runs[lr] = summary(tmp_path / f"lr{lr}")
    a, b = runs["1e-2"], runs["1e-3"]
    for r in (a, b):
        assert r["job_type"] == "train" and r["group"] == "lora" and r["name"].startswith("lora-")
        assert {"module", "trainer", "data", "mechanism", "model", "checkpoint", "seed"} <= set(r["config"])
        assert r["metrics"]["*"] == "trainer/global_step"  # train/*, val/*, lr-AdamW: against the training step
        assert any("lr-AdamW" in row for row in r["history"]) and any("train/loss" in row for row in r["history"])
    assert a["config"]["module"]["optimizer"]["lr"] == 1e-2 and b["config"]["module"]["optimizer"]["lr"] == 1e-3
    assert a["name"] != b["name"]
    recorded = json.loads((tmp_path / "lr1e-2/wandb_run.json").read_text())
    assert recorded["id"] == a["id"] and recorded["group"] == "lora"

    offline(str(REPO / "evaluate.py"), f"ckpt={tmp_path}/lr1e-2", "turns=2", "conversations=2", "probe_turns=[0,2]",
            "max_new_tokens=4", "probe_max_new_tokens=4", "capability_exchanges=1", "logger=wandb",
            f"out_dir={tmp_path}/eval", cwd=tmp_path)
    e = summary(tmp_path / "eval")
    assert e["job_type"] == "eval" and e["group"] == "lora" and e["name"] == "eval-lora-Cato-free"
    assert e["config"]["train_run"]["id"] == a["id"] and e["config"]["train_run"]["dir"] == str(tmp_path / "lr1e-2")
    assert e["config"]["run"]["mechanism"] == "lora" and e["config"]["turns"] == 2
    assert e["metrics"]["drift/*"] == "turn"
    rows = [row for row in e["history"] if "drift/likelihood_margin" in row]  # (plots/ and tables/: rows of their own)
    assert all("turn" in row for row in e["history"] if any(k.startswith("drift/") for k in row))
    assert any("plots/margin" in "/".join(row) for row in e["history"])
    assert any(k.startswith("tables/probes") for row in e["history"] for k in row)
    assert [row["turn"] for row in rows] == [0, 2]
    last = rows[-1]
    assert "drift/adherence/name" in last and "drift/likelihood_margin" in last
    assert last["drift/likelihood_margin/ci_low"] <= last["drift/likelihood_margin"] <= \
        last["drift/likelihood_margin/ci_high"]
