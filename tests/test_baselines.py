"""The training-free baselines `instaboost`, `split_softmax` and `repeat`: identity parameters are the base model
(or `none`) exactly, the reweighting is the papers' formula and moves attention toward the system prompt, cached
decoding equals one full forward (tiny Llama and tiny Gemma-3 with sliding layers, two padded rows), the
system-prompt keys are the persona segment without the attention sink, and repeat's copies are paid in history
tokens. Backbones load once per module and are deep-copied per test (fast)."""

import contextlib
import copy
import dataclasses

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.llama.modeling_llama import eager_attention_forward, repeat_kv

from persona_lit.models.backbones import load_backbone
from persona_lit.build import attach_mechanism
from persona_lit.evaluation.conversation import ConversationRunner
from persona_lit.data.dialogues import Collator
from persona_lit.errors import UserError
from persona_lit.mechanisms import REGISTRY
from persona_lit.mechanisms.split_softmax import split_softmax
from persona_lit.personas.load import load_persona
from tests.conftest import model_cfg, mechanism_cfg

ATTENTION = ["instaboost", "split_softmax"]
STRONG = {"instaboost": {"bias": 2.0}, "split_softmax": {"exponent": 0.3}}
IDENTITY = {"instaboost": {"bias": 0.0}, "split_softmax": {"exponent": 1.0}}
TURNS = [["Tell me about volcanoes.", "Hi"], ["And glaciers?", "Which is older, and why? Say it in detail, please."]]
_BACKBONES = {}


def backbone(name, attn="sdpa"):
    """A fresh copy of a tiny backbone (loaded once per module)."""
    if (name, attn) not in _BACKBONES:
        _BACKBONES[name, attn] = load_backbone(model_cfg(name, attn_implementation=attn))
    bb = _BACKBONES[name, attn]
    # frozen, as every mechanism leaves it (CPU matmuls on a slice may round differently when weights need grad)
    return dataclasses.replace(bb, model=copy.deepcopy(bb.model).requires_grad_(False))


def attach(bb, mechanism, **options):
    """attach `mechanism` with its conf/mechanism/*.yaml options, overridden by `options`."""
    cfg = mechanism_cfg(mechanism)
    for k, v in options.items():
        cfg.options[k] = v
    return attach_mechanism(bb, cfg)


def segment_batch(chat, system="You are Cato, a terse stoic."):
    """Two right-padded rows with segment ids (0: the system prompt), as the training collator makes them."""
    texts = ["What is the tallest mountain on Earth?", "Write a haiku about rain falling on a tin roof at night."]
    head = [{"role": "system", "content": system}] if system else []
    return Collator(chat.pad_id)([chat.encode_segments(head + [{"role": "user", "content": t},
                                                               {"role": "assistant", "content": "Little."}])
                                  for t in texts])


def logits(model, batch, **kwargs):
    """The last layer's output at every position (the logits' input: Gemma's 262k-word head costs more than the
    model) and the last position's logits."""
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True,
                    logits_to_keep=1, **kwargs)
    return torch.cat([out.hidden_states[-1].flatten(), out.logits.flatten()])


# identity parameters, disabled(), no system prompt ---------------------------------------------------------------
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
@pytest.mark.parametrize("mechanism", ATTENTION)
def test_identity_parameter_disabled_and_no_system_prompt_are_the_base_model(name, mechanism):
    base, bb = backbone(name), backbone(name)
    batch = segment_batch(bb.chat)
    expected = logits(base.model, batch)
    model, mech = attach(bb, mechanism, **IDENTITY[mechanism])
    assert torch.equal(logits(model, batch, segment_ids=batch["segment_ids"]), expected)
    assert not list(mech.trainable_parameters()) and not any(p.requires_grad for p in model.parameters())
    for key, value in STRONG[mechanism].items():
        setattr(mech, key, value)
    assert not torch.allclose(logits(model, batch, segment_ids=batch["segment_ids"]), expected, atol=1e-3)
    with mech.disabled():
        assert torch.equal(logits(model, batch, segment_ids=batch["segment_ids"]), expected)
    plain = segment_batch(bb.chat, system=None)  # no system prompt: nothing to reweight
    assert torch.equal(logits(model, plain, segment_ids=plain["segment_ids"]), logits(base.model, plain))


