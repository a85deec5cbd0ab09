"""`mechanism=steer` and `task=steer_sweep`: exactness invariants on tiny-llama and tiny-gemma3 over layer sets,
the runner against full recomputation, clean history, training steer_delta, and one-line errors."""

import pytest
import torch
from omegaconf import OmegaConf

from persona_lit.build import attach_mechanism
from persona_lit.evaluation.conversation import Conversation, ConversationRunner
from persona_lit.errors import UserError
from persona_lit.personas.load import load_persona
from persona_lit.steering.vectors import Direction, block_hooks, load_direction
from tests.conftest import model_cfg, run_cli, sample_batch, mechanism_cfg

CASES = [("tiny-llama", [0]), ("tiny-llama", [3]), ("tiny-llama", [1, 2]),
         ("tiny-gemma3", [0]), ("tiny-gemma3", [2, 5]), ("tiny-gemma3", [0, 1, 2, 3, 4, 5])]
IDS = [f"{m}-{'-'.join(map(str, l))}" for m, l in CASES]
TURNS = ["Tell me about volcanoes.", "And glaciers?", "Which is older, and why?"]


def direction_file(bb, path, seed=1, **meta):
    """A random direction for this backbone (its fingerprint in the metadata, as task=direction writes it)."""
    g = torch.Generator().manual_seed(seed)
    n, hidden = bb.model.config.num_hidden_layers, bb.model.config.hidden_size
    meta.setdefault("fingerprint", bb.fingerprint)
    return Direction(torch.randn(n, hidden, generator=g), 1.0 + torch.rand(n, generator=g), meta).save(path)


def steer(bb, path, **options):
    """attach mechanism=steer with conf/mechanism/steer.yaml's options, overridden by `options`."""
    cfg = mechanism_cfg("steer")
    cfg.options.direction = str(path)
    for k, v in options.items():
        cfg.options[k] = v
    return attach_mechanism(bb, cfg)


def logits(model, batch, **kwargs):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs).logits


def block_outputs(model, batch, layers, **kwargs):
    seen = {}
    with block_hooks(model, {i: (lambda h, kw, i=i: seen.__setitem__(i, h.clone())) for i in layers}):
        logits(model, batch, **kwargs)
    return seen


@pytest.mark.parametrize("name,layers", CASES, ids=IDS)
def test_alpha_zero_disabled_and_low_cap_are_the_base_model(backbone_factory, tmp_path, name, layers):
    base = backbone_factory(name)
    batch = sample_batch(base.chat)  # two rows, right-padded
    expected = logits(base.model, batch)
    bb = backbone_factory(name)
    model, mech = steer(bb, direction_file(bb, tmp_path / "d.safetensors"), layers=layers, alpha=0.0)
    assert torch.equal(logits(model, batch), expected) and not list(mech.trainable_parameters())
    mech.alpha = 3.0
    assert not torch.allclose(logits(model, batch), expected, atol=1e-3)
    with mech.disabled():
        assert torch.equal(logits(model, batch), expected)
    # a floor below every projection observed (padding included) changes nothing; one above every one does
    mech.alpha = 0.0
    seen = block_outputs(base.model, batch, layers)
    lowest = min(float((seen[i] @ mech.vectors[i].steer_unit).min()) / mech.vectors[i].norm for i in layers)
    highest = max(float((seen[i] @ mech.vectors[i].steer_unit).max()) / mech.vectors[i].norm for i in layers)
    mech.cap = lowest - 0.01
    assert torch.equal(logits(model, batch), expected)
    mech.cap = highest + 0.5
    assert not torch.allclose(logits(model, batch), expected, atol=1e-3)
    with mech.disabled():
        assert torch.equal(logits(model, batch), expected)


