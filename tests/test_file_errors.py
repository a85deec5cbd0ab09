"""Every file a user hands us, read badly: one UserError line that names the file (and the line where there is one)
and says what is allowed; never another exception, never a pickle unpickled, nothing half-written.

The matrix calls the readers in-process (the entry points turn a UserError into `error: ...`, exit 2: see
tests/test_bad_input.py and tests/test_config_errors.py). No model is loaded except the random-init tiny-llama of
the checkpoint cases. tests/test_fuzz_readers.py checks the same readers on generated input."""

from __future__ import annotations

import json
import os
import pickle
import time
import tracemalloc
from pathlib import Path

import pytest

from tests.conftest import mechanism_cfg
import torch
from omegaconf import OmegaConf
from safetensors.torch import save_file

from persona_lit.errors import UserError

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"
BIG = 50 << 20  # the "50 MB single line"


def fails(fn, *args, facts=(), **kwargs) -> str:
    """Calls fn, expects a UserError whose message is one line holding every fact; returns the message."""
    with pytest.raises(UserError) as e:
        fn(*args, **kwargs)
    msg = str(e.value)
    assert "\n" not in msg and "\r" not in msg, repr(msg)
    for fact in facts:
        assert str(fact) in msg, f"{fact!r} not in {msg!r}"
    return msg


def fast_and_small(fn, *args, facts=(), seconds: float = 20.0, peak_bytes: int = 6 * BIG, **kwargs) -> str:
    """fails(), and the reader took at most `seconds` and `peak_bytes` of Python allocations (tracemalloc)."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        msg = fails(fn, *args, facts=facts, **kwargs)
        took, (_, peak) = time.perf_counter() - start, tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert took < seconds, f"{took:.1f} s"
    assert peak < peak_bytes, f"peak {peak >> 20} MiB"
    return msg


def lines(path: Path, *records) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records), encoding="utf-8")
    return path


def big_line(path: Path, head: bytes, fill: bytes, tail: bytes) -> Path:
    """One line of about 50 MB: head + fill repeated + tail, written in chunks."""
    with open(path, "wb") as f:
        f.write(head)
        chunk = fill * ((1 << 20) // len(fill))
        for _ in range(BIG // len(chunk)):
            f.write(chunk)
        f.write(tail)
    assert path.stat().st_size >= BIG
    return path


class Trap:
    """Unpickling this creates the directory `marker`: a reader that unpickles leaves it behind."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


@pytest.fixture
def trap(tmp_path):
    """(write(path): a torch.save pickle holding a Trap and a tensor, marker that must never appear)."""
    proof = tmp_path / "proof"
    pickle.loads(pickle.dumps(Trap(proof)))  # the trap works: unpickling it does create the directory
    assert proof.is_dir()
    marker = tmp_path / "UNPICKLED"

    def write(path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"direction": torch.zeros(2, 4), "activation_norm": torch.ones(2), "trap": Trap(marker)}, path)
        assert not marker.exists()
        return path

    yield write, marker
    assert not marker.exists(), "a reader unpickled the file"


# ---------------------------------------------------------------- persona YAML
PERSONA = """\
name: Cato
system_prompt: You are Cato, a terse stoic.
probes:
  - question: What is your name?
    kind: name
    check: {contains_any: [cato]}
"""


def persona_file(tmp_path: Path, text: str | bytes) -> Path:
    path = tmp_path / "cato.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def test_persona_valid_control(tmp_path):
    from persona_lit.personas.load import load_persona

    assert load_persona(str(persona_file(tmp_path, PERSONA))).probes[0].check("I am Cato.")


def test_persona_truncated(tmp_path):
    from persona_lit.personas.load import load_persona

    path = persona_file(tmp_path, PERSONA[: PERSONA.index("[cato]") + 3])  # cut inside the flow list
    fails(load_persona, str(path), facts=[f"{path}:", "not valid YAML"])


