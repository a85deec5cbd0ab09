"""Experiment loggers: W&B by default (offline with a notice when there is no API key), CSV on request."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from persona_lit.errors import UserError


def wandb_has_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def make_logger(cfg: Any, save_dir: str, config: dict[str, Any], tags: list[str], group: str, name: str | None = None):
    """cfg is the `logger` config group: {kind: wandb|csv|none, project, ...}. Returns a Lightning logger or False."""
    kind = cfg.kind
    if kind == "none":
        return False
    if kind == "csv":
        from lightning.pytorch.loggers import CSVLogger

        return CSVLogger(save_dir=save_dir, name="csv", version="")
    if kind != "wandb":
        raise UserError(f"unknown logger.kind {kind!r}; allowed: wandb, csv, none")
    from lightning.pytorch.loggers import WandbLogger

    mode = os.environ.get("WANDB_MODE", "offline" if cfg.get("offline") else None)
    if mode is None and not wandb_has_key():
        print("persona_lit: no W&B API key found; logging offline to ./wandb (sync later with `wandb sync`)")
        mode = "offline"
    logger = WandbLogger(project=cfg.project, entity=cfg.get("entity"), save_dir=save_dir, name=name, group=group,
                         tags=tags, offline=mode == "offline", mode=mode)
    logger.log_hyperparams(config)
    return logger
