"""module.gradient_checkpointing=true: the same loss and gradients for every trainable mechanism on both tiny
models (recomputation must not double a mechanism's side effects), the same trained weights through train.py,
and less peak memory on SmolLM2 (bench/checkpointing.py, each arm in its own process)."""

import json

import pytest
import torch
from safetensors.torch import load_file

from persona_lit.build import attach_mechanism
from tests.conftest import run_cli, sample_batch, mechanism_cfg

MECHANISMS = {
    "lora": {"dropout": 0.0},
    "lyra-train-layers": {"train_layers": True},
    "lyra-lora": {"train_layers": True, "lora_r": 4},
    "triplet": {},
    "steer-vector": {"train_vector": True, "layers": [1, 2]},
}


def attach(bb, name, tmp_path):
    cfg = mechanism_cfg(name.split('-')[0])
    for k, v in MECHANISMS[name].items():
        cfg.options[k] = v
    if name.startswith("steer"):
        from tests.test_steer import direction_file

        cfg.options.direction = str(direction_file(bb, tmp_path / "d.safetensors"))
    return attach_mechanism(bb, cfg)


def loss_and_grads(model, mechanism, batch):
    extra = {"segment_ids": batch["segment_ids"]} if mechanism.uses_segments else {}
    if mechanism.uses_assistant_mask:
        extra["assistant_mask"] = batch["labels"] != -100
    params = list(mechanism.trainable_parameters())
    for p in params:
        p.grad = None
    loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                 **extra).loss
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in params]


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-gemma3"])
@pytest.mark.parametrize("mechanism", list(MECHANISMS))
def test_checkpointing_gives_the_same_loss_and_gradients(model_name, mechanism, backbone_factory, tmp_path):
    bb = backbone_factory(model_name)
    model, mech = attach(bb, mechanism, tmp_path)
    if mechanism == "triplet":  # the gate starts at zero: open it, or no gradient reaches the branch's weights
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n.endswith("triplet_gate"):
                    p.fill_(0.5)
    model.train()
    batch = sample_batch(bb.chat)
    loss_off, grads_off = loss_and_grads(model, mech, batch)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    loss_on, grads_on = loss_and_grads(model, mech, batch)
    assert torch.equal(loss_on, loss_off)
    assert len(grads_on) == len(grads_off) > 0 and any(g.abs().sum() > 0 for g in grads_off)
    for a, b in zip(grads_off, grads_on):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)


def test_train_py_switch_trains_the_same_weights(tmp_path):
    common = ["model=tiny-llama", "mechanism=lora", "mechanism.options.dropout=0.0", "persona=joyful_writer",
              "logger=none", "data.batch_size=4", "trainer.max_steps=2", "trainer.enable_progress_bar=false",
              "module.optimizer.lr=1e-2"]
    for arm in ("off", "on"):
        run = run_cli("train.py", *common, f"module.gradient_checkpointing={arm == 'on'}",
                      f"hydra.run.dir={tmp_path}/{arm}", timeout=300)
        assert run.returncode == 0, run.stderr[-2000:]
    off, on = (load_file(tmp_path / arm / "checkpoints/final.safetensors") for arm in ("off", "on"))
    assert off.keys() == on.keys()
    for k in off:
        torch.testing.assert_close(on[k], off[k], rtol=1e-5, atol=1e-7, msg=k)


def test_less_peak_memory_on_smollm2(tmp_path):
    out = tmp_path / "ckpt.json"
    run = run_cli("bench/checkpointing.py", "--model", "smollm2-135m-instruct", "--batch", "2", "--seq-len", "384",
                  "--json", str(out), timeout=400)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["loss_diff"] == 0.0 and result["grad_norm_rel_diff"] < 1e-4
    assert result["peak_ratio"] < 0.85, result  # measured 0.68 at 2 x 512 (3.1 GiB -> 2.1 GiB above the model)
