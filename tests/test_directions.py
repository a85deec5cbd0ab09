"""Persona directions (steering/directions.py, sources.py), their llama.cpp export and the drift projection on a
saved direction: hand computations on tiny models, the layer convention pinned, bad input, the CLI."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from persona_lit.models.backbones import decoder_layers
from persona_lit.evaluation.conversation import TurnRecord
from persona_lit.evaluation.protocol import ProtocolResult, summarize as drift_summary
from persona_lit.errors import UserError
from persona_lit.steering.directions import (Sample, cosine_matrix, extract, generate, projection_axis, prompt_ids,
                                             sample_means, summarize)
from persona_lit.steering.gguf_export import control_vectors, export_gguf, read_gguf
from persona_lit.steering.sources import Source, parse_sources
from persona_lit.steering.vectors import Direction, block_hooks, load_direction
from tests.conftest import REPO, run_cli

MODELS = ["tiny-llama", "tiny-gemma3"]
QUESTIONS = ["What is a list?", "Name a colour, please, and say why you like it so much.", "Why?"]


def one_line(err: pytest.ExceptionInfo, *facts: str) -> str:
    text = str(err.value)
    assert "\n" not in text and text, text
    for fact in facts:
        assert fact in text, f"{fact!r} not in {text!r}"
    return text


def write_axis_data(root: Path) -> Path:
    """A small assistant-axis folder in the real files' format (our own text)."""
    (root / "roles" / "instructions").mkdir(parents=True)
    (root / "traits" / "instructions").mkdir(parents=True)
    questions = ["How do I boil an egg?", "What is rain?", "Should I learn to sail?"]
    (root / "roles" / "instructions" / "default.json").write_text(json.dumps(
        {"instruction": [{"pos": ""}, {"pos": "You are {model_name}."}, {"pos": "Respond as yourself."}]}))
    (root / "roles" / "instructions" / "sailor.json").write_text(json.dumps(
        {"instruction": [{"pos": "You are an old sailor."}, {"pos": "Answer as a deckhand would."}],
         "questions": questions, "eval_prompt": "unused"}))
    (root / "traits" / "instructions" / "cheerful.json").write_text(json.dumps(
        {"instruction": [{"pos": "Be cheerful.", "neg": "Be gloomy."}, {"pos": "Smile.", "neg": "Sigh."}],
         "questions": questions}))
    return root


# --- the layer convention and the masked means, by hand ---------------------------------------------------------

@pytest.mark.parametrize("name", MODELS)
def test_block_hook_output_is_hidden_states_shifted_by_one_except_the_last(backbone_factory, name):
    backbone = backbone_factory(name)
    model, n = backbone.model, len(decoder_layers(backbone.model))
    ids = torch.tensor([prompt_ids(backbone.chat, "You are Cato.", QUESTIONS[1])])
    seen = {}
    with block_hooks(model, {k: (lambda k: lambda h, kw: seen.__setitem__(k, h.clone()))(k) for k in range(n)}):
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    for k in range(n - 1):
        torch.testing.assert_close(seen[k], hs[k + 1], rtol=0, atol=0)  # index L = output of block L = hs[L + 1]
    assert not torch.allclose(seen[n - 1], hs[n], atol=1e-3)  # transformers' last entry is after the final norm
    torch.testing.assert_close(model.model.norm(seen[n - 1]), hs[n])


def hand_means(model, sample: Sample, positions: list[int]):
    """One unpadded forward: hidden_states[L + 1] at `positions` (and, for the last block, a plain hook)."""
    last = {}
    handle = decoder_layers(model)[-1].register_forward_hook(lambda m, a, out: last.__setitem__(0, out))
    try:
        ids = torch.tensor([sample.prompt + sample.answer])
        hs = model(input_ids=ids, output_hidden_states=True).hidden_states
    finally:
        handle.remove()
    out = last[0][0] if isinstance(last[0], tuple) else last[0]
    states = [hs[k + 1][0] for k in range(len(hs) - 2)] + [out[0]]
    h = torch.stack([s[positions] for s in states])  # [layers, tokens, hidden]
    return h.mean(1), h.norm(dim=-1).mean(1)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("role", ["response", "reply_start"])
