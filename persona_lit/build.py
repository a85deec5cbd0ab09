"""Compose the objects of a run from its config: backbone + mechanism + persona, and restore checkpoints."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from persona_lit.backbones import Backbone, load_backbone
from persona_lit.checkpoint import load_trainable, read_checkpoint
from persona_lit.errors import UserError
from persona_lit.mechanisms import Mechanism, build_mechanism
from persona_lit.personas import Persona, load_persona, persona_from_dict, persona_to_dict

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("model", "mechanism", "data", "trainer", "logger", "experiment")


def preflight(argv: list[str], conf_dir: Path = CONF_DIR) -> None:
    """Checks `group=choice` overrides before Hydra runs, so a typo gets one line listing the valid choices."""
    for arg in argv:
        key, sep, value = arg.lstrip("+").partition("=")
        if sep and key in GROUPS and value and value != "null":
            choices = sorted(p.stem for p in (conf_dir / key).glob("*.yaml"))
            if value not in choices:
                raise UserError(f"unknown {key} {value!r}; allowed: {', '.join(choices)}")
        if sep and key in ("hydra.run.dir", "out_dir"):
            require_writable(Path(value), key)


def require_writable(path: Path, key: str) -> None:
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise UserError(f"{key}={path}: cannot write there ({existing} is not a writable directory)")
    try:  # os.access says yes to root everywhere (even /proc): try it
        os.rmdir(tempfile.mkdtemp(dir=existing, prefix=".persona_lit_probe."))
    except OSError as e:
        raise UserError(f"{key}={path}: cannot write there ({existing}: {e.strerror})") from None


def plain(cfg: Any) -> Any:
    return OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, DictConfig) else cfg


def attach_mechanism(backbone: Backbone, mechanism_cfg: Any) -> tuple[Any, Mechanism]:
    mechanism = build_mechanism(mechanism_cfg.name, **(plain(mechanism_cfg.get("options")) or {}))
    return mechanism.attach(backbone.model), mechanism


def resolve_persona(name_or_dict: Any) -> Persona:
    if isinstance(name_or_dict, (dict, DictConfig)):
        return persona_from_dict(plain(name_or_dict), "<checkpoint>")
    return load_persona(str(name_or_dict))


def run_config(cfg: DictConfig, persona: Persona) -> dict[str, Any]:
    """What a checkpoint carries so evaluation needs nothing else: model, mechanism, persona, data."""
    return {"model": plain(cfg.model), "mechanism": plain(cfg.mechanism), "persona": persona_to_dict(persona),
            "data": plain(cfg.data), "seed": int(cfg.seed)}


def restore(ckpt: str, model_override: Any = None) -> tuple[Backbone, Any, Mechanism, Persona, dict[str, Any]]:
    """Rebuilds backbone + mechanism from a checkpoint's own config and loads its trainable tensors."""
    tensors, header = read_checkpoint(ckpt)
    config = header["config"]
    model_cfg = OmegaConf.create(plain(model_override) if model_override is not None else config["model"])
    backbone = load_backbone(model_cfg)
    if header.get("fingerprint") and header["fingerprint"] != backbone.fingerprint:
        raise UserError(f"ckpt={ckpt}: trained on another base model ({config['model'].get('name')}, fingerprint "
                        f"{header['fingerprint']}); this model {backbone.name} has fingerprint {backbone.fingerprint}")
    model, mechanism = attach_mechanism(backbone, OmegaConf.create(config["mechanism"]))
    load_trainable(model, tensors, f"ckpt={ckpt}")
    model.eval()
    return backbone, model, mechanism, resolve_persona(config["persona"]), config
