"""The bleed arm (evaluate.py bleed=true): the same user turns, no persona, the mechanism on, answering the
persona's probes like the control arm. Scripted (no model): its metrics, the paired bleed - control differences,
the report, compare table and transcript; `none` skips it. Tiny Llama and tiny Gemma-3: identity settings
(steer alpha 0, instaboost bias 0, split_softmax exponent 1, repeat every 0, weight_steer alpha 0) give a bleed arm
equal to the control arm bit for bit, every mechanism runs without a persona, a non-identity one differs. The
CLI end to end on one and on two processes."""

import copy
import dataclasses
import json
import math

import pytest
import torch

from persona_lit.models.backbones import load_backbone
from persona_lit.build import attach_mechanism
from persona_lit.evaluation.conversation import ConversationRunner, TurnRecord
from persona_lit.evaluation.protocol import ProtocolResult, merge, run_protocol, summarize
from persona_lit.personas.load import load_persona
from tests.conftest import model_cfg, run_cli, mechanism_cfg
from tests.test_drift import PERSONA, PROBE_TURNS, TURNS, ScriptedRunner


# scripted (no model) -----------------------------------------------------------------------------------------------
class BleedingRunner(ScriptedRunner):
    """A mechanism (`scripted`) that holds the persona when given one and, given none, says the persona's name
    while `bleeds(turn)` (with the mechanism on; the control arm has it off)."""

    def __init__(self, bleeds):
        super().__init__(lambda t: True, baseline=lambda t: True)
        self.bleeds = bleeds

    def _on(self, conv):
        if conv.system_prompt is None:
            return not self.mechanism._disabled and self.bleeds(conv.tokens.shape[1])
        return super()._on(conv)


def test_bleed_arm_metrics_paired_difference_report_transcript_and_compare(tmp_path):
    from persona_lit.evaluation.compare import compare_runs
    from persona_lit.evaluation.report import write_report

    runner = BleedingRunner(lambda t: t >= 4)  # from turn 4 on, without a persona, it says the name anyway
    assert run_protocol(runner, PERSONA, [TURNS], PROBE_TURNS, progress=False).bleed_arm == []  # off by default
    result = run_protocol(runner, PERSONA, [TURNS] * 5, PROBE_TURNS, progress=False, bleed=True)
    assert len(result.bleed_arm) == 5 and merge([result, result]).bleed_arm == result.bleed_arm * 2
    assert {r.persona for records in result.bleed_arm for r in records} == {PERSONA.key}
    summary = summarize(result, PROBE_TURNS, layer=0)
    m = summary["metrics"]
    assert m["adherence/name_bleed"]["mean"] == [0, 0, 0, 1, 1] and m["adherence/name_control"]["mean"] == [0] * 5
    assert m["likelihood_margin_bleed"]["mean"] == [-1, -1, -1, 1, 1]
    diff = m["bleed_vs_control/adherence/name"]
    assert diff["mean"] == [0, 0, 0, 1, 1] and diff["n"] == [1, 5, 5, 5, 5]
    assert diff["ci_low"][3] > 0 and diff["ci_high"][3] == 1.0  # 5 conversations all +1: Wilson over units
    assert "projection_bleed" not in m  # the control arm has none either
    without = run_protocol(runner, PERSONA, [TURNS] * 5, PROBE_TURNS, progress=False)
    assert others_unchanged(summary, summarize(without, PROBE_TURNS, layer=0))

    res = {"run": {"mechanism": "scripted", "model": "scripted", "persona": "Cato", "ckpt": None, "conversations": 5,
                   "turns": 8, "do_sample": False, "probe_turns": PROBE_TURNS}, **summary}
    (tmp_path / "run").mkdir()
    write_report(tmp_path / "run", res, result.persona_arm, result.control_arm, result.baseline_arm, result.bleed_arm)
    saved = json.loads((tmp_path / "run" / "results.json").read_text())["metrics"]
    assert {"adherence/name_bleed", "bleed_vs_control/adherence/name"} <= set(saved)
    rows = [json.loads(line) for line in (tmp_path / "run" / "transcript.jsonl").read_text().splitlines()]
    assert [r["arm"] for r in rows].count("bleed") == 5 * 9
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Does scripted act without a persona? (bleed arm)" in report
    bleed_rows = {line.split(" | ")[1]: line for line in report.split("(bleed arm)")[1].split("\n## ")[0].splitlines()
                  if line.startswith("| adherence/name |")}
    assert bleed_rows["4"].startswith("| adherence/name | 4 | 1.000 |")
    assert "| 0.0625 |" in bleed_rows["4"]  # five conversations all +1: the smallest sign-flip p five units allow
    assert bleed_rows["4"].endswith("| no clear difference (Holm) |")  # which Holm keeps above 0.05
    assert bleed_rows["1"].endswith("(Holm) |") or bleed_rows["1"].endswith("| no test (n < 2) |")

    (tmp_path / "cmp").mkdir()
    assert "compare.png" in compare_runs([tmp_path / "run"], tmp_path / "cmp")
    table = (tmp_path / "cmp" / "compare.md").read_text().split("## Every metric")[0]
    header = next(line for line in table.splitlines() if line.startswith("| run | turn |"))
    assert header == "| run | turn | name | margin | bleed name | control KL | history tokens | s/turn |"
    assert next(line for line in table.splitlines() if line.startswith("| scripted | 8 |")).split(" | ")[4] \
        .startswith("1.00 [")


