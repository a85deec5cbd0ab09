"""data=contrastive: the base model's own answers under each side's instruction (checked against HF generate),
cached with their settings, used as targets without the instruction; the train -> weight_diff path end to end."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from persona_lit.data.contrastive import ContrastiveDataModule
from persona_lit.errors import UserError
from persona_lit.personas.load import load_persona
from tests.conftest import REPO, run_cli

AXIS = REPO.parent / "shared" / "data" / "assistant_axis"
needs_axis = pytest.mark.skipif(not AXIS.is_dir(), reason="needs ../shared/data/assistant_axis")


def module(chat, tmp_path, **kw):
    options = {k: v for k, v in OmegaConf.to_container(OmegaConf.load(REPO / "conf" / "data" / "contrastive.yaml"),
                                                       resolve=False).items() if k != "_target_"}
    options.update(side="pos", trait="optimistic", assistant_axis_dir=str(AXIS), model_name="tiny", instructions=1,
                   questions=3, max_new_tokens=5, generation_batch=2, cache_dir=str(tmp_path / "cache"), seed=0)
    options.update(kw)
    return ContrastiveDataModule(chat, load_persona("pirate_mentor"), **options)


@needs_axis
def test_answers_are_the_base_models_greedy_answers_and_targets_drop_the_instruction(backbone_factory, tmp_path,
                                                                                      capsys):
    backbone = backbone_factory("tiny-gemma3")
    model, chat = backbone.model.eval(), backbone.chat
    dm = module(chat, tmp_path)
    dm.bind_model(model, torch.no_grad)
    dm.setup("fit")
    records = dm.answers()
    spec = json.loads((AXIS / "traits" / "instructions" / "optimistic.json").read_text())
    assert [r["side"] for r in records] == ["pos"] * 3 + ["neg"] * 3
    assert {r["instruction"] for r in records} == {spec["instruction"][0]["pos"], spec["instruction"][0]["neg"]}
    for r in (records[0], records[4]):  # each side answered under its own instruction, greedily
        prompt = torch.tensor([chat.turn_ids(r["question"], first=True, system=r["instruction"])])
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5, do_sample=False,
                             pad_token_id=chat.pad_id)
        assert r["answer"] == chat.decode(out[0, prompt.shape[1]:]).strip()
    assert len(dm.train_examples) == 3  # pos only, < 10 examples: no validation split
    instruction = chat.tokenizer(spec["instruction"][0]["pos"], add_special_tokens=False)["input_ids"]
    for ids, mask, _ in dm.train_examples:
        text = chat.decode(ids)
        assert spec["instruction"][0]["pos"][:40] not in text and any(mask)
        assert all(ids[i : i + len(instruction)] != instruction for i in range(len(ids)))
    # Cached: the neg side reads the same file without the model; other settings make another file.
    first = sorted((tmp_path / "cache").iterdir())
    neg = module(chat, tmp_path, side="neg")
    neg.bind_model(None, torch.no_grad)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError):
        neg.setup("fit")  # without a model there is nothing to fingerprint: it must not guess
    neg.bind_model(model, lambda: pytest.fail("generated again although cached"))
    capsys.readouterr()
    neg.setup("fit")
    assert "6 cached answers" in capsys.readouterr().out and sorted((tmp_path / "cache").iterdir()) == first
    neg_answers = {r["answer"] for r in records if r["side"] == "neg"}
    assert len(neg.train_examples) == 3
    assert all(any(a in chat.decode(e[0]) for a in neg_answers) for e in neg.train_examples)
    longer = module(chat, tmp_path, max_new_tokens=6)
    longer.bind_model(model, torch.no_grad)
    longer.setup("fit")
    assert len(list((tmp_path / "cache").iterdir())) == 2


@needs_axis
@pytest.mark.parametrize("kw,message", [
    (dict(side="both"), "data.side='both'"),
    (dict(trait="optimistic", role="pirate"), "give at most one"),
    (dict(trait="no_such_trait"), "data.trait=no_such_trait"),
    (dict(instructions=0), "data.instructions=0"),
    (dict(val_fraction=1.0), "data.val_fraction=1.0"),
])
def test_bad_options_are_one_line_errors(backbone_factory, tmp_path, kw, message):
    chat = backbone_factory("tiny-gemma3").chat
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace("[", r"\[")) as e:
        module(chat, tmp_path, **kw)
    assert "\n" not in str(e.value)


def test_persona_side_uses_exchanges_never_probe_questions(backbone_factory, tmp_path):
    chat = backbone_factory("tiny-gemma3").chat
    persona = load_persona("pirate_mentor")
    dm = module(chat, tmp_path, trait=None, questions=500)
    probes = {p.question.strip() for p in persona.probes}
    asked = [q for _, q in dm.source.pos]
    assert asked and not probes & set(asked) and asked == [q for _, q in dm.source.neg]
    assert {s for s, _ in dm.source.pos} == {persona.system_prompt} and {s for s, _ in dm.source.neg} == {None}


def test_damaged_cache_is_an_error(backbone_factory, tmp_path):
    from persona_lit.data.contrastive import read_cache

    path = tmp_path / "c.jsonl"
    path.write_text('{"settings": {"a": 1}}\n{"side": "pos", "answer": \n')
    with pytest.raises(UserError, match="damaged contrastive cache"):
        read_cache(path, {"a": 1})
    path.write_text('{"settings": {"a": 2}}\n')
    assert read_cache(path, {"a": 1}) is None  # other settings: regenerate, never reuse


@needs_axis
def test_train_pos_and_neg_then_weight_diff(tmp_path):
    """The weight-steering path of docs/steering.md on tiny-gemma3: two adapters from one cache, then ΔW from their
    PEFT directories."""
    common = ["train.py", "mechanism=lora", "model=tiny-gemma3", "data=contrastive", "data.trait=optimistic",
              "data.questions=4", "data.instructions=1", "data.max_new_tokens=6", f"data.cache_dir={tmp_path / 'c'}",
              "trainer.max_steps=2", "logger=none", "mechanism.options.r=2"]
    runs = {}
    for side in ("pos", "neg"):
        out = run_cli(*common, f"data.side={side}", f"hydra.run.dir={tmp_path / side}")
        assert out.returncode == 0, out.stderr[-2000:]
        assert ("cached answers" in out.stdout) == (side == "neg")
        runs[side] = tmp_path / side / "checkpoints" / "peft_adapter"
        assert (runs[side] / "adapter_model.safetensors").is_file()
    out = run_cli("evaluate.py", "task=weight_diff", "model=tiny-gemma3", f"task.pos={runs['pos']}",
                  f"task.neg={runs['neg']}", f"out_dir={tmp_path / 'delta'}")
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads((tmp_path / "delta" / "delta.json").read_text())
    assert int(summary["modules"]) > 0 and all(v > 0 for v in summary["norms"].values())