@pytest.mark.parametrize("edit,facts", [
    (("name: Cato", "name: [Cato]"), ["field 'name' is missing or empty", "allowed: a non-empty string"]),
    ((PERSONA[PERSONA.index("probes:"):], "probes: 5\n"), ["field 'probes' must be a list of {question, check}"]),
    (("probes:\n", "exchanges: 7\nprobes:\n"), ["field 'exchanges' must be a path (a string)"]),
    (("{contains_any: [cato]}", "{max_sentences: two}"), ["probes[0]: check max_sentences='two'",
                                                          "must be an integer >= 0"]),
    (("{contains_any: [cato]}", "{contains_any: 3}"), ["check contains_any=3", "a string or a list of strings"]),
    (("{contains_any: [cato]}", "{regex: '(unclosed'}"), ["check regex='(unclosed'", "a valid regular expression"]),
    (("{contains_any: [cato]}", "{no_exclamations: maybe}"), ["check no_exclamations='maybe'", "true or false"]),
    (("{contains_any: [cato]}", "{li2024: 'lambda x: open(x)'}"), ["check li2024=", "a `lambda x: ...` check"]),
    (("    kind: name", "    kind: name\n    answer: Cato"),
     ["probes[0]: unknown field 'answer'", "allowed: assistant_answer, check, kind, persona_answer, question"]),
    (("name: Cato", "name: Cato\n1: one"), ["unknown field 1; allowed: description, exchanges, name, probes"]),
], ids=["name-list", "probes-int", "exchanges-int", "count-word", "words-int", "bad-regex", "flag-word",
        "li2024-call", "probe-field", "int-key"])
def test_persona_wrong_types(tmp_path, edit, facts):
    from persona_lit.personas.load import load_persona

    path = persona_file(tmp_path, PERSONA.replace(*edit))
    fails(load_persona, str(path), facts=[str(path), *facts])


def test_persona_unknown_check_kind(tmp_path):
    from persona_lit.personas.load import load_persona

    path = persona_file(tmp_path, PERSONA.replace("contains_any", "contains_some"))
    fails(load_persona, str(path), facts=[f"{path}: probes[0]: unknown check 'contains_some'",
                                          "allowed: all_lowercase, contains_all, contains_any,"])


@pytest.mark.parametrize("probes,facts", [
    ("  -\n", ["probes[0]: a probe needs a non-empty 'question' string and a 'check'"]),
    ("  - {}\n", ["probes[0]: a probe needs a non-empty 'question'"]),
    ("  - question: ''\n    check: {max_words: 3}\n", ["probes[0]: a probe needs a non-empty 'question'"]),
    ("  - question: Hi?\n", ["probes[0]: a check must be a mapping like {contains_any: [word]}; got None"]),
    ("  - question: Hi?\n    check: {}\n", ["probes[0]: a check must be a mapping like"]),
], ids=["null", "empty-mapping", "empty-question", "no-check", "empty-check"])
def test_persona_empty_probes(tmp_path, probes, facts):
    from persona_lit.personas.load import load_persona

    path = persona_file(tmp_path, PERSONA[: PERSONA.index("probes:\n") + 8] + probes)
    fails(load_persona, str(path), facts=[str(path), *facts])


def test_persona_non_utf8(tmp_path):
    from persona_lit.personas.load import load_persona

    path = persona_file(tmp_path, PERSONA.encode().replace(b"terse", b"t\xe9rse"))  # Latin-1 é
    fails(load_persona, str(path), facts=[f"{path}:2: not UTF-8 text (byte 0xe9)", "allowed: a UTF-8 YAML file"])


@pytest.mark.parametrize("text,facts", [
    ("name: !!python/object/apply:os.system [echo hi]\n", ["not valid YAML", "could not determine a constructor"]),
    ("name: Cato\nsystem_prompt: 2001-02-30\n", ["a YAML value that cannot be read", "allowed: plain strings"]),
    ("name: !!int\n", ["a YAML value that cannot be read (IndexError"]),
    ("name: \x00\n", ["not valid YAML (unacceptable character #x0000"]),
], ids=["python-tag", "bad-date", "empty-int", "nul"])
def test_persona_yaml_that_cannot_build(tmp_path, text, facts):
    from persona_lit.personas.load import load_persona

    path = persona_file(tmp_path, text)
    fails(load_persona, str(path), facts=[str(path), *facts])


def test_persona_50mb_line(tmp_path):
    from persona_lit.personas.load import load_persona

    path = big_line(tmp_path / "huge.yaml", b"name: Cato\nsystem_prompt: ", b"a", b"\n")
    fast_and_small(load_persona, str(path), facts=[str(path), "allowed: a persona YAML file of at most 4 MiB"],
                   seconds=2, peak_bytes=1 << 20)


