"""ΔW from two PEFT adapters (task=weight_diff) against PEFT's own merge_and_unload, and `mechanism=weight_steer`:
alpha 0 == base, bit-exact restore over merge/restore cycles (fp32, bf16, cast after attach), the random control,
the conversation runner, and one-line errors."""

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file

from persona_lit.build import attach_mechanism
from persona_lit.evaluation.conversation import ConversationRunner
from persona_lit.errors import UserError
from persona_lit.personas.load import load_persona
from persona_lit.steering.weight_diff import build_delta, load_delta, merged_delta, random_like, save_delta
from tests.conftest import run_cli, sample_batch, mechanism_cfg

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (model, targets, pos adapter options, neg adapter options): ranks, alphas, rsLoRA and patterns differ per side
CASES = [
    ("tiny-llama", ALL, dict(r=4, lora_alpha=8), dict(r=8, lora_alpha=32)),
    ("tiny-llama", ["q_proj", "v_proj"], dict(r=2, lora_alpha=16, use_rslora=True), dict(r=6, lora_alpha=4)),
    ("tiny-gemma3", ["o_proj", "gate_proj", "down_proj"], dict(r=8, lora_alpha=16, use_rslora=True),
     dict(r=4, lora_alpha=4, use_rslora=True)),
    ("tiny-gemma3", ["q_proj", "up_proj"], dict(r=4, lora_alpha=8, rank_pattern={"q_proj": 2},
                                                alpha_pattern={"up_proj": 3}), dict(r=3, lora_alpha=5)),
]
IDS = ["llama-all", "llama-qv-rslora-pos", "gemma-ogd-rslora", "gemma-patterns"]


def weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def adapter(backbone_factory, name, path, targets, seed, **options):
    """A PEFT adapter with random non-zero A and B saved to `path`; returns PEFT's own merged weights."""
    torch.manual_seed(seed)
    config = LoraConfig(target_modules=targets, init_lora_weights=False, lora_dropout=0.0, **options)
    peft_model = get_peft_model(backbone_factory(name).model, config)
    peft_model.save_pretrained(path)
    return weights(peft_model.merge_and_unload())


def make_pair(backbone_factory, tmp_path, name, targets, pos, neg):
    w_pos = adapter(backbone_factory, name, tmp_path / "pos", targets, 1, **pos)
    w_neg = adapter(backbone_factory, name, tmp_path / "neg", targets, 2, **neg)
    return w_pos, w_neg


@pytest.mark.parametrize("name,targets,pos,neg", CASES, ids=IDS)
def test_delta_is_peft_merged_pos_minus_merged_neg(backbone_factory, tmp_path, capsys, name, targets, pos, neg):
    w_pos, w_neg = make_pair(backbone_factory, tmp_path, name, targets, pos, neg)
    base = backbone_factory(name)
    w_base = weights(base.model)
    delta, meta = build_delta(tmp_path / "pos", tmp_path / "neg", base.model)
    changed = {k for k in w_base if not torch.equal(w_pos[k], w_base[k])}
    layers = base.model.config.num_hidden_layers
    assert set(delta) == changed and len(delta) == layers * len(targets)
    assert f"{len(delta)} modules found, {len(delta)} matched" in capsys.readouterr().out
    for k, d in delta.items():
        expected = (w_pos[k] - w_base[k]) - (w_neg[k] - w_base[k])
        assert float(expected.norm()) > 1e-2 * float(w_base[k].norm())  # not a trivial difference
        torch.testing.assert_close(d, expected, rtol=1e-5, atol=2e-6)
    scales = json.loads(meta["scales_pos"])
    assert len(scales) == len(delta) and meta["fingerprint"] == base.fingerprint
    # saved and read back: safetensors keyed by the model's own parameter names, metadata intact
    path = save_delta(tmp_path / "d.safetensors", delta, meta)
    back, back_meta = load_delta(path)
    assert back.keys() == delta.keys() and all(torch.equal(back[k], delta[k]) for k in delta)
    assert back_meta["pos"] == str(tmp_path / "pos") and back_meta["scales_neg"] == meta["scales_neg"]


