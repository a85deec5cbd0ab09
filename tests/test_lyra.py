"""Lyra's invariants on tiny-llama, tiny-gemma3 and (marked slow) the real Gemma-3-270M."""

import pytest
import torch
from omegaconf import OmegaConf

from persona_lit.build import attach_mechanism
from persona_lit.evaluation.conversation import Conversation, ConversationRunner
from persona_lit.errors import UserError
from persona_lit.mechanisms.lyra import load_persona_ids
from persona_lit.personas.load import load_persona

MODELS = ["tiny-llama", "tiny-gemma3", pytest.param("gemma3-270m", marks=pytest.mark.slow)]
DIALOGUE = [{"role": "user", "content": "Tell me about volcanoes."},
            {"role": "assistant", "content": "They are vents where molten rock escapes."},
            {"role": "user", "content": "And glaciers?"},
            {"role": "assistant", "content": "Rivers of ice, slow and patient."},
            {"role": "user", "content": "Which is older?"},
            {"role": "assistant", "content": "Ice ages come and go; volcanoes are older still."}]


def lyra(bb, **options):
    options.setdefault("layers", {"tiny-llama": [1, 3]}.get(bb.name))  # tiny-llama's default: its last layer only
    return attach_mechanism(bb, OmegaConf.create({"name": "lyra", "options": options}))


# Layer sets for every exactness invariant: the first layer (its cache length is the model's), the last, a
# subset, all; on Gemma-3 (S S G S S G) a subset of the global layers (the first global layer sizes the
# full-attention mask) and sliding layers (their window applies in Lyra's frame); and the eager path.
SLOW = pytest.mark.slow
CASES = [("tiny-llama", [0], "sdpa"), ("tiny-llama", [3], "sdpa"), ("tiny-llama", [0, 2], "sdpa"),
         ("tiny-llama", [1, 3], "sdpa"), ("tiny-llama", [0, 1, 2, 3], "sdpa"), ("tiny-llama", [0, 2], "eager"),
         ("tiny-gemma3", None, "sdpa"), ("tiny-gemma3", [2], "sdpa"), ("tiny-gemma3", [5], "sdpa"),
         ("tiny-gemma3", [0], "sdpa"), ("tiny-gemma3", [1, 5], "sdpa"), ("tiny-gemma3", [0, 1, 2, 3, 4, 5], "sdpa"),
         ("tiny-gemma3", [0, 5], "eager"), pytest.param("gemma3-270m", None, "sdpa", marks=SLOW),
         pytest.param("gemma3-270m", [11], "sdpa", marks=SLOW), pytest.param("gemma3-270m", [0, 17], "sdpa", marks=SLOW)]


def case_ids(case):
    return case if isinstance(case, str) else "all" if case is None else "-".join(map(str, case))


def pieces(chat, system, dialogue):
    """[(segment ids, assistant?)] for persona, then each user turn and answer, as the runner feeds them."""
    out = [(chat.persona_ids(system), False)]
    open_turn = chat.opens_user_turn(system)
    for m in dialogue:
        if m["role"] == "user":
            out.append((chat.user_turn_ids(m["content"], open_turn), False))
            open_turn = False
        else:
            out.append((chat._ids(m["content"]) + chat.close_assistant(), True))
    return out


@pytest.mark.parametrize("name,layers,attn", CASES, ids=case_ids)
def test_first_turn_equals_the_base_model_on_persona_plus_turn(backbone_factory, name, layers, attn):
    base, bb = backbone_factory(name, attn_implementation=attn), backbone_factory(name, attn_implementation=attn)
    model, mech = lyra(bb, layers=layers)
    system = load_persona("stoic").system_prompt
    ids, _, _ = bb.chat.encode_segments([{"role": "system", "content": system}] + DIALOGUE[:2])
    persona = bb.chat.persona_ids(system)
    with torch.no_grad():
        expected = base.model(input_ids=torch.tensor([ids])).logits
        mech.begin_conversation(None)
        out = model(input_ids=torch.tensor([persona]), use_cache=True)
        mech.begin_turn()
        rest = model(input_ids=torch.tensor([ids[len(persona):]]), past_key_values=out.past_key_values,
                     attention_mask=torch.ones(1, len(ids), dtype=torch.long), use_cache=True)
    got = torch.cat([out.logits, rest.logits], 1)
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()


