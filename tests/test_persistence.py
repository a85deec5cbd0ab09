"""Steer-then-release persistence (persona_lit/steering/persistence*.py): the single KV-cached pass against a
slow reference that re-runs the whole prefix every token, end-of-turn handling, centring, half-life, intervals,
and the task's outputs and one-line errors."""

import json
import math

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from safetensors.torch import load_file

from tests.conftest import REPO, run_cli
from persona_lit.models.backbones import decoder_layers, load_backbone
from persona_lit.build import attach_mechanism
from persona_lit.errors import UserError
from persona_lit.steering.persistence import (Decoding, centre, continue_ids, curve, format_half_life, half_life,
                                              half_life_stats, prompt_ids, run_arm)
from persona_lit.steering.persistence_reference import reference_arm
from persona_lit.steering.persistence_report import report, summarize
from persona_lit.steering.vectors import Direction

QUESTIONS = ["Hi.", "What is the capital of France, and why?", "Tell me a long story about a lighthouse keeper."]
GREEDY = Decoding(do_sample=False)


def direction_file(bb, path, seed=0, fingerprint=None):
    n, hidden = len(decoder_layers(bb.model)), bb.model.config.hidden_size
    vectors = torch.randn(n, hidden, generator=torch.Generator().manual_seed(seed))
    meta = {"model": bb.name, "fingerprint": fingerprint or bb.fingerprint, "name": f"p{seed}"}
    return Direction(vectors, torch.full((n,), 2.0), meta).save(path)


def steered(bb, path, **options):
    cfg = OmegaConf.create({"name": "steer", "options": {"direction": str(path), **options}})
    return attach_mechanism(bb, cfg)[1]


def force_end_every(model, end_id, period):
    """A bias hook: the end token becomes the argmax whenever the last fed position is a multiple of
    `period` (positions are the same in the batched pass and the one-row reference)."""
    last = {}

    def take(module, args, kwargs):
        last["pos"] = kwargs["position_ids"][:, -1]

    def bias(module, args, output):
        hit = (last["pos"] % period == 0).to(output.dtype)[:, None]
        output[..., end_id] += 1e4 * hit
        return output

    return [model.register_forward_pre_hook(take, with_kwargs=True),
            model.get_output_embeddings().register_forward_hook(bias)]


def measure_unit(path, layer):
    from persona_lit.steering.vectors import load_direction

    return load_direction(path).unit(layer)[None]


def assert_same_run(fast, row, ref):
    assert fast.tokens[row].tolist() == ref.tokens[0].tolist()
    assert fast.ids[row] == ref.ids[0]
    torch.testing.assert_close(fast.projection[row], ref.projection[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name, positions", [("tiny-llama", "all"), ("tiny-llama", "response"),
                                             ("tiny-gemma3", "all")])  # Gemma: <end_of_turn>, sliding window 16
def test_single_pass_equals_full_recompute_every_token(backbone_factory, tmp_path, name, positions):
    bb = backbone_factory(name)
    path = direction_file(bb, tmp_path / "d.safetensors")
    mech = steered(bb, path, layers=[1], alpha=6.0, positions=positions)
    hooks = force_end_every(bb.model, bb.chat.end_id, 9)
    prompts = [prompt_ids(bb.chat, q, None) for q in QUESTIONS]  # three lengths: a padded batch
    unit, n, m = measure_unit(path, 3), 6, 14
    for steer in (True, False):
        fast = run_arm(bb.model, bb.chat, prompts, [0, 1, 2], n, m, mech, 3, unit, GREEDY, steered=steer)
        assert fast.turn_end[:, :n].any() and fast.turn_end[:, n:].any()  # Continue turns in both phases
        for row, prompt in enumerate(prompts):
            ref = reference_arm(bb.model, bb.chat, prompt, row, n, m, mech, 3, unit, GREEDY, steered=steer)
            assert_same_run(fast, row, ref)
        if steer:
            kept = fast
    control = fast
    # steering did something in every row (with `response`, only where a generated token was the last one fed)
    assert (kept.projection[:, :n] - control.projection[:, :n]).abs().amax(1).min() > 1.0
    for h in hooks:
        h.remove()