def test_persona_exchanges_file_missing(tmp_path):
    from persona_lit.data.readers import read_dialogues
    from persona_lit.personas.load import load_persona

    persona = load_persona(str(persona_file(tmp_path, "exchanges: gone.jsonl\n" + PERSONA)))
    fails(read_dialogues, persona.exchanges_path, facts=[f"data file not found: {tmp_path / 'gone.jsonl'}"])


# ---------------------------------------------------------------- persona exchanges / dialogue JSONL
CHAT = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}


def test_dialogues_truncated(tmp_path):
    from persona_lit.data.readers import read_dialogues

    path = lines(tmp_path / "d.jsonl", CHAT, json.dumps(CHAT)[:-7])
    fails(read_dialogues, path, facts=[f"{path}:2: not valid JSON", "allowed: one JSON object a line"])


@pytest.mark.parametrize("record,facts", [
    ({"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": 5}]},
     ["messages[1].content must be a string"]),
    ({"messages": [{"role": "bot", "content": "Hi"}]}, ["messages[0].role must be one of system, user, assistant"]),
    ({"messages": "Hi"}, ["field 'messages' must be a non-empty list of {role, content}"]),
    ({"instruction": "Hi?", "output": ["Hello"]}, ["field 'output' must be a string, got list"]),
    ({"prompt": "Hi?", "completion": "Hello"}, ["unknown record format: need 'messages' (chat) or 'instruction'"]),
    (["Hi?", "Hello"], ["each line must be a JSON object, got list"]),
], ids=["content-int", "role", "messages-str", "alpaca-output-list", "other-format", "array"])
def test_dialogues_wrong_types(tmp_path, record, facts):
    from persona_lit.data.readers import read_dialogues

    path = lines(tmp_path / "d.jsonl", CHAT, CHAT, record)
    fails(read_dialogues, path, facts=[f"{path}:3:", *facts])


def test_dialogues_non_utf8(tmp_path):
    from persona_lit.data.readers import read_dialogues

    path = lines(tmp_path / "d.jsonl", CHAT)
    path.write_bytes(path.read_bytes() + b'{"messages": "caf\xe9"}\n')
    fails(read_dialogues, path, facts=[f"{path}:2: not UTF-8 text (byte 0xe9 at column 18)",
                                       "allowed: UTF-8 JSONL"])


def test_dialogues_50mb_line(tmp_path):
    from persona_lit.data.readers import read_dialogues

    path = big_line(tmp_path / "d.jsonl", b'{"messages": [{"role": "user", "content": "', b"a", b'"}]}\n')
    fast_and_small(read_dialogues, path, facts=[f"{path}:1: field 'messages' has no assistant text"])


def test_dialogues_50mb_of_brackets(tmp_path):
    from persona_lit.data.readers import read_dialogues

    path = big_line(tmp_path / "d.jsonl", b"", b"[", b"\n")
    fast_and_small(read_dialogues, path, facts=[f"{path}:1: JSON nested too deeply", "one JSON object a line"])


# ---------------------------------------------------------------- MT-bench question.jsonl and reference answers
QUESTION = {"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Shorter."]}


@pytest.mark.parametrize("record,facts", [
    ({**QUESTION, "turns": []}, ["field 'turns' must be a non-empty list of strings"]),
    ({**QUESTION, "question_id": "eighty-one"}, ["field 'question_id' must be an integer"]),
    ({**QUESTION, "category": 3}, ["field 'category' must be a string"]),
], ids=["empty-turns", "id-word", "category-int"])
def test_mt_bench_wrong_types(tmp_path, record, facts):
    from persona_lit.data.readers import read_mt_bench

    path = lines(tmp_path / "question.jsonl", QUESTION, record)
    fails(read_mt_bench, path, facts=[f"{path}:2:", *facts])


def test_mt_bench_empty_file(tmp_path):
    from persona_lit.data.readers import read_mt_bench

    path = lines(tmp_path / "question.jsonl", "", "  ")
    fails(read_mt_bench, path, facts=[f"{path}: no questions in the file"])


@pytest.mark.parametrize("record", [
    {"question_id": 81, "choices": "a1"}, {"question_id": 81, "choices": {"0": {"turns": []}}},
    {"question_id": [81], "choices": [{"turns": ["a1"]}]}, {"question_id": 99, "choices": [{"turns": ["a1"]}]},
], ids=["choices-str", "choices-dict", "id-list", "unknown-id"])
def test_mt_bench_reference_answers_wrong_shape(tmp_path, record):
    from persona_lit.data.readers import read_mt_bench_exchanges

    questions = lines(tmp_path / "question.jsonl", QUESTION)
    answers = lines(tmp_path / "gpt-4.jsonl", {"question_id": 81, "choices": [{"turns": ["a1", "a2"]}]}, record)
    fails(read_mt_bench_exchanges, questions, answers,
          facts=[f"{answers}:2: needs a known 'question_id' and 'choices[0].turns'"])