@pytest.mark.parametrize("name,layers,attn", CASES, ids=case_ids)
def test_cached_decoding_equals_full_recomputation_with_the_turn_mask(backbone_factory, name, layers, attn):
    bb = backbone_factory(name, attn_implementation=attn)
    model, mech = lyra(bb, layers=layers)
    system = load_persona("pirate_mentor").system_prompt
    ids, _, segments = bb.chat.encode_segments([{"role": "system", "content": system}] + DIALOGUE)
    with torch.no_grad():
        full = model(input_ids=torch.tensor([ids]), segment_ids=torch.tensor([segments])).logits
        mech.begin_conversation(None)
        cache, seen, logits = None, 0, []
        for k, (chunk, answer) in enumerate(pieces(bb.chat, system, DIALOGUE)):
            if k > 0 and not answer:
                mech.begin_turn()
            steps = [[t] for t in chunk] if answer else [chunk]  # answers decode one token at a time
            for step in steps:
                seen += len(step)
                out = model(input_ids=torch.tensor([step]), past_key_values=cache, use_cache=True,
                            attention_mask=torch.ones(1, seen, dtype=torch.long))
                cache = out.past_key_values
                logits.append(out.logits)
                assert cache.get_seq_length() == seen  # the model's own length bookkeeping, whatever the layers
    assert seen == len(ids)
    incremental = torch.cat(logits, 1)
    assert torch.allclose(incremental, full, atol=1e-4, rtol=1e-4), (incremental - full).abs().max()
    # and the turn mask matters: the base model on the same ids differs after turn 1
    with mech.disabled(), torch.no_grad():
        plain = model(input_ids=torch.tensor([ids])).logits
    assert not torch.allclose(plain, full, atol=1e-3)