# the formula, on one attention call --------------------------------------------------------------------------------
def reference(query, key, value, mask, persona, groups, scaling, mechanism, parameter):
    """softmax(QK^T/sqrt(d) + M) reweighted as the paper says, written out: (output [B, q, H, d], pi, pi')."""
    scores = query @ repeat_kv(key, groups).transpose(2, 3) * scaling + mask
    inside = persona[:, None, None, :]
    if mechanism == "instaboost":
        probs = torch.softmax(scores, -1)
        boosted = torch.softmax(scores + parameter * inside, -1)
    else:
        probs = torch.softmax(scores, -1)
        pi = (probs * inside).sum(-1, keepdim=True)
        up = torch.where(pi > 0, pi ** parameter / pi, 1.0)  # no system-prompt key in view: the row as it is
        boosted = torch.where(inside, probs * up, probs * torch.where(pi < 1, (1 - pi ** parameter) / (1 - pi), 1.0))
    share = lambda p: (p * inside).sum(-1)  # noqa: E731
    return (boosted @ repeat_kv(value, groups)).transpose(1, 2), share(probs), share(boosted)


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("mechanism", ATTENTION)
def test_reweighting_is_the_papers_formula_and_moves_attention_to_the_system_prompt(mechanism, attn):
    module = backbone("tiny-llama", attn).model.model.layers[0].self_attn  # 4 query heads on 2 key/value heads
    function = sdpa_attention_forward if attn == "sdpa" else eager_attention_forward
    g = torch.Generator().manual_seed(0)
    rows, q, kv, d = 2, 3, 9, module.head_dim
    query, key, value = (torch.randn(rows, h, n, d, generator=g) * 2 for h, n in ((4, q), (2, kv), (2, kv)))
    persona = torch.zeros(rows, kv, dtype=torch.bool)
    persona[0, 1:5], persona[1, 3:6] = True, True  # row 1: left padding in slots 0..1, its sink in slot 2
    allowed = torch.tril(torch.ones(q, kv, dtype=torch.bool), diagonal=kv - q)[None, None].repeat(rows, 1, 1, 1)
    allowed[1, :, :, :2] = False
    additive = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
    mask = allowed if attn == "sdpa" else additive
    for parameter, more in ((STRONG[mechanism], True), ({"bias": -1.5} if mechanism == "instaboost" else
                                                        {"exponent": 1.7}, False)):
        mech = REGISTRY[mechanism](**parameter)
        value_of = next(iter(parameter.values()))
        out, _ = mech.reweight(function, module, query, key, value, mask, persona, scaling=module.scaling)
        want, before, after = reference(query, key, value, additive, persona, 2, module.scaling, mechanism, value_of)
        assert torch.allclose(out, want, atol=1e-5), (out - want).abs().max()
        assert bool(((after > before) if more else (after < before)).all())  # every head and query
        if mechanism == "split_softmax":
            assert torch.allclose(after, before ** value_of, atol=1e-6)
    # SDPA's no-mask shortcut (no padding; one query, or a fresh causal block) is the causal mask
    mech, value_of = REGISTRY[mechanism](**STRONG[mechanism]), next(iter(STRONG[mechanism].values()))
    for q_len in (1, kv):
        queries = torch.randn(rows, 4, q_len, d, generator=g) * 2
        causal = torch.tril(torch.ones(q_len, kv, dtype=torch.bool), diagonal=kv - q_len)
        zero = torch.zeros(causal.shape).masked_fill(~causal, torch.finfo(torch.float32).min)[None, None]
        out, _ = mech.reweight(function, module, queries, key, value, None, persona, scaling=module.scaling)
        want, _, _ = reference(queries, key, value, zero, persona, 2, module.scaling, mechanism, value_of)
        assert torch.allclose(out, want, atol=1e-5), (q_len, (out - want).abs().max())


