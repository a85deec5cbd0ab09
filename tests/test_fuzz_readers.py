"""Property: every reader of a file a user hands us gives either a parsed result or a one-line UserError, never
another exception, whatever the file holds. Three kinds of input per reader: any bytes; JSON- or YAML-shaped text
(hypothesis' recursive JSON values, dumped); and a valid file with a few parts replaced, deleted or added (which
gets past the first checks, where the interesting failures are). Safetensors readers also get well-formed
safetensors with fuzzed headers, metadata and tensors, and raw headers hypothesis writes itself.

40 examples a reader (settings below); the whole file runs in well under a minute on one thread.
PERSONA_LIT_FUZZ_EXAMPLES=N runs N a reader with a random seed."""

from __future__ import annotations

import copy
import json
import os
import struct

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save as safetensors_bytes

from persona_lit.errors import UserError

# Fixed examples in CI (derandomize); PERSONA_LIT_FUZZ_EXAMPLES=2000 fuzzes deeper, with a fresh seed each run.
EXAMPLES = int(os.environ.get("PERSONA_LIT_FUZZ_EXAMPLES", 40))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=EXAMPLES == 40, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ---------------------------------------------------------------- strategies
scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=20)
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c,
                                                                                         max_size=4), max_leaves=12)
json_text = json_values.map(json.dumps)
jsonl_text = st.lists(json_text, max_size=4).map("\n".join)
YAML_CHARS = list("abcnxyz019 :-[]{}#&*!|>'\",.?%@`\\\t\n") + [
    "\n  ", "- ", ": ", "&a ", "*a", "2001-02-30", "\x00", "é",
    "!!int ", "!!float ", "!!bool ", "!!timestamp ", "!!set ", "!!binary ", "!!python/object "]
yaml_text = st.lists(st.sampled_from(YAML_CHARS), max_size=60).map("".join)


def _mutate_once(draw, node):
    """One change somewhere in `node` (in place where it can; returns the new node)."""
    if isinstance(node, (dict, list)) and node:
        keys = list(node) if isinstance(node, dict) else list(range(len(node)))
        op = draw(st.sampled_from(["descend", "descend", "descend", "delete", "add", "replace"]))
        k = draw(st.sampled_from(keys))
        if op == "descend":
            node[k] = _mutate_once(draw, node[k])
        elif op == "delete":
            del node[k]
        elif op == "add" and isinstance(node, dict):
            node[draw(st.text(max_size=8))] = draw(json_values)
        elif op == "add":
            node.append(draw(json_values))
        else:
            return draw(json_values)
        return node
    return draw(json_values | st.sampled_from([None, "", 0, -1, 10**9, 1.5, float("nan"), True, [], {}, "x" * 30,
                                               "two\nlines", "\r"]))  # an error line must not break on file text


def mutated(template):
    @st.composite
    def build(draw):
        value = copy.deepcopy(template)
        for _ in range(draw(st.integers(1, 3))):
            value = _mutate_once(draw, value)
        return value

    return build()


def dumps(value) -> str:
    return json.dumps(value, ensure_ascii=False)


def texts(*shaped) -> st.SearchStrategy[bytes]:
    """Any bytes, or one of the `shaped` text strategies as UTF-8."""
    return st.binary(max_size=400) | st.one_of(*shaped).map(lambda t: t.encode("utf-8", "surrogatepass"))


def parsed_or_user_error(fn, *args, **kwargs):
    """The property: a result, or a UserError whose message is one line. Anything else propagates."""
    try:
        return fn(*args, **kwargs)
    except UserError as e:
        assert "\n" not in str(e) and "\r" not in str(e), repr(str(e))
        return e


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


# ---------------------------------------------------------------- persona YAML
PERSONA = {"name": "Cato", "system_prompt": "You are Cato.", "description": "a stoic", "exchanges": "cato.jsonl",
           "probes": [{"question": "What is your name?", "kind": "name", "check": {"contains_any": ["cato"]},
                       "persona_answer": "Cato.", "assistant_answer": "An assistant."},
                      {"question": "Describe rain.", "check": {"max_sentences": 2, "no_exclamations": True,
                                                               "regex": "rain", "li2024": "lambda x: 'a' in x"}}]}


@FUZZ
@given(data=texts(yaml_text, json_text, mutated(PERSONA).map(lambda v: yaml.safe_dump(v, allow_unicode=True))))
def test_persona_yaml(work, data):
    from persona_lit.personas.load import load_persona
    from persona_lit.personas.types import Persona

    path = work / "persona.yaml"
    path.write_bytes(data)
    out = parsed_or_user_error(load_persona, str(path))
    assert isinstance(out, (Persona, UserError))
    if isinstance(out, Persona):  # a persona that loads can be scored
        for probe in out.probes:
            parsed_or_user_error(probe.check, "Cato says: rain, rain.")


