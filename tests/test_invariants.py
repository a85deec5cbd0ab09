"""The mechanisms' exactness invariants on tiny random Llama and Gemma-3 configs."""

import pytest
import torch
from omegaconf import OmegaConf

from persona_lit.build import attach_mechanism
from persona_lit.training.checkpoint import load_trainable, read_checkpoint, save_checkpoint, trainable_state
from tests.conftest import sample_batch

MODELS = ["tiny-llama", "tiny-gemma3"]


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def mech(name, **options):
    return OmegaConf.create({"name": name, "options": options})


@pytest.mark.parametrize("name", MODELS)
def test_none_is_the_base_model(backbone_factory, name):
    base = backbone_factory(name)
    batch = sample_batch(base.chat)
    expected = logits(base.model, batch)
    model, mechanism = attach_mechanism(backbone_factory(name), mech("none"))
    assert not list(mechanism.trainable_parameters())
    assert torch.equal(logits(model, batch), expected)


@pytest.mark.parametrize("name", MODELS)
def test_zero_init_lora_gives_base_logits(backbone_factory, name):
    base = backbone_factory(name)
    batch = sample_batch(base.chat)
    expected = logits(base.model, batch)
    model, mechanism = attach_mechanism(backbone_factory(name), mech("lora", r=4, alpha=8, dropout=0.0))
    model.eval()
    assert torch.equal(logits(model, batch), expected)
    # and the targets cover every linear projection of the decoder layers
    targets = set(model.peft_config["default"].target_modules)
    assert targets == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def perturb(model):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)


@pytest.mark.parametrize("name", MODELS)
def test_disabled_lora_is_base_and_enabled_differs(backbone_factory, name):
    base = backbone_factory(name)
    batch = sample_batch(base.chat)
    expected = logits(base.model, batch)
    model, mechanism = attach_mechanism(backbone_factory(name), mech("lora", r=4, alpha=8, dropout=0.0))
    model.eval()
    perturb(model)
    assert not torch.allclose(logits(model, batch), expected)
    with mechanism.disabled():
        assert torch.equal(logits(model, batch), expected)


@pytest.mark.parametrize("name", MODELS)
def test_reloaded_checkpoint_reproduces_logits(backbone_factory, name, tmp_path):
    bb = backbone_factory(name)
    model, _ = attach_mechanism(bb, mech("lora", r=4, alpha=8, dropout=0.0))
    model.eval()
    perturb(model)
    batch = sample_batch(bb.chat)
    expected = logits(model, batch)
    path = save_checkpoint(tmp_path / "final.safetensors", trainable_state(model), {"x": 1}, bb.fingerprint)
    tensors, header = read_checkpoint(path)
    assert header["fingerprint"] == bb.fingerprint and header["config"] == {"x": 1}
    fresh, _ = attach_mechanism(backbone_factory(name), mech("lora", r=4, alpha=8, dropout=0.0))
    fresh.eval()
    load_trainable(fresh, tensors, "test")
    assert torch.equal(logits(fresh, batch), expected)


@pytest.mark.parametrize("name", MODELS)
def test_exported_peft_adapter_loads_with_peft(backbone_factory, name, tmp_path):
    from peft import PeftModel

    bb = backbone_factory(name)
    model, mechanism = attach_mechanism(bb, mech("lora", r=4, alpha=8, dropout=0.0))
    model.eval()
    perturb(model)
    batch = sample_batch(bb.chat)
    expected = logits(model, batch)
    mechanism.export(tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    loaded = PeftModel.from_pretrained(backbone_factory(name).model, tmp_path / "adapter").eval()
    assert torch.equal(logits(loaded, batch), expected)
