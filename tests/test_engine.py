"""The evaluation engine's exactness: the growing cache, forks, native grouped-query attention, and bf16 without
its two silent errors (rotary buffers rounded by a cast; trainable weights stuck in bf16)."""

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from persona_lit.models.kv_cache import GrowingLayer, new_cache, roll_back, rollback_point, select_rows


def _ids(bb, rows, width, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(10, 2000, (rows, width), generator=g)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_growing_cache_equals_transformers_dynamic_cache_bit_for_bit(backbone_factory, name):
    """Chunks of several widths (prompt-like, then one token at a time, past the first buffer's room), a
    rollback and a row selection: every call's logits equal those on transformers' own DynamicCache exactly."""
    from transformers.cache_utils import DynamicCache

    bb = backbone_factory(name)
    mask = torch.ones(3, 0, dtype=torch.long)
    grow, plain = new_cache(bb.model), DynamicCache(config=bb.model.config)
    assert any(isinstance(layer, GrowingLayer) for layer in grow.layers)
    widths = [40, 7, 1, 1, 230, 1, 3] + [1] * 4
    with torch.no_grad():
        for k, w in enumerate(widths):
            ids = _ids(bb, 3, w, k)
            step = torch.ones(3, w, dtype=torch.long)
            if k == 0:
                step[1, :5] = 0  # left padding in one row
            mask = torch.cat([mask, step], 1)
            pos = (mask.cumsum(1) - 1).clamp(min=0)[:, -w:]
            a = bb.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=grow, use_cache=True)
            b = bb.model(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=plain, use_cache=True)
            assert torch.equal(a.logits, b.logits), k
            if k == 3:  # the point to roll back to at the end
                point = rollback_point(grow)
        assert grow.get_seq_length() == plain.get_seq_length() == mask.shape[1]
        # rows 2, 0, 0 of both caches, one more token each: equal, and the originals untouched
        index = torch.tensor([2, 0, 0])
        import copy

        fork_g, fork_p = select_rows(grow, index), copy.deepcopy(plain)
        fork_p.batch_select_indices(index)
        before = [layer.keys.clone() for layer in grow.layers]
        m2 = torch.cat([mask[index], torch.ones(3, 1, dtype=torch.long)], 1)
        pos = (m2.cumsum(1) - 1)[:, -1:]
        ids = _ids(bb, 3, 1, 99)
        a = bb.model(input_ids=ids, attention_mask=m2, position_ids=pos, past_key_values=fork_g, use_cache=True)
        b = bb.model(input_ids=ids, attention_mask=m2, position_ids=pos, past_key_values=fork_p, use_cache=True)
        assert torch.equal(a.logits, b.logits)
        assert all(torch.equal(x, layer.keys) for x, layer in zip(before, grow.layers))
    lengths = {layer.get_seq_length() for layer in roll_back(grow, point).layers if isinstance(layer, GrowingLayer)}
    assert lengths == {sum(widths[:4])}


