"""End to end on the real small models shipped in PyPI packages (SmolLM2-135M-Instruct, Gemma-3-270M)."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from persona_lit.build import attach_mechanism
from tests.conftest import run_cli, sample_batch

pytestmark = pytest.mark.slow


def test_smollm2_train_then_evaluate_from_the_checkpoint_alone(tmp_path):
    train = run_cli("train.py", "mechanism=lora", "persona=joyful_writer", "trainer.max_steps=2", "data.batch_size=2",
                    "data.max_length=192", "logger=csv", f"hydra.run.dir={tmp_path}/train")
    assert train.returncode == 0, train.stderr[-3000:]
    assert f"{tmp_path}/train" in train.stdout
    ckpt = tmp_path / "train/checkpoints/final.safetensors"
    assert ckpt.stat().st_size < 20e6  # adapter only: a few MB, not the 540 MB base
    metrics = (tmp_path / "train/csv/metrics.csv").read_text()
    assert "train/loss" in metrics and "train/device/items_per_sec" in metrics and "train/peak_mem_mb" in metrics
    ev = run_cli("evaluate.py", f"ckpt={tmp_path}/train", "turns=2", "conversations=1", "probe_turns=[0,2]",
                 "probe_kinds=[name]", "max_new_tokens=12", "probe_max_new_tokens=12", "logger=csv",
                 f"out_dir={tmp_path}/eval")
    assert ev.returncode == 0, ev.stderr[-3000:]
    results = json.loads((tmp_path / "eval/results.json").read_text())
    assert results["run"]["model"] == "smollm2-135m-instruct" and results["run"]["persona"] == "Lyra"
    assert results["metrics"]["adherence/name"]["turn"] == [0, 2]
    assert results["history_tokens"]["2"] > results["history_tokens"]["1"] > 0
    lines = (tmp_path / "eval/transcript.jsonl").read_text().splitlines()
    assert len(lines) == 9 and json.loads(lines[1])["answer"]  # persona, baseline and control arms, turns 0..2
    assert [json.loads(line)["arm"] for line in lines[::3]] == ["persona", "baseline", "control"]
    assert "adherence/name_baseline" in results["metrics"] and "vs_baseline/adherence/name" in results["metrics"]
    assert "Did lora beat the plain system prompt?" in (tmp_path / "eval/report.md").read_text()
    assert results["metrics"]["projection"]["mean"][0] == pytest.approx(1.0)  # 1.0 at turn 0 by construction
    for name in ("report.md", "adherence.png", "margin.png", "projection.png"):
        assert (tmp_path / "eval" / name).stat().st_size > 0


def test_gemma3_270m_zero_lora_is_the_base_model(backbone_factory):
    bb = backbone_factory("gemma3-270m")
    batch = sample_batch(bb.chat)
    with torch.no_grad():
        expected = bb.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    model, mechanism = attach_mechanism(bb, OmegaConf.create({"name": "lora", "options": {"r": 8}}))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits, expected)


def test_smollm2_cached_transcript_equals_reencoding_and_batched_rows_equal_alone(backbone_factory):
    """The runner's reused cache against re-encoding the full history each turn (greedy, token for
    token), and two conversations as one padded batch against each alone, on the real SmolLM2."""
    from persona_lit.evaluation.conversation import Conversation, ConversationRunner
    from persona_lit.mechanisms.none import NoMechanism
    from tests.test_conversation import TURNS, naive_transcript

    bb = backbone_factory("smollm2-135m-instruct")
    system = "You are Quill, a pirate mentor."
    runner = ConversationRunner(bb.model, bb.chat, NoMechanism(), max_new_tokens=16)
    conv = Conversation(system)
    for text in TURNS[:3]:
        runner.say(conv, text)
    ids, _ = naive_transcript(bb.model, bb.chat, system, TURNS[:3], 16)
    assert conv.ids == ids
    pair = Conversation(system, rows=2)
    for a, b in zip(TURNS[:3], ["Hi!", "Name three rivers in Europe and say which is longest.", "Why?"]):
        runner.say(pair, [a, b])
    alone = Conversation(system)
    for b in ["Hi!", "Name three rivers in Europe and say which is longest.", "Why?"]:
        runner.say(alone, b)
    assert pair.row_ids(0) == ids and pair.row_ids(1) == alone.ids