def test_sample_means_equal_a_hand_computation(backbone_factory, name, role):
    backbone = backbone_factory(name)
    chat, model = backbone.chat, backbone.model
    answers = ["A list holds items in order.", "", "Blue, because the sea is blue and calm today, friend."]
    samples = [Sample(prompt_ids(chat, s, q), chat._ids(a))
               for s, q, a in zip(["You are Cato.", None, "Be brief."], QUESTIONS, answers)]
    means, norms, counts = sample_means(model, samples, role, chat.pad_id, batch=2)  # padded batches
    for i, s in enumerate(samples):
        positions = ([len(s.prompt) - 1] if role == "reply_start"
                     else list(range(len(s.prompt), len(s.prompt) + len(s.answer))))
        assert counts[i] == len(positions)
        if not positions:  # the empty answer: nothing to average
            assert torch.isnan(means[i]).all()
            continue
        mean, norm = hand_means(model, s, positions)
        torch.testing.assert_close(means[i].float(), mean, atol=2e-5, rtol=1e-4)
        torch.testing.assert_close(norms[i].float(), norm, atol=2e-5, rtol=1e-4)


def test_reply_start_direction_is_the_mean_difference_by_hand(backbone_factory):
    backbone = backbone_factory("tiny-llama")
    chat, model = backbone.chat, backbone.model
    source = Source("trait:x", "trait", "x", [("Be cheerful.", q) for q in QUESTIONS], [("Be gloomy.", q) for q in QUESTIONS])
    d = extract(backbone, source, "reply_start", batch=2)
    hand = {side: [hand_means(model, Sample(prompt_ids(chat, s, q), []), [len(prompt_ids(chat, s, q)) - 1])
                   for s, q in pairs] for side, pairs in (("pos", source.pos), ("neg", source.neg))}
    expected = torch.stack([m for m, _ in hand["pos"]]).mean(0) - torch.stack([m for m, _ in hand["neg"]]).mean(0)
    torch.testing.assert_close(d.vectors, expected, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(d.activation_norm, torch.stack([n for _, n in hand["neg"]]).mean(0), atol=2e-5, rtol=1e-4)
    assert d.meta["tokens_pos"] == 3 and d.meta["samples"] == 3 and d.meta["generation"] is None


@pytest.mark.parametrize("name", MODELS)
def test_batched_generation_equals_greedy_decoding_of_each_row_alone(backbone_factory, name):
    backbone = backbone_factory(name)
    chat, model = backbone.chat, backbone.model
    pairs = [("You are Cato.", q) for q in QUESTIONS] + [(None, QUESTIONS[0])]
    samples = generate(model, chat, pairs, max_new_tokens=6, batch=3)
    for (system, q), s in zip(pairs, samples):
        ids = prompt_ids(chat, system, q)
        assert s.prompt == ids
        answer = []
        for _ in range(6):  # the slow reference: a full forward per token, no cache, no padding
            token = int(model(input_ids=torch.tensor([ids + answer])).logits[0, -1].argmax())
            if token == chat.end_id:
                break
            answer.append(token)
        assert s.answer == answer


# --- files: the direction, bad input, the GGUF export --------------------------------------------------------------

def test_saved_direction_reloads_with_its_metadata(backbone_factory, tmp_path):
    backbone = backbone_factory("tiny-llama")
    [source] = parse_sources(["persona:stoic"], tmp_path, "tiny", 5, 2)
    d = extract(backbone, source, "response", max_new_tokens=4, batch=2)
    n = len(decoder_layers(backbone.model))
    back = load_direction(d.save(tmp_path / "d.safetensors"), fingerprint=backbone.fingerprint, layers=n)
    assert torch.equal(back.vectors, d.vectors) and torch.equal(back.activation_norm, d.activation_norm)
    assert back.meta["source"] == "persona:stoic" and back.meta["token_role"] == "response"
    assert back.meta["fingerprint"] == backbone.fingerprint and back.meta["samples"] == 2
    assert back.meta["instructions"]["neg"] == [None] and back.meta["generation"]["max_new_tokens"] == 4
    assert back.meta["direction_norm"] == pytest.approx(d.vectors.norm(dim=-1).tolist(), abs=1e-5)


def test_bad_direction_files_are_one_line_errors(tmp_path):
    d = Direction(torch.randn(4, 8), torch.rand(4) + 1, {"model": "m", "fingerprint": "abc"})
    path = d.save(tmp_path / "d.safetensors")
    with pytest.raises(UserError) as e:
        load_direction(tmp_path / "missing.safetensors", "projection_direction")
    one_line(e, "projection_direction=", "file not found")
    pickled = tmp_path / "d.pt"
    pickled.write_bytes(pickle.dumps({"direction": [1.0, 2.0]}))
    with pytest.raises(UserError) as e:
        load_direction(pickled)
    one_line(e, "not a safetensors file")
    with pytest.raises(UserError) as e:
        projection_axis(path, "abc", 6, None)
    one_line(e, "4 layers", "this model has 6")
    with pytest.raises(UserError) as e:
        projection_axis(path, "other", 4, None)
    one_line(e, "another base model", "other")
    with pytest.raises(UserError) as e:
        projection_axis(path, "abc", 4, 3)  # the last reply state is post-norm
    one_line(e, "projection_layer=3", "0..2")
    assert projection_axis(None, "abc", 4, None) is None and projection_axis(path, "abc", 4, 1).layers == 4


def test_bad_sources_are_one_line_errors(tmp_path):
    root = write_axis_data(tmp_path / "axis")
    cases = [(["role:nosuch"], ("task.sources[0]=role:nosuch", "ls ")),
             (["trait:sailor"], ("no trait 'sailor'",)),
             (["role:default"], ("no role 'default'",)),
             (["vibe:x"], ("expected persona:",)),
             (["persona:nosuch"], ("unknown persona 'nosuch'",)),
             (["role:sailor", "role:sailor"], ("same source",)),
             ("role:sailor", ("non-empty list",))]
    for specs, facts in cases:
        with pytest.raises(UserError) as e:
            parse_sources(specs, root, "m", 5, 40)
        one_line(e, *facts)
    (root / "roles" / "instructions" / "broken.json").write_text('{"instruction": [\n  {"pos": "x"},\n')
    with pytest.raises(UserError) as e:
        parse_sources(["role:broken"], root, "m", 5, 40)
    one_line(e, "broken.json:3", "not valid JSON")
    (root / "traits" / "instructions" / "half.json").write_text(json.dumps({"instruction": [{"pos": "x"}], "questions": ["q"]}))
    with pytest.raises(UserError) as e:
        parse_sources(["trait:half"], root, "m", 5, 40)
    one_line(e, "half.json", "instruction[0] lacks", "'neg'")
    with pytest.raises(UserError) as e:
        parse_sources(["role:sailor"], tmp_path / "nowhere", "m", 5, 40)
    one_line(e, "task.assistant_axis_dir=")


def test_sources_pair_questions_and_fill_the_default_assistant(tmp_path):
    root = write_axis_data(tmp_path / "axis")
    role, trait = parse_sources(["role:sailor", "trait:cheerful"], root, "SmolX", 2, 2)
    assert role.pos == [("You are an old sailor.", "How do I boil an egg?"), ("You are an old sailor.", "What is rain?"),
                        ("Answer as a deckhand would.", "How do I boil an egg?"), ("Answer as a deckhand would.", "What is rain?")]
    assert [s for s, _ in role.neg] == [None, None, "You are SmolX.", "You are SmolX."]  # "" = the model's default
    assert [q for _, q in role.neg] == [q for _, q in role.pos] and role.slug == "role-sailor"
    assert trait.neg[0] == ("Be gloomy.", "How do I boil an egg?") and len(trait.pos) == 4


SHARED = REPO.parent / "shared" / "data" / "assistant_axis"  # conf/task/direction.yaml's default, from the repo


@pytest.mark.skipif(not SHARED.is_dir(), reason="the shared assistant-axis data is absent")
def test_the_shared_role_and_trait_files_parse():
    pirate, optimistic = parse_sources(["role:pirate", "trait:optimistic"], SHARED, "m", 5, 40)
    assert len(pirate.pos) == len(pirate.neg) == 200 and len(optimistic.pos) == 200
    assert "You are m." in pirate.instructions()["neg"] and None in pirate.instructions()["neg"]


def test_cosine_matrix_is_symmetric_with_ones_on_the_diagonal():
    v = torch.randn(5, 16)
    v[3] = -2.5 * v[0]
    c = cosine_matrix(v)
    torch.testing.assert_close(c, c.T)
    torch.testing.assert_close(c.diagonal(), torch.ones(5, dtype=c.dtype))
    assert c[0, 3] == pytest.approx(-1.0) and c[1, 2] == pytest.approx(float(torch.nn.functional.cosine_similarity(v[1], v[2], 0)), abs=1e-6)
    ds = {f"s{i}": Direction(torch.randn(3, 16), torch.ones(3), {"source": f"s{i}", "kind": "trait", "name": f"s{i}", "samples": 1,
                                                                  "tokens_pos": 1, "tokens_neg": 1, "skipped_pos": 0, "skipped_neg": 0})
          for i in range(3)}
    s = summarize(ds, layer=1)
    assert len(s["cosine"]["by_layer"]) == 3 and s["cosine"]["matrix"] == s["cosine"]["by_layer"][1]


def test_gguf_round_trip_holds_what_llama_cpp_adds_at_each_block(tmp_path):
    import gguf

    d = Direction(torch.randn(5, 12), torch.rand(5) + 0.5, {"model": "tiny", "architecture": "gemma3_text",
                                                             "fingerprint": "f", "source": "role:x"})
    tensors, fields = read_gguf(export_gguf(d, tmp_path / "x.gguf"))
    assert sorted(tensors) == [1, 2, 3, 4]  # block 0 has no slot in llama.cpp
    for layer, vector in tensors.items():
        expected = (d.vectors[layer] / d.vectors[layer].norm() * d.activation_norm[layer]).numpy()
        np.testing.assert_allclose(vector, expected, rtol=1e-6)
        assert np.linalg.norm(vector) == pytest.approx(float(d.activation_norm[layer]), rel=1e-5)
    assert fields["general.architecture"] == "controlvector" and fields["controlvector.model_hint"] == "gemma3"
    assert fields["controlvector.layer_count"] == 4 and fields["persona_lit.source"] == "role:x"
    assert "block N" in fields["persona_lit.layer_convention"] and "alpha" in fields["persona_lit.scale"]
    reader = gguf.GGUFReader(str(tmp_path / "x.gguf"))
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F32}
    assert all(len(t.shape) == 1 for t in reader.tensors)
    with pytest.raises(UserError) as e:
        control_vectors(d, [0, 2])
    one_line(e, "block 0")


