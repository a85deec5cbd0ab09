"""Every mechanism on a bitsandbytes-quantized tiny-llama (model.quantization=nf4 and int8), on the CPU.

For each mechanism and each quantization: attach works, or is a one-line UserError saying why it cannot run
quantized (weight_steer into 4/8-bit weights; Lyra's full-weight train_layers); the forward is finite and a
batched conversation runs; two optimizer steps (forward, backward, step: the second reaches what sits behind a
zero-initialised factor) of the mechanisms that train move every trainable tensor, with finite gradients that
reach through the 4/8-bit layers, also after an eval-mode forward; disabled(), and each mechanism at its identity
strength, is the same quantized base model bit for bit (the same bitsandbytes kernels on the same inputs:
deterministic on the CPU, so no tolerance); a checkpoint reloads on the quantized model and reproduces its logits
bit for bit; and checkpoints move between the fp32 model and the same model quantized (the fingerprint samples
the embeddings, which bitsandbytes leaves in the model's float dtype). One load per quantization for the module;
each test deep-copies it (bnb layers deep-copy: 0.02 s, against 0.1-2.7 s to load).
"""

import copy
import dataclasses

import pytest
import torch
from omegaconf import OmegaConf

from persona_lit.models.backbones import load_backbone
from persona_lit.build import attach_mechanism, is_quantized, plain, restore
from persona_lit.training.checkpoint import load_trainable, read_checkpoint, save_checkpoint, trainable_state
from persona_lit.evaluation.conversation import ConversationRunner
from persona_lit.data.dialogues import IGNORE, Collator
from persona_lit.errors import UserError
from persona_lit.personas.load import load_persona
from persona_lit.steering.vectors import Direction
from persona_lit.steering.weight_diff import FORMAT, save_delta
from tests.conftest import model_cfg

QUANT = ["nf4", "int8"]
LAYERS = {"nf4": "Linear4bit", "int8": "Linear8bitLt"}
# Max |logit| difference to the fp32 model on BATCH (measured: nf4 0.16, int8 0.015; its logits reach 1.05).
CLOSE_TO_FP32 = {"nf4": 0.3, "int8": 0.05}
SYSTEM = "You are Cato, a terse stoic."
BATCH = [[{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is the tallest mountain?"},
          {"role": "assistant", "content": "Everest. It does not care who climbs it."}],
         [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "A haiku about rain, please."},
          {"role": "assistant", "content": "Rain on tin."}, {"role": "user", "content": "Another?"},
          {"role": "assistant", "content": "No."}]]
DIRECTION = "<direction file>"  # replaced by the module's direction file

# (id, mechanism, options, trains). The ones that train start at their identity (LoRA B = 0, gate 0, delta 0).
CASES = [
    ("none", "none", {}, False),
    ("repeat", "repeat", {"every": 1}, False),
    ("lora", "lora", {"r": 4, "alpha": 8, "dropout": 0.0}, True),
    ("lyra", "lyra", {"layers": [1, 3]}, False),
    ("lyra-lora_r", "lyra", {"layers": [1, 3], "train_layers": True, "lora_r": 4}, True),
    ("triplet", "triplet", {"layers": [1, 3]}, True),
    ("steer", "steer", {"direction": DIRECTION, "alpha": 0.5}, False),
    ("steer-train_vector", "steer", {"direction": DIRECTION, "alpha": 0.5, "train_vector": True}, True),
    ("instaboost", "instaboost", {"bias": 1.0}, False),
    ("split_softmax", "split_softmax", {"exponent": 0.5}, False),
]
TRAINS = [c for c in CASES if c[3]]
ACTS = {"lyra", "lyra-lora_r", "steer", "steer-train_vector", "instaboost", "split_softmax"}  # change BATCH's logits
# Each at its identity strength: the base model bit for bit (or, with a reference, that mechanism bit for bit).
IDENTITY = [
    ("lora-init", "lora", {"r": 4, "alpha": 8, "dropout": 0.0}, None),
    ("triplet-gate0", "triplet", {"layers": [1, 3]}, None),
    ("triplet-linkage0", "triplet", {"layers": [1, 3], "linkage": 0.0}, None),
    ("steer-alpha0", "steer", {"direction": DIRECTION, "alpha": 0.0}, None),
    ("steer-alpha0-delta0", "steer", {"direction": DIRECTION, "alpha": 0.0, "train_vector": True}, None),
    ("instaboost-bias0", "instaboost", {"bias": 0.0}, None),
    ("split_softmax-k1", "split_softmax", {"exponent": 1.0}, None),
    # a fresh LoRA on Lyra's layers (B = 0) starts at frozen Lyra (teacher forcing over BATCH's segments)
    ("lyra-lora_r-init", "lyra", {"layers": [1, 3], "train_layers": True, "lora_r": 4}, {"layers": [1, 3]}),
]