def test_a_zero_width_growing_layer_reports_its_slots():
    """Lyra writes [B, heads, N, 0] entries for its chosen layers; transformers reads the length from layer 0."""
    layer = GrowingLayer()
    layer.update(torch.zeros(2, 3, 5, 0), torch.zeros(2, 3, 5, 0))
    layer.update(torch.zeros(2, 3, 1, 0), torch.zeros(2, 3, 1, 0))
    assert layer.get_seq_length() == 6 and layer.keys.shape == (2, 3, 6, 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q_len", [1, 9])
def test_native_grouped_query_attention_equals_repeated_heads_on_the_cpu(dtype, q_len):
    """What TRANSFORMERS_SDPA_FORCE_GQA switches to (conversation.native_gqa), with a padding mask, over a strided
    view of a growing buffer: bit for bit the values of transformers' repeat_kv path."""
    from transformers.integrations.sdpa_attention import repeat_kv

    g = torch.Generator().manual_seed(0)
    q = torch.randn(3, 9, q_len, 64, generator=g).to(dtype)
    buf_k, buf_v = torch.randn(3, 3, 350, 64, generator=g).to(dtype), torch.randn(3, 3, 350, 64, generator=g).to(dtype)
    k, v = buf_k[:, :, :300], buf_v[:, :, :300]
    mask = torch.ones(3, 1, q_len, 300, dtype=torch.bool)
    mask[0, ..., :7] = False
    want = F.scaled_dot_product_attention(q, repeat_kv(k.contiguous(), 3), repeat_kv(v.contiguous(), 3), attn_mask=mask)
    got = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    assert torch.equal(got, want)


def _cast_bf16(model):
    from persona_lit.build import place
    from persona_lit.mechanisms.none import NoMechanism

    place(model, NoMechanism(), torch.device("cpu"), torch.bfloat16)
    return model


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_bf16_cast_keeps_rotary_buffers_float32(backbone_factory, name):
    """build.place(bf16) casts the model; its rotary inv_freq buffers must stay float32 (they are after a forward),
    and the cos/sin a layer gets at position 5000 are float32-exact angles rounded once to bf16 (a bf16 inv_freq
    puts them up to several radians off)."""
    ref, low = backbone_factory(name).model, _cast_bf16(backbone_factory(name).model)
    with torch.no_grad():
        low(input_ids=_ids(None, 1, 4, 0))
    rotary = {n: b.dtype for n, b in low.named_buffers() if n.endswith("inv_freq")}
    assert rotary and set(rotary.values()) == {torch.float32}
    emb = next(m for n, m in low.named_modules() if n.endswith("rotary_emb"))
    emb32 = next(m for n, m in ref.named_modules() if n.endswith("rotary_emb"))
    x, pos = torch.zeros(1, 1, 8, dtype=torch.bfloat16), torch.tensor([[5000]])
    for extra in [(t,) for t in getattr(emb, "layer_types", [])] or [()]:
        cos, sin = emb(x, pos, *extra)
        cos32, sin32 = emb32(x.float(), pos, *extra)
        assert float((cos.float() - cos32).abs().max()) <= 2 ** -7 and float((sin.float() - sin32).abs().max()) <= 2 ** -7


@pytest.mark.slow
@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "gemma3-270m"])
def test_bf16_logits_at_a_long_distance_are_as_close_to_float32_as_near(backbone_factory, name):
    """The real models in bf16 (cast by build.place): the logits of 12 tokens placed 5,000 positions after 12 others
    are within bf16's own rounding of float32's, as with no gap; a rounded rotary inv_freq makes them far worse."""
    ref, low = backbone_factory(name).model, _cast_bf16(backbone_factory(name).model)
    ids = _ids(None, 1, 24, 0)
    errors = {}
    with torch.no_grad():
        for gap in (0, 5000):  # relative distance is what rotary encodes
            pos = torch.cat([torch.arange(12), torch.arange(12, 24) + gap])[None]
            a = ref(input_ids=ids, position_ids=pos).logits[:, 12:]
            b = low(input_ids=ids, position_ids=pos).logits[:, 12:].float()
            errors[gap] = float(((a - b).norm() / a.norm()))
    # measured: SmolLM2 0.0064 near, 0.0175 far (cos/sin rounded to bf16 at every angle); with a bf16 inv_freq 0.065;
    # Gemma-3-270M 0.050 / 0.062, with a bf16 inv_freq 0.51
    assert errors[5000] < 3 * errors[0] + 0.005, errors


@pytest.mark.parametrize("mechanism", [
    {"name": "lyra", "options": {"layers": [1, 3], "train_layers": True}},
    {"name": "lyra", "options": {"layers": [0, 2], "train_layers": True, "lora_r": 4}},
    {"name": "triplet", "options": {"layers": [1, 2], "memory_tokens": 16}},
    {"name": "lora", "options": {"r": 4, "alpha": 8, "dropout": 0.0}},
])
def test_trainable_weights_stay_float32_and_move_on_a_bf16_model(backbone_factory, mechanism):
    """A bf16 base model (model.dtype=bfloat16): every trainable tensor is float32 once training starts, a few
    AdamW steps at lr 5e-5 move each of them (in bf16 most of these updates would round away), the frozen base
    stays bf16 and unchanged."""
    import lightning as L

    from persona_lit.build import attach_mechanism
    from persona_lit.data import PersonaDialogueDataModule
    from persona_lit.personas.load import load_persona
    from persona_lit.training.module import PersonaLitModule

    bb = backbone_factory("tiny-llama", dtype="bfloat16")
    model, mech = attach_mechanism(bb, OmegaConf.create(mechanism))
    trainable = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    assert trainable and {p.dtype for p in frozen.values()} == {torch.bfloat16}
    start = {n: p.detach().float().clone() for n, p in trainable.items()}
    module = PersonaLitModule(model, mech, optimizer=lambda p: torch.optim.AdamW(p, lr=5e-5))
    data = PersonaDialogueDataModule(bb.chat, load_persona("stoic"), max_length=96, batch_size=2)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    now = dict((n, p) for n, p in model.named_parameters() if p.requires_grad)
    assert {p.dtype for p in now.values()} == {torch.float32}
    moved = [n for n, p in now.items() if not torch.equal(p.detach(), start[n])]
    # Triplet's gate starts at 0, so its projections get no gradient until the gate moves: the gate must move
    assert moved and (len(moved) == len(now) or mechanism["name"] == "triplet"), sorted(set(now) - set(moved))
    if mechanism["name"] == "triplet":
        assert any("triplet_gate" in n for n in moved)
    for n, p in model.named_parameters():
        if n in frozen:
            assert p.dtype == torch.bfloat16 and torch.equal(p.detach(), frozen[n]), n


