"""The persona pool (persona_lit/personas/pool.py, split.py) from the shared data, its content-disjoint split, evaluation
on the test personas (personas=test_split), and the context-limit stop of the conversation runner."""

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from persona_lit.errors import UserError
from persona_lit.personas.pool import SOURCES, load_pool
from persona_lit.personas.split import (PARTS, SPLIT_FILE, read_split, split, split_for_evaluation, split_request,
                                       write_split)

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "assistant_axis").is_dir(), reason="../shared/data is not here")
SMALL = ["pack", "role", "li2024"]


@pytest.fixture(scope="module")
def pool():
    return load_pool(None, DATA)


@pytest.fixture(scope="module")
def small_pool():
    return load_pool(SMALL, DATA)


def one_line(e) -> str:
    text = f"error: {e.value}"
    assert "\n" not in text, text
    return text


@needs_data
def test_pool_counts_keys_and_probes(pool):
    counts = pool.counts()
    assert counts == {"pack": 4, "role": 274, "li2024": 97, "personagym": 200, "spc": 3773}, counts
    assert set(pool.excluded) == {"role:default", "role:assistant"}
    by_key = pool.by_key
    assert len(by_key) == len(pool.entries)  # keys are unique
    for key in ("role:pirate", "li2024:12", "personagym:37", "spc:5", "pack:stoic"):
        assert by_key[key].persona.key == key  # what results.json's by_persona is keyed by
    # probes where promised: every entry has one; role name probes, Li et al. checks, identity keywords
    assert pool.probe_counts() == counts
    pirate = by_key["role:pirate"]
    (probe,) = pirate.persona.probes
    assert probe.kind == "name" and probe.check.spec == {"contains_any": ["pirate"]}
    assert "pirate" in pirate.persona.system_prompt.lower() and len(pirate.questions) == 40
    assert probe.check("I am a pirate captain.") and not probe.check(probe.assistant_answer)
    assert by_key["li2024:12"].persona.probes[0].check.spec["li2024"].startswith("lambda")
    gym, spc = by_key["personagym:37"], by_key["spc:5"]
    assert gym.persona.probes[0].kind == spc.persona.probes[0].kind == "identity" and len(gym.questions) == 50
    assert len(by_key["pack:stoic"].persona.probes) >= 9
    for e in pool.entries:  # reference answers: the persona's passes its check, the default assistant's fails
        for p in e.persona.probes:
            if p.persona_answer and p.assistant_answer:
                assert p.check(p.persona_answer) and not p.check(p.assistant_answer), (e.key, p.check.spec)


@needs_data
def test_split_is_seeded_stratified_and_disjoint(pool):
    a, b, other = split(pool, 0), split(pool, 0), split(pool, 1)
    assert a == b and a.parts != other.parts
    parts = [set(a.parts[p]) for p in PARTS]
    assert not (parts[0] & parts[1]) and not (parts[0] & parts[2]) and not (parts[1] & parts[2])
    assert set().union(*parts) == set(pool.keys)
    for p in PARTS:
        assert all(n >= 1 for n in a.sources_of(p).values()), (p, a.sources_of(p))  # every source in every part
    assert a.sources_of("test") == {"pack": 1, "role": 27, "li2024": 10, "personagym": 27, "spc": 377}
    with pytest.raises(UserError) as e:
        split(pool, 0, [0.5, 0.5, 0.0])
    assert "each share must be > 0" in one_line(e)


def _facts(prompt: str) -> set[str]:
    return {" ".join(re.findall(r"[a-z]+", line.lower())) for line in prompt.splitlines()[1:]} - {""}


def _template_free(prompt: str) -> str | None:
    """A one-line prompt, numbers masked (a multi-line prompt is a header and facts: _facts)."""
    return re.sub(r"\d+", "#", prompt.lower()) if len(prompt.splitlines()) == 1 else None


