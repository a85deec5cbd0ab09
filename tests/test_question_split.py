"""MT-bench's question-disjoint split: no evaluation turn and no capability reference was a training turn
(persona-pool conversations, dialogue filler, the training drift callback), stored with the run and refused
where it does not match; evaluate.py asks the test part."""

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from persona_lit.data import question_split as qs
from persona_lit.data.mt_bench import MTBenchDataModule, neutral_exchanges
from persona_lit.data.readers import read_mt_bench, read_mt_bench_exchanges
from persona_lit.errors import UserError
from tests.conftest import REPO

DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="module")
def questions():
    return read_mt_bench(None)


def test_parts_are_disjoint_cover_every_question_and_every_category(questions):
    s = qs.question_split(questions)
    ids = [i for p in qs.PARTS for i in s.parts[p]]
    assert len(ids) == len(set(ids)) == len(questions)
    for category in {q.category for q in questions}:
        of = {q.question_id for q in questions if q.category == category}
        assert [len(of & s.ids(p)) for p in qs.PARTS] == [4, 2, 4]  # 10 per category at (0.4, 0.2, 0.4)
    assert qs.question_split(questions) == s  # deterministic
    other = qs.question_split(questions, seed=1)
    assert other.parts["test"] != s.parts["test"] and other.hash != s.hash


def test_bad_fractions_are_one_line(questions):
    for bad in ([0.5, 0.5], [0.5, 0.5, 0.0], [0.3, 0.3, 0.3]):
        with pytest.raises(UserError, match="three shares"):
            qs.question_split(questions, 0, bad)


def test_evaluation_streams_and_capability_references_come_from_the_test_part_only(questions):
    s = qs.question_split(questions)
    test = s.ids("test")
    turns = MTBenchDataModule(None, turns=48, conversations=2, question_ids=test)
    turns.setup()
    asked = {t.question_id for k in range(2) for t in turns.stream("role:pirate", k)}
    assert asked <= test
    refs = neutral_exchanges(3, asked, None, only=test)
    first_turns = {q.turns[0]: q.question_id for q in questions}
    assert len(refs) == 3 and all(first_turns[q] in test for q, _ in refs)
    train_turns = {t for q in questions if q.question_id in s.ids("train") for t in q.turns}
    assert not train_turns & {t.text for k in range(2) for t in turns.stream("role:pirate", k)}


def test_dialogue_filler_reads_the_train_part_only(questions):
    s = qs.question_split(questions)
    text_of = {t: q.question_id for q in questions for t in q.turns}
    filler = read_mt_bench_exchanges(only=s.ids("train"))
    assert filler and {text_of[d[0]["content"]] for d in filler} <= s.ids("train")
    assert len(read_mt_bench_exchanges()) > len(filler)


@pytest.mark.skipif(not (DATA / "assistant_axis").is_dir(), reason="needs ../shared/data")
def test_no_evaluation_question_or_reference_is_a_persona_pool_training_turn(questions, tmp_path):
    from persona_lit.data.persona_pool import PersonaPoolDataModule

    dm = PersonaPoolDataModule(None, None, pool={"sources": ["pack", "role", "spc"], "data_dir": str(DATA)},
                               max_personas=40, turns=24, control_fraction=0.2, val_personas=4, mt_bench_path=None,
                               max_new_tokens=4, generation_batch=4, cache_dir=str(tmp_path), max_length=256,
                               batch_size=2, seed=0, num_workers=0)
    train, val = dm.plans()
    trained = {q for plan in train + val for q in plan.questions}
    test = dm.questions.ids("test")
    evaluated = {q.turns[i] for q in questions if q.question_id in test for i in range(len(q.turns))}
    references = {q for q, _ in neutral_exchanges(30, set(), None, only=test)}
    assert evaluated and references
    assert not trained & evaluated and not trained & references
    mt_trained = {q.question_id for q in questions if q.turns[0] in trained}
    assert mt_trained and mt_trained <= dm.questions.ids("train")


def _fake_checkpoint(run_dir: Path, data_cfg: dict) -> Path:
    from safetensors.torch import save_file

    path = run_dir / "checkpoints" / "final.safetensors"
    path.parent.mkdir(parents=True)
    save_file({"x": torch.zeros(1)}, str(path), metadata={"persona_lit": json.dumps({"config": {"data": data_cfg}})})
    return path


def _cfg(ckpt, part="test", seed=0):
    return OmegaConf.create({"ckpt": ckpt, "mt_bench_path": None,
                             "question_split": {"part": part, "seed": seed, "fractions": [0.4, 0.2, 0.4]}})


def test_evaluation_uses_the_training_runs_stored_split_and_refuses_its_train_part(tmp_path, capsys):
    ckpt = str(_fake_checkpoint(tmp_path / "run", {"_target_": "persona_lit.data.persona_pool.PersonaPoolDataModule"}))
    s, info = qs.for_evaluation(_cfg(ckpt, seed=3))  # no stored split: the settings, and a warning
    assert "may have trained on any MT-bench question" in info["from"] and "warning" in capsys.readouterr().out
    stored = qs.store_question_split(tmp_path / "run", {"seed": 5}, None)
    s, info = qs.for_evaluation(_cfg(ckpt, seed=3))
    assert s == stored and info["hash"] == stored.hash and info["ids"] == sorted(stored.ids("test"))
    assert "the training run's split" in info["from"]
    for part in ("train", "all"):
        with pytest.raises(UserError, match=f"question_split.part={part}: the checkpoint trained"):
            qs.for_evaluation(_cfg(ckpt, part=part))
    path = tmp_path / "run" / qs.QUESTION_SPLIT_FILE
    raw = json.loads(path.read_text())
    raw["test"], raw["train"] = raw["train"], raw["test"]  # an edited split no longer matches its seed
    path.write_text(json.dumps(raw))
    with pytest.raises(UserError, match="does not match the questions at hand"):
        qs.for_evaluation(_cfg(ckpt))
    assert qs.for_evaluation(_cfg(None, part="all"))[1]["ids"] == sorted(q.question_id for q in read_mt_bench(None))
