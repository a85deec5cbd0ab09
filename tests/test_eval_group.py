"""conf/eval/: a table's evaluation settings as one group choice. eval=headline composes to exactly the config of
every committed headline result's recorded command (results/*.json), so `python evaluate.py eval=headline
mechanism=X` (or ckpt=...) reproduces a headline row; train.py refuses the group in one line."""

import json
import shlex

import pytest
from omegaconf import OmegaConf

from persona_lit.config.check import check_cli
from tests.conftest import REPO, run_cli

RESULTS = sorted((REPO / "results").glob("*.json"))


def composed(overrides: list[str]) -> dict:
    cfg = check_cli(overrides, "evaluate")
    plain = OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=False)
    plain.pop("out_dir")  # a time stamp
    return plain


@pytest.mark.parametrize("path", RESULTS, ids=[p.stem for p in RESULTS])
def test_eval_headline_is_the_committed_results_command(path):
    command = json.loads(path.read_text())["command"]
    evaluation = next(part for part in command.split("&&") if "evaluate.py" in part)  # after a train.py step
    recorded = shlex.split(evaluation)[2:]
    assert recorded, path
    protocol = [a for a in recorded if a.startswith("protocol=")]
    arm = [a for a in recorded if a.split("=")[0] in ("mechanism", "ckpt", "model")]
    assert composed(recorded) == composed(["eval=headline", *protocol, *arm])


def test_results_exist_to_check_against():
    assert RESULTS, "results/ holds no committed result"


def test_command_line_wins_over_the_group():
    cfg = check_cli(["eval=headline", "mechanism=repeat", "pool.max_personas=64", "turns=12"], "evaluate")
    assert cfg.pool.max_personas == 64 and cfg.turns == 12 and cfg.protocol == "replay"


def test_train_py_refuses_the_group_in_one_line():
    proc = run_cli("train.py", "eval=headline")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "eval=headline" in lines[0]
