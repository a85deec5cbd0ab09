"""Faults a real run meets, each survived (issue 13): killed while writing a checkpoint or the export, no space
left while saving, a NaN loss, W&B unreachable with an API key set, an evaluation killed half-way. Each test
provokes the fault for real (SIGKILL, RLIMIT_FSIZE, a diverging learning rate, a closed port) in a subprocess.
Killed mid-epoch and resumed with ckpt_path=last: tests/test_training.py."""

import json
import os
import re
import resource
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import torch

from tests.conftest import REPO

TRAIN = ["train.py", "model=tiny-llama", "mechanism=lora", "mechanism.options.dropout=0.0", "persona=joyful_writer",
         "data.batch_size=8", "trainer.enable_progress_bar=false"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONWARNINGS": "ignore"}


def run(*args: str, env: dict | None = None, timeout: int = 120, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env or ENV, capture_output=True, text=True,
                          timeout=timeout, **kw)


def error_line(r: subprocess.CompletedProcess) -> str:
    """The run's one `error:` line (exit 2, no traceback)."""
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and r.stderr.rstrip().endswith(errors[0]), r.stderr[-3000:]
    return errors[0]


class GrowCheckpoint(L.Callback):
    """Test-only: from `step` on, checkpoints carry `megabytes` more, so that under a file size limit the first
    checkpoint fits and a later one does not (the disk filling up between two saves)."""

    def __init__(self, step: int, megabytes: int):
        self.step, self.megabytes = step, megabytes

    def on_save_checkpoint(self, trainer, pl_module, checkpoint):
        if trainer.global_step >= self.step:
            checkpoint["padding"] = torch.zeros(self.megabytes << 18)


# --- killed while writing a checkpoint or the export ---------------------------------------------------------------

def write_checkpoint(kind: str, path: str, value: str, megabytes: str, ready=lambda: None) -> None:
    """A checkpoint of `megabytes` 1 MB tensors, every entry `value`, written the way train.py writes it."""
    from persona_lit.training.checkpoint import AtomicCheckpointIO, save_checkpoint

    tensors = {f"w{i}": torch.full((1 << 18,), float(value)) for i in range(int(megabytes))}
    ready()
    if kind == "ckpt":  # ModelCheckpoint's last.ckpt goes through this (train.py installs it)
        AtomicCheckpointIO().save_checkpoint({"state_dict": tensors, "global_step": int(value)}, path)
    else:  # final.safetensors
        save_checkpoint(path, tensors, {"step": int(value)}, "fingerprint")


def _start_writer(kind: str, path: Path, value: int, megabytes: int) -> subprocess.Popen:
    # Lightning's own writer stages in the system temp dir and copies into place across filesystems: put that
    # dir on another filesystem (tmpfs), as a local /tmp is for a run on shared storage.
    other_fs = Path("/dev/shm") if Path("/dev/shm").is_dir() else path.parent
    env = {**ENV, "TMPDIR": str(other_fs)}
    code = ("import sys; from tests.test_faults import write_checkpoint\n"
            "write_checkpoint(*sys.argv[1:], ready=lambda: (print('ready', flush=True), sys.stdin.readline()))")
    return subprocess.Popen([sys.executable, "-c", code, kind, str(path), str(value), str(megabytes)], cwd=REPO,
                            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _kill_mid_write(procs: dict[str, subprocess.Popen], dirs: dict[str, Path], full: dict[str, int]) -> dict:
    """SIGKILLs each writer as soon as a file in its directory is partly written (0 < size < full size)."""
    for proc in procs.values():  # both ready (imports done, tensors made), then both write at once
        assert proc.stdout.readline().strip() == "ready", proc.stderr.read()[-3000:]
    for proc in procs.values():
        proc.stdin.write("go\n")
        proc.stdin.flush()
    caught, deadline = {}, time.monotonic() + 60
    while len(caught) < len(procs) and time.monotonic() < deadline:
        for kind, proc in procs.items():
            if kind in caught or proc.poll() is not None:
                continue
            for entry in os.scandir(dirs[kind]):
                try:
                    size = entry.stat().st_size
                except FileNotFoundError:
                    continue
                if 0 < size < full[kind]:
                    proc.kill()
                    caught[kind] = (entry.name, size)
                    break
        if all(p.poll() is not None for k, p in procs.items() if k not in caught):
            break
        time.sleep(0.0005)
    for proc in procs.values():
        proc.wait(timeout=30)
    return caught


def test_killed_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path):
    from persona_lit.training.checkpoint import read_checkpoint

    megabytes = 96
    paths = {"ckpt": tmp_path / "ckpt" / "last.ckpt", "final": tmp_path / "final" / "final.safetensors"}
    for kind, path in paths.items():  # the previous checkpoints (value 1), written completely, in-process
        write_checkpoint(kind, str(path), "1", str(megabytes))
    full = {kind: path.stat().st_size for kind, path in paths.items()}
    procs = {kind: _start_writer(kind, path, 2, megabytes) for kind, path in paths.items()}
    caught = _kill_mid_write(procs, {k: p.parent for k, p in paths.items()}, full)
    assert caught.keys() == paths.keys(), f"a writer finished before it could be killed: {caught}"
    assert all(p.returncode == -signal.SIGKILL for p in procs.values())
    # the previous files are whole and load; nothing partial under the final names; only hidden temporaries
    old = torch.load(paths["ckpt"], weights_only=True)
    assert old["global_step"] == 1 and all(bool((t == 1).all()) for t in old["state_dict"].values())
    tensors, header = read_checkpoint(paths["final"])
    assert header["config"] == {"step": 1} and len(tensors) == megabytes
    assert all(bool((t == 1).all()) for t in tensors.values())
    for kind, path in paths.items():
        assert path.stat().st_size == full[kind]
        others = [n for n in os.listdir(path.parent) if n != path.name]
        assert all(n.startswith(f".{path.name}.") and n.endswith(".tmp") for n in others), others
        assert caught[kind][0] != path.name  # the partial bytes were in a temporary file


# --- no space left while saving ---------------------------------------------------------------------------------

def test_no_space_left_while_saving_is_one_error_and_keeps_the_older_checkpoint(tmp_path):
    limit = 2 << 20  # bytes per file: last.ckpt at step 1 (~0.9 MB) fits, the one at step 2 (+3 MB) does not

    def file_size_limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    r = run(*TRAIN, "logger=none", "trainer.max_steps=4", "checkpoint.every_n_train_steps=1",
            "+callbacks.grow._target_=tests.test_faults.GrowCheckpoint", "+callbacks.grow.step=2",
            "+callbacks.grow.megabytes=3", f"hydra.run.dir={tmp_path}", preexec_fn=file_size_limit)
    last = tmp_path / "checkpoints" / "last.ckpt"
    line = error_line(r)
    assert line.startswith(f"error: cannot write {last}: File too large") and "previous file is kept" in line, line
    ckpt = torch.load(last, weights_only=True)  # the older checkpoint, whole
    assert ckpt["global_step"] == 1 and "padding" not in ckpt
    assert os.listdir(last.parent) == ["last.ckpt"]  # no temporary left, no final.safetensors


# --- a NaN or infinite loss -------------------------------------------------------------------------------------

NAN_LINE = re.compile(r"error: the training loss is (nan|inf|-inf) at step (\d+) \(mechanism lora; batch rows: "
                      r"(\S+joyful_writer\.jsonl) lines ([\d, ]+)\); training stopped before updating from it, "
                      r"the last checkpoint, (\S+) \(step (\d+)\), is kept \(lower module\.optimizer\.lr, or check "
                      r"those rows\)")


def test_nan_loss_stops_naming_step_rows_and_mechanism_and_keeps_the_checkpoint(tmp_path):
    # a learning rate that diverges: finite but huge weights after the warm-up's first real step, then a NaN loss
    r = run(*TRAIN, "logger=none", "trainer.max_steps=8", "checkpoint.every_n_train_steps=1",
            "module.optimizer.lr=1e30", f"hydra.run.dir={tmp_path}")
    line = error_line(r)
    m = NAN_LINE.fullmatch(line)
    assert m, line
    step, source, rows, kept, kept_step = int(m[2]), Path(m[3]), [int(x) for x in m[4].split(", ")], m[5], int(m[6])
    assert source.is_file() and len(rows) == 8  # data.batch_size source lines, each a record of that file
    lines = source.read_text(encoding="utf-8").splitlines()
    assert all(json.loads(lines[n - 1]) for n in rows)
    last = tmp_path / "checkpoints" / "last.ckpt"
    assert kept == str(last) and kept_step == step
    ckpt = torch.load(last, weights_only=True)  # not overwritten by a NaN one
    assert ckpt["global_step"] == step and ckpt["state_dict"]
    assert all(bool(torch.isfinite(t).all()) for t in ckpt["state_dict"].values())
    assert os.listdir(last.parent) == ["last.ckpt"]  # no final.safetensors, no peft_adapter from NaN weights


def test_training_batches_name_their_source_lines(tmp_path):
    """batch["index"] -> describe_rows -> the file lines the examples came from (blank lines counted)."""
    from persona_lit.data import PersonaDialogueDataModule

    class Chat:  # an example's ids are [0, its record number]: enough to trace it back
        pad_id = 0

        def encode(self, messages):
            return [0], [False]

        def encode_segments(self, messages):
            answer = int(next(m["content"] for m in messages if m["role"] == "assistant"))
            return [0, answer], [False, True], [0, 1]

    path = tmp_path / "d.jsonl"
    records = [json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": str(k)}]})
               for k in range(1, 24)]
    path.write_text("\n".join(r + ("\n" if k % 5 == 0 else "") for k, r in enumerate(records)) + "\n")
    persona = SimpleNamespace(name="p", system_prompt="s", exchanges_path=None)
    dm = PersonaDialogueDataModule(Chat(), persona, sources=[str(path)], batch_size=4, max_length=64)
    dm.setup("fit")
    lines = path.read_text().splitlines()
    seen = 0
    for batch in dm.train_dataloader():
        for index, ids in zip(batch["index"].tolist(), batch["input_ids"].tolist()):
            where = dm.describe_rows([index])
            assert where.startswith(f"{path} line ")
            n = int(where.rsplit(" ", 1)[1])
            assert json.loads(lines[n - 1])["messages"][1]["content"] == str(ids[1])
            seen += 1
    assert seen == len(dm.train_examples) > 0


# --- W&B unreachable with an API key set --------------------------------------------------------------------------

def test_wandb_unreachable_trains_on_offline_with_one_warning(tmp_path):
    key = "0123456789abcdef" * 2 + "fedcba98"  # 40 characters, like a W&B key
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in ENV.items() if not k.startswith("WANDB_")}
    env.update(WANDB_API_KEY=key, WANDB_BASE_URL=f"http://127.0.0.1:{port}", WANDB_CONFIG_DIR=str(tmp_path / "cfg"),
               WANDB_CACHE_DIR=str(tmp_path / "cache"), WANDB_DATA_DIR=str(tmp_path / "data"))
    started = time.monotonic()
    r = run(*TRAIN, "logger=wandb", "trainer.max_steps=2", f"hydra.run.dir={tmp_path / 'run'}", env=env, timeout=40)
    assert r.returncode == 0, r.stderr[-3000:]
    assert time.monotonic() - started < 40
    out = r.stdout + r.stderr
    warnings = [line for line in out.splitlines() if "W&B unreachable" in line]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"persona_lit: warning: W&B unreachable at http://127.0.0.1:{port} (")
    assert "logging offline" in warnings[0]
    assert list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))  # the logs, local
    assert (tmp_path / "run" / "checkpoints" / "final.safetensors").is_file()
    assert key not in out
    for path in tmp_path.rglob("*"):  # nor written anywhere
        assert not path.is_file() or key.encode() not in path.read_bytes(), path


