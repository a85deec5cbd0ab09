"""Bad user input: one `error: ...` line on stderr, exit code 2, no traceback, nothing half-written left behind."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent
TRAIN = ["model=tiny-llama", "mechanism=lora", "persona=joyful_writer", "logger=none"]
EVAL = ["turns=2", "probe_turns=[0,1]", "max_new_tokens=8", "probe_max_new_tokens=8", "logger=none"]


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def user_error(proc: subprocess.CompletedProcess, *facts: str, absent: Path | None = None) -> str:
    """Asserts the project rule and returns the error line."""
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    detail = f"rc={proc.returncode}\nstderr tail:\n{proc.stderr[-3000:]}"
    assert proc.returncode == 2, detail
    assert "Traceback" not in proc.stderr, detail
    assert lines and lines[-1].startswith("error:"), detail
    for fact in facts:
        assert fact in lines[-1], f"{fact!r} not in {lines[-1]!r}"
    if absent is not None:
        assert not absent.exists(), f"{absent} left behind: {list(absent.rglob('*'))}"
    return lines[-1]


def train_fails(tmp_path: Path, *overrides: str, facts=()) -> str:
    run_dir = tmp_path / "run"
    proc = cli("train.py", *TRAIN, "trainer.max_steps=1", f"hydra.run.dir={run_dir}", *overrides)
    return user_error(proc, *facts, absent=run_dir)


def eval_fails(tmp_path: Path, ckpt: str, facts=()) -> str:
    out_dir = tmp_path / "out"
    proc = cli("evaluate.py", f"ckpt={ckpt}", *EVAL, f"out_dir={out_dir}")
    return user_error(proc, *facts, absent=out_dir)


def write_jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(l + "\n" for l in lines))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """One real tiny-llama LoRA run shared by the checkpoint tests."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    proc = cli("train.py", *TRAIN, "trainer.max_steps=2", "data.max_examples=8", f"hydra.run.dir={run_dir}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "checkpoints" / "final.safetensors").is_file()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    return run_dir