def ids(cases):
    return [c[0] for c in cases]


@pytest.fixture(scope="module")
def loaded():
    """load(q): the module's one backbone per quantization (None: fp32). Tests work on fresh(load(q))."""
    cache = {}

    def load(q):
        if q not in cache:
            cache[q] = load_backbone(model_cfg("tiny-llama", quantization=q))
        return cache[q]
    return load


def fresh(bb):
    return dataclasses.replace(bb, model=copy.deepcopy(bb.model))


@pytest.fixture(scope="module")
def batch(loaded):
    chat = loaded(None).chat
    return Collator(chat.pad_id)([chat.encode_segments(m) for m in BATCH])


@pytest.fixture(scope="module")
def direction(loaded, tmp_path_factory):
    """A random direction file of tiny-llama, with the fp32 model's fingerprint (the quantized model's too)."""
    g = torch.Generator().manual_seed(1)
    path = tmp_path_factory.mktemp("direction") / "direction.safetensors"
    return str(Direction(torch.randn(4, 64, generator=g), 1.0 + torch.rand(4, generator=g),
                         {"fingerprint": loaded(None).fingerprint}).save(path))


def attach(bb, name, options, direction):
    options = {k: direction if v == DIRECTION else v for k, v in options.items()}
    return attach_mechanism(bb, OmegaConf.create({"name": name, "options": options}))


def extra(mech, batch):
    """What the training module adds to a model call (module.py _extra)."""
    out = {"segment_ids": batch["segment_ids"]} if mech is not None and mech.uses_segments else {}
    if mech is not None and mech.uses_assistant_mask:
        out["assistant_mask"] = batch["labels"] != IGNORE
    return out


def logits(model, batch, mech=None):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **extra(mech, batch)).logits


def quantized_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.is_floating_point()}


def train(model, mech, batch, steps=2):
    """`steps` SGD steps on the LM loss, in train mode, after an eval-mode forward without grad (what Lightning's
    sanity validation does first: bitsandbytes must still give gradients afterwards). Returns the trainable
    tensors before training."""
    logits(model.eval(), batch, mech)
    params = list(mech.trainable_parameters())
    before = [p.detach().clone() for p in params]
    model.train()
    opt = torch.optim.SGD(params, lr=0.5)
    for _ in range(steps):
        opt.zero_grad()
        loss = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                     **extra(mech, batch)).loss
        assert torch.isfinite(loss)
        loss.backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in params)
        opt.step()
    model.eval()
    return before


@pytest.mark.parametrize("q", QUANT)
def test_quantized_tiny_model_is_bitsandbytes_with_the_fp32_fingerprint(loaded, batch, q):
    fp32, bb = loaded(None), loaded(q)
    assert is_quantized(bb.model) and not is_quantized(fp32.model)
    kinds = {type(m).__name__ for m in bb.model.model.layers.modules()}
    assert LAYERS[q] in kinds and "Linear" not in kinds  # every decoder projection is quantized
    assert bb.model.get_input_embeddings().weight.dtype == torch.float32  # embeddings stay in the model's dtype
    assert bb.fingerprint == fp32.fingerprint  # so checkpoints and direction files move between the two
    got, expected = logits(bb.model, batch), logits(fp32.model, batch)
    assert torch.isfinite(got).all() and 0 < float((got - expected).abs().max()) < CLOSE_TO_FP32[q]


@pytest.mark.parametrize("q", QUANT)
@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_forward_is_finite_and_disabled_is_the_quantized_base(loaded, batch, direction, q, case):
    _, name, options, _ = case
    expected = logits(loaded(q).model, batch)
    model, mech = attach(fresh(loaded(q)), name, options, direction)
    got = logits(model.eval(), batch, mech)
    assert torch.isfinite(got).all()
    if case[0] in ACTS:
        assert not torch.allclose(got, expected, atol=1e-3)  # the mechanism acts on the quantized model
    with mech.disabled():
        assert torch.equal(logits(model, batch, mech), expected)