# --- an evaluation killed half-way --------------------------------------------------------------------------------

def test_evaluation_killed_half_way_leaves_no_results(tmp_path):
    out = tmp_path / "eval"
    args = ["evaluate.py", "model=tiny-llama", "mechanism=none", "persona=pirate_mentor", "turns=8", "conversations=2",
            "probe_turns=[0,8]", "max_new_tokens=8", "probe_max_new_tokens=8", "capability_exchanges=0", "logger=none",
            f"out_dir={out}"]
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    seen, deadline = b"", time.monotonic() + 90
    try:
        while b"control arm" not in seen and time.monotonic() < deadline and proc.poll() is None:
            if select.select([proc.stderr], [], [], 1)[0]:
                seen += os.read(proc.stderr.fileno(), 65536)  # tqdm redraws with \r: read bytes, not lines
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert b"control arm" in seen and proc.returncode == -signal.SIGKILL, seen[-3000:]
    assert not out.exists()
    assert not list(tmp_path.rglob("results.json")) and not os.listdir(tmp_path)  # no temp dir that looks like one


def test_evaluation_killed_while_writing_its_results_leaves_them_marked_unfinished(tmp_path):
    """The issue's contract: no results directory, or a complete one marked unfinished; never a results.json
    that looks complete. Killed inside staged_dir after results.json, as write_report would be."""
    code = ("import os, sys; from pathlib import Path; from persona_lit.outputs import staged_dir\n"
            "with staged_dir(Path(sys.argv[1])) as tmp:\n"
            "    (Path(tmp) / 'results.json').write_text('{}')\n"
            "    os.kill(os.getpid(), 9)\n")
    r = run("-c", code, str(tmp_path / "eval"), timeout=60)
    if r.returncode != -signal.SIGKILL or (tmp_path / "eval").exists():  # not the expected failure: a real error
        raise RuntimeError(f"the writer was not killed inside staged_dir: {r.returncode} {r.stderr[-3000:]}")
    for results in tmp_path.rglob("results.json"):
        assert (results.parent / "UNFINISHED").is_file(), f"{results} looks complete"
