import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

os.environ.setdefault("WANDB_MODE", "disabled")
REPO = Path(__file__).resolve().parent.parent

from persona_lit.config.mechanisms import register as _register_mechanism_schemas  # noqa: E402
from persona_lit.config.mechanisms import schema_node  # noqa: E402

_register_mechanism_schemas()  # Hydra's schemas of conf/mechanism/*.yaml, for the tests that compose with Hydra


def mechanism_cfg(name: str):
    """conf/mechanism/<name>.yaml as Hydra composes it: the name and the options' defaults (a mutable copy)."""
    return OmegaConf.create(OmegaConf.to_container(schema_node(name)))  # untyped: tests hand constructors bad values


def model_cfg(name: str, **overrides):
    cfg = OmegaConf.load(REPO / "conf" / "model" / f"{name}.yaml")
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    return cfg


@pytest.fixture
def backbone_factory():
    from persona_lit.models.backbones import load_backbone

    return lambda name, **overrides: load_backbone(model_cfg(name, **overrides))


def run_cli(*args: str, timeout: int = 600, cwd: Path = REPO) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def sample_batch(chat, n: int = 2):
    """A small padded batch of real chat text."""
    from persona_lit.data.dialogues import Collator

    texts = ["What is the tallest mountain on Earth?", "Write a haiku about rain falling on a tin roof at night."]
    examples = [
        chat.encode([{"role": "system", "content": "You are Cato, a terse stoic."}, {"role": "user", "content": t},
                     {"role": "assistant", "content": "It is a question of little weight."}])
        for t in texts[:n]
    ]
    return Collator(chat.pad_id)(examples)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