# ---------------------------------------------------------------- Li et al. 2024 JSONL and its check compiler
LI = {"index": 0, "category": "pattern", "system_prompt": "Start with 'a'.", "probe": "Hi?",
      "adherence_check": "lambda x: x.lower().startswith('a')"}


@pytest.mark.parametrize("change,facts", [
    ({"adherence_check": "lambda x: eval(x)"}, ["adherence_check: call to 'eval' is not allowed; allowed: "]),
    ({"adherence_check": "lambda x: x.__class__"}, ["adherence_check: 'x.__class__' (Attribute) is not allowed"]),
    ({"adherence_check": "lambda x, y: 1"}, ["a check must be `lambda x: <expression>` with one argument"]),
    ({"adherence_check": "lambda x: (" * 3}, ["adherence_check: not a Python expression"]),
    ({"adherence_check": "lambda x: 'a\x00'\x00"}, ["adherence_check: not a Python expression"]),
    ({"adherence_check": "lambda x: " + "not " * 5000 + "x"}, ["adherence_check: "]),
    ({"index": "0"}, ["field 'index' is missing or not a int (a record has index, category,"]),
    ({"probe": None}, ["field 'probe' is missing or not a str"]),
], ids=["eval", "dunder", "two-args", "syntax", "nul", "deep", "index-str", "probe-null"])
def test_li2024_bad_records(tmp_path, change, facts):
    from persona_lit.personas.li2024 import load_li2024

    path = lines(tmp_path / "li.jsonl", {**LI, "index": 1}, {**LI, **change})
    fails(load_li2024, path, facts=[f"{path}:2:", *facts])


def test_li2024_truncated_and_non_utf8(tmp_path):
    from persona_lit.personas.li2024 import load_li2024

    path = lines(tmp_path / "li.jsonl", LI, json.dumps({**LI, "index": 1})[:40])
    fails(load_li2024, path, facts=[f"{path}:2: not valid JSON", "allowed: one JSON object a line"])
    path.write_bytes(json.dumps(LI).encode() + b"\n" + json.dumps({**LI, "index": 1}).encode().replace(b"Hi", b"H\xff"))
    fails(load_li2024, path, facts=[f"{path}:2: not UTF-8 text (byte 0xff", "allowed: UTF-8 JSONL"])


def test_li2024_50mb_check(tmp_path):
    from persona_lit.personas.li2024 import load_li2024

    head = json.dumps({k: v for k, v in LI.items() if k != "adherence_check"})[:-1].encode()
    path = big_line(tmp_path / "li.jsonl", head + b', "adherence_check": "lambda x: ', b"x+", b'x"}\n')
    fast_and_small(load_li2024, path, facts=[f"{path}:1: adherence_check: a check of ", "allowed: at most 10000"])


def test_li2024_persona_index_not_in_file(tmp_path):
    from persona_lit.personas.load import load_persona

    path = lines(tmp_path / "li.jsonl", LI)
    fails(load_persona, f"{path}#7", facts=[f"persona '{path}#7': no record with index 7 in {path}"])


# ---------------------------------------------------------------- direction files (safetensors)
def direction(tmp_path: Path, layers: int = 2, **meta) -> Path:
    from persona_lit.steering.vectors import Direction

    return Direction(torch.ones(layers, 4), torch.ones(layers), {"model": "tiny-llama", "fingerprint": "aaaa", **meta}
                     ).save(tmp_path / "d.safetensors")


def test_direction_pickle_is_never_unpickled(tmp_path, trap):
    from persona_lit.steering.vectors import load_direction

    write, _ = trap
    path = write(tmp_path / "direction.safetensors")
    fails(load_direction, path, facts=[f"direction={path}: not a safetensors file"])


def test_direction_of_another_model(tmp_path):
    from persona_lit.steering.vectors import load_direction

    path = direction(tmp_path)
    assert load_direction(path, layers=2, fingerprint="aaaa").layers == 2
    fails(load_direction, path, layers=4, facts=[f"direction={path}: direction has 2 layers, this model has 4"])
    fails(load_direction, path, fingerprint="bbbb",
          facts=[f"direction={path}: extracted on another base model", "this model has fingerprint bbbb"])