@pytest.mark.parametrize("name,layers", CASES[:2] + CASES[3:5], ids=IDS[:2] + IDS[3:5])
def test_steered_block_output_is_the_base_output_plus_the_vector_exactly(backbone_factory, tmp_path, name, layers):
    base, bb = backbone_factory(name), backbone_factory(name)
    path = direction_file(bb, tmp_path / "d.safetensors")
    model, mech = steer(bb, path, layers=layers[:1], alpha=2.5)
    d, layer, batch = load_direction(path), layers[0], sample_batch(base.chat)
    push = d.unit(layer) * (2.5 * float(d.activation_norm[layer]))
    before = block_outputs(base.model, batch, range(layer + 1))
    after = block_outputs(model, batch, range(layer + 1))  # our hooks run after the mechanism's
    for i in range(layer):
        assert torch.equal(after[i], before[i])  # blocks before the steered one: untouched
    assert torch.equal(after[layer], before[layer] + push)
    # positions=response with an assistant mask (as in training): only the masked positions move
    mech.positions = "response"
    mask = batch["labels"] != -100
    after = block_outputs(model, batch, [layer], assistant_mask=mask)[layer]
    assert torch.equal(after[mask], (before[layer] + push)[mask]) and torch.equal(after[~mask], before[layer][~mask])
    # and the cap lifts every projection to the floor, exactly where it was below
    mech.positions, mech.alpha, mech.cap = "all", 0.0, 0.5
    after = block_outputs(model, batch, [layer])[layer]
    proj = after @ d.unit(layer)
    assert float(proj.min()) >= 0.5 * float(d.activation_norm[layer]) - 1e-4


def runner_for(model, bb, mech, **kw):
    return ConversationRunner(model, bb.chat, mech, max_new_tokens=kw.pop("max_new_tokens", 6), **kw)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_positions_response_leaves_the_prompt_untouched_and_changes_the_answer(backbone_factory, tmp_path, name):
    base, bb = backbone_factory(name), backbone_factory(name)
    model, mech = steer(bb, direction_file(bb, tmp_path / "d.safetensors"), layers=[1], alpha=8.0,
                        positions="response")
    system = load_persona("stoic").system_prompt
    outs = []
    for m, me in ((base.model, None), (model, mech)):
        runner = runner_for(m, bb, me)
        conv = runner.start(load_persona("stoic"))
        if me is not None:
            me.begin_turn()
        conv.append([bb.chat.user_turn_ids(TURNS[0], conv.open_turn)], bb.chat.pad_id)
        prompt = runner.forward_new(conv).logits
        if me is not None:
            me.begin_answer()
        conv.append([[int(prompt[0, -1].argmax())]], bb.chat.pad_id)
        outs.append((prompt, runner.forward_new(conv).logits))
    assert system and torch.equal(outs[0][0], outs[1][0])  # persona segment and user turn: the base model
    assert not torch.allclose(outs[0][1], outs[1][1], atol=1e-3)  # the answer's tokens are steered


def pieces_mask(bounds, prompts, turn, history, positions):
    """Which slots of conv.ids[:bounds[turn]] the runner steers while answering `turn` (1-based)."""
    kinds = ["history-prompt"] * bounds[0]
    for k in range(1, turn + 1):
        span = bounds[k] - bounds[k - 1]
        kinds += [("now-" if k == turn else "history-") + ("prompt" if j < prompts[k - 1] else "response")
                  for j in range(span)]
    return torch.tensor([(history == "steered" or kind.startswith("now")) and
                         (positions == "all" or kind.endswith(positions)) for kind in kinds])


RUNNER_CASES = [("tiny-llama", "steered", "all"), ("tiny-llama", "clean", "response"),
                ("tiny-llama", "clean", "all"), ("tiny-gemma3", "steered", "response"), ("tiny-gemma3", "clean", "prompt")]