@pytest.mark.parametrize("name,layers,attn", CASES, ids=case_ids)
def test_batched_with_padding_equals_one_at_a_time(backbone_factory, name, layers, attn):
    # Gemma's sliding window counts padded slots inside a history (transformers' behaviour, the base model
    # differs batched vs alone too), so the window is widened here to test Lyra's own padding handling.
    bb = backbone_factory(name, attn_implementation=attn,
                          **({"tiny.sliding_window": 4096} if name == "tiny-gemma3" else {}))
    model, mech = lyra(bb, layers=layers)
    convs = [(load_persona("stoic").system_prompt, DIALOGUE[:4]),
             (load_persona("botanist").system_prompt, [{"role": "user", "content": "Hi"},
                                                      {"role": "assistant", "content": "Ah, hello there."},
                                                      {"role": "user", "content": "What is a fern, in detail?"},
                                                      {"role": "assistant", "content": "Ah, an old plant."}])]
    chunks = [pieces(bb.chat, s, d) for s, d in convs]

    def run(rows):
        """Feeds chunk k of every row together, left-padded; returns per-row logits of real tokens."""
        mech.begin_conversation(None)
        pad = bb.chat.pad_id
        cache, masks, got = None, [[] for _ in rows], [[] for _ in rows]
        for k in range(len(rows[0])):
            if k > 0 and not rows[0][k][1]:
                mech.begin_turn()
            width = max(len(r[k][0]) for r in rows)
            ids = [[pad] * (width - len(r[k][0])) + r[k][0] for r in rows]
            for i, r in enumerate(rows):
                masks[i] += [0] * (width - len(r[k][0])) + [1] * len(r[k][0])
            mask = torch.tensor(masks)
            positions = (mask.cumsum(1) - 1).clamp(min=0)[:, -width:]
            with torch.no_grad():
                out = model(input_ids=torch.tensor(ids), attention_mask=mask, position_ids=positions,
                            past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            for i, r in enumerate(rows):
                got[i].append(out.logits[i, width - len(r[k][0]):])
        return [torch.cat(g) for g in got]

    batched = run(chunks)
    for i, c in enumerate(chunks):
        alone = run([c])[0]
        tol = 1e-3 if name == "gemma3-270m" else 1e-4  # real logits are ~30 in size; float32 batched matmuls
        assert torch.allclose(batched[i], alone, atol=tol, rtol=1e-4), (i, (batched[i] - alone).abs().max())


@pytest.mark.parametrize("name", ["tiny-gemma3", pytest.param("gemma3-270m", marks=pytest.mark.slow)])
def test_chosen_layers_memory_stays_constant_while_the_cache_grows(backbone_factory, name):
    bb = backbone_factory(name)
    model, mech = lyra(bb)
    runner = ConversationRunner(model, bb.chat, mech, max_new_tokens=4)
    conv = runner.start(load_persona("stoic"))
    persona_tokens = len(conv.ids)
    memory, history = [], []
    for t in range(50):
        runner.say(conv, f"Question {t}: tell me something.")
        memory.append(mech.memory_tokens())
        history.append(conv.cache.get_seq_length())
    chosen = set(mech.layers)
    assert history[-1] > 10 * history[0]  # the plain cache grows with every turn...
    assert max(memory) <= len(chosen) * (persona_tokens + 40) and max(memory) == min(memory[1:]) or \
        max(memory) - min(memory) <= len(chosen) * 4  # ...the chosen layers hold persona + one turn
    for i, layer in enumerate(conv.cache.layers):  # and the model's own cache stores nothing for them
        if i in chosen:
            assert layer.keys.numel() == 0 and layer.keys.shape[-2] == history[-1]


@pytest.mark.parametrize("name", ["tiny-llama", pytest.param("gemma3-270m", marks=pytest.mark.slow)])
def test_persona_cache_file_roundtrip_without_pickle(backbone_factory, tmp_path, name):
    bb = backbone_factory(name)
    model, mech = lyra(bb)
    runner = ConversationRunner(model, bb.chat, mech, max_new_tokens=6)
    persona = load_persona("joyful_writer")
    conv = runner.start(persona)
    first = runner.say(conv, "Describe the sea.")
    mech.save_persona(tmp_path / "lyra_persona.safetensors")
    ids = load_persona_ids(tmp_path / "lyra_persona.safetensors")  # safetensors: plain tensors, no unpickling
    assert ids[0].tolist() == bb.chat.persona_ids(persona.system_prompt)
    mech.begin_conversation(None)
    conv2 = Conversation(None)  # a conversation whose persona comes from the file alone
    runner.extend(conv2, ids[0].tolist())
    conv2.system_prompt, conv2.open_turn = persona.system_prompt, bb.chat.opens_user_turn(persona.system_prompt)
    assert runner.say(conv2, "Describe the sea.") == first


def test_disabled_is_the_base_model_and_frozen_by_default(backbone_factory):
    base, bb = backbone_factory("tiny-gemma3"), backbone_factory("tiny-gemma3")
    model, mech = lyra(bb)
    assert not list(mech.trainable_parameters())
    ids = torch.tensor([bb.chat.encode([{"role": "user", "content": "hello"}] * 2)[0]])
    with torch.no_grad():
        mech.begin_conversation(None)
        mech.begin_turn()
        with mech.disabled():
            assert torch.equal(model(input_ids=ids).logits, base.model(input_ids=ids).logits)
    _, trainable = lyra(backbone_factory("tiny-gemma3"), train_layers=True)
    names = [n for n, p in trainable.model.named_parameters() if p.requires_grad]
    assert names and all(".self_attn.base." in n for n in names)


@pytest.mark.parametrize("lora_r", [0, 4])
def test_trains_its_layers_on_chained_dialogues_and_evaluates(tmp_path, lora_r):
    from safetensors.torch import load_file

    from tests.conftest import run_cli

    run = run_cli("train.py", "model=tiny-llama", "mechanism=lyra", "mechanism.options.layers=[1,3]",
                  "mechanism.options.train_layers=true", f"mechanism.options.lora_r={lora_r}", "persona=stoic",
                  "data.chain_turns=3", "data.filler_turns=1", "module.distill_weight=1.0",
                  "data.max_length=768", "trainer.max_steps=2", "logger=none", f"hydra.run.dir={tmp_path}/train")
    assert run.returncode == 0, run.stderr[-3000:]
    tensors = load_file(tmp_path / "train/checkpoints/final.safetensors")
    assert tensors and all(".self_attn.base." in k and (".layers.1." in k or ".layers.3." in k) for k in tensors)
    assert all(("lora_" in k) == bool(lora_r) for k in tensors)
    ev = run_cli("evaluate.py", f"ckpt={tmp_path}/train", "turns=2", "probe_turns=[2]", "max_new_tokens=4",
                 "probe_max_new_tokens=4", "logger=none", f"out_dir={tmp_path}/eval")
    assert ev.returncode == 0, ev.stderr[-3000:]


def test_fresh_persona_distillation_is_zero_on_turn_one_and_positive_later(backbone_factory):
    """The teacher of turn k sees [persona ; turn k]. Lyra on turn 1 is that view exactly (KL ~ 0); on a
    later turn the base model with history differs from it."""
    from persona_lit.data import Collator
    from persona_lit.training.distill import fresh_persona_kl

    bb = backbone_factory("tiny-llama")
    model, mech = lyra(bb, layers=[0, 1, 2, 3])  # every layer Lyra: the student *is* the fresh view
    system = {"role": "system", "content": load_persona("stoic").system_prompt}
    batch = Collator(bb.chat.pad_id)([bb.chat.encode_segments([system] + DIALOGUE)])
    with torch.no_grad():
        student = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        segment_ids=batch["segment_ids"]).logits
        assert fresh_persona_kl(model, mech, batch, student, bb.chat.pad_id) < 1e-6
        with mech.disabled():
            plain = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert fresh_persona_kl(model, mech, batch, plain, bb.chat.pad_id) > 1e-4