def test_direction_truncated_and_foreign(tmp_path):
    from persona_lit.steering.vectors import load_direction

    path = direction(tmp_path)
    path.write_bytes(path.read_bytes()[:-9])
    fails(load_direction, path, facts=[f"direction={path}: not a safetensors file"])
    save_file({"weight": torch.ones(2, 2)}, str(path))
    fails(load_direction, path, facts=[f"direction={path}: not a persona_lit direction file",
                                       "expected persona_lit.direction/1 with direction, activation_norm"])


# ---------------------------------------------------------------- ΔW files and PEFT adapter directories
def test_delta_pickle_and_direction_file(tmp_path, trap):
    from persona_lit.steering.weight_diff import load_delta

    write, _ = trap
    path = write(tmp_path / "delta.safetensors")
    fails(load_delta, path, facts=[f"mechanism.options.delta={path}: not a safetensors file"])
    other = direction(tmp_path)
    fails(load_delta, other, facts=[f"mechanism.options.delta={other}: not a ΔW file",
                                    "allowed: a file written by task=weight_diff"])


def adapter(tmp_path: Path, **config) -> Path:
    d = tmp_path / "adapter"
    d.mkdir(exist_ok=True)
    cfg = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, **config}
    (d / "adapter_config.json").write_text(json.dumps(cfg))
    name = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{name}.lora_A.weight": torch.ones(2, 8), f"{name}.lora_B.weight": torch.ones(8, 2)},
              str(d / "adapter_model.safetensors"))
    return d


def test_adapter_valid_control(tmp_path):
    from persona_lit.steering.weight_diff import read_adapter

    _, deltas = read_adapter(adapter(tmp_path), "task.pos")
    assert torch.equal(deltas["model.layers.0.self_attn.q_proj"], torch.full((8, 8), 4.0))


@pytest.mark.parametrize("config,facts", [
    ({"r": "four"}, ["r='four'; allowed: an integer >= 1"]),
    ({"r": 0}, ["r=0; allowed: an integer >= 1"]),
    ({"lora_alpha": None}, ["lora_alpha=None; allowed: a finite number"]),
    ({"rank_pattern": {"q_proj": 2.5}}, ["rank_pattern; allowed: a mapping of module patterns to an integer >= 1"]),
    ({"alpha_pattern": {"q_proj(": 2}}, ["alpha_pattern key 'q_proj('; allowed: a regular expression"]),
    ({"peft_type": "IA3"}, ["peft_type='IA3'; allowed: LORA"]),
], ids=["r-word", "r-zero", "alpha-null", "rank-float", "pattern-regex", "ia3"])
def test_adapter_config_wrong_types(tmp_path, config, facts):
    from persona_lit.steering.weight_diff import read_adapter

    d = adapter(tmp_path, **config)
    fails(read_adapter, d, "task.pos", facts=[f"task.pos={d}", *facts])


def test_adapter_pickled_weights(tmp_path, trap):
    from persona_lit.steering.weight_diff import read_adapter

    write, _ = trap
    d = adapter(tmp_path)
    write(d / "adapter_model.safetensors")
    fails(read_adapter, d, "task.neg", facts=[f"task.neg={d / 'adapter_model.safetensors'}: not a safetensors file",
                                              "allowed: PEFT's adapter_model.safetensors"])
    (d / "adapter_model.safetensors").rename(d / "adapter_model.bin")  # PEFT's older pickle format
    fails(read_adapter, d, "task.neg", facts=[f"task.neg={d}: need a PEFT adapter directory with adapter_config.json "
                                              f"and adapter_model.safetensors"])


# ---------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def lora_ckpt(tmp_path_factory):
    """A final.safetensors of tiny-llama (random init) + LoRA, as train.py writes it; and what it was made of."""
    from persona_lit.models.backbones import load_backbone
    from persona_lit.build import attach_mechanism, plain
    from persona_lit.training.checkpoint import save_checkpoint, trainable_state
    from persona_lit.personas.load import load_persona, persona_to_dict

    model_cfg = OmegaConf.load(CONF / "model" / "tiny-llama.yaml")
    mech_cfg = mechanism_cfg("lora")
    backbone = load_backbone(model_cfg)
    model, _ = attach_mechanism(backbone, mech_cfg)
    config = {"model": plain(model_cfg), "mechanism": plain(mech_cfg),
              "persona": persona_to_dict(load_persona("stoic")), "data": {}, "seed": 0}
    tensors = trainable_state(model)
    path = save_checkpoint(tmp_path_factory.mktemp("ckpt") / "final.safetensors", tensors, config,
                           backbone.fingerprint)
    return path, tensors, config, backbone.fingerprint


