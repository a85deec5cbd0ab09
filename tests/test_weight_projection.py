"""task=weight_projection: a checkpoint's effective weight change (read through the identity) is exactly PEFT's
s·B·A for a LoRA and the trained weight for Lyra; projections and the correlation are checked by hand."""

import json
import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from persona_lit.build import attach_mechanism, plain
from persona_lit.training.checkpoint import save_checkpoint, trainable_state
from persona_lit.errors import UserError
from persona_lit.personas.load import load_persona, persona_to_dict
from persona_lit.steering.weight_diff import FORMAT, save_delta
from persona_lit.steering.weight_projection import correlation, effective_weights, project
from tests.conftest import REPO, model_cfg


def mech(name, **options):
    return OmegaConf.create({"name": name, "options": options})


LORA = dict(r=4, alpha=8, dropout=0.0, target_modules=None, init_lora_weights=False)
LYRA = dict(layers=[1], train_layers=True, lora_r=0, lora_alpha=None, history_window=0)


def checkpoint(bb, mechanism, path, perturb=None):
    model, m = attach_mechanism(bb, mechanism)
    if perturb:
        perturb(model)
    config = {"model": plain(model_cfg("tiny-llama")), "mechanism": plain(mechanism),
              "persona": persona_to_dict(load_persona("stoic")), "data": {}, "seed": 0}
    return save_checkpoint(path, trainable_state(model), config, bb.fingerprint), model


def test_lora_change_is_pefts_delta_weight(backbone_factory, tmp_path):
    bb = backbone_factory("tiny-llama")
    base = {k: v.detach().clone() for k, v in bb.model.named_parameters()}
    _, model = checkpoint(bb, mech("lora", **LORA), tmp_path / "a.safetensors")
    names = [k for k in base if k.endswith(("q_proj.weight", "down_proj.weight"))]
    eff = effective_weights(model, names)
    for name in names:
        layer = model.get_submodule("base_model.model." + name.removesuffix(".weight"))
        expected = base[name] + layer.get_delta_weight("default")
        assert torch.allclose(eff[name], expected, atol=1e-5), name
        assert (eff[name] - base[name]).abs().max() > 1e-4  # the adapter really changed it
    change = {k: eff[k] - base[k] for k in names}
    doubled = project(change, {k: 2 * v for k, v in change.items()})
    assert doubled["overall"]["coefficient"] == pytest.approx(0.5, rel=1e-5)
    assert doubled["overall"]["cosine"] == pytest.approx(1.0, rel=1e-5)
    assert len(doubled["layers"]) >= 2 and all(v["cosine"] == pytest.approx(1.0, rel=1e-5) for v in doubled["layers"].values())
    g = torch.Generator().manual_seed(0)
    rand = {k: torch.randn(v.shape, generator=g) for k, v in change.items()}
    assert abs(project(change, rand)["overall"]["cosine"]) < 0.1
    flipped = project(change, {k: -v for k, v in change.items()})
    assert flipped["overall"]["coefficient"] == pytest.approx(-1.0, rel=1e-5)


def test_lyra_trained_layer_change_is_exact_and_other_layers_zero(backbone_factory, tmp_path):
    bb = backbone_factory("tiny-llama")
    base = {k: v.detach().clone() for k, v in bb.model.named_parameters()}
    bump = torch.randn_like(base["model.layers.1.self_attn.q_proj.weight"]) * 0.01

    def perturb(model):
        with torch.no_grad():
            model.get_submodule("model.layers.1.self_attn.base.q_proj").weight.add_(bump)

    _, model = checkpoint(bb, mech("lyra", **LYRA), tmp_path / "l.safetensors", perturb)
    names = ["model.layers.1.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.weight",
             "model.layers.1.mlp.up_proj.weight"]
    eff = effective_weights(model, names)
    assert torch.allclose(eff[names[0]] - base[names[0]], bump, atol=1e-6)
    assert torch.equal(eff[names[1]], base[names[1]]) or torch.allclose(eff[names[1]], base[names[1]], atol=1e-7)
    assert torch.allclose(eff[names[2]], base[names[2]], atol=1e-7)


def test_correlation_by_hand():
    assert correlation([1, 2], [3, 4])["pearson"] is None
    c = correlation([1, 2, 3, 4, 5], [2, 4, 5, 4, 5])
    xs, ys = [1, 2, 3, 4, 5], [2, 4, 5, 4, 5]
    mx, my = 3, 4
    r = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / math.sqrt(
        sum((x - mx) ** 2 for x in xs) * sum((y - my) ** 2 for y in ys))
    assert c["pearson"] == pytest.approx(r) and c["pearson_ci95"][0] < r < c["pearson_ci95"][1]
    assert c["spearman"] == pytest.approx(correlation([1, 2, 3, 4, 5], [1, 2.5, 4.5, 2.5, 4.5])["pearson"])  # ties: mean ranks


def test_task_on_two_checkpoints(backbone_factory, tmp_path):
    bb = backbone_factory("tiny-llama")
    base = {k: v.detach().clone() for k, v in bb.model.named_parameters()}
    a, model = checkpoint(bb, mech("lora", **LORA), tmp_path / "a" / "final.safetensors")
    names = [k for k in base if k.endswith(("v_proj.weight", "o_proj.weight"))]
    delta = {k: v - base[k] for k, v in effective_weights(model, names).items()}
    save_delta(tmp_path / "delta.safetensors", delta, {"format": FORMAT, "fingerprint": bb.fingerprint})
    b, _ = checkpoint(backbone_factory("tiny-llama"), mech("lyra", **LYRA), tmp_path / "b" / "final.safetensors")
    # fake drift evaluations are not needed: the behaviour part is read from results.json files
    for d, v in (("ea", 0.5), ("eb", -0.1)):
        (tmp_path / d).mkdir()
        (tmp_path / d / "results.json").write_text(json.dumps({"metrics": {"vs_baseline/likelihood_margin": {
            "turn": [0, 4], "mean": [0.0, v], "ci_low": [0.0, v - 0.1], "ci_high": [0.0, v + 0.1]}}}))
    from persona_lit.steering.weight_projection import run_task

    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        cfg = compose("evaluate", overrides=[
            "model=tiny-llama", "task=weight_projection", f"task.delta={tmp_path / 'delta.safetensors'}",
            f"task.ckpts=[{a},{b}]", f"task.evals=[{tmp_path / 'ea'},{tmp_path / 'eb'}]", "task.labels=[lora,lyra]",
            f"out_dir={tmp_path / 'out'}"])
        run_task(cfg)
        results = json.loads((tmp_path / "out" / "results.json").read_text())
        rows = {r["label"]: r for r in results["rows"]}
        assert rows["lora"]["overall"]["coefficient"] == pytest.approx(1.0, rel=1e-4)
        assert rows["lyra"]["overall"]["coefficient"] == pytest.approx(0.0, abs=1e-6)  # untrained Lyra layers
        assert rows["lora"]["behaviour"] == 0.5 and results["correlation"]["n"] == 2
        assert (tmp_path / "out" / "projection.png").is_file() and "| lora | lora |" in (
            tmp_path / "out" / "report.md").read_text()
        bad = compose("evaluate", overrides=["model=tiny-llama", "task=weight_projection",
                                             f"task.delta={tmp_path / 'delta.safetensors'}", f"task.ckpts=[{a}]",
                                             f"task.evals=[{tmp_path / 'ea'}]", "task.turn=3",
                                             f"out_dir={tmp_path / 'o2'}"])
        with pytest.raises(UserError, match="turn 3 is not a probe turn"):
            run_task(bad)
        assert not (tmp_path / "o2").exists()
