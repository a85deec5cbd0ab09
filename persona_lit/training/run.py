"""What train.py runs: compose the objects from config, fit with Lightning, always close the logger."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from omegaconf import DictConfig

from persona_lit.models.backbones import load_backbone
from persona_lit.build import attach_mechanism, plain, resolve_persona, resolve_train_switch, run_config
from persona_lit.training.callbacks import (DriftCallback, ExportCheckpoint, LogProgress, PeakMemory,
                                           StopOnNonFiniteLoss, throughput)
from persona_lit.training.checkpoint import AtomicCheckpointIO
from persona_lit.errors import UserError
from persona_lit.training.loggers import make_logger, record_run
from persona_lit.training.module import PersonaLitModule


def _resume_path(ckpt_path: str | None) -> str | None:
    if ckpt_path in (None, "last"):
        return ckpt_path
    if not Path(ckpt_path).is_file():
        raise UserError(f"ckpt_path={ckpt_path}: file not found (give a run's checkpoints/last.ckpt)")
    return ckpt_path


def train(cfg: DictConfig) -> Path:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    logger = None
    try:
        L.seed_everything(int(cfg.seed), workers=True, verbose=False)
        resume = _resume_path(cfg.ckpt_path)
        persona = resolve_persona(cfg.persona)
        cfg.mechanism = resolve_train_switch(cfg.mechanism, training=True)  # the checkpoint says what trained
        backbone = load_backbone(cfg.model)
        model, mechanism = attach_mechanism(backbone, cfg.mechanism)
        if not any(True for _ in mechanism.trainable_parameters()):
            raise UserError(f"train.py: mechanism={mechanism.name} has nothing to train (allowed: lora, lyra, "
                            f"triplet, steer; {mechanism.name} runs as it is: python evaluate.py "
                            f"mechanism={mechanism.name})")
        datamodule = instantiate(cfg.data, chat=backbone.chat, persona=persona)
        if hasattr(datamodule, "bind_model"):  # data answered by the base model itself (data=contrastive)
            datamodule.bind_model(model, mechanism.disabled)
        datamodule.setup("fit")  # fail on bad data before any run artifact is made
        config = run_config(cfg, persona)
        module = PersonaLitModule(
            model, mechanism, optimizer=instantiate(cfg.module.optimizer),
            scheduler=instantiate(cfg.module.scheduler) if cfg.module.scheduler else None,
            kl_weight=float(cfg.module.kl_weight), run_config=config, fingerprint=backbone.fingerprint,
            distill_weight=float(cfg.module.distill_weight), pad_id=backbone.chat.pad_id,
            reopen=tuple(backbone.chat.reopen_ids()), gradient_checkpointing=bool(cfg.module.gradient_checkpointing),
        )
        ckpt_dir = run_dir / "checkpoints"
        callbacks = [
            ModelCheckpoint(dirpath=ckpt_dir, save_last=True, save_top_k=0,
                            every_n_train_steps=int(cfg.checkpoint.every_n_train_steps)),
            throughput(),
            PeakMemory(),
            *([] if sys.stderr.isatty() else [LogProgress()]),
            StopOnNonFiniteLoss(),
            ExportCheckpoint(str(ckpt_dir)),
            *([DriftCallback(backbone.chat, persona, **plain(cfg.drift),
                             question_split=plain(cfg.data.get("question_split")))]
              if cfg.drift.every_n_val_epochs else []),
            *(instantiate(c) for c in (cfg.callbacks or {}).values()),
        ]
        experiment = HydraConfig.get().runtime.choices.get("experiment")
        logger = make_logger(cfg.logger, str(run_dir), {**plain(cfg), **config, "experiment": experiment},
                             tags=[backbone.name, persona.key, mechanism.name], group=experiment or mechanism.name,
                             name=f"{experiment or mechanism.name}-{run_dir.name}", job_type="train")
        record_run(logger, run_dir)
        if logger:
            callbacks.append(LearningRateMonitor(logging_interval="step"))
        atomic = {} if cfg.trainer.get("plugins") else {"plugins": [AtomicCheckpointIO()]}  # last.ckpt: tmp + rename
        trainer = instantiate(cfg.trainer, logger=logger, callbacks=callbacks, default_root_dir=str(run_dir), **atomic)
        try:
            trainer.fit(module, datamodule=datamodule, ckpt_path=resume, weights_only=True)
        except RuntimeError as e:  # torch.load on a damaged or foreign .ckpt
            if resume and ("checkpoint" in str(e).lower() or "zip" in str(e).lower() or "pickle" in str(e).lower()):
                raise UserError(f"ckpt_path={resume}: cannot load ({str(e).splitlines()[0]})") from None
            raise
    except UserError:
        if not (run_dir / "checkpoints").exists():
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing half-written left behind
        raise
    finally:
        if logger:
            logger.finalize("success")
            if hasattr(logger, "experiment") and cfg.logger.kind == "wandb":
                import wandb

                wandb.finish()
    print(f"persona_lit: run directory {run_dir}")
    return run_dir