def test_checkpoint_of_another_model(lora_ckpt):
    from persona_lit.build import restore

    path = lora_ckpt[0]
    other = OmegaConf.load(CONF / "model" / "tiny-llama.yaml")
    other.tiny.seed = 1
    fails(restore, str(path), model_override=other,
          facts=[f"ckpt={path}: trained on another base model (tiny-llama, fingerprint {lora_ckpt[3]})"])


def test_checkpoint_of_another_mechanism(tmp_path, lora_ckpt):
    from persona_lit.build import restore
    from persona_lit.training.checkpoint import save_checkpoint

    _, tensors, config, fp = lora_ckpt
    path = save_checkpoint(tmp_path / "final.safetensors", tensors, {**config, "mechanism": {"name": "none"}}, fp)
    fails(restore, str(path), facts=[f"ckpt={path}: checkpoint does not fit this model and mechanism",
                                     f"0 missing, {len(tensors)} unexpected tensors"])


def test_checkpoint_pickle_is_never_unpickled(tmp_path, trap):
    from persona_lit.training.checkpoint import read_checkpoint

    write, _ = trap
    path = write(tmp_path / "final.safetensors")
    fails(read_checkpoint, path, facts=[f"ckpt={path}: corrupted or not a safetensors file"])
    lightning = write(tmp_path / "last.ckpt")
    fails(read_checkpoint, lightning, facts=[f"ckpt={lightning}: not a .safetensors checkpoint",
                                             "evaluate.py reads the final.safetensors written beside them"])


@pytest.mark.parametrize("metadata,facts", [
    (None, ["a safetensors file without persona_lit metadata (not written by train.py)"]),
    ({"persona_lit": "{not json"}, ["corrupted persona_lit metadata"]),
    ({"persona_lit": "[1, 2]"}, ["corrupted persona_lit metadata (allowed: a JSON object with version, fingerprint"]),
    ({"persona_lit": json.dumps({"version": "1", "config": {"x": 1}})},
     ["its config lacks model, mechanism or persona (allowed: a checkpoint written by train.py)"]),
], ids=["no-metadata", "not-json", "list", "config-without-model"])
def test_checkpoint_metadata(tmp_path, metadata, facts):
    from persona_lit.build import restore

    path = tmp_path / "final.safetensors"
    save_file({"x": torch.zeros(1)}, str(path), metadata=metadata)
    fails(restore, str(path), facts=[f"ckpt={path}", *facts])


# ---------------------------------------------------------------- contrastive and persona-pool caches
SETTINGS = {"format": "x", "fingerprint": "aaaa"}


def test_contrastive_cache_damaged(tmp_path):
    from persona_lit.data.contrastive import read_cache

    path = lines(tmp_path / "c.jsonl", {"settings": SETTINGS}, {"side": "pos", "answer": "a"})
    fails(read_cache, path, SETTINGS, facts=[f"{path}: a damaged contrastive cache (records lack side/question/answer)",
                                             "delete it to regenerate"])
    assert read_cache(path, {**SETTINGS, "fingerprint": "bbbb"}) is None  # other settings: not this cache, no error
    path.write_bytes(path.read_bytes().replace(b'"a"', b'"\xe9"'))
    fails(read_cache, path, SETTINGS, facts=[f"{path}: a damaged contrastive cache (not UTF-8 JSONL)"])


def test_persona_pool_cache_damaged(tmp_path):
    from persona_lit.data import cache
    from persona_lit.data.persona_pool import _valid_record

    path = lines(tmp_path / "p.jsonl", {"settings": SETTINGS}, {"persona": "pack:stoic", "system": "s",
                                                                "turns": [["q", 5]]})
    fails(cache.read_cache, path, SETTINGS, "persona_pool", _valid_record, "persona/system/turns",
          facts=[f"{path}: a damaged persona_pool cache (records lack persona/system/turns)"])
    lines(path, {"settings": SETTINGS}, '{"persona": "pack:st')
    fails(cache.read_cache, path, SETTINGS, "persona_pool", _valid_record, "persona/system/turns",
          facts=[f"{path}: a damaged persona_pool cache (not UTF-8 JSONL)"])


