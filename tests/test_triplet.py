"""Triplet's invariants on tiny-llama and tiny-gemma3: exact base at linkage 0 and before training, cached ==
full recomputation across turns, no future in training, padding-independent, bounded persistent memory."""

import dataclasses

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from persona_lit.build import attach_mechanism
from persona_lit.evaluation.conversation import Conversation, ConversationRunner
from persona_lit.mechanisms.triplet import default_layers
from persona_lit.personas.load import load_persona
from tests.conftest import sample_batch
from tests.test_conversation import TURNS, naive_transcript

MODELS = ["tiny-llama", "tiny-gemma3"]
DIALOGUE = [{"role": "user", "content": "Tell me about volcanoes."},
            {"role": "assistant", "content": "They are vents where molten rock escapes."},
            {"role": "user", "content": "And glaciers?"},
            {"role": "assistant", "content": "Rivers of ice, slow and patient."},
            {"role": "user", "content": "Which is older?"},
            {"role": "assistant", "content": "Ice ages come and go; volcanoes are older still."}]


def triplet(bb, **options):
    return attach_mechanism(bb, OmegaConf.create({"name": "triplet", "options": options}))


def perturb(model, gate=0.5):
    """Switches the branch on: a trained-looking gate and projections that differ from the base copies."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "triplet_gate" in n:
                p.fill_(gate)
            elif "triplet_" in n:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def pieces(chat, system, dialogue):
    """[(ids, assistant?)]: the persona, then each user turn and answer, as the runner feeds them."""
    out, open_turn = [(chat.persona_ids(system), False)], chat.opens_user_turn(system)
    for m in dialogue:
        if m["role"] == "user":
            out.append((chat.user_turn_ids(m["content"], open_turn), False))
            open_turn = False
        else:
            out.append((chat._ids(m["content"]) + chat.close_assistant(), True))
    return out


@pytest.mark.parametrize("name", MODELS)
def test_linkage_zero_and_untrained_are_the_base_model(backbone_factory, name):
    base = backbone_factory(name)
    batch = sample_batch(base.chat)
    expected = logits(base.model, batch)
    off, off_mech = triplet(backbone_factory(name), linkage=0.0)
    on, on_mech = triplet(backbone_factory(name), linkage=1.0)
    names = [n for n, p in on.named_parameters() if p.requires_grad]
    assert names and all(".self_attn.triplet_" in n for n in names)  # one prefix: selection and checkpoints follow
    assert all(p.item() == 0 for n, p in on.named_parameters() if n.endswith("triplet_gate"))
    assert torch.equal(logits(off, batch), expected)
    assert torch.equal(logits(on, batch), expected)  # gate 0: a fresh mechanism is the base model
    perturb(off), perturb(on)
    assert not torch.allclose(logits(on, batch), expected, atol=1e-3)
    assert torch.equal(logits(off, batch), expected) and off_mech.memory_size() == 0  # branch skipped
    with on_mech.disabled():
        assert torch.equal(logits(on, batch), expected)


@pytest.mark.parametrize("name", MODELS)
def test_cached_decoding_equals_full_recomputation_over_turns(backbone_factory, name):
    bb = backbone_factory(name)
    model, mech = triplet(bb, memory_tokens=24)  # far shorter than the dialogue: the bound is exercised
    perturb(model)
    system = load_persona("stoic").system_prompt
    ids, _, _ = bb.chat.encode_segments([{"role": "system", "content": system}] + DIALOGUE)
    with torch.no_grad():
        full = model(input_ids=torch.tensor([ids])).logits
        with mech.disabled():
            plain = model(input_ids=torch.tensor([ids])).logits
        mech.begin_conversation(None)
        cache, seen, got = None, 0, []
        for k, (chunk, answer) in enumerate(pieces(bb.chat, system, DIALOGUE)):
            if k > 0 and not answer:
                mech.begin_turn()  # must not reset the memory
            for step in ([[t] for t in chunk] if answer else [chunk]):  # answers decode token by token
                seen += len(step)
                out = model(input_ids=torch.tensor([step]), past_key_values=cache, use_cache=True,
                            attention_mask=torch.ones(1, seen, dtype=torch.long))
                cache = out.past_key_values
                got.append(out.logits)
    assert seen == len(ids) and mech.memory_size() == 24
    incremental = torch.cat(got, 1)
    assert torch.allclose(incremental, full, atol=1e-5, rtol=0), (incremental - full).abs().max()
    assert not torch.allclose(plain, full, atol=1e-3)  # and the branch was on


@pytest.mark.parametrize("name", MODELS)
def test_runner_transcript_equals_reencoding(backbone_factory, name):
    bb = backbone_factory(name)
    model, mech = triplet(bb, memory_tokens=40)
    perturb(model, gate=2.0)
    system = "You are Cato, a terse stoic."
    runner = ConversationRunner(model, bb.chat, mech, max_new_tokens=8)
    mech.begin_conversation(None)
    conv = Conversation(system)
    for text in TURNS[:3]:
        runner.say(conv, text)
    ids, _ = naive_transcript(model, bb.chat, system, TURNS[:3], 8)  # each generate starts a fresh memory
    assert conv.ids == ids
    with torch.no_grad(), mech.disabled():  # and the branch was on for this history
        plain = model(input_ids=torch.tensor([ids])).logits
    with torch.no_grad():
        assert not torch.allclose(model(input_ids=torch.tensor([ids])).logits, plain, atol=1e-3)


def test_probes_do_not_write_into_the_conversation_memory(backbone_factory):
    bb = backbone_factory("tiny-llama")
    model, mech = triplet(bb, memory_tokens=64)
    perturb(model, gate=2.0)
    persona = load_persona("joyful_writer")
    persona = dataclasses.replace(persona, probes=persona.probes[:2])
    runner = ConversationRunner(model, bb.chat, mech, max_new_tokens=8, probe_max_new_tokens=6)
    with_probes = runner.run(persona, [TURNS[:2]], probe_turns=[0, 1, 2], progress=False)[0]
    memory = mech.snapshot()
    without = runner.run(persona, [TURNS[:2]], probe_turns=[], progress=False)[0]
    assert [r.answer for r in with_probes] == [r.answer for r in without]
    assert [len(r.probes) for r in with_probes] == [2, 2, 2]
    assert torch.equal(memory.idx, mech.memory.idx) and torch.equal(memory.count, mech.memory.count)
    for i in mech.layers:
        assert torch.equal(memory.kv[i][0], mech.memory.kv[i][0]) and torch.equal(memory.kv[i][1], mech.memory.kv[i][1])


def test_memory_persists_across_turns_and_is_bounded(backbone_factory):
    bb = backbone_factory("tiny-llama")
    model, mech = triplet(bb, memory_tokens=96)
    perturb(model)
    runner = ConversationRunner(model, bb.chat, mech, max_new_tokens=6)
    conv = runner.start(load_persona("stoic"))
    sizes = [mech.memory_size()]
    for t in range(12):
        runner.say(conv, f"Question {t}: tell me something.")
        sizes.append(mech.memory_size())
        # every forwarded token was written (prefill, each decode step, the closing tokens)
        assert mech.memory.count.item() == len(conv.ids) == conv.cache.get_seq_length()
        assert mech.memory.idx[0, -1].item() == len(conv.ids) - 1
    assert sizes[0] > 0 and sizes[1] > sizes[0]  # grows across turns: not reset per turn
    assert len(conv.ids) > 96 and sizes[-1] == 96  # bounded to the last memory_tokens
    assert mech.memory.idx[0, 0].item() == len(conv.ids) - 96
    assert all(k.shape[2] == 96 for k, _ in mech.memory.kv.values())
    conv = runner.start(load_persona("botanist"))  # a new conversation starts from an empty memory
    assert mech.memory.count.item() == mech.memory_size() == len(conv.ids)


@pytest.mark.parametrize("name", MODELS)
def test_training_cannot_see_the_future(backbone_factory, name):
    base = backbone_factory(name)
    model, _ = triplet(backbone_factory(name))
    perturb(model)
    model.train()  # teacher forcing: no state, the sequence's own earlier tokens under a strict causal mask
    ids = torch.tensor([base.chat.encode([{"role": "user", "content": "Tell me about volcanoes and ice."}])[0]])
    with torch.no_grad():
        ref = model(input_ids=ids).logits
        assert torch.equal(ref[:, 0], base.model(input_ids=ids).logits[:, 0])  # token 0 reads nothing, not itself
        for t in (2, ids.shape[1] // 2, ids.shape[1] - 2):
            changed = ids.clone()
            changed[0, t + 1] = (changed[0, t + 1] + 7) % 1000
            got = model(input_ids=changed).logits
            assert torch.allclose(got[:, : t + 1], ref[:, : t + 1], atol=1e-6, rtol=0), t
            assert not torch.allclose(got[:, t + 1], ref[:, t + 1])
        model.eval()  # teacher forcing reads exactly what generation reads
        assert torch.allclose(model(input_ids=ids).logits, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", MODELS)
def test_batched_with_padding_equals_one_at_a_time(backbone_factory, name):
    # Gemma's sliding window counts padded slots (transformers: the base model differs batched vs alone too),
    # so the window is widened here to test triplet's own padding handling, as test_lyra does.
    bb = backbone_factory(name, **({"tiny.sliding_window": 4096} if name == "tiny-gemma3" else {}))
    model, mech = triplet(bb, memory_tokens=20)
    perturb(model)
    pad = bb.chat.pad_id

    # training: right padding with attention_mask
    batch = sample_batch(bb.chat)
    model.train()
    with torch.no_grad():
        together = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for i in range(2):
            n = int(batch["attention_mask"][i].sum())
            alone = model(input_ids=batch["input_ids"][i : i + 1, :n]).logits
            diff = (together[i, :n] - alone[0]).abs().max()
            assert diff <= 1e-5, (i, diff)
    model.eval()

    # generate: left padding, the memory skips pad tokens
    prompts = [bb.chat.turn_ids("Tell me about volcanoes.", first=True, system="You are Cato."),
               bb.chat.turn_ids("Hi", first=True, system=None)]
    width = max(map(len, prompts))
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    kw = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False, pad_token_id=pad, output_scores=True,
              return_dict_in_generate=True)
    out = model.generate(input_ids=ids, attention_mask=mask, **kw)
    for i, p in enumerate(prompts):
        one = torch.tensor([p])
        alone = model.generate(input_ids=one, attention_mask=torch.ones_like(one), **kw)
        assert out.sequences[i, width:].tolist() == alone.sequences[0, len(p):].tolist()
        for s_batch, s_alone in zip(out.scores, alone.scores):
            assert torch.allclose(s_batch[i], s_alone[0], atol=1e-4, rtol=0)

    # a conversation fed chunk by chunk, each chunk left-padded: pads sit inside the memory and the bound trims it
    other = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."},
             {"role": "user", "content": "What is a fern?"}, {"role": "assistant", "content": "An old plant."}]
    convs = [pieces(bb.chat, load_persona("stoic").system_prompt, DIALOGUE[:4]),
             pieces(bb.chat, load_persona("botanist").system_prompt, other)]

    def run(rows):
        mech.begin_conversation(None)
        cache, masks, got = None, [[] for _ in rows], [[] for _ in rows]
        for k in range(len(rows[0])):
            width = max(len(r[k][0]) for r in rows)
            chunk = [[pad] * (width - len(r[k][0])) + r[k][0] for r in rows]
            for i, r in enumerate(rows):
                masks[i] += [0] * (width - len(r[k][0])) + [1] * len(r[k][0])
            m = torch.tensor(masks)
            with torch.no_grad():
                out = model(input_ids=torch.tensor(chunk), attention_mask=m, use_cache=True, past_key_values=cache,
                            position_ids=(m.cumsum(1) - 1).clamp(min=0)[:, -width:])
            cache = out.past_key_values
            for i, r in enumerate(rows):
                got[i].append(out.logits[i, width - len(r[k][0]):])
        return [torch.cat(g) for g in got]

    batched = run(convs)
    assert mech.memory_size() > 20  # pads inside the window keep a few extra columns, never fewer real ones
    for i, c in enumerate(convs):
        alone = run([c])[0]
        assert mech.memory_size() == 20
        assert torch.allclose(batched[i], alone, atol=1e-5, rtol=0), (i, (batched[i] - alone).abs().max())


def test_default_layers_follow_the_originals_relative_depth():
    class Fake(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.model = nn.Module()
            self.model.layers = nn.ModuleList(nn.Identity() for _ in range(n))

    assert default_layers(Fake(32)) == [16, 24, 30]  # the original
    assert default_layers(Fake(30)) == [15, 22, 28]  # SmolLM2-135M
    assert default_layers(Fake(18)) == [9, 13, 16]  # Gemma-3-270M


def test_lightning_training_moves_the_gate_and_the_checkpoint_restores(backbone_factory, tmp_path):
    import lightning as L

    from persona_lit.build import restore
    from persona_lit.training.callbacks import ExportCheckpoint
    from persona_lit.data import PersonaDialogueDataModule
    from persona_lit.training.module import PersonaLitModule
    from persona_lit.personas.load import persona_to_dict
    from tests.conftest import model_cfg

    bb = backbone_factory("tiny-llama")
    mech_cfg = OmegaConf.create({"name": "triplet", "options": {"layers": None, "linkage": 1.0, "gain": 1.0,
                                                               "memory_tokens": 64}})
    model, mechanism = attach_mechanism(bb, mech_cfg)
    persona = load_persona("joyful_writer")
    config = {"model": OmegaConf.to_container(model_cfg("tiny-llama")), "mechanism": OmegaConf.to_container(mech_cfg),
              "persona": persona_to_dict(persona), "data": {}, "seed": 0}
    module = PersonaLitModule(model, mechanism, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-2),
                              run_config=config, fingerprint=bb.fingerprint)
    data = PersonaDialogueDataModule(bb.chat, persona, max_length=96, batch_size=4)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[ExportCheckpoint(str(tmp_path))])
    trainer.fit(module, datamodule=data)
    gates = [p.item() for n, p in model.named_parameters() if n.endswith("triplet_gate")]
    assert len(gates) == len(mechanism.layers) and all(g != 0 for g in gates)
    batch = sample_batch(bb.chat)
    model.eval()
    expected = logits(model, batch)
    with mechanism.disabled():
        assert not torch.allclose(logits(model, batch), expected)  # training changed the model
    _, restored, restored_mech, _, _ = restore(str(tmp_path / "final.safetensors"))
    assert restored_mech.name == "triplet" and restored_mech.memory_tokens == 64
    assert torch.equal(logits(restored, batch), expected)