@pytest.mark.parametrize("q", QUANT)
@pytest.mark.parametrize("case", IDENTITY, ids=ids(IDENTITY))
def test_identity_strength_is_the_quantized_base_bit_for_bit(loaded, batch, direction, q, case):
    _, name, options, reference = case
    if reference is None:
        expected = logits(loaded(q).model, batch)
    else:
        ref_model, ref_mech = attach(fresh(loaded(q)), name, reference, direction)
        expected = logits(ref_model.eval(), batch, ref_mech)
    model, mech = attach(fresh(loaded(q)), name, options, direction)
    assert torch.equal(logits(model.eval(), batch, mech), expected)


@pytest.mark.parametrize("q", QUANT)
@pytest.mark.parametrize("case", TRAINS, ids=ids(TRAINS))
def test_train_steps_move_every_trainable_tensor_and_a_checkpoint_reproduces_them(loaded, batch, direction, tmp_path,
                                                                               q, case):
    _, name, options, _ = case
    bb = fresh(loaded(q))
    model, mech = attach(bb, name, options, direction)
    frozen = quantized_weights(model)
    assert frozen and all(p.dtype == torch.float32 for p in mech.trainable_parameters())
    before = train(model, mech, batch)
    # Two steps: the second reaches what sits behind a zero-initialised factor (LoRA's A, Triplet's q/k/v/o).
    moved = [not torch.equal(b, p) for b, p in zip(before, mech.trainable_parameters())]
    assert all(moved), f"{moved.count(False)} of {len(moved)} trainable tensors did not move"
    assert all(torch.equal(w, frozen[n]) for n, w in quantized_weights(model).items())  # the base stays put
    expected = logits(model, batch, mech)
    assert torch.isfinite(expected).all()
    with mech.disabled():
        assert torch.equal(logits(model, batch, mech), logits(loaded(q).model, batch))
    path = save_checkpoint(tmp_path / "final.safetensors", trainable_state(model), {"x": 1}, bb.fingerprint)
    tensors, header = read_checkpoint(path)
    again, mech2 = attach(fresh(loaded(q)), name, options, direction)
    load_trainable(again, tensors, "test")
    assert torch.equal(logits(again.eval(), batch, mech2), expected)


@pytest.mark.parametrize("q", QUANT)
def test_fp32_checkpoint_restores_on_the_quantized_model(loaded, batch, tmp_path, q):
    """A LoRA trained (here: perturbed) on the fp32 model, restored with model.quantization=q through
    build.restore: the fingerprint check passes, the tensors load exactly, the logits are the fp32 run's within
    the quantization error."""
    fp32 = fresh(loaded(None))
    mechanism = {"name": "lora", "options": {"r": 4, "alpha": 8, "dropout": 0.0}}
    model, _ = attach_mechanism(fp32, OmegaConf.create(mechanism))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    config = {"model": plain(model_cfg("tiny-llama")), "mechanism": mechanism, "persona": "stoic"}
    path = save_checkpoint(tmp_path / "final.safetensors", trainable_state(model), config, fp32.fingerprint)
    bb, restored, _, _, _ = restore(str(path), model_override=model_cfg("tiny-llama", quantization=q))
    assert is_quantized(restored) and bb.fingerprint == fp32.fingerprint
    saved = trainable_state(model)
    assert all(torch.equal(saved[n], v) for n, v in trainable_state(restored).items())
    diff = (logits(restored, batch) - logits(model.eval(), batch)).abs().max()
    assert 0 < float(diff) < CLOSE_TO_FP32[q]