# ---------------------------------------------------------------- persona split JSON
@pytest.fixture(scope="module")
def pack_split():
    from persona_lit.personas.pool import load_pool
    from persona_lit.personas.split import split

    pool = load_pool(["pack"])
    return pool, split(pool, seed=0).to_json()


@pytest.mark.parametrize("change,facts", [
    ({"format": "other"}, ["not a persona split (persona_lit.persona_split/1: seed, fractions, pool,"]),
    ({"seed": "zero"}, ["a damaged persona split (allowed: pool an object, seed an integer,"]),
    ({"test": "pack:stoic"}, ["a damaged persona split"]),
    ({"fractions": "abc"}, ["fractions='abc'; allowed: three numbers (train, val, test)"]),
    ({"fractions": [0.5, 0.5, 0.5]}, ["pool.fractions=[0.5, 0.5, 0.5]: each share must be > 0 and they must sum to 1"]),
    ({"pool_hash": "0"}, ["the persona pool changed since this split was written"]),
    ({"val": ["pack:nobody"]}, ["val key 'pack:nobody' is not in the pool or is in two parts"]),
], ids=["format", "seed-word", "part-str", "fractions-str", "fractions-sum", "hash", "unknown-key"])
def test_persona_split_damaged(tmp_path, pack_split, change, facts):
    from persona_lit.personas.split import read_split

    pool, valid = pack_split
    path = tmp_path / "persona_split.json"
    path.write_text(json.dumps({**valid, **change}))
    fails(read_split, path, pool=pool, facts=[str(path), *facts])


def test_persona_split_truncated_and_non_utf8(tmp_path, pack_split):
    from persona_lit.personas.split import read_split

    pool, valid = pack_split
    path = tmp_path / "persona_split.json"
    path.write_text(json.dumps(valid)[:-20])
    fails(read_split, path, pool=pool, facts=[f"{path}: not valid JSON", "allowed: a persona split written by"])
    path.write_bytes(json.dumps(valid).encode().replace(b"pack", b"p\xe4ck", 1))
    fails(read_split, path, pool=pool, facts=[f"{path}: not valid JSON (UnicodeDecodeError"])


# ---------------------------------------------------------------- sweep results (task=sweep_compare)
PER_TURN = {"turn": [0, 5], "mean": [0.5, 0.25], "ci_low": [0.25, 0.0], "ci_high": [0.75, 0.5]}
SWEEP = {"run": {"model": "tiny-llama", "mechanism": "steer", "persona": "Cato", "layers": [1]},
         "task": {"turn": 5, "probe_kind": "name", "metric": "adherence", "system_prompt": False},
         "sweep": [{"alpha": 0, "metrics": {"adherence/name": PER_TURN, "capability/kl_to_base": PER_TURN}}],
         "reference_none": None}


def sweep_dirs(tmp_path: Path, second) -> list[str]:
    dirs = []
    for i, results in enumerate([SWEEP, second]):
        d = tmp_path / f"sweep{i}"
        d.mkdir()
        if results is not None:
            (d / "results.json").write_text(results if isinstance(results, str) else json.dumps(results))
        dirs.append(str(d))
    return dirs


@pytest.mark.parametrize("second,facts", [
    (None, ["no readable results.json of task=steer_sweep there (FileNotFoundError)"]),
    (json.dumps(SWEEP)[:-30], ["no readable results.json of task=steer_sweep there (JSONDecodeError)"]),
    ({**SWEEP, "sweep": [{"metrics": {}}]}, ["(sweep must be a list of {alpha, metrics})",
                                             "allowed: the results.json that task=steer_sweep writes"]),
    ({**SWEEP, "sweep": [{"alpha": 1, "metrics": {"adherence/name": {**PER_TURN, "mean": [0.5]}}}]},
     ["a per-turn metric whose lists differ in length"]),
    ({**SWEEP, "task": {**SWEEP["task"], "turn": 3}}, ["task.turn=3 but 5 in task.runs[0]; allowed: sweeps with "
                                                        "the same turn"]),
], ids=["missing", "truncated", "no-alpha", "short-list", "other-turn"])
def test_sweep_results_damaged(tmp_path, second, facts):
    from persona_lit.steering.sweep_compare import load_sweeps

    runs = sweep_dirs(tmp_path, second)
    fails(load_sweeps, runs, None, facts=[f"task.runs[1]={runs[1]}", *facts])