@pytest.mark.parametrize("options", [{"train_layers": True}, {"train_layers": True, "lora_r": 4}])
def test_trained_layers_still_disable_to_the_base_model(backbone_factory, options):
    """The control arm and the distillation teacher run under disabled(): after the chosen layers (or
    their LoRA) change, disabled() must still be the base model, and enabled must differ from it."""
    base, bb = backbone_factory("tiny-llama"), backbone_factory("tiny-llama")
    model, mech = lyra(bb, **options)
    ids = torch.tensor([bb.chat.encode([{"role": "user", "content": "hello there"}] * 2)[0]])
    with torch.no_grad():
        for p in mech.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
        with mech.disabled():
            assert torch.equal(model(input_ids=ids).logits, base.model(input_ids=ids).logits)
        assert not torch.allclose(model(input_ids=ids).logits, base.model(input_ids=ids).logits, atol=1e-4)


def test_lora_on_chosen_layers_starts_at_frozen_lyra_and_only_its_factors_train(backbone_factory):
    frozen_model, frozen = lyra(backbone_factory("tiny-llama"))
    model, mech = lyra(backbone_factory("tiny-llama"), train_layers=True, lora_r=4)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all("lora_" in n and (".layers.1." in n or ".layers.3." in n) for n in names)
    persona = load_persona("stoic")
    answers = []
    for m, mechanism in ((frozen_model, frozen), (model, mech)):
        runner = ConversationRunner(m, backbone_factory("tiny-llama").chat, mechanism, max_new_tokens=6)
        conv = runner.start(persona)
        answers.append([runner.say(conv, t) for t in ("Describe the sea.", "And the sky?")])
        answers.append(conv.ids)
    assert answers[0] == answers[2] and answers[1] == answers[3]  # zero-initialised LoRA: frozen Lyra exactly
    with pytest.raises(UserError, match="lora_r=4: a LoRA on the chosen layers needs"):
        lyra(backbone_factory("tiny-llama"), lora_r=4)