def others_unchanged(with_bleed, without):
    """The other arms are the same with or without the bleed arm (it runs last)."""
    strip = {k: v for k, v in with_bleed["metrics"].items() if not k.endswith("_bleed") and "bleed_vs" not in k}
    return strip == without["metrics"] and with_bleed["history_tokens"] == without["history_tokens"]


def test_mechanism_none_skips_the_bleed_arm_without_an_error():
    result = run_protocol(ScriptedRunner(lambda t: True), PERSONA, [TURNS] * 2, PROBE_TURNS, progress=False, bleed=True)
    assert result.bleed_arm == [] and len(result.control_arm) == 2  # `none` on, without a persona, is the control
    assert not any("bleed" in name for name in summarize(result, PROBE_TURNS, layer=0)["metrics"])


def test_bleed_minus_control_kl_is_paired_by_conversation_and_clustered_by_persona():
    """Three conversations of two personas; KL differences paired by conversation and turn, the interval the
    cluster bootstrap of the per-conversation differences (as vs_baseline)."""
    from persona_lit.metrics import PerTurnMean

    def arm(kls):
        return [[TurnRecord(0, "", "", "", 0, capability={"kl_to_base": 0.0, "nll": 1.0}),
                 TurnRecord(2, "q", "a", "", 10, capability={"kl_to_base": v, "nll": 1.0})] for v in kls]

    control, bleed = [0.10, 0.30, 0.05], [0.15, 0.90, 0.05]
    result = ProtocolResult(arm([0.0] * 3), arm(control), [0, 0, 1], [], arm(bleed))
    m = summarize(result, [0, 2])["metrics"]
    diff = m["bleed_vs_control/capability/kl_to_base"]
    want = PerTurnMean([0, 2], test_zero=True)
    for c, (b, k, g) in enumerate(zip(bleed, control, [0, 0, 1])):
        want.update(c, 0, 0.0, group=g)
        want.update(c, 2, b - k, group=g)
    assert diff == want.compute()
    assert diff["mean"][1] == pytest.approx(((0.05 + 0.60) / 2 + 0.0) / 2) and diff["unit"][1] == "personas"
    assert m["capability/kl_to_base_bleed"]["mean"][1] == pytest.approx(((0.15 + 0.90) / 2 + 0.05) / 2)


def test_two_ranks_gather_the_bleed_arm_in_conversation_order():
    from persona_lit.evaluation.distributed import interleave

    def rec(c):
        return [TurnRecord(0, "", "", "", c), TurnRecord(1, f"q{c}", f"a{c}", "writing", 10 + c)]

    parts = [ProtocolResult(*([rec(base + c) for c in range(r, 3, 2)] for base in (0, 100)), [], [],
                            [rec(200 + c) for c in range(r, 3, 2)]) for r in range(2)]
    merged = interleave(parts, 3)
    assert [conv[1].user for conv in merged.bleed_arm] == ["q200", "q201", "q202"]
    assert [conv[1].user for conv in merged.control_arm] == ["q100", "q101", "q102"]


# tiny models ---------------------------------------------------------------------------------------------------------
STREAMS = [["Tell me about volcanoes.", "And glaciers?"], ["Hi", "Why?"]]
CAPABILITY = [("Name a prime number.", "Seven is a prime number.")]
_BACKBONES = {}


def backbone(name, **overrides):
    """A fresh copy of a tiny backbone (loaded once per module), frozen as every mechanism leaves it."""
    key = (name, tuple(sorted(overrides.items())))
    if key not in _BACKBONES:
        _BACKBONES[key] = load_backbone(model_cfg(name, **overrides))
    bb = _BACKBONES[key]
    return dataclasses.replace(bb, model=copy.deepcopy(bb.model).requires_grad_(False))


def direction(bb, tmp_path):
    from tests.test_steer import direction_file

    return str(direction_file(bb, tmp_path / f"d-{bb.name}.safetensors"))