@needs_data
@pytest.mark.parametrize("seed", [0, 1])
def test_no_test_fact_or_description_appears_in_train(pool, seed):
    s = split(pool, seed)
    by_key = pool.by_key
    prompts = {p: [by_key[k].persona.system_prompt for k in s.parts[p]] for p in PARTS}
    train_facts = set().union(*map(_facts, prompts["train"]))
    train_lines = {_template_free(t) for t in prompts["train"]}
    for part in ("val", "test"):
        facts = set().union(*map(_facts, prompts[part]))
        assert len(facts) > 50 and not facts & train_facts  # Synthetic-Persona-Chat facts: none shared
        assert not ({_template_free(t) for t in prompts[part]} & train_lines) - {None}  # "a 72-year-old" vs "a 70-"
    # near-duplicates by word overlap (PersonaGym's templated descriptions), checked pair by pair
    gym = {p: [set(re.findall(r"[a-z]+", by_key[k].persona.description.lower())) - {"a", "an", "year", "old", "from",
                                                                                       "who", "is", "the"}
               for k in s.parts[p] if k.startswith("personagym:")] for p in PARTS}
    for words in gym["test"]:
        assert max(len(words & w) / len(words | w) for w in gym["train"]) < 0.75


def test_content_groups_join_shared_facts_and_near_duplicates():
    from persona_lit.personas.pool import PoolEntry
    from persona_lit.personas.split import content_groups
    from persona_lit.personas.types import Persona

    def entry(key, prompt):
        return PoolEntry(key, key.split(":")[0], Persona(name=key, system_prompt=prompt))

    head = "You are the person these facts describe."
    entries = [entry("spc:0", f"{head}\nI like cats.\nI am a nurse."), entry("spc:1", f"{head}\nI am a nurse!"),
               entry("spc:2", f"{head}\nI like dogs."), entry("spc:3", f"{head}\nI drive a truck.")]
    assert content_groups(entries) == [["spc:0", "spc:1"], ["spc:2"], ["spc:3"]]
    gym = [entry(f"personagym:{i}", f"You are {d}. Stay this person.") for i, d in enumerate([
        "a 72-year-old doctor from Tokyo who loves hiking", "a 70-year-old doctor from Tokyo who loves hiking",
        "a 30-year-old pilot from Lima who plays chess", "a 41-year-old baker from Oslo who paints"])]
    assert content_groups(gym) == [["personagym:0", "personagym:1"], ["personagym:2"], ["personagym:3"]]


@needs_data
def test_stored_split_round_trips_and_a_changed_pool_is_refused(small_pool, tmp_path):
    s = split(small_pool, 3, [0.6, 0.2, 0.2])
    path = write_split(tmp_path / SPLIT_FILE, s)
    stored = json.loads(path.read_text())
    assert stored["seed"] == 3 and stored["pool"]["sources"] == SMALL and stored["pool_hash"] == small_pool.hash
    back, pool_back = read_split(path, data_dir=DATA)  # rebuilt from the stored spec
    assert back == s and pool_back.hash == small_pool.hash
    changed = dataclasses.replace(small_pool, entries=small_pool.entries[:-1])
    with pytest.raises(UserError) as e:
        read_split(path, pool=changed)
    assert "the persona pool changed since this split was written" in one_line(e)
    # the data itself changing: a pool of 5 roles, then one role file fewer
    roles = tmp_path / "data" / "assistant_axis" / "roles" / "instructions"
    roles.mkdir(parents=True)
    for name in ("pirate", "accountant", "alien", "angel", "architect"):
        (roles / f"{name}.json").symlink_to(DATA / "assistant_axis" / "roles" / "instructions" / f"{name}.json")
    few = load_pool(["role"], tmp_path / "data")
    assert few.counts() == {"role": 5}
    path = write_split(tmp_path / "few.json", split(few, 0))
    (roles / "angel.json").unlink()
    with pytest.raises(UserError) as e:
        read_split(path, data_dir=tmp_path / "data")
    assert "pool changed" in one_line(e)