@pytest.fixture
def delta_file(backbone_factory, tmp_path):
    """(model name, path of a ΔW file) for tiny-llama, q/v/down adapters."""
    def make(name="tiny-llama", dtype="float32"):
        make_pair(backbone_factory, tmp_path, name, ["q_proj", "v_proj", "down_proj"], dict(r=4, lora_alpha=8),
                  dict(r=2, lora_alpha=8, use_rslora=True))
        bb = backbone_factory(name, dtype=dtype)
        return save_delta(tmp_path / f"d-{name}-{dtype}.safetensors",
                          *build_delta(tmp_path / "pos", tmp_path / "neg", bb.model))
    return make


def weight_steer(bb, path, **options):
    cfg = mechanism_cfg("weight_steer")
    cfg.options.delta = str(path)
    for k, v in options.items():
        cfg.options[k] = v
    return attach_mechanism(bb, cfg)


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("name,dtype", [("tiny-llama", "float32"), ("tiny-llama", "bfloat16"),
                                        ("tiny-gemma3", "float32"), ("tiny-gemma3", "bfloat16")])
def test_alpha_zero_is_base_and_restore_is_bit_exact(backbone_factory, delta_file, capsys, name, dtype):
    path = delta_file(name, dtype)
    delta, _ = load_delta(path)
    base = backbone_factory(name, dtype=dtype)
    batch = sample_batch(base.chat)
    w_base, expected = weights(base.model), logits(base.model, batch)
    bb = backbone_factory(name, dtype=dtype)
    model, mech = weight_steer(bb, path, alpha=0.0)
    assert f"{len(delta)} of {len(delta)} ΔW tensors merged" in capsys.readouterr().out
    assert same(weights(model), w_base) and torch.equal(logits(model, batch), expected)
    assert not list(mech.trainable_parameters())
    mech.alpha = 2.0
    merged = weights(model)
    for k in w_base:  # exactly W + alpha·ΔW on ΔW's tensors (computed in fp32), nothing else touched
        want = (w_base[k].float() + 2.0 * delta[k]).to(w_base[k].dtype) if k in delta else w_base[k]
        assert torch.equal(merged[k], want), k
    steered = logits(model, batch)
    assert not torch.allclose(steered.float(), expected.float(), atol=1e-2)
    for _ in range(3):  # merge/restore cycles: originals and the merged weights come back bit for bit
        with mech.disabled():
            assert same(weights(model), w_base) and torch.equal(logits(model, batch), expected)
            with mech.disabled():  # nested: still the base model
                assert same(weights(model), w_base)
            assert same(weights(model), w_base)
        assert same(weights(model), merged) and torch.equal(logits(model, batch), steered)
    mech.alpha = 0.0
    assert same(weights(model), w_base)
    with merged_delta(model, delta, 2.0) as n:  # the standalone context manager: same merge, then restored
        assert n == len(delta) and same(weights(model), merged)
    assert same(weights(model), w_base)


def test_cast_after_attach_merges_again_and_restores_the_cast_base(backbone_factory, delta_file):
    path = delta_file()
    delta, _ = load_delta(path)
    base = backbone_factory("tiny-llama").model.to(torch.bfloat16)
    w_base, batch = weights(base), sample_batch(backbone_factory("tiny-llama").chat)
    model, mech = weight_steer(backbone_factory("tiny-llama"), path, alpha=1.5)
    model.to(torch.bfloat16)  # as evaluation does after attach (precision=bf16)
    logits(model, batch)  # the next forward merges again from the cast originals
    for k, w in weights(model).items():
        want = (w_base[k].float() + 1.5 * delta[k]).to(torch.bfloat16) if k in delta else w_base[k]
        assert torch.equal(w, want), k
    with mech.disabled():
        assert same(weights(model), w_base) and torch.equal(logits(model, batch), logits(base, batch))