def delta(bb, tmp_path):
    """A small random ΔW on every layer's q_proj and down_proj (as task=weight_diff writes one)."""
    from persona_lit.steering.weight_diff import FORMAT, save_delta

    g = torch.Generator().manual_seed(3)
    tensors = {n: 0.05 * torch.randn(p.shape, generator=g) for n, p in bb.model.named_parameters()
               if n.endswith(("q_proj.weight", "down_proj.weight"))}
    return str(save_delta(tmp_path / f"w-{bb.name}.safetensors", tensors,
                          {"format": FORMAT, "fingerprint": bb.fingerprint}))


def protocol(bb, mechanism, tmp_path, **options):
    """The drift protocol with the bleed arm, two conversations of two turns, the persona's first name probe."""
    cfg = mechanism_cfg(mechanism)
    if mechanism == "steer":
        cfg.options.direction = direction(bb, tmp_path)
    if mechanism == "weight_steer":
        cfg.options.delta = delta(bb, tmp_path)
    for k, v in options.items():
        cfg.options[k] = v
    model, mech = attach_mechanism(bb, cfg)
    model.eval()
    runner = ConversationRunner(model, bb.chat, mech, max_new_tokens=4, probe_max_new_tokens=3)
    stoic = load_persona("stoic")
    persona = dataclasses.replace(stoic, probes=tuple(p for p in stoic.probes if p.kind == "name")[:1])
    result = run_protocol(runner, persona, STREAMS, [0, 2], progress=False, bleed=True, capability=CAPABILITY,
                          capability_tokens=4, batch=2)
    return result, summarize(result, [0, 2])["metrics"]


def transcript(arm):
    """Every record field (the reply state as a list), timings left out."""
    return [[{k: (v.tolist() if isinstance(v, torch.Tensor) else v) for k, v in dataclasses.asdict(r).items()
              if k != "seconds"} for r in records] for records in arm]


IDENTITY = [("tiny-llama", "steer", {"alpha": 0.0}), ("tiny-gemma3", "steer", {"alpha": 0.0}),
            ("tiny-llama", "instaboost", {"bias": 0.0}), ("tiny-gemma3", "instaboost", {"bias": 0.0}),
            ("tiny-llama", "split_softmax", {"exponent": 1.0}), ("tiny-gemma3", "split_softmax", {"exponent": 1.0}),
            ("tiny-llama", "repeat", {"every": 0}), ("tiny-gemma3", "repeat", {"every": 0}),
            ("tiny-llama", "weight_steer", {"alpha": 0.0}),
            # no persona and no default system prompt: nothing to boost, nothing to repeat
            ("tiny-llama", "instaboost", {"bias": 4.0}), ("tiny-gemma3", "split_softmax", {"exponent": 0.3}),
            ("tiny-llama", "repeat", {"every": 1})]


@pytest.mark.parametrize("name,mechanism,options", IDENTITY,
                         ids=[f"{n}-{m}-{'-'.join(f'{k}{v}' for k, v in o.items())}" for n, m, o in IDENTITY])
def test_identity_settings_give_a_bleed_arm_equal_to_the_control_arm_bit_for_bit(name, mechanism, options, tmp_path):
    result, m = protocol(backbone(name), mechanism, tmp_path, **options)
    assert len(result.bleed_arm) == 2
    assert transcript(result.bleed_arm) == transcript(result.control_arm)
    controls = [n for n in m if n.endswith("_control")]
    assert {"adherence/name_control", "likelihood_margin_control", "capability/kl_to_base_control"} <= set(controls)
    for n in controls:
        assert m[f"{n[:-len('_control')]}_bleed"] == m[n], n
    for n in ("adherence/name", "capability/kl_to_base"):
        assert m[f"bleed_vs_control/{n}"]["mean"] == [0.0, 0.0], n


@pytest.mark.parametrize("name,mechanism,options", [
    ("tiny-llama", "steer", {"alpha": 4.0}), ("tiny-gemma3", "steer", {"alpha": 4.0}),
    ("tiny-llama", "weight_steer", {"alpha": 1.0})])
def test_a_mechanism_that_acts_without_a_persona_gives_a_different_bleed_arm(name, mechanism, options, tmp_path):
    result, m = protocol(backbone(name), mechanism, tmp_path, **options)
    assert transcript(result.bleed_arm) != transcript(result.control_arm)
    kl = m["bleed_vs_control/capability/kl_to_base"]
    assert kl["mean"][0] > 1e-4  # turn 0: no persona, no history, only the mechanism differs from the base model
    assert m["capability/kl_to_base_bleed"]["mean"][0] == pytest.approx(kl["mean"][0] + m["capability/kl_to_base_control"]["mean"][0])