# --- the drift projection on a saved direction -------------------------------------------------------------------

def test_drift_projection_uses_the_saved_axis():
    """Persona minus control is [2, 1] at turn 0 and [0, 1] at turn 1: on the arm's own turn-0 direction turn 1
    scores (0*2 + 1*1) / 5 = 0.2; on a saved axis [0, 3] it scores 1 / 1 = 1."""
    def arm(states):
        return [[TurnRecord(t, "", "", "", 0, reply_state=torch.tensor([[0.0, 0.0], s, [0.0, 0.0]])) for t, s in enumerate(states)]] * 2
    result = ProtocolResult(arm([torch.tensor([3.0, 2.0]), torch.tensor([1.0, 2.0])]),
                            arm([torch.tensor([1.0, 1.0]), torch.tensor([1.0, 1.0])]))
    own = drift_summary(result, [0, 1], layer=1)["metrics"]["projection"]
    axis = Direction(torch.tensor([[1.0, 0.0], [0.0, 3.0], [1.0, 1.0]]), torch.ones(3), {"source": "role:x"})
    saved = drift_summary(result, [0, 1], layer=1, axis=axis)["metrics"]["projection"]
    assert own["mean"] == pytest.approx([1.0, 0.2]) and own["axis"] == "turn-0 difference"
    assert saved["mean"] == pytest.approx([1.0, 1.0]) and saved["axis"] == "role:x"