def test_random_control_has_each_tensors_norm_and_another_direction(backbone_factory, delta_file):
    path = delta_file()
    delta, _ = load_delta(path)
    r0, r0b, r1 = random_like(delta, 0), random_like(delta, 0), random_like(delta, 1)
    assert same(r0, r0b) and not same(r0, r1)
    for k in delta:
        torch.testing.assert_close(r0[k].norm(), delta[k].norm(), rtol=1e-5, atol=0)
        cos = float((r0[k] * delta[k]).sum() / (r0[k].norm() * delta[k].norm()))
        assert abs(cos) < 0.2, k
    w_base = weights(backbone_factory("tiny-llama").model)
    model, mech = weight_steer(backbone_factory("tiny-llama"), path, alpha=1.0, control="random", seed=1)
    for k, w in weights(model).items():
        assert torch.equal(w, (w_base[k] + r1[k]) if k in delta else w_base[k]), k
    with mech.disabled():
        assert same(weights(model), w_base)


def test_runner_answers_are_those_of_the_merged_model_and_disabled_is_the_base(backbone_factory, delta_file):
    path = delta_file()
    delta, _ = load_delta(path)
    persona, turns = load_persona("stoic"), ["Tell me about volcanoes.", "And glaciers?"]

    def answers(model, chat, mech):
        runner = ConversationRunner(model, chat, mech, max_new_tokens=8)
        conv = runner.start(persona)
        return [runner.say(conv, t) for t in turns]

    ref = backbone_factory("tiny-llama")
    base_answers = answers(ref.model, ref.chat, None)
    with merged_delta(ref.model, delta, 4.0):
        merged_answers = answers(ref.model, ref.chat, None)
    bb = backbone_factory("tiny-llama")
    model, mech = weight_steer(bb, path, alpha=4.0)
    assert answers(model, bb.chat, mech) == merged_answers != base_answers
    with mech.disabled():
        assert answers(model, bb.chat, mech) == base_answers


def rewrite(directory, keys=None, **config):
    """Edits a saved adapter in place: its tensor names (fn) and adapter_config.json entries."""
    if keys is not None:
        tensors = load_file(directory / "adapter_model.safetensors")
        save_file({keys(k): v for k, v in tensors.items()}, directory / "adapter_model.safetensors")
    cfg = json.loads((directory / "adapter_config.json").read_text())
    (directory / "adapter_config.json").write_text(json.dumps({**cfg, **config}))


BAD = [
    # the original bug: names that map to nothing -> zero matched
    (lambda d: [rewrite(d.parent / s, keys=lambda k: k.replace("base_model.model.model.", "base_model.model."))
                for s in ("pos", "neg")], "16 of 16 adapter modules match no parameter"),
    (lambda d: rewrite(d, base_model_name_or_path="some/other-model"), "adapters of different base models"),
    (lambda d: rewrite(d, keys=lambda k: k.replace("layers.3.", "layers.9.")), "target different modules"),
    (lambda d: rewrite(d, r=5), "r=5 in adapter_config.json"),
    (lambda d: rewrite(d, use_dora=True), "use_dora=True is not supported"),
    (lambda d: rewrite(d, keys=lambda k: k.replace("lora_A", "lora_X")), "is not a LoRA factor"),
]


@pytest.mark.parametrize("spoil,message", BAD, ids=["zero-matched", "base", "targets", "rank", "dora", "key"])
def test_bad_adapters_are_one_line_errors(backbone_factory, tmp_path, spoil, message):
    make_pair(backbone_factory, tmp_path, "tiny-llama", ["q_proj", "k_proj", "v_proj", "o_proj"],
              dict(r=4, lora_alpha=8), dict(r=4, lora_alpha=8))
    spoil(tmp_path / "pos")
    with pytest.raises(UserError, match=message) as e:
        build_delta(tmp_path / "pos", tmp_path / "neg", backbone_factory("tiny-llama").model)
    assert "\n" not in str(e.value)