def test_split_softmax_keeps_rows_at_the_ends_and_is_accurate_near_one():
    part, rest = torch.ones(4, 1), torch.full((4, 1), 2.0)
    pi = torch.tensor([[0.0], [1.0], [1 - 1e-6], [0.25]])
    out = split_softmax(part * pi, rest * (1 - pi), pi, 1 - pi, 0.5)
    assert out[0] == 2.0 and out[1] == 1.0  # nothing on one side: the row as it is
    assert torch.allclose(out[2:], torch.sqrt(pi[2:]) + 2 * (1 - torch.sqrt(pi[2:])), atol=1e-6)


# system-prompt keys; cached decoding == one full forward -----------------------------------------------------------
def run_conversation(model, bb, mech, calls=None):
    """Persona, then two turns on two rows of different lengths (padding); `calls` collects (slots, last logits)."""
    runner = ConversationRunner(model, bb.chat, mech, max_new_tokens=5)
    hook = None
    if calls is not None:
        hook = model.register_forward_hook(
            lambda m, a, kw, out: calls.append((kw["attention_mask"].shape[1], out.logits[:, -1].clone())),
            with_kwargs=True)
    conv = runner.start(load_persona("stoic"), rows=2)
    persona = conv.tokens.shape[1]
    for texts in TURNS:
        runner.say(conv, texts)
    assert runner.forward_new(conv, logits_to_keep=1) is not None  # the last answer's closing: left to a next call
    if hook is not None:
        hook.remove()
    return conv, persona


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_system_prompt_keys_are_the_persona_segment_without_its_first_token(name):
    bb = backbone(name)
    model, mech = attach(bb, "instaboost")
    conv, persona = run_conversation(model, bb, mech)
    expected = torch.zeros_like(conv.mask)
    expected[:, 1:persona] = True  # the persona segment fills the first slots of both rows; slot 0 is the sink
    assert persona == len(bb.chat.persona_ids(load_persona("stoic").system_prompt)) > 16  # past Gemma's window
    assert torch.equal(mech.flags, expected)
    # the training path (segment 0 of a collated batch) marks the same tokens
    batch = segment_batch(bb.chat, load_persona("stoic").system_prompt)
    logits(model, batch, segment_ids=batch["segment_ids"])
    want = (batch["segment_ids"] == 0) & batch["attention_mask"].bool()
    want[:, 0] = False
    assert torch.equal(mech.flags, want)


CACHE_CASES = [("tiny-llama", [0], "instaboost"), ("tiny-llama", [1, 3], "split_softmax"),
               ("tiny-llama", None, "instaboost"), ("tiny-llama", None, "split_softmax"),
               ("tiny-gemma3", [0], "split_softmax"), ("tiny-gemma3", [2, 5], "instaboost"),
               ("tiny-gemma3", [0, 1, 3], "instaboost"), ("tiny-gemma3", None, "split_softmax")]


@pytest.mark.parametrize("name,layers,mechanism", CACHE_CASES,
                         ids=[f"{n}-{m}-{'all' if l is None else '-'.join(map(str, l))}" for n, l, m in CACHE_CASES])
def test_cached_decoding_equals_one_full_forward(name, layers, mechanism):
    """The runner (persona, turns and answers fed in chunks and token by token on the KV cache, two left-padded
    rows) against one forward over the whole transcript with segment ids: the same logits at every fed slot."""
    bb = backbone(name)
    model, mech = attach(bb, mechanism, layers=layers, **STRONG[mechanism])
    calls = []
    conv, persona = run_conversation(model, bb, mech, calls)
    mask = conv.mask
    segments = torch.where(mask, 1, -1)
    segments[:, :persona] = 0
    slots = sorted({width - 1 for width, _ in calls})
    full_forward = dict(input_ids=conv.tokens, attention_mask=mask.long(),
                        position_ids=(mask.long().cumsum(1) - 1).clamp(min=0), logits_to_keep=torch.tensor(slots))
    with torch.no_grad():
        full = model(**full_forward, segment_ids=segments).logits
        with mech.disabled():
            base = model(**full_forward).logits
    checked = 0
    for width, last in calls:
        rows, at = mask[:, width - 1], slots.index(width - 1)
        assert torch.allclose(last[rows], full[rows, at], atol=1e-4), (width, (last[rows] - full[rows, at]).abs().max())
        checked += int(rows.sum())
    real = mask[:, slots]
    assert checked >= 12 and not torch.allclose(full[real], base[real], atol=1e-3)  # and the mechanism acted


