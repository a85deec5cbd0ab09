"""data=persona_pool: many-persona conversations whose answers are the base model's with the persona fresh
(checked against HF generate on [persona ; turn k] alone), labels on every answer and nothing else, train-split
personas only, control conversations without a persona, the cache; train.py -> evaluate.py personas=test_split
end to end on tiny-gemma3 (tiny-llama's random init answers only newlines, which strip to nothing)."""

import json

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from persona_lit.models.backbones import load_backbone
from persona_lit.data.dialogues import IGNORE
from persona_lit.build import attach_mechanism
from persona_lit.training.distill import fresh_persona_kl, fresh_persona_views
from persona_lit.personas.load import load_persona
from persona_lit.personas.pool import load_pool
from persona_lit.personas.split import SPLIT_FILE
from tests.conftest import REPO, model_cfg, run_cli

DATA = REPO.parent / "shared" / "data"
pytestmark = pytest.mark.skipif(not (DATA / "assistant_axis").is_dir(), reason="needs ../shared/data/assistant_axis")
SOURCES = ["pack", "role"]  # small and fast; one persona of each with max_personas=2 (one per source in turn)
SMALL = dict(pool=dict(sources=SOURCES, data_dir=str(DATA)), max_personas=2, turns=2, max_new_tokens=4,
             generation_batch=4, control_fraction=0.2)


def data_module(chat, cache_dir, **kw):
    cfg = OmegaConf.load(REPO / "conf" / "data" / "persona_pool.yaml")
    cfg.seed = 0
    cfg = OmegaConf.merge(cfg, SMALL, {"cache_dir": str(cache_dir)}, kw)
    return instantiate(cfg, chat=chat, persona=load_persona("pirate_mentor"))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    backbone = load_backbone(model_cfg("tiny-gemma3"))
    model = backbone.model.eval()
    cache_dir = tmp_path_factory.mktemp("pool_cache")
    dm = data_module(backbone.chat, cache_dir)
    dm.bind_model(model, torch.no_grad)
    dm.setup("fit")
    return backbone, dm, cache_dir


def _greedy(model, chat, system, question, n=4):
    prompt = torch.tensor([chat.turn_ids(question, first=True, system=system)])
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, do_sample=False,
                         pad_token_id=chat.pad_id)
    return chat.decode(out[0, prompt.shape[1]:]).strip()


def test_answers_are_the_base_models_with_the_persona_fresh(built):
    backbone, dm, _ = built
    model, chat = backbone.model, backbone.chat
    personas = [r for r in dm.conversations if r["persona"] is not None]
    controls = [r for r in dm.conversations if r["persona"] is None]
    assert sorted(r["persona"].split(":")[0] for r in personas) == SOURCES and len(controls) == 1
    assert all(len(r["turns"]) == 2 and all(a for _, a in r["turns"]) for r in dm.conversations)
    role = next(r for r in personas if r["persona"].startswith("role:"))
    own = load_pool(SOURCES, DATA).by_key[role["persona"]].questions
    assert role["turns"][0][0] in own and role["turns"][1][0] not in own  # its own question, then MT-bench
    for record in (role, controls[0]):  # turn 2 answered as if it were the first: [persona ; turn 2] only
        question, answer = record["turns"][1]
        assert answer == _greedy(model, chat, record["system"], question)


def test_labels_are_every_answer_and_nothing_else(built):
    backbone, dm, _ = built
    chat = backbone.chat
    for (ids, mask, segments), record in zip(dm.train_examples, dm.conversations):
        assert segments[0] == 0 and not any(m for m, s in zip(mask, segments) if s == 0)  # no persona token
        for k, (_, answer) in enumerate(record["turns"], start=1):
            labelled = [i for i, m, s in zip(ids, mask, segments) if m and s == k]
            assert labelled == chat._ids(answer) + [chat.end_id]  # the answer and its end token: no user token
        assert max(segments) == len(record["turns"])
    batch = next(iter(dm.train_dataloader()))
    assert {"input_ids", "labels", "segment_ids", "index"} <= set(batch)
    views = fresh_persona_views(batch, chat.pad_id)[0]  # module.distill_weight: one teacher view per (row, turn)
    assert views.shape[0] == int(sum(len(set(s[l != IGNORE].tolist())) for s, l in
                                     zip(batch["segment_ids"], batch["labels"])))
    assert "persona_pool conversations " in dm.describe_rows(batch["index"].tolist())