@pytest.mark.slow
def test_single_pass_equals_full_recompute_on_smollm2(backbone_factory, tmp_path):
    bb = backbone_factory("smollm2-135m-instruct")
    path = direction_file(bb, tmp_path / "d.safetensors")
    mech = steered(bb, path, layers=[10], alpha=8.0)
    prompts = [prompt_ids(bb.chat, q, None) for q in QUESTIONS[:2]]
    unit, n, m = measure_unit(path, 20), 4, 8
    fast = run_arm(bb.model, bb.chat, prompts, [0, 1], n, m, mech, 20, unit, GREEDY)
    for row, prompt in enumerate(prompts):
        assert_same_run(fast, row, reference_arm(bb.model, bb.chat, prompt, row, n, m, mech, 20, unit, GREEDY))


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
def test_end_of_turn_appends_continue_turn_and_no_second_bos(backbone_factory, tmp_path, name):
    bb = backbone_factory(name)
    chat = bb.chat
    mech = steered(bb, direction_file(bb, tmp_path / "d.safetensors"), layers=[0], alpha=2.0)
    hooks = force_end_every(bb.model, chat.end_id, 5)
    prompt = prompt_ids(chat, QUESTIONS[1], None)
    trace = run_arm(bb.model, chat, [prompt], [0], 4, 12, mech, 1, torch.randn(1, bb.model.config.hidden_size),
                    GREEDY, continue_text="Continue.")
    tokens = trace.tokens[0].tolist()
    assert len(tokens) == 16 and tokens.count(chat.end_id) >= 2  # only generated tokens are counted
    insert = continue_ids(chat, "Continue.")
    expected = list(prompt)
    for t in tokens[:-1]:  # the last token is never fed
        expected += [t] + (insert if t == chat.end_id else [])
    assert trace.ids[0] == expected
    text = chat.tokenizer.decode(insert)
    assert "Continue." in text and text.rstrip().endswith(chat.tokenizer.decode(chat.generation_prompt()).strip())
    if chat.bos_ids:  # Gemma: exactly one <bos>, at the start
        assert trace.ids[0].count(chat.bos_ids[0]) == 1 and trace.ids[0][0] == chat.bos_ids[0]
    for h in hooks:
        h.remove()


def test_measuring_at_the_steered_block_reads_before_the_addition(backbone_factory, tmp_path):
    bb = backbone_factory("tiny-llama")
    path = direction_file(bb, tmp_path / "d.safetensors")
    mech = steered(bb, path, layers=[2], alpha=5.0)
    prompts = [prompt_ids(bb.chat, QUESTIONS[1], None)]
    unit = measure_unit(path, 2)  # the pushed vector's own direction, read at block 2 and at block 3
    for layer, same in ((2, True), (3, False)):
        p = run_arm(bb.model, bb.chat, prompts, [0], 1, 1, mech, layer, unit, GREEDY).projection[0, 0, 0]
        q = run_arm(bb.model, bb.chat, prompts, [0], 1, 1, mech, layer, unit, GREEDY, steered=False).projection[0, 0, 0]
        # block 2's own output before its hook is untouched by steering at 2; block 3 reads the pushed stream
        assert (p == q) if same else abs(p - q - 5.0 * 2.0) < 0.5 * 5.0 * 2.0