# repeat ------------------------------------------------------------------------------------------------------------
def drift_records(bb, mechanism, options=None, disabled=False):
    model, mech = attach(bb, mechanism, **(options or {}))
    runner = ConversationRunner(model, bb.chat, mech, max_new_tokens=4, probe_max_new_tokens=3)
    persona = load_persona("stoic")
    streams = [["Tell me about volcanoes.", "And glaciers?", "Which is older?"], ["Hi", "Why?", "Tell me more."]]
    probe_turns = [1, 3] if bb.name == "tiny-llama" else []  # (Gemma's 262k-word head makes scoring slow)
    with mech.disabled() if disabled else contextlib.nullcontext():
        return runner.run(persona, streams, probe_turns, probes=persona.probes[:1], progress=False)


def summary(records):
    return [[(r.turn, r.answer, r.history_tokens, [(p.answer, p.margin) for p in r.probes]) for r in rows]
            for rows in records]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_repeat_every_zero_or_beyond_the_conversation_is_none_and_copies_are_paid_in_history_tokens(name):
    none = summary(drift_records(backbone(name), "none"))
    for every in (0, 10**6):
        assert summary(drift_records(backbone(name), "repeat", {"every": every})) == none
    assert summary(drift_records(backbone(name), "repeat", {"every": 1}, disabled=True)) == none
    bb = backbone(name)
    every2 = summary(drift_records(bb, "repeat", {"every": 2}))
    prompt, runner = load_persona("stoic").system_prompt, ConversationRunner(bb.model, bb.chat)
    copy_cost = len(runner.user_turn_ids("Why?", False, prompt)) - len(runner.user_turn_ids("Why?", False))
    assert copy_cost > 10
    for rows, base in zip(every2, none):
        assert rows[:2] == base[:2]  # turns 0 and 1, and the probes at turn 1 (they never get a copy)
        assert rows[2][2] - base[2][2] == copy_cost == rows[3][2] - base[3][2]  # turn 2 carries one copy


def test_repeat_inserts_a_system_message_or_prefixes_the_user_message_on_gemma():
    prompt = load_persona("stoic").system_prompt
    for name in ("tiny-llama", "tiny-gemma3"):
        bb = backbone(name)
        runner = ConversationRunner(bb.model, bb.chat)
        ids = runner.user_turn_ids("Why?", False, prompt)
        if bb.chat.fmt.system_in_first_user:
            assert ids == bb.chat.user_turn_ids(f"{prompt}\n\nWhy?")
        else:
            assert ids == bb.chat.message_ids("system", prompt)[0] + bb.chat.user_turn_ids("Why?")
        assert runner.user_turn_ids("Why?", False) == bb.chat.user_turn_ids("Why?")


# config ------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mechanism,options,facts", [
    ("instaboost", {"bias": "strong"}, ["mechanism.options.bias='strong'", "finite number"]),
    ("instaboost", {"bias": float("inf")}, ["mechanism.options.bias=inf"]),
    ("instaboost", {"layers": [4]}, ["mechanism.options.layers=[4]", "0..3"]),
    ("instaboost", {"layers": []}, ["mechanism.options.layers=[]", "null"]),
    ("split_softmax", {"exponent": 0}, ["mechanism.options.exponent=0", "> 0"]),
    ("split_softmax", {"exponent": True}, ["mechanism.options.exponent=True"]),
    ("split_softmax", {"layers": "all"}, ["mechanism.options.layers='all'"]),
    ("repeat", {"every": -1}, ["mechanism.options.every=-1", "integer >= 0"]),
    ("repeat", {"every": 2.5}, ["mechanism.options.every=2.5"]),
    ("instaboost", {"_attn": "flex_attention"}, ["model.attn_implementation='flex_attention'", "eager, sdpa"]),
])
def test_bad_options_are_one_line_user_errors(mechanism, options, facts):
    bb = backbone("tiny-llama")
    if "_attn" in options:
        bb.model.config._attn_implementation = options.pop("_attn")
    with pytest.raises(UserError) as err:
        attach(bb, mechanism, **options)
    message = str(err.value)
    assert "\n" not in message and all(f in message for f in facts), message