# --- the CLI -----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("directions")
    root, out = write_axis_data(tmp / "axis"), tmp / "out"
    r = run_cli("evaluate.py", "task=direction", "model=tiny-llama", "logger=none", f"out_dir={out}",
                "task.sources=[persona:pirate_mentor,role:sailor,trait:cheerful]", f"task.assistant_axis_dir={root}",
                "task.questions=2", "task.instructions=2", "task.max_new_tokens=4", "task.batch=3")
    return r, out, tmp


def test_evaluate_task_direction_writes_every_file(cli_run, backbone_factory):
    r, out, _ = cli_run
    assert r.returncode == 0, r.stderr[-3000:]
    slugs = ["persona-pirate_mentor", "role-sailor", "trait-cheerful"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{s}.{ext}" for s in slugs for ext in ("safetensors", "gguf")] + ["cosine.png", "directions.json", "norms.png", "report.md"])
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".out.")]  # no staged leftovers
    summary = json.loads((out / "directions.json").read_text())
    assert summary["cosine"]["sources"] == slugs and summary["run"]["layer"] == 2
    assert summary["sources"]["role-sailor"]["samples"] == 4 and summary["sources"]["persona-pirate_mentor"]["samples"] == 2
    backbone = backbone_factory("tiny-llama")
    d = load_direction(out / "role-sailor.safetensors", fingerprint=backbone.fingerprint, layers=4)
    assert d.meta["instructions"]["neg"] == [None, "You are tiny-llama."]
    assert summary["sources"]["role-sailor"]["direction_norm"] == pytest.approx(d.vectors.norm(dim=-1).tolist(), abs=1e-4)
    tensors, _ = read_gguf(out / "role-sailor.gguf")
    np.testing.assert_allclose(tensors[2], (d.unit(2) * d.activation_norm[2]).numpy(), rtol=1e-6)
    assert "cosine at layer 2" in r.stdout and "role-sailor" in (out / "report.md").read_text()