@pytest.mark.parametrize("name,options", [("lyra", {"train_layers": True}), ("triplet", {}), ("lora", {})])
def test_distillation_toward_the_fresh_persona_teacher_trains_each_mechanism_on_these_batches(built, name, options):
    """module.distill_weight on a pool batch: a finite KL whose gradient reaches the mechanism's trainable tensors
    (Lyra's trained layers, Triplet's branch, a persona-keeping LoRA). One row, the shortest (Gemma's 262k-token
    vocabulary makes every logit row cost; the e2e run trains Lyra on them all)."""
    backbone, dm, _ = built
    fresh = load_backbone(model_cfg("tiny-gemma3"))  # the fixture's model stays the plain base model
    model, mechanism = attach_mechanism(fresh, OmegaConf.create({"name": name, "options": options}))
    batch = dm._loader(dm.train_examples, shuffle=False).collate_fn([min(dm.train_examples, key=lambda e: len(e[0]))])
    extra = {"segment_ids": batch["segment_ids"]} if mechanism.uses_segments else {}
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"],
                **extra)
    kl = fresh_persona_kl(model, mechanism, batch, out.logits, fresh.chat.pad_id)
    (out.loss + kl).backward()
    assert torch.isfinite(kl) and kl >= 0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in mechanism.trainable_parameters())


def test_no_val_or_test_persona_in_training_and_controls_have_no_persona(built):
    backbone, dm, _ = built
    chat, split = backbone.chat, dm.split
    pool = load_pool(SOURCES, DATA)
    trained = {r["persona"] for r in dm.conversations} - {None}
    assert trained <= set(split.parts["train"]) and not trained & (set(split.parts["test"]) | set(split.parts["val"]))
    prompts = {k: pool.by_key[k].persona.system_prompt for k in pool.keys}
    for (ids, _, segments), record in zip(dm.train_examples, dm.conversations):
        text = chat.decode(ids)
        assert not any(prompts[k][:60] in text for k in split.parts["test"] + split.parts["val"])
        if record["persona"] is None:
            assert record["system"] is None and not any(p[:60] in text for p in prompts.values())
            assert [i for i, s in zip(ids, segments) if s == 0] == chat.persona_ids(None)  # BOS only (tiny-gemma3)
            assert [q for q, _ in record["turns"]] in [[q for q, _ in r["turns"]] for r in dm.conversations
                                                       if r["persona"] is not None]
        else:
            assert record["system"] == prompts[record["persona"]] and record["system"] in text


def test_cache_is_reused_and_other_settings_make_a_new_file(built, capsys):
    backbone, dm, cache_dir = built
    first = sorted(cache_dir.iterdir())
    assert first == [dm.cache_path] and json.loads(first[0].read_text().splitlines()[0])["settings"]["turns"] == 2
    again = data_module(backbone.chat, cache_dir)
    again.bind_model(backbone.model, lambda: pytest.fail("generated again although cached"))
    capsys.readouterr()
    again.setup("fit")
    assert "3 cached conversations" in capsys.readouterr().out and sorted(cache_dir.iterdir()) == first
    assert again.train_examples == dm.train_examples
    longer = data_module(backbone.chat, cache_dir, max_new_tokens=5)
    longer.bind_model(backbone.model, torch.no_grad)
    longer.setup("fit")
    assert len(list(cache_dir.iterdir())) == 2


def test_train_on_the_pool_then_evaluate_its_test_split(built, tmp_path):
    """train.py writes the split into its run dir; evaluate.py ckpt=<run> personas=test_split reads it back.
    Lyra's layers train (distillation on these batches is tested in-process above, to keep this fast)."""
    _, _, cache_dir = built
    run = tmp_path / "run"
    out = run_cli("train.py", "mechanism=lyra", "mechanism.options.train_layers=true", "model=tiny-gemma3",
                  "data=persona_pool", f"data.pool.sources=[{','.join(SOURCES)}]", f"data.pool.data_dir={DATA}",
                  "data.max_personas=2", "data.turns=2", "data.max_new_tokens=4", "data.generation_batch=4",
                  f"data.cache_dir={cache_dir}", "data.batch_size=1", "trainer.max_steps=2",
                  "logger=none",
                  f"hydra.run.dir={run}")
    assert out.returncode == 0, out.stderr[-2000:]
    stored = json.loads((run / SPLIT_FILE).read_text())
    assert (run / "checkpoints" / "final.safetensors").is_file() and stored["pool"]["sources"] == SOURCES
    out = run_cli("evaluate.py", f"ckpt={run}", "personas=test_split", "pool.max_personas=1", f"pool.data_dir={DATA}",
                  "turns=1", "conversations=1", "probe_turns=[0,1]", "max_new_tokens=4", "probe_max_new_tokens=4",
                  "capability_exchanges=0", "control=false", "baseline=false", "logger=none",
                  f"out_dir={tmp_path / 'eval'}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"split the training run's split {run / SPLIT_FILE}" in out.stdout
    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert json.dumps(results).count(stored["test"][0]) >= 1
