"""`python train.py mechanism=X` with nothing else: a trainable mechanism trains (a trainable tensor moves), one
with nothing to train stops with one line (exit 2) and leaves no run directory. Lyra's chosen layers train in
train.py (train_layers: null) while evaluate.py without a checkpoint runs frozen Lyra."""

import re

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from tests.conftest import mechanism_cfg, run_cli

TINY = ["model=tiny-llama", "logger=none", "trainer.max_steps=2", "trainer.enable_progress_bar=false",
        "module.optimizer.lr=1e-2"]


@pytest.mark.parametrize("mechanism", ["lora", "lyra", "triplet"])
def test_bare_train_trains_a_tensor(mechanism, tmp_path):
    from persona_lit.build import CONF_DIR, attach_mechanism
    from persona_lit.models.backbones import load_backbone

    run = run_cli("train.py", f"mechanism={mechanism}", *TINY, f"hydra.run.dir={tmp_path}/run", timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    trained = load_file(tmp_path / "run/checkpoints/final.safetensors")
    assert trained, "a checkpoint with no tensors"
    L.seed_everything(0, workers=True, verbose=False)  # as train.py does before it builds the mechanism
    backbone = load_backbone(OmegaConf.load(CONF_DIR / "model/tiny-llama.yaml"))
    model, _ = attach_mechanism(backbone, mechanism_cfg(mechanism), training=True)
    initial = {k: v.detach().float() for k, v in model.named_parameters() if v.requires_grad}
    assert set(trained) <= set(initial), sorted(set(trained) - set(initial))[:4]
    moved = [k for k in trained if not torch.equal(trained[k].float(), initial[k])]
    assert moved, f"{mechanism}: no trainable tensor moved in 2 steps"


@pytest.mark.parametrize("mechanism", ["none", "repeat", "instaboost", "split_softmax"])
def test_nothing_to_train_is_one_line(mechanism, tmp_path):
    run = run_cli("train.py", f"mechanism={mechanism}", *TINY, f"hydra.run.dir={tmp_path}/run", timeout=300)
    assert run.returncode == 2, run.stderr[-2000:]
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "nothing to train" in lines[0] and f"evaluate.py mechanism={mechanism}" in lines[0]
    assert not (tmp_path / "run").exists()


def test_lyra_trains_in_train_py_and_is_frozen_in_evaluate(backbone_factory):
    from persona_lit.build import attach_mechanism, resolve_train_switch

    cfg = mechanism_cfg("lyra")
    assert cfg.options.train_layers is None
    assert resolve_train_switch(cfg, training=True).options.train_layers is True
    assert resolve_train_switch(cfg, training=False).options.train_layers is False
    explicit = OmegaConf.merge(cfg, {"options": {"train_layers": False}})
    assert resolve_train_switch(explicit, training=True).options.train_layers is False  # said so: kept
    _, frozen = attach_mechanism(backbone_factory("tiny-llama"), cfg)
    assert not list(frozen.trainable_parameters())
    _, trained = attach_mechanism(backbone_factory("tiny-llama"), cfg, training=True)
    assert list(trained.trainable_parameters())


def test_a_logged_run_records_lr_and_throughput_and_a_log_file_gets_progress_lines(tmp_path):
    args = [a for a in TINY if a != "logger=none"]
    run = run_cli("train.py", "mechanism=lora", *args, "logger=csv", f"hydra.run.dir={tmp_path}/run", timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    header = (tmp_path / "run/csv/metrics.csv").read_text().splitlines()[0].split(",")
    assert {"lr-AdamW", "train/device/items_per_sec", "train/device/samples_per_sec", "train/peak_mem_mb",
            "train/loss"} <= set(header)
    # stderr is a pipe here, as under nohup: the last step gets a line a log file keeps
    assert re.search(r"persona_lit: step 2/2, loss \d+\.\d+, [\d.]+ s/step, \d+ tokens/s, 0m00s left", run.stderr), \
        run.stderr[-2000:]