def test_adapters_of_another_model_and_bad_delta_files_are_errors(backbone_factory, tmp_path, delta_file):
    make_pair(backbone_factory, tmp_path / "g", "tiny-gemma3", ["q_proj"], dict(r=2, lora_alpha=2),
              dict(r=2, lora_alpha=2))
    with pytest.raises(UserError, match="2 of 6 adapter modules match no parameter"):  # gemma's layers 4, 5
        build_delta(tmp_path / "g" / "pos", tmp_path / "g" / "neg", backbone_factory("tiny-llama").model)
    path = delta_file()
    delta, meta = load_delta(path)
    with pytest.raises(UserError, match="built for another base model"):
        weight_steer(backbone_factory("tiny-gemma3"), path)
    extra = save_delta(tmp_path / "x.safetensors", {**delta, "model.layers.9.mlp.up_proj.weight": torch.ones(2, 2)},
                       meta)
    with pytest.raises(UserError, match="1 of 13 tensors match no parameter"):
        weight_steer(backbone_factory("tiny-llama"), extra)
    for bad, msg in (({"delta": None}, "give the path"), ({"control": "noise"}, "allowed: null, random"),
                     ({"alpha": "x"}, "finite number")):
        with pytest.raises(UserError, match=msg):
            weight_steer(backbone_factory("tiny-llama"), path, **bad)
    with pytest.raises(UserError, match="no such file"):
        weight_steer(backbone_factory("tiny-llama"), tmp_path / "missing.safetensors")


def test_task_weight_diff_cli(backbone_factory, tmp_path):
    make_pair(backbone_factory, tmp_path, "tiny-llama", ["q_proj", "v_proj"], dict(r=4, lora_alpha=8),
              dict(r=4, lora_alpha=8, use_rslora=True))
    args = ["evaluate.py", "task=weight_diff", "model=tiny-llama", f"task.pos={tmp_path / 'pos'}"]
    ok = run_cli(*args, f"task.neg={tmp_path / 'neg'}", f"out_dir={tmp_path / 'out'}")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "8 modules found, 8 matched" in ok.stdout
    delta, meta = load_delta(tmp_path / "out" / "delta.safetensors")
    assert len(delta) == 8 and json.loads((tmp_path / "out" / "delta.json").read_text())["modules"] == "8"
    bad = run_cli(*args, f"task.neg={tmp_path / 'nowhere'}", f"out_dir={tmp_path / 'out2'}")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "task.neg=" in bad.stderr
    assert not (tmp_path / "out2").exists()


def test_composed_delta_files_add_with_their_weights(backbone_factory, delta_file, tmp_path):
    """delta=[a, b] weights=[1, -0.5]: W + alpha*(ΔW_a - 0.5*ΔW_b) tensor by tensor, keys of either file; restore exact."""
    path = delta_file()
    a, meta = load_delta(path)
    names = sorted(a)
    b = {k: torch.randn_like(v) * 0.01 for k, v in a.items() if k != names[0]}  # b lacks one tensor of a
    other = save_delta(tmp_path / "b.safetensors", b, meta)
    bb = backbone_factory("tiny-llama")
    before = weights(bb.model)
    def composed(**options):
        cfg = mechanism_cfg("weight_steer")
        cfg.options.delta = [str(path), str(other)]
        cfg.options.update(options)
        return attach_mechanism(bb, cfg)

    model, mech = composed(weights=[1.0, -0.5], alpha=2.0)
    for k in names:
        expected = before[k] + 2.0 * (a[k] - 0.5 * b[k] if k in b else a[k])
        assert torch.allclose(dict(model.named_parameters())[k], expected, atol=1e-6), k
    with mech.disabled():
        assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    with pytest.raises(UserError, match=r"weights=\[1.0\]: 1 weights for 2"):
        composed(weights=[1.0])