def test_fork_of_every_row_runs_in_place_and_leaves_the_conversation_as_it_was(backbone_factory):
    """on_fork with rows 0..rows-1 runs on the conversation itself (no copy) and takes back what it added: the
    same tokens, cache length and next answer as a conversation that never forked; a copied fork gives the same
    probe answer as the in-place one."""
    from persona_lit.evaluation.conversation import ConversationRunner
    from persona_lit.mechanisms.none import NoMechanism

    bb = backbone_factory("tiny-llama")
    runner = ConversationRunner(bb.model, bb.chat, NoMechanism(), max_new_tokens=6, probe_max_new_tokens=5)
    a, b = runner.start(None, rows=2), runner.start(None, rows=2)
    for conv in (a, b):
        runner.say(conv, ["Hello there.", "Tell me a fact."])
    tokens, cached = a.tokens.clone(), a.cache.get_seq_length()
    in_place = runner.on_fork(a, [0, 1], runner.say, ["What is your name?"] * 2, 5, close=False)
    copied = runner.on_fork(a, [1, 0], runner.say, ["What is your name?"] * 2, 5, close=False)
    assert in_place == copied[::-1]
    assert torch.equal(a.tokens, tokens) and a.cache.get_seq_length() == cached
    assert runner.say(a, ["And then?", "Why?"]) == runner.say(b, ["And then?", "Why?"])


def test_conversation_batch_is_chosen_from_the_kv_cache_estimate_and_a_batch_that_cannot_fit_is_refused(
        backbone_factory):
    """kv_bytes_per_row counts every layer's K and V (a sliding layer only its window); plan_batch takes the most
    rows that fit (with one copied probe fork and the cache's spare room) and refuses a given batch that cannot."""
    from persona_lit.errors import UserError
    from persona_lit.evaluation.memory import ROOM, USABLE, kv_bytes_per_row, plan_batch

    llama, gemma = backbone_factory("tiny-llama").model, backbone_factory("tiny-gemma3").model
    # tiny-llama: 4 layers x (K + V) x 2 KV heads x head dim 16 x 4 bytes per token
    assert kv_bytes_per_row(llama, 1000, torch.float32) == 1000 * 4 * 2 * 2 * 16 * 4
    assert kv_bytes_per_row(llama, 1000, torch.bfloat16) == 1000 * 4 * 2 * 2 * 16 * 2
    # tiny-gemma3: 2 global layers hold 1000 tokens, 4 sliding layers their window of 16
    assert kv_bytes_per_row(gemma, 1000, torch.float32) == (2 * 1000 + 4 * 16) * 2 * 2 * 16 * 4
    row = kv_bytes_per_row(llama, 1000, torch.float32)
    free = int(10 * row * ROOM / USABLE) + 1  # room for 10 rows' caches
    cpu = torch.device("cpu")
    auto = plan_batch(None, 64, llama, torch.float32, 1000, 4, cpu, free=free)
    assert auto.rows == 6 and auto.auto  # 6 rows + a 4-row probe fork = 10
    assert plan_batch(None, 3, llama, torch.float32, 1000, 4, cpu, free=free).rows == 3  # no more than the units
    assert plan_batch(5, 64, llama, torch.float32, 1000, 4, cpu, free=free).rows == 5
    with pytest.raises(UserError, match=r"conversation_batch=8: the KV cache would need .* use conversation_batch<=6"):
        plan_batch(8, 64, llama, torch.float32, 1000, 4, cpu, free=free)
    with pytest.raises(UserError, match="use fewer turns"):
        plan_batch(None, 64, llama, torch.float32, 1000, 4, cpu, free=row)


