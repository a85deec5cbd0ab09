"""evaluate.py devices=N: conversations split across DDP ranks, gathered on rank 0 in their original order,
the same results as one process. DDP itself runs only in subprocesses (never inside pytest)."""

import json
import math
from dataclasses import dataclass, field

import pytest
import torch

from persona_lit.errors import UserError
from persona_lit.evaluation.distributed import interleave, resolve_placement
from tests.conftest import run_cli


@dataclass
class _Result:  # ProtocolResult's shape, with an extra arm as other code may add
    persona_arm: list
    control_arm: list
    baseline_arm: list = field(default_factory=list)
    groups: list = field(default_factory=list)


def _ranks(total: int, world: int, arms=("persona_arm", "control_arm", "baseline_arm")) -> list[_Result]:
    """What each rank of `world` holds for conversations rank, rank + world, ...: records tagged by index."""
    return [_Result(**{a: [[f"{a}:{c}:t0", f"{a}:{c}:t1"] for c in range(r, total, world)] for a in arms},
                    groups=[7]) for r in range(world)]


@pytest.mark.parametrize("total,world", [(5, 2), (4, 2), (3, 4), (1, 3)])
def test_interleave_restores_conversation_order_for_every_arm(total, world):
    merged = interleave(_ranks(total, world), total)
    for arm in ("persona_arm", "control_arm", "baseline_arm"):
        assert getattr(merged, arm) == [[f"{arm}:{c}:t0", f"{arm}:{c}:t1"] for c in range(total)]
    assert merged.groups == [7]  # not a list of conversations: rank 0's


def test_interleave_keeps_an_arm_that_no_rank_ran_empty_and_rejects_a_short_one():
    merged = interleave(_ranks(4, 2, arms=("persona_arm", "control_arm")), 4)
    assert merged.baseline_arm == [] and len(merged.persona_arm) == 4
    parts = _ranks(4, 2)
    parts[1].control_arm.pop()
    with pytest.raises(RuntimeError, match="control_arm"):
        interleave(parts, 4)


def test_interleave_real_protocol_result():
    from persona_lit.evaluation.conversation import TurnRecord
    from persona_lit.evaluation.protocol import ProtocolResult

    def rec(c):
        return [TurnRecord(0, "", "", "", c), TurnRecord(1, f"q{c}", f"a{c}", "writing", 10 + c)]

    parts = [ProtocolResult([rec(c) for c in range(r, 3, 2)], [rec(100 + c) for c in range(r, 3, 2)])
             for r in range(2)]
    merged = interleave(parts, 3)
    assert [conv[1].user for conv in merged.persona_arm] == ["q0", "q1", "q2"]
    assert [conv[1].user for conv in merged.control_arm] == ["q100", "q101", "q102"]


def test_placement_values():
    assert resolve_placement("auto", 1, "auto") == (1, None)
    assert resolve_placement("auto", 1, "cpu") == (1, "cpu")
    assert resolve_placement("cpu", 2, "auto") == (2, "cpu")
    assert resolve_placement("auto", "3", "cpu") == (3, "cpu")
    for devices in (0, -1, "two", 1.5):
        with pytest.raises(UserError, match=rf"^devices={devices}: must be an integer >= 1"):
            resolve_placement("auto", devices, "auto")
    with pytest.raises(UserError, match="^accelerator=tpu: unknown accelerator; allowed: auto, cpu, cuda$"):
        resolve_placement("auto", 2, "tpu")
    if torch.cuda.device_count() < 2:
        with pytest.raises(UserError, match="^devices=2: this machine has"):
            resolve_placement("auto", 2, "cuda")


def _close(a, b, path=""):
    """Equal JSON trees, floats to tolerance; returns the first difference's path or None."""
    if isinstance(a, dict):
        if set(a) != set(b):
            return f"{path}: keys {sorted(set(a) ^ set(b))}"
        return next((d for k in a if (d := _close(a[k], b[k], f"{path}/{k}"))), None)
    if isinstance(a, list):
        if not isinstance(b, list) or len(a) != len(b):
            return f"{path}: lengths"
        return next((d for i, (x, y) in enumerate(zip(a, b)) if (d := _close(x, y, f"{path}[{i}]"))), None)
    if isinstance(a, float) and isinstance(b, (int, float)):
        same = math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-5) or (math.isnan(a) and math.isnan(b))
        return None if same else f"{path}: {a} != {b}"
    return None if a == b else f"{path}: {a!r} != {b!r}"


def test_two_processes_give_the_same_evaluation_as_one(tmp_path):
    """3 conversations on 2 CPU ranks (uneven shares: 0 and 2 on rank 0, 1 on rank 1) against one process:
    the same answers in the same conversation order, the same metrics; only rank 0 writes."""
    args = ["evaluate.py", "model=tiny-llama", "mechanism=none", "turns=2", "conversations=3", "probe_turns=[0,2]",
            "max_new_tokens=4", "probe_max_new_tokens=4", "capability_exchanges=1", "capability_tokens=4",
            "logger=none"]
    runs = {}
    for n in (2, 1):
        out = tmp_path / f"devices{n}"
        r = run_cli(*args, f"devices={n}", "accelerator=cpu", f"out_dir={out}", timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.count("persona_lit: evaluation written to") == 1  # rank 0 only
        results = json.loads((out / "results.json").read_text())
        transcript = [json.loads(line) for line in (out / "transcript.jsonl").read_text().splitlines()]
        runs[n] = results, transcript
    (one, one_rows), (two, two_rows) = runs[1], runs[2]
    assert one["run"]["devices"] == 1 and two["run"]["devices"] == 2 and two["run"]["device"] == "cpu"
    assert _close(one["metrics"], two["metrics"]) is None, _close(one["metrics"], two["metrics"])
    assert one["history_tokens"] == two["history_tokens"]
    # Conversations differ (each shuffles the questions with its own seed), so a wrong order would show.
    firsts = [row["user"] for row in one_rows if row["arm"] == "persona" and row["turn"] == 1]
    assert len(firsts) == 3 and len(set(firsts)) == 3
    assert [(r["arm"], r["conversation"], r["turn"], r["user"]) for r in two_rows] == \
        [(r["arm"], r["conversation"], r["turn"], r["user"]) for r in one_rows]
    assert _close(one_rows, two_rows) is None, _close(one_rows, two_rows)