def test_split_names_and_config_keys():
    from persona_lit.config.check import check_cli

    assert split_request("test_split") == "test" and split_request(["val_split"]) == "val"
    assert split_request(["stoic", "botanist"]) is None and split_request(None) is None
    with pytest.raises(UserError) as e:
        split_request("stoic")
    assert "personas=[stoic]" in one_line(e)
    cfg = check_cli(["personas=test_split", "pool.sources=[role,li2024]", "pool.max_personas=2", "pool.seed=1"],
                    "evaluate")
    assert list(cfg.pool.sources) == ["role", "li2024"] and list(cfg.pool.fractions) == [0.8, 0.1, 0.1]
    with pytest.raises(UserError) as e:
        check_cli(["pool.sources=[role,wiki]"], "evaluate")
    assert "pool.sources=[role,wiki]: expected one of pack, role, li2024, personagym, spc" in one_line(e)
    assert set(SOURCES) == {"pack", "role", "li2024", "personagym", "spc"}


def _fake_checkpoint(run_dir: Path, data_cfg: dict) -> Path:
    from safetensors.torch import save_file

    path = run_dir / "checkpoints" / "final.safetensors"
    path.parent.mkdir(parents=True)
    save_file({"x": torch.zeros(1)}, str(path), metadata={"persona_lit": json.dumps({"config": {"data": data_cfg}})})
    return path


@needs_data
def test_a_checkpoint_trained_on_the_pool_keeps_its_split(small_pool, tmp_path):
    trained = {"sources": ["pack", "role"], "seed": 7, "fractions": [0.6, 0.2, 0.2]}
    cfg = OmegaConf.create({"ckpt": str(_fake_checkpoint(tmp_path / "run", {"pool": trained})),
                            "pool": {"sources": SMALL, "data_dir": str(DATA), "seed": 0, "fractions": [0.8, 0.1, 0.1],
                                     "max_personas": None, "split_file": None}})
    s, pool, note = split_for_evaluation(cfg)  # no split file in the run: recomputed from data.pool, said so
    assert "recomputed from the checkpoint's data.pool" in note and s.seed == 7
    assert pool.spec["sources"] == ["pack", "role"]
    stored = split(load_pool(["pack", "role"], DATA), 11, [0.6, 0.2, 0.2])
    write_split(tmp_path / "run" / SPLIT_FILE, stored)
    s, _, note = split_for_evaluation(cfg)
    assert s == stored and "the training run's split" in note
    cfg.ckpt = str(_fake_checkpoint(tmp_path / "single", {"sources": None}))  # trained on one persona
    s, _, note = split_for_evaluation(cfg)
    assert s == split(small_pool, 0) and "not trained on the persona pool" in note


@needs_data
def test_evaluate_test_split_runs_only_test_personas(tmp_path):
    """In-process: hydra compose (the CLI check's) + evaluate on tiny-llama, 2 test personas of role and li2024."""
    from persona_lit.config.check import check_cli
    from persona_lit.evaluation.runner import evaluate

    out = tmp_path / "eval"
    cfg = check_cli(["personas=test_split", "model=tiny-llama", "pool.sources=[role,li2024]", "pool.max_personas=2",
                     f"pool.data_dir={DATA}", "turns=1", "conversations=1", "probe_turns=[0,1]", "max_new_tokens=3",
                     "probe_max_new_tokens=3", "capability_exchanges=0", "control=false", "logger=none",
                     f"out_dir={out}"], "evaluate")
    evaluate(cfg)
    results = json.loads((out / "results.json").read_text())
    test = split(load_pool(["role", "li2024"], DATA), 0).parts["test"]
    keys = results["run"]["personas"]
    assert len(keys) == 2 and set(keys) <= set(test) and {k.split(":")[0] for k in keys} == {"role", "li2024"}
    assert results["run"]["persona_split"]["keys"] == keys and results["run"]["persona_split"]["part"] == "test"
    assert set(results["by_persona"]) == set(keys)
    assert results["run"]["last_turn"] == {k: {"persona": [1]} for k in keys}  # nothing stopped early
    assert results["run"]["context_limit"] == 4096
    rows = [json.loads(line) for line in (out / "transcript.jsonl").read_text().splitlines()]
    assert {r["persona"] for r in rows} == set(keys)


