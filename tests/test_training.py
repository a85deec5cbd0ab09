"""Training through Lightning: resume after a kill, reload reproduces logits (DDP: tests/test_ddp.py)."""

import torch
from safetensors.torch import load_file

from tests.conftest import run_cli

COMMON = ["model=tiny-llama", "mechanism=lora", "mechanism.options.dropout=0.0", "persona=joyful_writer",
          "logger=none", "data.batch_size=8", "checkpoint.every_n_train_steps=2", "trainer.max_steps=14",
          "trainer.enable_progress_bar=false", "module.optimizer.lr=1e-2"]


def test_killed_run_resumes_to_the_same_weights(tmp_path):
    full = run_cli("train.py", *COMMON, f"hydra.run.dir={tmp_path}/full")
    assert full.returncode == 0, full.stderr[-2000:]
    # Killed abruptly after step 11 (mid-epoch 2 of ~8 batches per epoch); last.ckpt holds step 10.
    killed = run_cli("train.py", *COMMON, f"hydra.run.dir={tmp_path}/resumed", "+callbacks.kill._target_=tests.helpers.KillAtStep",
                     "+callbacks.kill.step=11")
    assert killed.returncode == 9, killed.stderr[-2000:]
    assert not (tmp_path / "resumed/checkpoints/final.safetensors").exists()
    resumed = run_cli("train.py", *COMMON, f"hydra.run.dir={tmp_path}/resumed", "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = load_file(tmp_path / "full/checkpoints/final.safetensors")
    b = load_file(tmp_path / "resumed/checkpoints/final.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # and training moved the weights (lora_B starts at zero)
    assert any(k.endswith("lora_B.default.weight") and a[k].abs().sum() > 0 for k in a)


def test_checkpoints_are_small(tmp_path):
    run = run_cli("train.py", *COMMON, "trainer.max_steps=2", f"hydra.run.dir={tmp_path}")
    assert run.returncode == 0, run.stderr[-2000:]
    final = tmp_path / "checkpoints/final.safetensors"
    last = tmp_path / "checkpoints/last.ckpt"
    params = sum(t.numel() for t in load_file(final).values())
    assert final.stat().st_size < params * 4 + 200_000  # trainable tensors + config, not the base model
    assert last.stat().st_size < 3 * params * 4 + 500_000  # + Adam moments
    # the Lightning checkpoint loads without unpickling arbitrary objects
    torch.load(last, weights_only=True)


def test_restored_checkpoint_reproduces_the_trained_module(backbone_factory, tmp_path):
    """Fit in-process through Lightning, then rebuild from final.safetensors alone: same logits."""
    import lightning as L
    from omegaconf import OmegaConf

    from persona_lit.build import attach_mechanism, restore
    from persona_lit.training.callbacks import ExportCheckpoint
    from persona_lit.data import PersonaDialogueDataModule
    from persona_lit.training.module import PersonaLitModule
    from persona_lit.personas.load import load_persona, persona_to_dict
    from tests.conftest import model_cfg, sample_batch

    bb = backbone_factory("tiny-gemma3")
    mech_cfg = OmegaConf.create({"name": "lora", "options": {"r": 4, "alpha": 8, "dropout": 0.0}})
    model, mechanism = attach_mechanism(bb, mech_cfg)
    persona = load_persona("joyful_writer")
    config = {"model": OmegaConf.to_container(model_cfg("tiny-gemma3")), "mechanism": OmegaConf.to_container(mech_cfg),
              "persona": persona_to_dict(persona), "data": {}, "seed": 0}
    module = PersonaLitModule(model, mechanism, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
                              run_config=config, fingerprint=bb.fingerprint)
    data = PersonaDialogueDataModule(bb.chat, persona, max_length=128, batch_size=4)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[ExportCheckpoint(str(tmp_path))])
    trainer.fit(module, datamodule=data)
    batch = sample_batch(bb.chat)
    model.eval()
    with torch.no_grad():
        expected = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    _, restored, _, restored_persona, _ = restore(str(tmp_path / "final.safetensors"))
    with torch.no_grad():
        got = restored(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert torch.equal(got, expected)
    assert restored_persona.name == "Lyra" and len(restored_persona.probes) == len(persona.probes)


def test_drift_callback_logs_curves_during_training(tmp_path):
    run = run_cli("train.py", *COMMON, "trainer.max_steps=9", "logger=csv", "drift.every_n_val_epochs=1",
                  "drift.turns=2", "drift.probe_turns=[0,2]", "drift.max_new_tokens=4", f"hydra.run.dir={tmp_path}")
    assert run.returncode == 0, run.stderr[-2000:]
    header, *rows = (tmp_path / "csv/metrics.csv").read_text().splitlines()
    assert "val_drift/adherence/name/turn_2" in header and "val_drift/likelihood_margin/turn_0" in header
    column = header.split(",").index("val_drift/adherence/name/turn_0")
    assert any(r.split(",")[column] for r in rows)  # logged at least once (one validation epoch)
