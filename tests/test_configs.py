"""Every config composes, and the entry points answer --help."""

import pytest
from hydra import compose, initialize_config_dir

from tests.conftest import REPO, run_cli

CONF = REPO / "conf"


def choices(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("model", choices("model"))
@pytest.mark.parametrize("mechanism", choices("mechanism"))
def test_train_config_composes(model, mechanism):
    with initialize_config_dir(str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=[f"model={model}", f"mechanism={mechanism}"], return_hydra_config=True)
    assert cfg.model.name == model and cfg.mechanism.name == mechanism and cfg.data.seed == cfg.seed


@pytest.mark.parametrize("group", ["trainer", "logger", "data"])
def test_every_choice_composes(group):
    for choice in choices(group):
        with initialize_config_dir(str(CONF), version_base="1.3"):
            compose("train", overrides=[f"{group}={choice}"])
            compose("evaluate", overrides=[f"logger={choice}"] if group == "logger" else [])


def test_unknown_keys_are_rejected():
    with initialize_config_dir(str(CONF), version_base="1.3"):
        with pytest.raises(Exception, match="max_stepz"):
            compose("train", overrides=["trainer.max_stepz=3"])


@pytest.mark.parametrize("script", ["train.py", "evaluate.py"])
def test_help(script):
    out = run_cli(script, "--help", timeout=120)
    assert out.returncode == 0 and "Configuration groups" in out.stdout and "mechanism" in out.stdout