# ---------------------------------------------------------------- drift results (task=weight_projection)
DRIFT = {"metrics": {"vs_baseline/adherence/name": PER_TURN}}


@pytest.mark.parametrize("results,facts", [
    ([DRIFT], ["no drift results.json there (TypeError); allowed: the out_dir of a drift evaluation"]),
    ({"metrics": [1]}, ["'metrics' is not an object; allowed: the results.json of a drift evaluation"]),
    ({"metrics": {"vs_baseline/adherence/name": {"turn": 5}}},
     ["vs_baseline/adherence/name is not a per-turn metric (allowed: turn, mean, ci_low, ci_high lists"]),
    ({"metrics": {"vs_baseline/adherence/name": {**PER_TURN, "mean": [0.5, "high"]}}},
     ["vs_baseline/adherence/name at turn 5 is [", "allowed: numbers or null"]),
    ({"metrics": {"adherence/name": PER_TURN}}, ["no vs_baseline/adherence/name (an evaluation with baseline=true"]),
    ({"metrics": {"vs_baseline/adherence/name": {**PER_TURN, "turn": [0, 4]}}}, ["turn 5 is not a probe turn there"]),
], ids=["list", "metrics-list", "not-per-turn", "mean-word", "no-baseline", "other-turns"])
def test_drift_results_damaged(tmp_path, results, facts):
    from persona_lit.steering.weight_projection import behaviour

    (tmp_path / "results.json").write_text(json.dumps(DRIFT))
    assert behaviour(str(tmp_path), "adherence/name", 5, 2) == (0.25, [0.0, 0.5])  # the valid control
    (tmp_path / "results.json").write_text(json.dumps(results))
    fails(behaviour, str(tmp_path), "adherence/name", 5, 2, facts=[f"task.evals[2]={tmp_path}", *facts])


# ---------------------------------------------------------------- directories: not writable, already holding results
def test_directory_not_writable(tmp_path):
    from persona_lit.build import require_writable

    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    fails(require_writable, blocker / "out", "out_dir",
          facts=[f"out_dir={blocker / 'out'}: cannot write there ({blocker} is not a writable directory)"])
    # As root os.access says yes everywhere, /proc included; require_writable tries a write.
    fails(require_writable, Path("/proc/persona_lit_out"), "hydra.run.dir",
          facts=["hydra.run.dir=/proc/persona_lit_out: cannot write there (/proc"])


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write into a read-only directory (covered by /proc above)")
def test_directory_read_only(tmp_path):
    from persona_lit.build import require_writable

    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    try:
        fails(require_writable, ro / "out", "out_dir", facts=[f"out_dir={ro / 'out'}: cannot write there"])
    finally:
        ro.chmod(0o700)


def test_out_dir_with_results(tmp_path):
    """A task's out_dir that already holds results: refused before anything is written, the results untouched
    (before: the task ran to the end, then `OSError: Directory not empty` and its own results deleted)."""
    from persona_lit.outputs import staged_dir

    out = tmp_path / "out"
    out.mkdir()
    (out / "results.json").write_text("{}")
    with pytest.raises(UserError) as e:
        with staged_dir(out):
            raise AssertionError("staged_dir must refuse before the block runs")
    msg = str(e.value)
    assert msg == f"out_dir={out}: exists and is not an empty directory (it may hold results); allowed: a new or " \
                  f"empty directory", msg
    assert (out / "results.json").read_text() == "{}" and sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (tmp_path / "file").write_text("x")
    fails(lambda: staged_dir(tmp_path / "file").__enter__(), facts=[f"out_dir={tmp_path / 'file'}: exists and is not"])
    with staged_dir(tmp_path / "empty_ok") as tmp:  # a new (or empty) directory is fine
        (tmp / "results.json").write_text("{}")
    assert (tmp_path / "empty_ok" / "results.json").is_file()


def test_evaluate_out_dir_with_results(tmp_path):
    from persona_lit.evaluation.runner import evaluate

    out = tmp_path / "out"
    out.mkdir()
    (out / "report.md").write_text("old")
    cfg = OmegaConf.create({"out_dir": str(out), "compare": None, "task": {"name": "drift"}})
    fails(evaluate, cfg, facts=[f"out_dir={out}: exists and is not empty (choose another out_dir)"])
    assert [p.name for p in out.iterdir()] == ["report.md"]