def test_history_window_ablation_holds_the_last_n_history_tokens(backbone_factory):
    """history_window=N: the chosen layers see persona + the last N tokens before this turn + the turn;
    N=0 is plain Lyra. The window is capped at N and changes what the model says."""
    for n in (0, 12):
        bb = backbone_factory("tiny-llama")
        model, mech = lyra(bb, history_window=n)
        runner = ConversationRunner(model, bb.chat, mech, max_new_tokens=5)
        conv = runner.start(load_persona("stoic"))
        persona = len(conv.ids)
        for t in range(4):
            runner.say(conv, f"Question {t}: tell me something.")
        mech.begin_turn()  # what the next turn starts from: persona + window
        widths = [s.widths for s in mech.segments.values()]
        assert all(w == ({"persona": persona} if n == 0 else {"persona": persona, "window": n}) for w in widths)
    bb = backbone_factory("tiny-llama")
    model, mech = lyra(bb, history_window=12)
    with torch.no_grad():
        for p in model.parameters():  # a random tiny model ignores small context changes; sharpen it
            p.mul_(3.0)
    outs = {}
    for n in (0, 12):
        mech.history_window = n
        runner = ConversationRunner(model, bb.chat, mech, max_new_tokens=5)
        conv = runner.start(load_persona("stoic"))
        runner.say(conv, "Remember the word heliotrope.")
        mech.begin_turn()
        ids = torch.tensor([bb.chat.user_turn_ids("What word?")])
        with torch.no_grad():
            outs[n] = model(input_ids=ids, past_key_values=conv.cache,
                            attention_mask=torch.ones(1, conv.tokens.shape[1] + ids.shape[1], dtype=torch.long)).logits
    assert not torch.allclose(outs[0], outs[12], atol=1e-4)  # the window reached the chosen layers


@pytest.mark.parametrize("name,layers", [("tiny-llama", [0]), ("tiny-llama", [0, 2]), ("tiny-gemma3", [0, 2])])
def test_history_window_keys_are_rerotated_to_sit_right_after_the_persona(backbone_factory, name, layers):
    """Layer 0's keys/values depend only on the token and its position, so after begin_turn() the window
    (the last N real history tokens of each row, batched with padding) followed by the new turn must hold
    exactly the keys of those tokens fed fresh at positions P, P+1, ... right after the persona."""
    bb = backbone_factory(name, **({"tiny.sliding_window": 4096} if name == "tiny-gemma3" else {}))
    model, mech = lyra(bb, layers=layers, history_window=7)
    runner = ConversationRunner(model, bb.chat, mech, max_new_tokens=5)
    persona = load_persona("stoic")
    conv = runner.start(persona, rows=2)
    for texts in (["Hi.", "Tell me about the tallest volcanoes on Earth."], ["And glaciers, please?", "Why?"]):
        runner.say(conv, texts)
    before = [conv.row_ids(b) for b in range(2)]
    runner.say(conv, ["Which is older?", "Name one more, and say why it matters."])
    p_len = len(bb.chat.persona_ids(persona.system_prompt))
    seg = mech.segments[0]
    assert list(seg.widths) == ["persona", "window", "turn"]
    for b in range(2):
        fresh = before[b][-7:] + conv.row_ids(b)[len(before[b]):]  # window tokens, then this turn's
        _, fresh_mech = lyra(backbone_factory(name, **({"tiny.sliding_window": 4096} if name == "tiny-gemma3"
                                                       else {})), layers=layers)
        fresh_model = fresh_mech.model
        fresh_mech.begin_conversation(None)
        with torch.no_grad():
            out = fresh_model(input_ids=torch.tensor([bb.chat.persona_ids(persona.system_prompt)]), use_cache=True)
            fresh_mech.begin_turn()
            fresh_model(input_ids=torch.tensor([fresh]), past_key_values=out.past_key_values, use_cache=True,
                        attention_mask=torch.ones(1, p_len + len(fresh), dtype=torch.long))
        want = fresh_mech.segments[0]
        real = seg.valid[b]
        assert int(real.sum()) == p_len + len(fresh)
        assert torch.allclose(seg.k[b][:, real], want.k[0], atol=1e-5), (seg.k[b][:, real] - want.k[0]).abs().max()
        assert torch.allclose(seg.v[b][:, real], want.v[0], atol=1e-6)
        assert seg.pos[b][real].tolist() == list(range(p_len + len(fresh)))


def test_frozen_original_moves_with_the_model_and_stays_out_of_checkpoints(backbone_factory):
    """train_layers keeps the original attention for disabled(): registered (so .to(dtype) reaches it), but as
    non-persistent buffers: not a parameter, not in the state dict, not in the exported checkpoint."""
    from persona_lit.training.checkpoint import trainable_state

    base, bb = backbone_factory("tiny-llama"), backbone_factory("tiny-llama")
    model, mech = lyra(bb, train_layers=True)
    assert not any("lyra_original" in k for k in model.state_dict())
    assert not any("lyra_original" in n for n, _ in model.named_parameters())
    assert not any("lyra_original" in k for k in trainable_state(model))
    with torch.no_grad():
        for p in mech.trainable_parameters():
            p.add_(0.05 * torch.randn_like(p))
    model.to(torch.bfloat16)
    originals = [b for n, b in model.named_buffers() if "lyra_original" in n]
    assert originals and all(b.dtype == torch.bfloat16 for b in originals)
    ids = torch.tensor([bb.chat.encode([{"role": "user", "content": "hello there"}] * 2)[0]])
    with torch.no_grad(), mech.disabled():
        assert torch.equal(model(input_ids=ids).logits, base.model.to(torch.bfloat16)(input_ids=ids).logits)