@FUZZ
@given(raw=json_values | mutated(PERSONA))
def test_persona_dict_from_a_checkpoint(raw):
    from persona_lit.personas.load import persona_from_dict

    parsed_or_user_error(persona_from_dict, raw, "<checkpoint>")


# ---------------------------------------------------------------- dialogue, MT-bench and Li et al. 2024 JSONL
CHAT = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                     {"role": "assistant", "content": "a"}]}
ALPACA = {"instruction": "q", "input": "", "output": "a"}
QUESTION = {"question_id": 81, "category": "writing", "turns": ["one?", "two?"]}
ANSWER = {"question_id": 81, "model_id": "gpt-4", "choices": [{"index": 0, "turns": ["a1", "a2"]}]}
LI = {"index": 0, "category": "pattern", "system_prompt": "Always start with 'a'.", "probe": "Hi?",
      "adherence_check": "lambda x: x.lower().startswith('a')"}


def jsonl(template) -> st.SearchStrategy[str]:
    return st.lists(mutated(template).map(dumps) | st.just(dumps(template)), min_size=1, max_size=3).map("\n".join)


@FUZZ
@given(data=texts(jsonl_text, jsonl(CHAT), jsonl(ALPACA)))
def test_dialogues(work, data):
    from persona_lit.data.readers import read_dialogues

    path = work / "dialogues.jsonl"
    path.write_bytes(data)
    parsed_or_user_error(read_dialogues, path)


@FUZZ
@given(data=texts(jsonl_text, jsonl(QUESTION)))
def test_mt_bench_questions(work, data):
    from persona_lit.data.readers import read_mt_bench

    path = work / "question.jsonl"
    path.write_bytes(data)
    parsed_or_user_error(read_mt_bench, path)


@FUZZ
@given(data=texts(jsonl_text, jsonl(ANSWER)))
def test_mt_bench_reference_answers(work, data):
    from persona_lit.data.readers import read_mt_bench_exchanges

    questions, answers = work / "q.jsonl", work / "gpt-4.jsonl"
    questions.write_text(dumps(QUESTION) + "\n")
    answers.write_bytes(data)
    parsed_or_user_error(read_mt_bench_exchanges, questions, answers)


@FUZZ
@given(data=texts(jsonl_text, jsonl(LI)))
def test_li2024_file(work, data):
    from persona_lit.personas.li2024 import load_li2024

    path = work / "li.jsonl"
    path.write_bytes(data)
    out = parsed_or_user_error(load_li2024, path, skip_unsupported=False)
    for persona in out if isinstance(out, list) else []:
        parsed_or_user_error(persona.probes[0].check.score, "a cat sat.")


PY_CHARS = list("x lambda:()[]{}.,'\"+-*/<>=!%~^&|@#0129aceinorst_\\\n") + [
    "lambda x: ", " for ", " in ", " if ", " and ", " not ", "x.split()", "len(", "fraction_starts_with(x, ",
    "count_words(x)", "__import__", "**", "x[0]", "*x", "**x", "\x00", "yield", "await "]


@FUZZ
@given(source=st.lists(st.sampled_from(PY_CHARS), max_size=40).map("".join) | st.text(max_size=60))
def test_li2024_check_compiler(source):
    from persona_lit.personas.li2024_checks import compile_check

    out = parsed_or_user_error(compile_check, source)
    if not isinstance(out, UserError) and out.supported:
        parsed_or_user_error(out.score, "a cat sat on the mat.")


# ---------------------------------------------------------------- safetensors files: direction, ΔW, checkpoint
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64, torch.int8, torch.bool, torch.float64]