def test_context_limit_warns_and_stops_at_the_last_turn_that_fits(backbone_factory):
    from persona_lit.evaluation.conversation import ConversationRunner
    from persona_lit.personas.load import persona_from_dict

    limit = 160
    backbone = backbone_factory("tiny-llama", **{"tiny.max_position_embeddings": limit})
    persona = persona_from_dict({"name": "Cato", "system_prompt": "You are Cato.", "probes": [
        {"question": "What is your name?", "kind": "name", "check": {"contains_any": ["cato"]},
         "persona_answer": "I am Cato.", "assistant_answer": "I am an assistant."}]}, "<test>")
    runner = ConversationRunner(backbone.model, backbone.chat, None, max_new_tokens=6, probe_max_new_tokens=4)
    assert runner.context_limit() == limit
    seen = []  # every position the model was given, probes and forks included
    hook = backbone.model.model.register_forward_pre_hook(
        lambda m, args, kwargs: seen.append(int(kwargs["position_ids"].max())), with_kwargs=True)
    try:
        with pytest.warns(UserWarning, match="context limit: turn"):
            (records,) = runner.run(persona, [["Tell me a short story about the sea."] * 40], [0, 1, 2, 5, 10, 20, 40],
                                    progress=False)
    finally:
        hook.remove()
    last = records[-1]
    assert 1 <= last.turn < 40 and f"stopped after turn {last.turn} of 40" in last.stopped
    assert all(not r.stopped for r in records[:-1]) and [r.turn for r in records] == list(range(last.turn + 1))
    assert max(seen) < limit  # never past the context, never wrapped
    # the stop was needed: the next turn (and its probes, at a probe turn) could pass the limit
    chat, nxt = backbone.chat, last.turn + 1
    at_probe = nxt in (1, 2, 5, 10, 20)
    fork = len(chat.user_turn_ids("What is your name?")) + len(chat.close_assistant()) + 5 if at_probe else 0
    need = last.history_tokens + len(chat.user_turn_ids("Tell me a short story about the sea.")) + 6 \
        + len(chat.close_assistant()) + fork
    assert need > limit >= last.history_tokens
    # the same runner with room for every turn: no stop, no warning
    runner.max_context = 100_000
    (records,) = runner.run(persona, [["Hi."] * 3], [0, 3], progress=False)
    assert records[-1].turn == 3 and not records[-1].stopped


@needs_data
def test_evaluated_personas_are_a_seeded_sample_stratified_by_source(pool):
    """Not the first personas of each source: a sample drawn with the evaluation's seed (another seed, another
    sample), one source after another, all from the part asked for."""
    from persona_lit.personas.split import round_robin

    s = split(pool, 0)
    test, sources = s.parts["test"], s.pool_spec["sources"]
    first = round_robin(test, sources, 32)
    a, b, again = round_robin(test, sources, 32, 0), round_robin(test, sources, 32, 1), round_robin(test, sources, 32, 0)
    assert a == again and a != b and a != first and len(set(a)) == 32 and set(a) <= set(test)
    counts = {src: sum(k.startswith(src + ":") for k in a) for src in sources}
    available = {src: sum(k.startswith(src + ":") for k in test) for src in sources}
    top = max(counts.values())  # round-robin: a source not exhausted is at most one behind the others
    assert all(top - counts[src] <= 1 for src in sources if counts[src] < available[src])
    assert round_robin(test, sources, None, 3) == list(test)  # no limit: the whole part, as it is
