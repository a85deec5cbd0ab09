"""Experiment loggers: W&B by default (offline with a notice when there is no API key or the server cannot be
reached), CSV on request."""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from persona_lit.errors import UserError


def wandb_has_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


def wandb_unreachable(base_url: str, timeout: float = 5.0) -> str | None:
    """Why the W&B server at `base_url` cannot be reached (refused, no DNS, no answer within `timeout` s), or
    None: any HTTP answer, even an error status, means it is there. Goes through the proxies W&B would use."""
    try:
        urllib.request.urlopen(urllib.request.Request(base_url, method="HEAD"), timeout=timeout).close()
    except urllib.error.HTTPError:
        return None
    except urllib.error.URLError as e:
        return str(getattr(e.reason, "strerror", None) or e.reason)
    except (OSError, ValueError) as e:  # a timeout, a reset connection, a malformed URL
        return str(getattr(e, "strerror", None) or e or type(e).__name__)
    return None


def _offline_notice(base_url: str, why: str, save_dir: str) -> None:
    secret = os.environ.get("WANDB_API_KEY")
    why = why.strip().splitlines()[0][:160] if why.strip() else "no answer"
    line = f"persona_lit: warning: W&B unreachable at {base_url} ({why}); logging offline to {save_dir}/wandb " \
           f"(sync later with `wandb sync`)"
    print(line.replace(secret, "***") if secret else line, flush=True)  # the key is never printed


RUN_FILE = "wandb_run.json"  # in a training run's directory: its W&B run, which an evaluation of it links to


def make_logger(cfg: Any, save_dir: str, config: dict[str, Any], tags: list[str], group: str, name: str | None = None,
                job_type: str | None = None):
    """cfg is the `logger` config group: {kind: wandb|csv|none, project, ...}. Returns a Lightning logger or False.
    On W&B: the run is named `name`, grouped by `group`, typed `job_type` (train, eval), with `config` as its
    config."""
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
    online = mode in (None, "online", "run")
    base_url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    if online and (why := wandb_unreachable(base_url)):  # a closed port or no network: never wait on it
        _offline_notice(base_url, why, save_dir)
        mode, online = "offline", False
    import wandb

    def start(mode: str | None):
        # init_timeout bounds wandb.init (90 s by default, then retries) when the server answers but stalls
        timeout = os.environ.get("WANDB_INIT_TIMEOUT", "30")
        settings = wandb.Settings(init_timeout=float(timeout) if timeout.replace(".", "", 1).isdigit() else 30.0)
        logger = WandbLogger(project=cfg.project, entity=cfg.get("entity"), save_dir=save_dir, name=name, group=group,
                             tags=tags, offline=mode == "offline", mode=mode, settings=settings, job_type=job_type)
        logger.log_hyperparams(config)  # starts the run (wandb.init) on the main process
        return logger

    try:
        return start(mode)
    except wandb.errors.CommError as e:
        if not online:
            raise
        wandb.finish()
        _offline_notice(base_url, str(e), save_dir)
        return start("offline")


def record_run(logger: Any, run_dir: Path) -> None:
    """Writes run_dir/wandb_run.json (id, name, group, project, entity, path) for a W&B logger; nothing otherwise."""
    run = getattr(logger, "experiment", None) if type(logger).__name__ == "WandbLogger" else None
    if run is None or not getattr(run, "id", None):
        return
    info = {"id": run.id, "name": run.name, "group": run.group, "project": run.project, "entity": run.entity or None}
    info["path"] = "/".join(str(p) for p in (info["entity"], info["project"], info["id"]) if p)
    from persona_lit.outputs import write_json

    write_json(Path(run_dir) / RUN_FILE, info)


def training_run_of(ckpt: Any) -> dict[str, Any] | None:
    """The training run an evaluation's checkpoint came from: its directory and, when it logged to W&B, that run
    (wandb_run.json). None without a checkpoint."""
    if not ckpt:
        return None
    path = Path(str(ckpt))
    run_dir = path if path.is_dir() else path.parent.parent if path.parent.name == "checkpoints" else path.parent
    info: dict[str, Any] = {"dir": str(run_dir)}
    record = run_dir / RUN_FILE
    if record.is_file():
        import json

        info.update(json.loads(record.read_text(encoding="utf-8")))
    return info