@pytest.mark.parametrize("name,history,positions", RUNNER_CASES)
def test_runner_answers_are_the_greedy_answers_of_full_recomputation(backbone_factory, tmp_path, name, history,
                                                                      positions):
    bb = backbone_factory(name)
    path = direction_file(bb, tmp_path / "d.safetensors")
    model, mech = steer(bb, path, layers=[0, 2], alpha=3.0, positions=positions, history=history)
    with torch.no_grad():  # a random tiny model repeats one token; sharper weights give varied answers
        for p in model.parameters():
            p.mul_(3.0)
    runner = runner_for(model, bb, mech)
    conv = runner.start(load_persona("stoic"))
    bounds, prompts = [len(conv.ids)], []
    for text in TURNS:
        prompts.append(len(bb.chat.user_turn_ids(text, conv.open_turn)))
        runner.say(conv, text)
        bounds.append(len(conv.ids))
    ids, checked, tokens = conv.ids, 0, set()
    for k in range(1, len(TURNS) + 1):
        where = pieces_mask(bounds, prompts, k, history, positions)
        for pos in range(bounds[k - 1] + prompts[k - 1], bounds[k] - len(bb.chat.close_assistant()) + 1):
            w = where[:pos]
            fns = {i: (lambda h, kw, i=i, w=w: mech.steer(h, i, w[None, :, None])) for i in mech.layers}
            with torch.no_grad(), mech.disabled(), block_hooks(model, fns):
                top = model(input_ids=torch.tensor([ids[:pos]])).logits[0, -1].topk(2)
            if pos < bounds[k] - len(bb.chat.close_assistant()) or int(top.indices[0]) == bb.chat.end_id:
                if float(top.values[0] - top.values[1]) > 1e-4:  # a near tie may go either way in float32
                    assert int(top.indices[0]) == ids[pos], (k, pos)
                    checked += 1
                    tokens.add(ids[pos])
    assert checked >= 9 and len(tokens) > 1


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_clean_history_caches_what_the_base_model_caches_and_steered_does_not(backbone_factory, tmp_path, name):
    """tiny-gemma3's sliding window is 16 tokens: its sliding layers are rolled back past a full window."""
    base = backbone_factory(name)
    ref_runner = runner_for(base.model, base, None)
    caches = {}
    for history in ("clean", "steered"):
        bb = backbone_factory(name)
        model, mech = steer(bb, direction_file(bb, tmp_path / f"{history}.safetensors"), layers=[1], alpha=6.0,
                            history=history)
        runner = runner_for(model, bb, mech)
        conv, bounds = runner.start(load_persona("stoic")), []
        bounds.append(conv.tokens.shape[1])
        for text in TURNS[:2]:
            runner.say(conv, text)
            bounds.append(conv.tokens.shape[1])
        ref = Conversation(conv.system_prompt)  # the base model fed the same slots, a turn per forward
        for b in bounds:
            ref.tokens, ref.mask = conv.tokens[:, :b], conv.mask[:, :b]
            ref_runner.forward_new(ref)
        caches[history] = [(torch.equal(a.keys, r.keys) and torch.equal(a.values, r.values))
                           for a, r in zip(conv.cache.layers, ref.cache.layers)]
        assert conv.cache.get_seq_length() == ref.cache.get_seq_length() == conv.tokens.shape[1]
    assert all(caches["clean"])
    assert not all(caches["steered"][2:])  # blocks after the steered one read steered states


@pytest.mark.parametrize("name,history", [("tiny-llama", "steered"), ("tiny-llama", "clean"),
                                          ("tiny-gemma3", "clean")])
def test_batched_conversations_with_probes_equal_one_at_a_time(backbone_factory, tmp_path, name, history):
    import dataclasses

    from tests.test_conversation import STREAMS, EarlyEndRunner

    # Gemma's sliding window counts padded slots (the base model differs batched vs alone): widened here
    bb = backbone_factory(name, **({"tiny.sliding_window": 4096} if name == "tiny-gemma3" else {}))
    model, mech = steer(bb, direction_file(bb, tmp_path / "d.safetensors"), layers=[0, 2], alpha=4.0,
                        positions="response", history=history)
    persona = load_persona("joyful_writer")
    persona = dataclasses.replace(persona, probes=persona.probes[:2])
    batched = EarlyEndRunner(model, bb.chat, mech, max_new_tokens=8, probe_max_new_tokens=5, probe_batch=2)
    together = batched.run(persona, STREAMS, probe_turns=[0, 2], progress=False)
    single = EarlyEndRunner(model, bb.chat, mech, max_new_tokens=8, probe_max_new_tokens=5, probe_batch=1)
    for stream, rows in zip(STREAMS, together):
        alone = single.run(persona, [stream], probe_turns=[0, 2], progress=False)[0]
        assert [r.answer for r in rows] == [r.answer for r in alone]
        for a, b in zip(rows, alone):
            assert [(p.answer, p.passed) for p in a.probes] == [(p.answer, p.passed) for p in b.probes]
            assert [p.margin for p in a.probes] == pytest.approx([p.margin for p in b.probes], abs=1e-4)
    with mech.disabled():
        plain = single.run(persona, [STREAMS[0]], probe_turns=[], progress=False)[0]
    assert [r.answer for r in plain] != [r.answer for r in together[0]]  # the steering did something