@st.composite
def safetensors_files(draw, names: list[str], metadata: st.SearchStrategy[dict[str, str]]) -> bytes:
    """Real safetensors bytes (fuzzed tensor names, shapes, dtypes and metadata), sometimes cut or with a byte
    changed; or a raw 8-byte length + header JSON hypothesis writes; or any bytes."""
    kind = draw(st.sampled_from(["file", "file", "raw", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "raw":
        header = draw(mutated({"t": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
                               "__metadata__": {"format": "x"}}))
        raw = dumps(header).encode("utf-8", "surrogatepass")
        length = draw(st.sampled_from([len(raw), len(raw) + 1, 0, 2**63, len(raw) - 1]))
        return struct.pack("<Q", length % 2**64) + raw + draw(st.binary(max_size=40))
    tensors = {}
    for name in draw(st.lists(st.sampled_from(names) | st.text(min_size=1, max_size=12), max_size=3, unique=True)):
        shape = draw(st.lists(st.integers(0, 3), max_size=3))
        tensors[name] = torch.zeros(shape, dtype=draw(st.sampled_from(DTYPES)))
        if tensors[name].is_floating_point() and tensors[name].numel() and draw(st.booleans()):
            tensors[name].view(-1)[0] = draw(st.sampled_from([float("nan"), float("inf"), 1e30]))
    data = safetensors_bytes(tensors, metadata=draw(metadata) or None)
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(data)))
        data = data[:cut] if draw(st.booleans()) else data[:cut] + bytes([draw(st.integers(0, 255))]) + data[cut + 1:]
    return data


def metadata(template: dict) -> st.SearchStrategy[dict[str, str]]:
    """String metadata: the template's values JSON-encoded, fuzzed, sometimes not JSON at all."""
    as_json = mutated(template).map(lambda d: {str(k): dumps(v) for k, v in d.items()} if isinstance(d, dict) else {})
    return as_json | st.dictionaries(st.text(max_size=8), st.text(max_size=12), max_size=3)


DIRECTION_META = {"format": "persona_lit.direction/1", "model": "tiny-llama", "fingerprint": "abc", "samples": 3}


@FUZZ
@given(data=safetensors_files(["direction", "activation_norm"], metadata(DIRECTION_META)))
def test_direction_file(work, data):
    from persona_lit.steering.vectors import load_direction

    path = work / "direction.safetensors"
    path.write_bytes(data)
    parsed_or_user_error(load_direction, path, layers=None)


@FUZZ
@given(data=safetensors_files(["model.layers.0.self_attn.q_proj.weight", "lm_head.weight"],
                              st.just({"format": "persona_lit.weight_diff.v1"}) | metadata({"format": 1})))
def test_delta_file(work, data):
    from persona_lit.steering.weight_diff import load_delta

    path = work / "delta.safetensors"
    path.write_bytes(data)
    parsed_or_user_error(load_delta, path)


ADAPTER_CONFIG = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "use_rslora": False, "target_modules": ["q_proj"],
                  "rank_pattern": {"q_proj": 2}, "alpha_pattern": {}, "base_model_name_or_path": "tiny-llama"}
LORA = "base_model.model.model.layers.0.self_attn.q_proj"


@FUZZ
@given(config=texts(json_text, mutated(ADAPTER_CONFIG).map(dumps)),
       weights=safetensors_files([f"{LORA}.lora_A.weight", f"{LORA}.lora_B.weight", "x.weight"], st.just({})))
def test_peft_adapter_directory(work, config, weights):
    from persona_lit.steering.weight_diff import read_adapter

    d = work / "adapter"
    d.mkdir(exist_ok=True)
    (d / "adapter_config.json").write_bytes(config)
    (d / "adapter_model.safetensors").write_bytes(weights)
    parsed_or_user_error(read_adapter, d, "task.pos")


@FUZZ
@given(data=safetensors_files(["model.layers.0.mlp.down_proj.lora_A.default.weight"],
                              metadata({"persona_lit": {"version": "1", "fingerprint": "abc",
                                                        "config": {"model": {}, "mechanism": {}, "persona": {}}}})))
def test_checkpoint_file(work, data):
    from persona_lit.training.checkpoint import read_checkpoint

    path = work / "final.safetensors"
    path.write_bytes(data)
    out = parsed_or_user_error(read_checkpoint, path)
    if not isinstance(out, UserError):
        assert isinstance(out[1], dict) and isinstance(out[1]["config"], dict)


# ---------------------------------------------------------------- generated-data caches
CONTRASTIVE_SETTINGS = {"format": "x", "fingerprint": "abc"}


@FUZZ
@given(data=texts(jsonl_text, jsonl({"side": "pos", "instruction": "i", "question": "q", "answer": "a"})
                  .map(lambda t: dumps({"settings": CONTRASTIVE_SETTINGS}) + "\n" + t)))
def test_contrastive_cache(work, data):
    from persona_lit.data.contrastive import read_cache

    path = work / "contrastive.jsonl"
    path.write_bytes(data)
    out = parsed_or_user_error(read_cache, path, CONTRASTIVE_SETTINGS)
    for r in out if isinstance(out, list) else []:  # what ContrastiveDataModule.setup reads of each record
        assert r["side"] in ("pos", "neg") and isinstance(r["question"], str) and isinstance(r["answer"], str)


@FUZZ
@given(data=texts(jsonl_text, jsonl({"persona": "pack:stoic", "system": "You are Cato.", "turns": [["q", "a"]]})
                  .map(lambda t: dumps({"settings": CONTRASTIVE_SETTINGS}) + "\n" + t)))