def test_alpha_zero_has_no_steered_level(backbone_factory, tmp_path):
    bb = backbone_factory("tiny-llama")
    path = direction_file(bb, tmp_path / "d.safetensors")
    mech = steered(bb, path, layers=[1], alpha=0.0)
    prompts = [prompt_ids(bb.chat, q, None) for q in QUESTIONS[:2]]
    unit, sampled = measure_unit(path, 3), Decoding(True, 0.9, 0.9)
    s = run_arm(bb.model, bb.chat, prompts, [5, 6], 3, 5, mech, 3, unit, sampled)
    c = run_arm(bb.model, bb.chat, prompts, [5, 6], 3, 5, mech, 3, unit, sampled, steered=False)
    assert torch.equal(s.tokens, c.tokens) and torch.equal(s.projection, c.projection)  # seeds shared by both arms
    centred, level = centre(s.projection[..., 0], c.projection[..., 0], 3)
    assert torch.isnan(centred).all() and torch.isnan(level).all()
    info = {"n_steer": 3, "n_release": 5, "measure_layer": 3, "window": 2, "directions": [str(path)], "model": "m",
            "alpha": 0.0, "steer_layers": [1], "positions": "all", "questions": QUESTIONS[:2], "seeds": [5, 6],
            "runs": 2, "do_sample": True, "temperature": 0.9, "top_p": 0.9, "continue_text": "Continue."}
    results, _ = summarize(info, ["p0"], [Direction(torch.ones(4, 64), torch.ones(4))], [(0, 5), (1, 6)], c, [s])
    r = results["personas"]["p0"]
    assert r["no_steered_level"] == 2 and "no steered level" in r["message"] and r["half_life"]["n"] == 0
    assert all(v is None for v in r["curve"]["mean"]) and "no run with a steered level" in report(results, "")
    json.dumps(results, allow_nan=False)  # NaN never reaches results.json


def test_centring_by_hand():
    p = torch.tensor([[3.0, 5.0, 2.0, 1.0], [2.0, 2.0, 0.0, 0.0]])
    q = torch.tensor([[1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 1.0, 3.0]])  # row 1: steered phase equals the control
    c, level = centre(p, q, 2)
    torch.testing.assert_close(c[0], torch.tensor([2 / 3, 4 / 3, 1 / 3, 0.0], dtype=torch.float64))
    assert level[0] == 3.0 and torch.isnan(level[1]) and torch.isnan(c[1]).all()
    assert torch.isnan(centre(p, q, 0)[0]).all()  # no steered phase: no steered level


def test_half_life_known_answers_and_censoring():
    release = torch.tensor([[1, 0.9, 0.6, 0.4, 0.3, 0.2],
                            [1, 0.4, 1, 1, 0.3, 0.2],  # a one-token dip: the window smooths it away
                            [1, 1, 1, 1, 1, 1],  # never below half: censored
                            [0.2, 0.2, 0.2, 0.2, 0.2, 0.2],
                            [1, math.nan, 1, 1, 1, 1]], dtype=torch.float64)
    hl1, c1 = half_life(release, window=1)
    hl3, c3 = half_life(release, window=3)
    assert hl1[:4].tolist() == [3, 1, 6, 0] and hl3[:4].tolist() == [2, 4, 6, 0]
    assert c1.tolist() == [False, False, True, False, False] and torch.isnan(hl1[4])
    stats = half_life_stats(hl3, c3, 6)
    assert (stats["n"], stats["censored"], stats["median"], stats["median_lower_bound"]) == (4, 1, 3.0, False)
    assert stats["mean_lower_bound"] and stats["ci_low"] is None and stats["no_steered_level"] == 1
    assert ">= 3.0" in format_half_life(stats) and "1 of 4 censored at >= 6" in format_half_life(stats)
    mostly = half_life_stats(torch.tensor([6.0, 6.0, 2.0]), torch.tensor([True, True, False]), 6)
    assert mostly["median"] == 6 and mostly["median_lower_bound"]


def test_intervals_none_for_one_run_never_zero_width():
    one = curve(torch.tensor([[1.0, 0.5, 0.2]], dtype=torch.float64))
    assert one["ci_low"] == [None] * 3 and one["n"] == [1] * 3
    same = curve(torch.tensor([[1.0, 0.5], [1.0, 0.5]], dtype=torch.float64))
    assert same["ci_low"] == [None, None] and same["interval"] == ["none", "none"]
    spread = curve(torch.tensor([[1.0, 0.5], [0.8, 0.1], [0.9, 0.3]], dtype=torch.float64))
    assert all(lo < m < hi for lo, m, hi in zip(spread["ci_low"], spread["mean"], spread["ci_high"]))
    assert half_life_stats(torch.tensor([4.0]), torch.tensor([False]), 9)["ci_low"] is None
    equal = half_life_stats(torch.tensor([0.0, 0.0]), torch.tensor([False, False]), 9)  # Wilson, not [0, 0]
    assert equal["interval"] == "wilson" and equal["ci_low"] == 0.0 < equal["ci_high"] <= 9
    full = half_life_stats(torch.tensor([0.0, 6.0, 1.0]), torch.tensor([False] * 3), 9)
    assert full["ci_low"] == 0.0 < full["mean"] < full["ci_high"] <= 9  # clipped to [0, n_release]