def test_train_vector_trains_only_steer_delta_and_the_checkpoint_reproduces_it(backbone_factory, tmp_path):
    import lightning as L

    from persona_lit.build import restore
    from persona_lit.training.callbacks import ExportCheckpoint
    from persona_lit.data import PersonaDialogueDataModule
    from persona_lit.training.module import PersonaLitModule
    from persona_lit.personas.load import persona_to_dict

    bb = backbone_factory("tiny-llama")
    path = direction_file(bb, tmp_path / "d.safetensors")
    model, mech = steer(bb, path, layers=[1, 3], alpha=1.0, positions="response", train_vector=True)
    names = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert names == ["model.layers.1.steer.steer_delta", "model.layers.3.steer.steer_delta"]
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    persona = load_persona("joyful_writer")
    mech_cfg = {"name": "steer", "options": {"direction": str(path), "layers": [1, 3], "alpha": 1.0,
                                             "positions": "response", "cap": None, "history": "steered",
                                             "train_vector": True}}
    config = {"model": OmegaConf.to_container(model_cfg("tiny-llama")), "mechanism": mech_cfg,
              "persona": persona_to_dict(persona), "data": {}, "seed": 0}
    module = PersonaLitModule(model, mech, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2), run_config=config,
                              fingerprint=bb.fingerprint)
    data = PersonaDialogueDataModule(bb.chat, persona, max_length=128, batch_size=4)
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[ExportCheckpoint(str(tmp_path))])
    trainer.fit(module, datamodule=data)
    moved = sorted(n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n]))
    assert moved == names
    model.eval()
    batch = sample_batch(bb.chat)
    mask = batch["labels"] != -100
    expected = logits(model, batch, assistant_mask=mask)
    _, restored, restored_mech, _, _ = restore(str(tmp_path / "final.safetensors"))
    assert torch.equal(logits(restored, batch, assistant_mask=mask), expected)
    with restored_mech.disabled():
        assert not torch.allclose(logits(restored, batch, assistant_mask=mask), expected, atol=1e-4)


def test_the_vector_moves_with_the_model_to_bf16(backbone_factory, tmp_path):
    base, bb = backbone_factory("tiny-llama"), backbone_factory("tiny-llama")
    model, mech = steer(bb, direction_file(bb, tmp_path / "d.safetensors"), layers=[2], alpha=2.0, train_vector=True)
    model.to(torch.bfloat16)
    base.model.to(torch.bfloat16)
    assert mech.vectors[2].steer_unit.dtype == mech.vectors[2].steer_delta.dtype == torch.bfloat16
    assert not any("steer_unit" in k for k in model.state_dict())  # a buffer, never in checkpoints
    batch = sample_batch(bb.chat)
    out = logits(model, batch)
    assert out.dtype == torch.bfloat16 and not torch.equal(out, logits(base.model, batch))
    with mech.disabled():
        assert torch.equal(logits(model, batch), logits(base.model, batch))


@pytest.mark.parametrize("options,facts", [
    ({"direction": None}, ["mechanism.options.direction=None", "give the path"]),
    ({"direction": "/nonexistent/d.safetensors"}, ["mechanism.options.direction=/nonexistent", "not found"]),
    ({"layers": [4]}, ["mechanism.options.layers=[4]", "0..3"]),
    ({"layers": []}, ["mechanism.options.layers=[]"]),
    ({"positions": "answer"}, ["mechanism.options.positions='answer'", "all, prompt, response"]),
    ({"history": "fresh"}, ["mechanism.options.history='fresh'", "steered, clean"]),
    ({"alpha": "strong"}, ["mechanism.options.alpha='strong'", "finite number"]),
    ({"cap": float("nan")}, ["mechanism.options.cap=nan"]),
    ({"history": "clean", "_layer_types": "linear_attention"}, ["history=clean", "'linear_attention'",
                                                               "history=steered"]),
    ({"_fingerprint": "0123456789abcdef"}, ["mechanism.options.direction=", "another base model"]),
])
def test_bad_options_are_one_line_user_errors(backbone_factory, tmp_path, options, facts):
    bb = backbone_factory("tiny-llama")
    meta = {"fingerprint": options.pop("_fingerprint")} if "_fingerprint" in options else {}
    path = direction_file(bb, tmp_path / "d.safetensors", **meta)
    if "_layer_types" in options:  # a cache layer the runner cannot roll back
        bb.model.config.layer_types = ["full_attention"] * 3 + [options.pop("_layer_types")]
    cfg = mechanism_cfg("steer")
    cfg.options.direction = str(path)
    for k, v in options.items():
        cfg.options[k] = v
    with pytest.raises(UserError) as err:
        attach_mechanism(bb, cfg)
    message = str(err.value)
    assert "\n" not in message and all(f in message for f in facts), message