@pytest.mark.parametrize("attn", ["flash_attention_2", "flex_attention"])
def test_attention_implementations_that_cannot_read_lyras_mask_are_rejected(backbone_factory, attn):
    bb = backbone_factory("tiny-llama")
    bb.model.config._attn_implementation = attn
    with pytest.raises(UserError, match=f"model.attn_implementation='{attn}' cannot read Lyra's attention masks; "
                                        "allowed: eager, sdpa"):
        lyra(bb)


@pytest.mark.parametrize("name,layers,attn", CASES, ids=case_ids)
def test_conversation_runner_answers_are_the_greedy_answers_of_full_recomputation(backbone_factory, name, layers,
                                                                                   attn):
    """The runner (cached, turn by turn, its own decode loop) against one forward pass of the whole
    transcript with the turn mask: every answer token is that pass's greedy choice."""
    bb = backbone_factory(name, attn_implementation=attn)
    model, mech = lyra(bb, layers=layers)
    if name.startswith("tiny"):
        with torch.no_grad():  # a random tiny model repeats one token; sharper weights give varied answers
            for p in model.parameters():
                p.mul_(3.0)
    runner = ConversationRunner(model, bb.chat, mech, max_new_tokens=6)
    conv = runner.start(load_persona("stoic"))
    texts = ("Tell me about volcanoes.", "And glaciers?", "Which is older, and why?")
    bounds = [len(conv.ids)]
    for text in texts:
        runner.say(conv, text)
        bounds.append(len(conv.ids))
    segments = [0] * bounds[0] + [k for k in range(1, len(bounds)) for _ in range(bounds[k] - bounds[k - 1])]
    with torch.no_grad():
        full = model(input_ids=torch.tensor([conv.ids]), segment_ids=torch.tensor([segments])).logits[0]
    checked, tokens = 0, set()
    for k, text in enumerate(texts, start=1):
        start = bounds[k - 1] + len(bb.chat.user_turn_ids(text))  # the answer, then close_assistant()
        for pos in range(start, bounds[k] - len(bb.chat.close_assistant()) + 1):  # + 1: the end of the answer
            top = full[pos - 1].topk(2)
            if pos < bounds[k] - len(bb.chat.close_assistant()) or int(top.indices[0]) == bb.chat.end_id:
                if float(top.values[0] - top.values[1]) > 1e-4:  # a near tie may go either way in float32
                    assert int(top.indices[0]) == conv.ids[pos], (k, pos)
                    checked += 1
                    tokens.add(conv.ids[pos])
    assert checked >= 9 and len(tokens) > 1


@pytest.mark.parametrize("name", ["tiny-gemma3", "tiny-llama"])
def test_fresh_persona_teacher_view_is_a_conversation_that_starts_at_turn_k(backbone_factory, name):
    """The teacher of turn k reads exactly the ids of [persona ; turn k] encoded as a conversation of its own:
    on Gemma (no system role, the persona opens the first user turn) with one user header, not two."""
    from persona_lit.data import Collator
    from persona_lit.training.distill import fresh_persona_views

    chat = backbone_factory(name).chat
    system = {"role": "system", "content": load_persona("stoic").system_prompt}
    batch = Collator(chat.pad_id)([chat.encode_segments([system] + DIALOGUE)])
    ids, mask, _, _ = fresh_persona_views(batch, chat.pad_id, chat.reopen_ids())
    turns = [DIALOGUE[i : i + 2] for i in range(0, len(DIALOGUE), 2)]
    assert len(ids) == len(turns) >= 2
    for view, m, turn in zip(ids, mask, turns):
        assert view[m.bool()].tolist() == chat.encode_segments([system] + turn)[0]