def test_evaluate_drift_projects_on_a_saved_direction(cli_run, tmp_path):
    r, out, _ = cli_run
    assert r.returncode == 0, r.stderr[-3000:]
    common = ["model=tiny-llama", "mechanism=none", "persona=pirate_mentor", "turns=1", "conversations=2",
              "probe_turns=[0,1]", "probe_kinds=[name]", "max_new_tokens=3", "probe_max_new_tokens=3",
              "capability_exchanges=0", "logger=none"]
    e = run_cli("evaluate.py", *common, f"projection_direction={out / 'role-sailor.safetensors'}", f"out_dir={tmp_path / 'e'}")
    assert e.returncode == 0, e.stderr[-3000:]
    projection = json.loads((tmp_path / "e" / "results.json").read_text())["metrics"]["projection"]
    assert projection["axis"] == "role:sailor" and projection["mean"][0] == pytest.approx(1.0)


def test_evaluate_task_direction_rejects_an_unknown_role(tmp_path):
    root = write_axis_data(tmp_path / "axis")
    r = run_cli("evaluate.py", "task=direction", "model=tiny-llama", "logger=none", "task.sources=[role:no_such_role]",
                f"task.assistant_axis_dir={root}", f"out_dir={tmp_path / 'o'}")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and "Traceback" not in r.stderr and lines[-1].startswith("error: task.sources[0]=role:no_such_role")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
@pytest.mark.skipif(not SHARED.is_dir(), reason="the shared assistant-axis data is absent")
def test_smollm2_pirate_directions_agree_more_with_each_other_than_with_an_accountant(backbone_factory):
    """Real SmolLM2, reply-start directions (nothing generated, ~20 s): the pirate mentor persona's direction is
    closer to the pirate role's than to the accountant role's at the middle layer (measured 0.67 vs 0.41)."""
    backbone = backbone_factory("smollm2-135m-instruct")
    sources = parse_sources(["persona:pirate_mentor", "role:pirate", "role:accountant"], SHARED, "smollm2", 2, 5)
    mentor, pirate, accountant = (extract(backbone, s, "reply_start", batch=10).vectors[15] for s in sources)
    c = cosine_matrix(torch.stack([mentor, pirate, accountant]))
    assert c[0, 1] > c[0, 2] + 0.1, c


def test_saved_results_get_the_usual_permissions(tmp_path):
    """Staged writes (mkstemp/mkdtemp are private) end with the umask's permissions, like any file."""
    import os
    import stat

    from persona_lit.outputs import staged_dir

    umask = os.umask(0o022)
    try:
        path = Direction(torch.ones(2, 3), torch.ones(2), {"model": "m"}).save(tmp_path / "d.safetensors")
        with staged_dir(tmp_path / "out") as tmp:
            (Path(tmp) / "x.txt").write_text("x")
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
