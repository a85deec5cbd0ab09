"""Compose the objects of a run from its config: backbone + mechanism + persona, and restore checkpoints."""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from persona_lit.models.backbones import Backbone, input_device, load_backbone
from persona_lit.training.checkpoint import load_trainable, read_checkpoint
from persona_lit.errors import UserError
from persona_lit.mechanisms import Mechanism, build_mechanism
from persona_lit.personas.load import load_persona, persona_from_dict, persona_to_dict
from persona_lit.personas.types import Persona

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
GROUPS = ("model", "mechanism", "data", "trainer", "logger", "experiment", "task", "eval")


def preflight(argv: list[str], conf_dir: Path = CONF_DIR, config: str | None = None) -> None:
    """Checks the overrides before Hydra runs, so a mistake gets one line. With `config` (train, evaluate) every
    override: syntax, group choices, unknown keys, types and ranges (persona_lit/config/check.py); without it
    only `group=choice`. Then that hydra.run.dir / out_dir can be written."""
    if config is not None:
        from persona_lit.config.check import check_cli

        check_cli(argv, config, conf_dir)
    for arg in argv:
        key, sep, value = arg.lstrip("+").partition("=")
        if config is None and sep and key in GROUPS and value and value != "null":
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


# The option that makes a mechanism's own tensors train. Left null it means "yes" in train.py (which writes the
# resolved value into the checkpoint's config) and "no" everywhere else (evaluate.py mechanism=lyra without ckpt is
# frozen Lyra).
TRAIN_SWITCH = {"lyra": "train_layers", "steer": "train_vector"}


def resolve_train_switch(mechanism_cfg: Any, training: bool) -> Any:
    """mechanism_cfg with its TRAIN_SWITCH option set where it is null: `training` (train.py) or False."""
    key = TRAIN_SWITCH.get(str(mechanism_cfg.get("name")))
    options = mechanism_cfg.get("options")
    if key is None or options is None or options.get(key, False) is not None:
        return mechanism_cfg
    resolved = OmegaConf.create(plain(mechanism_cfg))
    resolved.options[key] = bool(training)
    return resolved


def attach_mechanism(backbone: Backbone, mechanism_cfg: Any, training: bool = False) -> tuple[Any, Mechanism]:
    mechanism_cfg = resolve_train_switch(mechanism_cfg, training)
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


def restore(ckpt: str, model_override: Any = None,
            device: torch.device | None = None) -> tuple[Backbone, Any, Mechanism, Persona, dict[str, Any]]:
    """Rebuilds backbone + mechanism from a checkpoint's own config and loads its trainable tensors.
    `device` only steers where bitsandbytes loads a quantized model (see place() for the rest)."""
    tensors, header = read_checkpoint(ckpt)
    config = header["config"]
    if not (all(isinstance(config.get(k), dict) for k in ("model", "mechanism"))
            and isinstance(config.get("persona"), (dict, str))):
        raise UserError(f"ckpt={ckpt}: its config lacks model, mechanism or persona (allowed: a checkpoint written "
                        f"by train.py)")
    model_cfg = OmegaConf.create(plain(model_override) if model_override is not None else config["model"])
    backbone = load_backbone(model_cfg, device=device)
    if header.get("fingerprint") and header["fingerprint"] != backbone.fingerprint:
        raise UserError(f"ckpt={ckpt}: trained on another base model ({config['model'].get('name')}, fingerprint "
                        f"{header['fingerprint']}); this model {backbone.name} has fingerprint {backbone.fingerprint}")
    model, mechanism = attach_mechanism(backbone, OmegaConf.create(config["mechanism"]))
    load_trainable(model, tensors, f"ckpt={ckpt}")
    model.eval()
    return backbone, model, mechanism, resolve_persona(config["persona"]), config


# Where evaluation runs: `device` and `precision` of conf/evaluate.yaml.
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N"


def resolve_device(value: Any, key: str = "device") -> torch.device:
    """auto = cuda when available, else cpu; also cpu, cuda, cuda:N."""
    text = "auto" if value is None else str(value).strip().lower()
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if text == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", text)
    if not match:
        raise UserError(f"{key}={value}: unknown device; allowed: {DEVICE_CHOICES}")
    if not torch.cuda.is_available():
        raise UserError(f"{key}={value}: no CUDA device is available here; allowed here: auto, cpu")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise UserError(f"{key}={value}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                        f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return torch.device("cuda", index)


def resolve_precision(value: Any, device: torch.device, key: str = "precision") -> tuple[str, torch.dtype]:
    """auto = bf16 on cuda (fp32 where the GPU has no bf16), fp32 on cpu; or fp32, bf16, fp16."""
    text = "auto" if value is None else str(value).strip().lower()
    if text == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        text = "bf16" if bf16 else "fp32"
    if text not in PRECISIONS:
        raise UserError(f"{key}={value}: unknown precision; allowed: auto, {', '.join(PRECISIONS)}")
    return text, PRECISIONS[text]


def is_quantized(model: nn.Module) -> bool:
    """A bitsandbytes (or other transformers-quantized) model: it cannot be moved or cast with .to()."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_loaded_in_4bit", False) or getattr(base, "is_loaded_in_8bit", False)
                or getattr(base, "hf_quantizer", None) is not None or getattr(base, "is_quantized", False))


def place(model: nn.Module, mechanism: Mechanism, device: torch.device, dtype: torch.dtype) -> str:
    """Puts the model, with the mechanism's modules inside it (and any it keeps outside), on `device` in
    `dtype`; returns the precision actually used. A quantized model stays where bitsandbytes placed it
    (load_backbone(device=...) asked for `device`) and keeps its dtypes: .to() would break it."""
    if is_quantized(model):
        where = input_device(model)
        if where.type != device.type or (device.index is not None and where.index != device.index):
            raise UserError(f"device={device}: this quantized (bitsandbytes) model was placed on {where} "
                            f"by bitsandbytes; use device={where.type} or a model without quantization")
        return f"quantized ({model.get_input_embeddings().weight.dtype} embeddings)"
    model.to(device=device, dtype=dtype)
    for value in vars(mechanism).values():  # modules a mechanism keeps outside the model's tree
        if isinstance(value, nn.Module) and value is not model:
            value.to(device=device, dtype=dtype)
    return next(name for name, d in PRECISIONS.items() if d == dtype)