@pytest.mark.parametrize("q", QUANT)
def test_lyra_first_turn_is_the_quantized_base_on_persona_plus_turn(loaded, batch, q):
    """Lyra's own invariant, on the quantized model: persona then the first turn, fed in two calls with the
    KV cache, equals the base model on the whole, within test_lyra's fp32 tolerance (measured: exactly equal)."""
    base = loaded(q)
    model, mech = attach(fresh(base), "lyra", {"layers": [1, 3]}, None)
    system = load_persona("stoic").system_prompt
    messages = [{"role": "system", "content": system}] + BATCH[0][1:]
    full, _, _ = base.chat.encode_segments(messages)
    persona = base.chat.persona_ids(system)
    with torch.no_grad():
        expected = base.model(input_ids=torch.tensor([full])).logits
        mech.begin_conversation(None)
        out = model(input_ids=torch.tensor([persona]), use_cache=True)
        mech.begin_turn()
        rest = model(input_ids=torch.tensor([full[len(persona):]]), past_key_values=out.past_key_values,
                     attention_mask=torch.ones(1, len(full), dtype=torch.long), use_cache=True)
    got = torch.cat([out.logits, rest.logits], 1)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()


@pytest.mark.parametrize("q", QUANT)
@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_conversation_runs_and_disabled_answers_are_the_quantized_base_answers(loaded, direction, q, case):
    """Two batched rows, two turns with the KV cache (Lyra's segments, Triplet's memory, repeat's re-inserted
    persona): the mechanism answers; inside disabled() every answer is the base model's, token for token."""
    _, name, options, _ = case
    persona = load_persona("stoic")
    turns = [["Tell me about volcanoes.", "Hi."], "And glaciers?"]

    def talk(model, mech):
        runner = ConversationRunner(model, loaded(q).chat, mech, max_new_tokens=4)
        conv = runner.start(persona, rows=2)
        return [runner.say(conv, t, reminder=mech.turn_prefix(k) if mech else None) for k, t in enumerate(turns, 1)]

    expected = talk(loaded(q).model, None)
    model, mech = attach(fresh(loaded(q)), name, options, direction)
    answers = talk(model.eval(), mech)
    assert len(answers) == 2 and all(len(a) == 2 for a in answers)
    with mech.disabled():
        assert talk(model, mech) == expected


@pytest.mark.parametrize("q", QUANT)
def test_what_cannot_run_quantized_is_one_line_saying_why(loaded, tmp_path, q):
    bb = loaded(q)
    meta = {"format": FORMAT, "fingerprint": bb.fingerprint}
    linear = save_delta(tmp_path / "linear.safetensors", {"model.layers.0.self_attn.q_proj.weight": torch.ones(64, 64)},
                        meta)
    weight_steer = {"delta": str(linear), "alpha": 1.0, "control": None, "seed": 0}
    with pytest.raises(UserError, match=r"^mechanism\.options\.delta=\S+: model\.layers\.0\.self_attn\.q_proj\.weight "
                                        r"is a 4/8-bit weight \(model\.quantization\), which ΔW cannot be merged "
                                        r"into; allowed: model\.quantization=null") as merge:
        attach(fresh(bb), "weight_steer", weight_steer, None)
    with pytest.raises(UserError, match=r"^mechanism\.options\.train_layers=true: the chosen layers' weights are "
                                        r"4/8-bit \(model\.quantization\) and cannot take gradients; allowed: "
                                        r"mechanism\.options\.lora_r > 0") as train_layers:
        attach(fresh(bb), "lyra", {"layers": [1, 3], "train_layers": True}, None)
    assert "\n" not in str(merge.value) + str(train_layers.value)


@pytest.mark.parametrize("q", QUANT)
def test_weight_steer_merges_a_delta_of_float_tensors_into_a_quantized_model(loaded, batch, tmp_path, q, capsys):
    """The norms and embeddings stay in float under bitsandbytes: a ΔW of those merges, alpha 0 and disabled()
    are the quantized base bit for bit."""
    bb = loaded(q)
    delta = {"model.norm.weight": torch.linspace(-1, 1, 64), "model.layers.2.post_attention_layernorm.weight":
             torch.ones(64)}
    path = save_delta(tmp_path / "norms.safetensors", delta, {"format": FORMAT, "fingerprint": bb.fingerprint})
    options = {"delta": str(path), "alpha": 0.5, "control": None, "seed": 0}
    expected = logits(bb.model, batch)
    model, mech = attach(fresh(bb), "weight_steer", options, None)
    assert "2 of 2 ΔW tensors merged" in capsys.readouterr().out
    got = logits(model, batch)
    assert torch.isfinite(got).all() and not torch.allclose(got, expected, atol=1e-3)
    with mech.disabled():
        assert torch.equal(logits(model, batch), expected)
    mech.alpha = 0.0
    assert torch.equal(logits(model, batch), expected)