GOOD_CHAT = json.dumps({"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]})
GOOD_ALPACA = json.dumps({"instruction": "Say hi", "input": "", "output": "Hello!"})


# 1
def test_malformed_jsonl_names_file_and_line(tmp_path):
    data = write_jsonl(tmp_path / "bad.jsonl", [GOOD_CHAT, GOOD_CHAT, '{"messages": [', GOOD_CHAT])
    train_fails(tmp_path, f"data.sources=[{data}]", facts=[f"{data}:3", "not valid JSON"])


# 2
def test_alpaca_record_without_output(tmp_path):
    record = json.dumps({"instruction": "Say hi", "input": "", "output": ""})
    data = write_jsonl(tmp_path / "alpaca.jsonl", [GOOD_ALPACA, record])
    train_fails(tmp_path, f"data.sources=[{data}]", facts=[f"{data}:2", "'output'", "assistant"])


def test_chat_record_with_only_a_user_message(tmp_path):
    record = json.dumps({"messages": [{"role": "user", "content": "Anyone there?"}]})
    data = write_jsonl(tmp_path / "chat.jsonl", [GOOD_CHAT, GOOD_CHAT, record])
    train_fails(tmp_path, f"data.sources=[{data}]", facts=[f"{data}:3", "'messages'", "assistant"])


# 3
def test_empty_data_set(tmp_path):
    data = tmp_path / "empty.jsonl"
    data.write_text("")
    train_fails(tmp_path, f"data.sources=[{data}]", facts=["empty data set", str(data)])


# 4
@pytest.mark.parametrize("override, facts", [
    ("mechanism=lorra", ["unknown mechanism 'lorra'", "lora", "lyra", "none"]),
    ("model=tiny-lama", ["unknown model 'tiny-lama'", "tiny-llama", "smollm2-135m-instruct"]),
    ("persona=joyfull_writer", ["unknown persona 'joyfull_writer'", "joyful_writer", "pirate_mentor", "stoic"]),
])
def test_unknown_names_list_the_valid_ones(tmp_path, override, facts):
    train_fails(tmp_path, override, facts=facts)


# 5
def test_persona_too_long_for_max_length(tmp_path):
    persona = tmp_path / "verbose.yaml"
    persona.write_text(OmegaConf.to_yaml({"name": "Verbose", "system_prompt": "You talk a great deal. " * 400}))
    line = train_fails(tmp_path, f"persona={persona}", "data.max_length=128", facts=["tokens", "data.max_length=128"])
    assert any(w.isdigit() and int(w) > 128 for w in line.split()), line


# 6
def test_evaluate_missing_checkpoint(tmp_path):
    missing = tmp_path / "nope" / "final.safetensors"
    eval_fails(tmp_path, str(missing), facts=[f"ckpt={missing}", "not found"])


def test_evaluate_random_bytes_checkpoint(tmp_path):
    ckpt = tmp_path / "x.safetensors"
    ckpt.write_bytes(os.urandom(4096))
    eval_fails(tmp_path, str(ckpt), facts=[str(ckpt), "corrupted"])


def test_evaluate_truncated_checkpoint(tmp_path, trained):
    data = (trained / "checkpoints" / "final.safetensors").read_bytes()
    ckpt = tmp_path / "final.safetensors"
    ckpt.write_bytes(data[: len(data) // 2])
    eval_fails(tmp_path, str(ckpt), facts=[str(ckpt), "corrupted"])


# 7
def test_restore_on_another_base_model(trained):
    from persona_lit.build import restore
    from persona_lit.errors import UserError

    other = OmegaConf.load(REPO / "conf" / "model" / "tiny-llama.yaml")
    other.tiny.seed = 1
    with pytest.raises(UserError, match="another base model"):
        restore(str(trained), model_override=other)


def test_resume_on_another_base_model(tmp_path, trained):
    last = trained / "checkpoints" / "last.ckpt"
    train_fails(tmp_path, f"ckpt_path={last}", "model.tiny.seed=1", "trainer.max_steps=4", "data.max_examples=8",
                facts=["ckpt_path", "another base model"])


# 8
def test_evaluate_out_dir_not_writable(tmp_path, trained):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    for out_dir in (blocker / "sub", Path("/proc/persona_lit_x")):
        proc = cli("evaluate.py", f"ckpt={trained}", *EVAL, f"out_dir={out_dir}")
        user_error(proc, f"out_dir={out_dir}", "cannot write")
    assert blocker.read_text() == "not a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_train_run_dir_not_writable(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    for run_dir in (blocker / "sub", Path("/proc/persona_lit_x")):
        proc = cli("train.py", *TRAIN, "trainer.max_steps=1", f"hydra.run.dir={run_dir}")
        user_error(proc, f"hydra.run.dir={run_dir}", "cannot write")
    assert blocker.read_text() == "not a directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


# 9
def test_resume_from_missing_ckpt_path(tmp_path):
    missing = tmp_path / "gone" / "last.ckpt"
    train_fails(tmp_path, f"ckpt_path={missing}", facts=[f"ckpt_path={missing}", "not found"])


@pytest.mark.parametrize("override,facts", [
    ("probe_batch=0", ["probe_batch=0", ">= 1"]),
    ("capability_exchanges=-1", ["capability_exchanges=-1", ">= 0"]),
])
def test_evaluate_bad_batch_and_capability_settings(tmp_path, override, facts):
    out_dir = tmp_path / "out"
    proc = cli("evaluate.py", "model=tiny-llama", *EVAL, override, f"out_dir={out_dir}")
    user_error(proc, *facts, absent=out_dir)


def test_evaluate_capability_without_reference_answers(tmp_path):
    questions = write_jsonl(tmp_path / "question.jsonl", ['{"question_id": 1, "category": "writing", "turns": ["Hi?"]}'])
    out_dir = tmp_path / "out"
    proc = cli("evaluate.py", "model=tiny-llama", *EVAL, f"mt_bench_path={questions}", "question_split.part=all",
               f"out_dir={out_dir}")  # one question: too few for a split
    user_error(proc, "capability_exchanges=3", "reference_answer/gpt-4.jsonl", absent=out_dir)


def test_a_persona_given_twice_is_refused_before_anything_runs(tmp_path):
    """Two personas with one key would keep one result under it: refused with one line, nothing written."""
    out = tmp_path / "eval"
    proc = cli("evaluate.py", "model=tiny-llama", "personas=[stoic,botanist,stoic]", *EVAL, f"out_dir={out}")
    user_error(proc, "personas:", "'stoic'", "given twice", absent=out)
