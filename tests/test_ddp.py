"""Every trainable mechanism under DDP and under FSDP2 (trainer=fsdp2: Lightning's ModelParallelStrategy), 2 CPU
processes in a subprocess with a timeout, against one process on the same global batch: one process with batch_size=4 and accumulate_grad_batches=2 sees batches 2k and 2k+1 in
step k; two ranks with batch_size=4 see batch 2k (rank 0) and 2k+1 (rank 1), and DDP averages their gradients,
which is what accumulation does (FSDP2: reduce-scattered, the same average). Same losses per batch, same final trainable weights (float tolerance: the
gradient sums are reduced in another order), and the DDP checkpoint loads on one process with the same logits.
A mechanism with nothing to train is refused under DDP too, with one line (exit 2), not torch's traceback."""

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import run_cli, sample_batch

COMMON = ["model=tiny-llama", "persona=joyful_writer", "logger=none", "data.batch_size=4", "data.val_fraction=0",
          "trainer.max_steps=3", "trainer.enable_progress_bar=false", "module.optimizer.lr=1e-2",
          "checkpoint.every_n_train_steps=100", "+callbacks.record._target_=tests.helpers.RecordLosses"]
MECHANISMS = {
    "lora": ["mechanism=lora", "mechanism.options.dropout=0.0"],
    "lyra-train-layers": ["mechanism=lyra", "mechanism.options.layers=[1,3]", "mechanism.options.train_layers=true"],
    "lyra-lora": ["mechanism=lyra", "mechanism.options.layers=[0,2]", "mechanism.options.train_layers=true",
                  "mechanism.options.lora_r=4"],
    "triplet": ["mechanism=triplet", "mechanism.options.layers=[1,2]"],
    "steer-vector": ["mechanism=steer", "mechanism.options.layers=[1,3]", "mechanism.options.train_vector=true"],
}


def losses(run_dir):
    rows = [json.loads(line) for f in sorted(run_dir.glob("losses_rank*.jsonl")) for line in f.read_text().splitlines()]
    return {tuple(r["index"]): r["loss"] for r in rows}


def train(tmp_path, name, extra, *more):
    run_dir = tmp_path / name
    run_dir.mkdir()
    run = run_cli("train.py", *COMMON, *extra, *more, f"hydra.run.dir={run_dir}", f"+callbacks.record.path={run_dir}",
                  timeout=420)
    assert run.returncode == 0, run.stderr[-3000:]
    return run_dir


@pytest.mark.parametrize("mechanism", list(MECHANISMS))
def test_ddp_and_fsdp2_match_one_process_on_the_same_global_batch(mechanism, tmp_path, backbone_factory):
    extra = list(MECHANISMS[mechanism])
    if mechanism.startswith("steer"):
        from tests.test_steer import direction_file

        extra.append(f"mechanism.options.direction={direction_file(backbone_factory('tiny-llama'), tmp_path / 'd.safetensors')}")
    one = train(tmp_path, "one", extra, "trainer.accumulate_grad_batches=2")
    a, wa = losses(one), load_file(one / "checkpoints/final.safetensors")
    assert len(a) == 6 and len(wa) > 0  # 3 steps x 2 batches of 4
    from persona_lit.build import restore

    backbone, model_a, _, _, _ = restore(str(one / "checkpoints/final.safetensors"))
    batch = sample_batch(backbone.chat)
    with torch.no_grad():
        la = model_a(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    for strategy in ("ddp", "fsdp2"):
        run = train(tmp_path, strategy, extra, f"trainer={strategy}")
        assert len(list(run.glob("losses_rank*.jsonl"))) == 2, strategy  # both ranks trained
        b = losses(run)
        assert a.keys() == b.keys(), (strategy, sorted(a), sorted(b))  # the same batches
        for k in a:
            assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-5), (strategy, k)
        wb = load_file(run / "checkpoints/final.safetensors")
        assert wa.keys() == wb.keys(), strategy
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5, msg=f"{strategy} {k}")
        # the multi-process run's checkpoint loads on one process and gives the one-process run's logits
        _, model_b, _, _, _ = restore(str(run / "checkpoints/final.safetensors"))
        with torch.no_grad():
            lb = model_b(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        torch.testing.assert_close(lb, la, rtol=1e-4, atol=1e-4, msg=strategy)


@pytest.mark.parametrize("mechanism", ["none", "split_softmax"])
def test_ddp_with_nothing_to_train_is_one_line(mechanism, tmp_path):
    run = run_cli("train.py", *COMMON[:-1], f"mechanism={mechanism}", "trainer=ddp", f"hydra.run.dir={tmp_path}/run",
                  timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "nothing to train" in lines[0] and f"evaluate.py mechanism={mechanism}" in lines[0], \
        run.stderr
    assert not (tmp_path / "run").exists()