def compose_eval(*overrides):
    with initialize_config_dir(str(REPO / "conf"), version_base="1.3"):
        return compose("evaluate", overrides=["task=persistence", "model=tiny-llama", "mechanism=steer",
                                              "logger=none", *overrides])


@pytest.fixture(scope="module")
def directions(tmp_path_factory):
    root = tmp_path_factory.mktemp("dirs")
    bb = load_backbone(OmegaConf.load(REPO / "conf/model/tiny-llama.yaml"))
    paths = [direction_file(bb, root / f"p{i}.safetensors", seed=i) for i in range(2)]
    paths.append(direction_file(bb, root / "other.safetensors", fingerprint="0123456789abcdef"))
    return paths


@pytest.mark.parametrize("override, facts", [
    ("task.n_steer=-1", ["task.n_steer=-1", ">= 0"]),
    ("task.measure_layer=99", ["task.measure_layer=99", "0..3"]),
    ("task.directions=[OTHER]", ["task.directions[0]", "another base model"]),
    ("task.seeds=[0,1]", ["task.seeds=[0, 1]", "greedy", "one seed"]),
    ("mechanism=none", ["mechanism=none", "mechanism=steer"]),
])
def test_bad_options_are_one_line_user_errors(directions, tmp_path, override, facts):
    from persona_lit.steering.persistence_task import run_task

    override = override.replace("OTHER", str(directions[2]))
    cfg = compose_eval(f"mechanism.options.direction={directions[0]}", "task.do_sample=false", "task.seeds=[0]",
                       f"out_dir={tmp_path / 'out'}", override) if override != "mechanism=none" else \
        compose_eval(f"out_dir={tmp_path / 'out'}", override)
    with pytest.raises(UserError) as e:
        run_task(cfg)
    assert "\n" not in str(e.value) and all(f in str(e.value) for f in facts), str(e.value)
    assert not (tmp_path / "out").exists()


def test_evaluate_persistence_end_to_end(directions, tmp_path):
    out = tmp_path / "out"
    args = ["evaluate.py", "task=persistence", "model=tiny-llama", "mechanism=steer", "mechanism.options.alpha=6",
            "mechanism.options.layers=[1]", f"task.directions=[{directions[0]},{directions[1]}]", "task.n_steer=4",
            "task.n_release=6", "task.questions=2", "task.seeds=[0,1]", "task.batch=3", "logger=csv", f"out_dir={out}"]
    proc = run_cli(*args, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["run"]["measure_layer"] == 2 and set(results["ranking"]) == {"p0", "p1"}  # halfway to block 3
    for name in ("p0", "p1"):
        r = results["personas"][name]
        assert r["half_life"]["n"] == 4 and len(r["curve"]["mean"]) == 10 and r["no_steered_level"] == 0
    traces = load_file(out / "traces.safetensors")
    assert traces["p0/centred"].shape == (4, 10) and traces["control/tokens"].shape == (4, 10)
    torch.testing.assert_close(traces["p1/centred"][:, :4].double().mean(1), torch.ones(4, dtype=torch.float64))
    assert len((out / "transcript.jsonl").read_text().splitlines()) == 3 * 4
    report_md = (out / "report.md").read_text()
    assert "c_t = (p_t - b) / (s - b)" in report_md and "p0" in report_md and (out / "persistence.png").stat().st_size
    assert "persistence/p0/centred" in (out / "csv" / "metrics.csv").read_text().splitlines()[0]
    bad = run_cli(*[a for a in args if not a.startswith("out_dir")], "task.measure_layer=9",
                  f"out_dir={tmp_path / 'bad'}", timeout=300)
    lines = bad.stderr.strip().splitlines()
    assert bad.returncode == 2 and lines[-1].startswith("error: task.measure_layer=9") and "Traceback" not in bad.stderr
    assert not (tmp_path / "bad").exists()
