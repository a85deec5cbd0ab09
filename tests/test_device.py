"""Evaluation places the model explicitly (`device`, `precision`): values resolved or rejected with one line,
the model and its mechanism moved and cast, every result a CPU float, the fingerprint taken before the cast."""

import json

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from persona_lit.build import attach_mechanism, is_quantized, place, plain, resolve_device, resolve_precision
from persona_lit.errors import UserError
from tests.conftest import model_cfg, run_cli
from tests.test_bad_input import EVAL, cli, user_error

NO_CUDA = not torch.cuda.is_available()


def lora(r=4):
    return OmegaConf.create({"name": "lora", "options": {"r": r, "alpha": 8, "dropout": 0.0, "target_modules": None,
                                                         "init_lora_weights": False}})


def test_device_values():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    for bad in ("tpu", "cuda:x", "gpu", "cpu:0"):
        with pytest.raises(UserError, match=rf"^device={bad}: unknown device; allowed: auto, cpu, cuda, cuda:N$"):
            resolve_device(bad)


@pytest.mark.skipif(not NO_CUDA, reason="checks the line given where there is no CUDA")
def test_cuda_without_a_gpu_is_one_line(tmp_path):
    for value in ("cuda", "cuda:1"):
        with pytest.raises(UserError, match=rf"^device={value}: no CUDA device is available here"):
            resolve_device(value)
    out_dir = tmp_path / "out"
    proc = cli("evaluate.py", "model=tiny-llama", *EVAL, "accelerator=cuda", f"out_dir={out_dir}")
    user_error(proc, "accelerator=cuda", "no CUDA device", absent=out_dir)


def test_precision_values():
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == ("fp32", torch.float32)
    assert resolve_precision("bf16", cpu) == ("bf16", torch.bfloat16)
    assert resolve_precision("fp16", cpu) == ("fp16", torch.float16)
    for bad in ("fp8", "16", "bfloat16"):
        with pytest.raises(UserError, match=rf"^precision={bad}: unknown precision; allowed: auto, fp32, bf16, fp16$"):
            resolve_precision(bad, cpu)


@pytest.mark.parametrize("override,facts", [
    ("device=tpu", ["device=tpu", "auto, cpu, cuda, cuda:N"]),
    ("precision=fp8", ["precision=fp8", "auto, fp32, bf16, fp16"]),
    ("devices=0", ["devices=0", ">= 1"]),
    ("accelerator=tpu", ["accelerator=tpu", "auto, cpu, cuda"]),
])
def test_evaluate_bad_placement_is_one_line(tmp_path, override, facts):
    out_dir = tmp_path / "out"
    user_error(cli("evaluate.py", "model=tiny-llama", *EVAL, override, f"out_dir={out_dir}"), *facts, absent=out_dir)


class _Outside:
    """A mechanism that keeps a module outside the model's tree (place() must move it too)."""

    name = "outside"

    def __init__(self):
        self.extra = nn.Linear(2, 2)


def test_place_casts_model_mechanism_and_leaves_quantized_models_alone(backbone_factory):
    bb = backbone_factory("tiny-llama")
    model, mechanism = attach_mechanism(bb, lora())
    assert place(model, mechanism, torch.device("cpu"), torch.bfloat16) == "bf16"
    floats = [t for t in [*model.parameters(), *model.buffers()] if t.is_floating_point()]
    assert floats and all(t.dtype == torch.bfloat16 for t in floats)
    assert any("lora_" in n for n, p in model.named_parameters() if p.dtype == torch.bfloat16)
    outside = _Outside()
    place(nn.Linear(2, 2), outside, torch.device("cpu"), torch.float16)
    assert outside.extra.weight.dtype == torch.float16

    quantized = backbone_factory("tiny-llama").model
    quantized.is_loaded_in_4bit = True  # as bitsandbytes marks it: .to() would break such a model
    assert is_quantized(quantized)
    assert place(quantized, _Outside(), torch.device("cpu"), torch.bfloat16).startswith("quantized")
    assert all(p.dtype == torch.float32 for p in quantized.parameters())


def test_bf16_protocol_results_are_cpu_floats(backbone_factory):
    """The drift protocol on a bf16 model: answers, scores, reply states and capability numbers come back as
    CPU float32 (what results.json and the metrics read), not bf16 tensors."""
    from persona_lit.evaluation.conversation import ConversationRunner
    from persona_lit.evaluation.protocol import run_protocol, summarize
    from persona_lit.personas.load import load_persona

    bb = backbone_factory("tiny-llama")
    model, mechanism = attach_mechanism(bb, lora())
    place(model.eval(), mechanism, torch.device("cpu"), torch.bfloat16)
    runner = ConversationRunner(model, bb.chat, mechanism, max_new_tokens=3, probe_max_new_tokens=3)
    assert runner.device == torch.device("cpu")
    persona = load_persona("stoic")
    result = run_protocol(runner, persona, [["Hello there.", "What is rain?"]] * 2, [0, 2], progress=False,
                          capability=[("What is 2+2?", "Four.")], capability_tokens=4)
    records = [r for arm in (result.persona_arm, result.control_arm) for conv in arm for r in conv]
    states = [r.reply_state for r in records if r.reply_state is not None]
    assert states and all(s.dtype == torch.float32 and s.device.type == "cpu" for s in states)
    assert all(isinstance(p.margin, float) for r in records for p in r.probes)
    assert all(isinstance(v, float) for r in records if r.capability for v in r.capability.values())
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in runner.references.values())
    metrics = summarize(result, [0, 2])["metrics"]
    assert metrics["capability/kl_to_base_control"]["mean"][0] == pytest.approx(0.0, abs=1e-6)


def test_fp32_checkpoint_evaluates_in_bf16_on_cpu(tmp_path, backbone_factory):
    """device=cpu precision=bf16 on a LoRA checkpoint trained (saved) in fp32: the fingerprint check passes
    (taken on the weights as loaded, before the cast), and results.json records where and how it ran."""
    from persona_lit.training.checkpoint import save_checkpoint, trainable_state
    from persona_lit.personas.load import load_persona, persona_to_dict

    bb = backbone_factory("tiny-llama")
    model, _ = attach_mechanism(bb, lora())
    config = {"model": plain(model_cfg("tiny-llama")), "mechanism": plain(lora()),
              "persona": persona_to_dict(load_persona("stoic")), "data": {}, "seed": 0}
    ckpt = save_checkpoint(tmp_path / "final.safetensors", trainable_state(model), config, bb.fingerprint)
    bf16 = bb.model.to(torch.bfloat16)
    from persona_lit.models.backbones import fingerprint

    assert fingerprint(bf16) != bb.fingerprint  # so the order (fingerprint, then cast) is what makes it match
    out = tmp_path / "eval"
    r = run_cli("evaluate.py", f"ckpt={ckpt}", "device=cpu", "precision=bf16", "turns=2", "conversations=2",
                "probe_turns=[0,2]", "probe_kinds=[name]", "max_new_tokens=4", "probe_max_new_tokens=4",
                "capability_exchanges=1", "capability_tokens=4", "logger=none", f"out_dir={out}", timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["run"]["device"] == "cpu" and results["run"]["precision"] == "bf16"
    assert results["run"]["devices"] == 1 and results["run"]["mechanism"] == "lora"
    assert results["metrics"]["likelihood_margin"]["n"] == [1, 2]  # turn 0 (the persona alone) once per persona