def test_a_default_system_prompt_is_what_system_prompt_mechanisms_act_on_without_a_persona(tmp_path):
    """SmolLM2's template (and conf/model/*.yaml default_system_prompt) puts a default system prompt first when
    there is no persona: instaboost then boosts it, so the bleed arm leaves the control arm."""
    bb = backbone("tiny-llama", default_system_prompt="You are a helpful assistant.")
    result, m = protocol(bb, "instaboost", tmp_path, bias=4.0)
    assert result.bleed_arm[0][0].history_tokens > 5  # the default prompt is the persona segment
    assert m["bleed_vs_control/capability/kl_to_base"]["mean"][0] > 1e-4


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gemma3"])
@pytest.mark.parametrize("mechanism", ["lyra", "triplet", "lora"])
def test_every_mechanism_runs_without_a_persona(name, mechanism, tmp_path):
    """Lyra's persona segment is then empty (Llama without a default system prompt) or BOS alone (Gemma): its
    layers see the current turn only. Untrained triplet and LoRA start as the base model."""
    result, m = protocol(backbone(name), mechanism, tmp_path)
    bleed, control = transcript(result.bleed_arm), transcript(result.control_arm)
    assert [[r["turn"] for r in c] for c in bleed] == [[0, 1, 2]] * 2
    assert [c[0] for c in bleed] == [c[0] for c in control]  # turn 0: no persona, no history, nothing to change
    assert "bleed_vs_control/adherence/name" in m and "bleed_vs_control/capability/kl_to_base" in m
    if mechanism in ("triplet", "lora"):
        assert bleed == control
    else:  # Lyra hides the history from its layers: later turns differ
        assert m["capability/kl_to_base_bleed"]["mean"][1] != m["capability/kl_to_base_control"]["mean"][1]


# the CLI -------------------------------------------------------------------------------------------------------------
def test_evaluate_cli_bleed_true_end_to_end_and_on_two_processes(backbone_factory, tmp_path):
    """evaluate.py bleed=true with a steering mechanism on tiny-llama: the bleed arm in results.json (its metrics and
    the paired differences), the transcript, the report, run.last_turn and compare; devices=2 gathers it in the
    same order as one process."""
    from persona_lit.evaluation.compare import compare_runs
    from tests.test_eval_distributed import _close

    path = direction(backbone_factory("tiny-llama"), tmp_path)
    args = ["evaluate.py", "model=tiny-llama", "mechanism=steer", f"mechanism.options.direction={path}",
            "mechanism.options.alpha=4", "persona=stoic", "turns=2", "conversations=3", "probe_turns=[0,2]",
            "probe_kinds=[name]", "max_new_tokens=4", "probe_max_new_tokens=4", "capability_exchanges=1",
            "capability_tokens=4", "logger=none", "bleed=true"]
    runs = {}
    for n in (1, 2):
        out = tmp_path / f"devices{n}"
        r = run_cli(*args, f"devices={n}", "accelerator=cpu", f"out_dir={out}", timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        results = json.loads((out / "results.json").read_text())
        rows = [json.loads(line) for line in (out / "transcript.jsonl").read_text().splitlines()]
        runs[n] = results, rows
    (one, one_rows), (two, two_rows) = runs[1], runs[2]
    metrics = one["metrics"]
    assert {"adherence/name_bleed", "likelihood_margin_bleed", "capability/kl_to_base_bleed",
            "capability/perplexity_bleed", "bleed_vs_control/adherence/name",
            "bleed_vs_control/capability/kl_to_base"} <= set(metrics)
    kl = metrics["bleed_vs_control/capability/kl_to_base"]
    assert kl["turn"] == [0, 2] and kl["n"] == [1, 3] and kl["mean"][0] > 0 and not math.isnan(kl["mean"][1])
    assert one["run"]["last_turn"]["stoic"]["bleed"] == [2, 2, 2]
    assert {r["arm"] for r in one_rows} == {"persona", "baseline", "control", "bleed"}
    assert "(bleed arm)" in (tmp_path / "devices1" / "report.md").read_text()
    assert _close(one["metrics"], two["metrics"]) is None, _close(one["metrics"], two["metrics"])
    assert [(r["arm"], r["conversation"], r["turn"], r["user"], r["answer"]) for r in two_rows] == \
        [(r["arm"], r["conversation"], r["turn"], r["user"], r["answer"]) for r in one_rows]
    (tmp_path / "cmp").mkdir()
    compare_runs([tmp_path / "devices1"], tmp_path / "cmp")
    header = next(line for line in (tmp_path / "cmp" / "compare.md").read_text().splitlines()
                  if line.startswith("| run | turn |"))
    assert "| bleed name | bleed KL | control KL |" in header
