"""The drift metrics under several processes: the drift callback during DDP training (rank 0 alone computes
them, so they must not sync), and a synced compute over 2 gloo ranks that gathers every conversation."""

import json
import math

from tests.conftest import run_cli


def test_drift_callback_under_ddp_finishes_and_logs(tmp_path):
    """Rank 0 runs the drift protocol alone: a metric that synced on compute() would wait in a collective the
    other rank never joins (a hang until the timeout)."""
    run = run_cli("train.py", "model=tiny-llama", "mechanism=lora", "persona=joyful_writer", "trainer=ddp",
                  "trainer.max_steps=2", "trainer.val_check_interval=2", "+trainer.limit_val_batches=1",
                  "trainer.enable_progress_bar=false", "data.batch_size=4", "logger=csv", "drift.every_n_val_epochs=1",
                  "drift.turns=2", "drift.probe_turns=[0,2]", "drift.max_new_tokens=4", "checkpoint.every_n_train_steps=0",
                  f"hydra.run.dir={tmp_path}", timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    header, *rows = (tmp_path / "csv/metrics.csv").read_text().splitlines()
    names = header.split(",")
    for name in ("val_drift/adherence/name/turn_0", "val_drift/adherence/name/turn_2",
                 "val_drift/likelihood_margin/turn_2"):
        assert name in names, names
    column = names.index("val_drift/likelihood_margin/turn_2")
    assert any(r.split(",")[column] for r in rows)  # a value was logged


SYNCED = r"""
import json, os, sys
sys.path.insert(0, os.getcwd())  # the repository (run_cli runs in it)
import torch.distributed as dist
import torch.multiprocessing as mp

def work(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from persona_lit.metrics import PerTurnMean, ProbeAdherence
    from persona_lit.metrics.drift import unit_interval
    margin, adherence = PerTurnMean([0, 2]), ProbeAdherence([0, 2])  # default: sync on compute
    for c in range(rank, 5, world):  # conversations 0, 2, 4 on rank 0; 1, 3 on rank 1 (global ids)
        for turn in (0, 2):
            margin.update(c, turn, 0.5 if turn == 0 else c / 4)
            adherence.update(c, turn, [True, c % 2 == 0, False, True])
    results = margin.compute(), adherence.compute()
    if rank == 0:
        json.dump(results, open(out, "w"))
    dist.destroy_process_group()

if __name__ == "__main__":
    mp.spawn(work, args=(2, int(sys.argv[1]), sys.argv[2]), nprocs=2, join=True)
"""


def test_synced_compute_gathers_every_conversation(tmp_path):
    """Used across ranks with sync, the states are concatenated: conversation 1 of rank 1 is not averaged
    with conversation 1 of rank 0, and the result equals one process holding all five."""
    import socket

    from persona_lit.metrics import PerTurnMean, ProbeAdherence

    script = tmp_path / "synced.py"
    script.write_text(SYNCED)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "out.json"
    run = run_cli(str(script), str(port), str(out), timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    margin_two, adherence_two = json.loads(out.read_text())
    margin, adherence = PerTurnMean([0, 2]), ProbeAdherence([0, 2])
    for c in range(5):
        for turn in (0, 2):
            margin.update(c, turn, 0.5 if turn == 0 else c / 4)
            adherence.update(c, turn, [True, c % 2 == 0, False, True])
    for two, one in ((margin_two, margin.compute()), (adherence_two, adherence.compute())):
        assert two["n"] == [1, 5] and one["n"] == [1, 5]
        for key in ("mean", "ci_low", "ci_high"):
            assert [v is None or math.isclose(v, w) for v, w in zip(two[key], one[key])] == [True, True], key
    assert margin_two["mean"][1] == sum(c / 4 for c in range(5)) / 5