# --- forks that share the conversation's cache (models/shared_prefix.py) ------------------------------------------

@pytest.mark.parametrize("flash", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q_len", [1, 7])
def test_shared_prefix_attention_equals_attention_over_the_whole_history(flash, dtype, q_len):
    """SharedPrefixLayer.attend (history once per parent row, suffix per fork row, merged by log-sum-exp) against
    sdpa over each fork row's copied [history ; suffix], with left padding in the history and the suffix, uneven
    fork rows per parent row, grouped K/V heads; both kernels of _attention (the CPU's flash, the float32 matmuls)."""
    from persona_lit.models import shared_prefix
    from persona_lit.models.shared_prefix import SharedPrefixLayer

    torch.manual_seed(0)
    rows, kv, group, dim, n0, s = 3, 2, 3, 16, 11, 5 + q_len
    parent = GrowingLayer()
    hist_k, hist_v = torch.randn(rows, kv, n0, dim, dtype=dtype), torch.randn(rows, kv, n0, dim, dtype=dtype)
    parent.update(hist_k, hist_v)
    index = torch.tensor([2, 0, 2, 1, 2])  # parent rows 2, 0, 2, 1, 2: three forks of row 2
    layer = SharedPrefixLayer(parent, index)
    suf_k, suf_v = torch.randn(len(index), kv, s, dim, dtype=dtype), torch.randn(len(index), kv, s, dim, dtype=dtype)
    k, v = layer.update(suf_k, suf_v)
    assert layer.get_seq_length() == n0 + s and torch.equal(k, suf_k)
    query = torch.randn(len(index), kv * group, q_len, dim, dtype=dtype)
    pad = torch.ones(rows, n0, dtype=torch.bool)
    pad[0, :3], pad[1, :1] = False, False  # left padding of the history
    visible = torch.ones(len(index), s, dtype=torch.bool)
    visible[1, :2] = False  # a fork row whose prompt was padded on the left
    causal = torch.ones(q_len, s, dtype=torch.bool).tril(s - q_len)
    mask = torch.cat([pad[index][:, None, None, :].expand(-1, 1, q_len, n0),
                      (visible[:, None, :] & causal)[:, None]], -1)
    full_k, full_v = torch.cat([hist_k[index], suf_k], 2), torch.cat([hist_v[index], suf_v], 2)
    want = F.scaled_dot_product_attention(query.float(), full_k.float().repeat_interleave(group, 1),
                                          full_v.float().repeat_interleave(group, 1), attn_mask=mask, scale=0.3)
    real = mask.any(-1)[:, 0]  # queries with a visible slot (every one here)
    original = shared_prefix._attention
    shared_prefix._attention = lambda *a, **kw: original(*a, flash=flash)
    try:
        got = layer.attend(query, k, v, mask, 0.3).transpose(1, 2).float()
    finally:
        shared_prefix._attention = original
    tol = 2e-6 if dtype == torch.float32 else 2e-2
    assert real.all() and (got - want).abs().max() < tol
    assert torch.equal(parent.keys, hist_k) and parent.get_seq_length() == n0  # the history is only read


def _mixed_conversation(runner):
    from persona_lit.personas.types import Persona

    personas = [Persona(name="cato", system_prompt="You are Cato, a terse pirate captain who ends with 'fair winds!'."),
                Persona(name="mira", system_prompt="You are Mira, a botanist."),
                Persona(name="ode", system_prompt="You are Ode, a poet who answers in rhyme and loves long words.")]
    conv = runner.start(personas, rows=3)  # three persona segments of different lengths: a padded history
    for text in (["Hello there, who are you?", "Hi.", "What is the weather like today at sea?"],
                 "Tell me one thing you like."):
        runner.say(conv, text)
    return conv


def _probe_everything(runner, conv):
    """Generated probe answers (their tokens, by row) and scored answers (full log-probs) on forks of conv; the
    fork rows are uneven per conversation row (row 0 three times, row 2 once)."""
    from persona_lit.evaluation.probing import ScoreItem

    index = [0, 1, 0, 2, 1, 0]
    questions = ["What is your name?", "Say hi.", "Where do you live?", "Count to five.", "Favourite food?", "Sing."]
    tokens = runner.on_fork(conv, index, lambda fork: (runner.say(fork, questions, 6, close=False),
                                                       fork.tokens.clone())[1])
    items = [ScoreItem(b, q, a, None, True) for b in (0, 1, 2)
             for q, a in [("Your name?", "My name is Cato, fair winds!"), ("Hi", "Hello. How can I help?")]]
    return tokens, [s.logprobs for s in runner.score(conv, items)]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
@pytest.mark.parametrize("mechanism", ["none", "repeat"])
def test_shared_forks_give_the_copying_forks_answers_and_scores(backbone_factory, name, mechanism):
    """The same probe tokens and the same scored log-probs (fp32) whether forks copy their rows or share the
    conversation's cache; the conversation is as it was after either (its next answer included)."""
    from persona_lit.evaluation.conversation import ConversationRunner
    from persona_lit.mechanisms.none import NoMechanism
    from persona_lit.mechanisms.repeat import RepeatMechanism

    bb = backbone_factory(name)
    mech = NoMechanism() if mechanism == "none" else RepeatMechanism(every=1)
    runs = {}
    for share in (False, True):
        mech.attach(bb.model)
        runner = ConversationRunner(bb.model, bb.chat, mech, max_new_tokens=5, probe_max_new_tokens=6,
                                    min_new_tokens=6, probe_batch=2, share_forks=share)
        conv = _mixed_conversation(runner)
        assert runner.shares(conv) == share and runner.fork_rows(conv) == (6 if share else 2)
        before = (conv.tokens.clone(), conv.cache.get_seq_length())
        runs[share] = (*_probe_everything(runner, conv), runner.say(conv, "And then?"))
        assert torch.equal(conv.tokens[:, : before[0].shape[1]], before[0])
    (tok_c, lp_c, next_c), (tok_s, lp_s, next_s) = runs[False], runs[True]
    assert torch.equal(tok_c, tok_s) and next_c == next_s
    assert max(float((a - b).abs().max()) for a, b in zip(lp_c, lp_s)) < 1e-5


def test_forks_share_only_under_mechanisms_that_leave_attention_alone(backbone_factory):
    from persona_lit.evaluation.conversation import ConversationRunner
    from persona_lit.mechanisms.lyra import LyraMechanism

    bb = backbone_factory("tiny-llama")
    mech = LyraMechanism(layers=[0])
    model = mech.attach(bb.model)
    runner = ConversationRunner(model, bb.chat, mech, max_new_tokens=3, probe_max_new_tokens=3, probe_batch=2)
    conv = _mixed_conversation(runner)
    assert not LyraMechanism.attention_untouched and not runner.shares(conv) and runner.fork_rows(conv) == 2


@pytest.mark.slow
def test_shared_forks_on_smollm2_token_identical_in_fp32_and_as_close_as_copying_in_bf16(backbone_factory):
    """Real model: fp32 probe tokens identical and log-probs within 1e-4 of the copying forks'; in bf16 the shared
    forks' log-probs are no farther from fp32 than the copying forks' are (both are bf16 rounding)."""
    from persona_lit.evaluation.conversation import ConversationRunner
    from persona_lit.models.backbones import keep_rotary_fp32

    bb = backbone_factory("smollm2-135m-instruct")
    out = {}
    for dtype in (torch.float32, torch.bfloat16):
        keep_rotary_fp32(bb.model.to(dtype))
        for share in (False, True):
            runner = ConversationRunner(bb.model, bb.chat, None, max_new_tokens=16, probe_max_new_tokens=8,
                                        probe_batch=2, share_forks=share)
            out[dtype, share] = _probe_everything(runner, _mixed_conversation(runner))
    (tok_c, lp_c), (tok_s, lp_s) = out[torch.float32, False], out[torch.float32, True]
    assert torch.equal(tok_c, tok_s)
    assert max(float((a - b).abs().max()) for a, b in zip(lp_c, lp_s)) < 1e-4
    err = {share: max(float((a.float() - b).abs().max()) for a, b in zip(out[torch.bfloat16, share][1], lp_c))
           for share in (False, True)}
    assert err[True] <= 1.5 * err[False] + 0.05, err