def test_evaluate_cli_drift_with_steering_clean_and_steered(backbone_factory, tmp_path):
    """`python evaluate.py mechanism=steer ...`: the drift protocol with its baseline arm, and a one-line error
    without a direction."""
    import json

    bb = backbone_factory("tiny-llama")
    path = direction_file(bb, tmp_path / "d.safetensors")
    common = ["model=tiny-llama", "mechanism=steer", "persona=stoic", "turns=3", "probe_turns=[0,3]",
              "conversations=2", "max_new_tokens=6", "probe_max_new_tokens=5", "capability_exchanges=1",
              "capability_tokens=8", "logger=none", "probe_kinds=[name]"]
    bad = run_cli("evaluate.py", *common, f"out_dir={tmp_path}/bad", timeout=300)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1].startswith(
        "error: mechanism.options.direction=None"), bad.stderr[-2000:]
    assert not (tmp_path / "bad").exists()
    kl = {}
    for history in ("steered", "clean"):
        out = tmp_path / history
        run = run_cli("evaluate.py", *common, f"mechanism.options.direction={path}", "mechanism.options.alpha=4",
                      f"mechanism.options.history={history}", f"out_dir={out}", timeout=600)
        assert run.returncode == 0, run.stderr[-3000:]
        results = json.loads((out / "results.json").read_text())
        assert results["run"]["mechanism"] == "steer" and results["config"]["mechanism"]["options"]["history"] == history
        metrics = results["metrics"]
        assert {"adherence/name", "adherence/name_baseline", "capability/kl_to_base"} <= set(metrics)
        kl[history] = metrics["capability/kl_to_base"]["mean"]
    assert kl["steered"] != kl["clean"]  # turn 3: the history differs


@pytest.mark.parametrize("name,positions", [("tiny-llama", "response"), ("tiny-gemma3", "response"),
                                            ("tiny-llama", "prompt")])
def test_scored_answers_are_steered_as_responses(backbone_factory, tmp_path, name, positions):
    """Probe margins and the capability cost score fixed answers in one forward: with positions=response the
    answer tokens are steered (as when generated) and the prompt is not; checked against one full forward of
    the whole sequence with that mask."""
    from persona_lit.evaluation.probing import ScoreItem

    bb = backbone_factory(name)
    model, mech = steer(bb, direction_file(bb, tmp_path / "d.safetensors"), layers=[1], alpha=4.0,
                        positions=positions)
    runner = ConversationRunner(model, bb.chat, mech, max_new_tokens=4)
    conv = runner.start(None, rows=1)  # the persona segment only: no steered answers in the history
    question, answer = "What is your name?", "Captain Quill, and you may call me that."
    scored = runner.score(conv, [ScoreItem(0, question, answer)])[0].mean_logp
    with mech.disabled():
        base = runner.score(conv, [ScoreItem(0, question, answer)])[0].mean_logp
    prompt = bb.chat.user_turn_ids(question, conv.open_turn)
    target = bb.chat._ids(answer) + [bb.chat.end_id]
    history = conv.row_ids(0)
    ids = torch.tensor([history + prompt + target])
    mask = torch.zeros_like(ids, dtype=torch.bool)
    mask[0, len(history) + len(prompt):] = True  # the answer's tokens are the response
    with torch.no_grad():
        out = model(input_ids=ids, assistant_mask=mask).logits[0].float()
    start = len(history) + len(prompt) - 1
    logp = torch.log_softmax(out[start : start + len(target)], -1)
    expected = float(logp.gather(1, torch.tensor(target)[:, None]).mean())
    assert abs(scored - base) > 1e-3  # the steering reached the scored tokens
    assert scored == pytest.approx(expected, abs=1e-4)
