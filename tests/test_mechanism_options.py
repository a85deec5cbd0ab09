"""Each mechanism's options are one dataclass (persona_lit/config/mechanisms.py) that Hydra checks: its fields are
the mechanism's constructor arguments with the same defaults, Hydra's own composition (no config check before it)
refuses a wrong type or an unknown key (`+key=` adds one on purpose; the config check refuses that), the composed defaults are the dataclass's, and --help lists them."""

import inspect

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from persona_lit.build import resolve_train_switch
from persona_lit.config.mechanisms import OPTIONS, defaults, schema_node
from persona_lit.mechanisms import REGISTRY
from tests.conftest import REPO, run_cli


def test_every_mechanism_has_its_options_dataclass():
    assert set(OPTIONS) == set(REGISTRY)
    assert {p.stem for p in (REPO / "conf" / "mechanism").glob("*.yaml")} == set(OPTIONS)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_fields_are_the_constructor_arguments_with_the_same_defaults(name):
    signature = {k: p for k, p in inspect.signature(REGISTRY[name].__init__).parameters.items()
                 if k != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    assert set(signature) == set(defaults(name))
    resolved = OmegaConf.to_container(resolve_train_switch(schema_node(name), training=False).options)
    for key, p in signature.items():
        if p.default is not inspect.Parameter.empty:
            assert p.default == resolved[key], (name, key)


def hydra_compose(*overrides):
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("train", overrides=list(overrides))


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_hydra_composes_the_dataclass_defaults(name):
    cfg = hydra_compose(f"mechanism={name}")
    assert cfg.mechanism.name == name
    assert OmegaConf.to_container(cfg.mechanism.options) == OmegaConf.to_container(schema_node(name).options)


@pytest.mark.parametrize("override,fact", [
    ("mechanism.options.lora_r=many", "lora_r"),
    ("mechanism.options.train_layers=sometimes", "train_layers"),
    ("mechanism.options.layers=[1,x]", "layers"),
    ("mechanism.options.lora_rank=4", "lora_rank"),
])
def test_hydra_itself_refuses_a_wrong_type_or_an_unknown_key(override, fact):
    with pytest.raises(Exception) as e:  # noqa: PT011 - Hydra wraps OmegaConf's errors in several types
        hydra_compose("mechanism=lyra", override)
    assert fact in str(e.value)


def test_a_bundle_value_is_typed_by_the_dataclass():
    cfg = hydra_compose("mechanism=lora", "mechanism.options.alpha=8")
    assert cfg.mechanism.options.alpha == 8.0 and isinstance(cfg.mechanism.options.alpha, float)


def test_help_lists_the_chosen_mechanisms_options_with_their_defaults():
    out = run_cli("train.py", "mechanism=lyra", "--help").stdout
    assert "mechanism.options.history_window=0" in out and "[>= 0]" in out
    assert "mechanism.options.lora_alpha=None" in out and "mechanism.options.memory_tokens" not in out


def test_a_range_from_the_dataclass_is_one_line_exit_2():
    proc = run_cli("train.py", "mechanism=lyra", "mechanism.options.lora_r=-1")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "mechanism.options.lora_r=-1" in lines[0] and ">= 0" in lines[0]