def test_persona_pool_cache(work, data):
    from persona_lit.data import cache
    from persona_lit.data.persona_pool import _valid_record

    path = work / "pool.jsonl"
    path.write_bytes(data)
    out = parsed_or_user_error(cache.read_cache, path, CONTRASTIVE_SETTINGS, "persona_pool", _valid_record,
                               "persona/system/turns")
    for r in out if isinstance(out, list) else []:  # what PersonaPoolDataModule.example reads of each record
        assert all(isinstance(q, str) and isinstance(a, str) for q, a in r["turns"])


# ---------------------------------------------------------------- persona split, sweep and drift results
@pytest.fixture(scope="module")
def pack_split():
    from persona_lit.personas.pool import load_pool
    from persona_lit.personas.split import split

    pool = load_pool(["pack"])
    return pool, split(pool, seed=0).to_json()


@FUZZ
@given(data=st.data())
def test_persona_split(work, pack_split, data):
    from persona_lit.personas.split import read_split

    pool, valid = pack_split
    content = data.draw(texts(json_text, mutated(valid).map(dumps)))
    path = work / "persona_split.json"
    path.write_bytes(content)
    parsed_or_user_error(read_split, path, pool=pool)


PER_TURN = {"turn": [0, 5], "mean": [0.5, 0.25], "ci_low": [0.25, None], "ci_high": [0.75, None]}
SWEEP = {"run": {"model": "tiny-llama", "mechanism": "steer", "persona": "Cato", "layers": [1]},
         "task": {"alphas": [0, 1], "system_prompt": False, "turn": 5, "probe_kind": "name", "metric": "adherence",
                  "max_kl": 0.5},
         "sweep": [{"alpha": 0, "metrics": {"adherence/name": PER_TURN, "capability/kl_to_base": PER_TURN}},
                   {"alpha": 1, "metrics": {"adherence/name": PER_TURN, "capability/perplexity": PER_TURN}}],
         "reference_none": {"adherence/name": PER_TURN, "capability/kl_to_base": PER_TURN}}


@FUZZ
@given(data=texts(json_text, mutated(SWEEP).map(dumps)))
def test_sweep_results(work, data):
    from persona_lit.steering.sweep_compare import load_sweeps, table

    good, fuzzed = work / "sweep_good", work / "sweep_fuzzed"
    for d in (good, fuzzed):
        d.mkdir(exist_ok=True)
    (good / "results.json").write_text(dumps(SWEEP))
    (fuzzed / "results.json").write_bytes(data)
    out = parsed_or_user_error(load_sweeps, [str(good), str(fuzzed)], None)
    if not isinstance(out, UserError):  # what the task does next with them
        table(out)


DRIFT = {"run": {"mechanism": "lora"}, "metrics": {"adherence/name": PER_TURN, "vs_baseline/adherence/name": PER_TURN}}


@FUZZ
@given(data=texts(json_text, mutated(DRIFT).map(dumps)))
def test_drift_results(work, data):
    from persona_lit.steering.weight_projection import behaviour

    d = work / "drift"
    d.mkdir(exist_ok=True)
    (d / "results.json").write_bytes(data)
    out = parsed_or_user_error(behaviour, str(d), "adherence/name", 5, 0)
    if not isinstance(out, UserError):
        mean, (low, high) = out
        assert all(v is None or isinstance(v, (int, float)) for v in (mean, low, high))


COMPARED = {"run": {"mechanism": "lyra", "model": "tiny-llama", "persona": "Cato"},
            "metrics": {"adherence/name": {**PER_TURN, "ci_low": [None, 0.1], "ci_high": [None, 0.4], "n": [1, 3],
                                           "interval": ["none", "bootstrap"]},
                        "likelihood_margin_baseline": PER_TURN, "capability/kl_to_base_control": PER_TURN},
            "history_tokens": {"0": 30, "5": 700}, "seconds_per_turn": {"5": 1.5}}


@settings(max_examples=15 if EXAMPLES == 40 else EXAMPLES, deadline=None, derandomize=EXAMPLES == 40, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])  # plots: fewer examples
@given(data=texts(json_text, mutated(COMPARED).map(dumps)))
def test_compare_results(work, data):
    import shutil

    from persona_lit.evaluation.compare import compare_runs

    good, fuzzed, out = work / "cmp_good", work / "cmp_fuzzed", work / "cmp_out"
    for d in (good, fuzzed):
        d.mkdir(exist_ok=True)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir()
    (good / "results.json").write_text(dumps(COMPARED))
    (fuzzed / "results.json").write_bytes(data)
    result = parsed_or_user_error(compare_runs, [good, fuzzed], out)
    if isinstance(result, UserError):
        assert list(out.iterdir()) == []  # checked before anything is written
