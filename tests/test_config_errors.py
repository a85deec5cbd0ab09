"""Config mistakes on the command line: one `error: ...` line, exit 2, before Hydra or any model runs
(persona_lit/config/, called by build.preflight). The matrix runs the check in-process; two
subprocess tests run the entry points end to end."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from persona_lit.config.check import addable, check_cli, schema_of
from persona_lit.errors import UserError
from tests.documentation import pages

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"


def fails(config: str, *overrides: str) -> str:
    with pytest.raises(UserError) as e:
        check_cli(list(overrides), config)
    line = f"error: {e.value}"
    assert "\n" not in line, line
    return line


# (entry point, overrides, facts the one line must hold)
MISTAKES = [
    # unknown keys: top level and each group, with the keys that exist there and the closest one
    ("train", ["data.path=x.jsonl"],
     ["unknown key data.path (data: batch_size, chain_turns, filler_turns,", "sources"]),
    ("evaluate", ["turn=3"], ["unknown key turn (top level: accelerator, baseline,", "did you mean turns?"]),
    ("train", ["sed=1"], ["unknown key sed (top level:", "did you mean seed?"]),
    ("train", ["trainer.max_stepz=3"], ["unknown key trainer.max_stepz (trainer:", "did you mean trainer.max_steps?"]),
    ("train", ["model.nmae=x"], ["unknown key model.nmae (model:", "chat_format", "did you mean model.name?"]),
    ("train", ["mechanism.options.rank=4"],
     ["unknown key mechanism.options.rank (mechanism.options: alpha, dropout, init_lora_weights, r, target_modules)"]),
    ("train", ["logger.projet=x"], ["unknown key logger.projet (logger:", "did you mean logger.project?"]),
    ("train", ["module.optimizer.learning_rate=1e-3"],
     ["unknown key module.optimizer.learning_rate (module.optimizer: lr,"]),
    ("train", ["drift.turn=3"], ["did you mean drift.turns?"]),
    ("train", ["checkpoint.every=3"], ["unknown key checkpoint.every (checkpoint: every_n_train_steps)"]),
    ("evaluate", ["judge.uri=http://x"], ["unknown key judge.uri (judge: api_key_env, model, timeout_s, url)",
                                          "did you mean judge.url?"]),
    ("evaluate", ["task.alphas=[0,0.1]"],
     ["unknown key task.alphas (task: name)", "task.alphas is a key of task=steer_sweep"]),
    ("evaluate", ["mechanism.options.layers=[5]"],
     ["unknown key mechanism.options.layers (mechanism.options: no keys)", "is a key of mechanism=", "lyra", "steer"]),
    ("evaluate", ["data.batch_size=4"], ["unknown key data.batch_size (top level:"]),
    ("train", ["model=tiny-llama", "model.quantization=nf4"],
     ["unknown key model.quantization", "+model.quantization="]),
    ("train", ["hydra.run.dirr=x"], ["unknown key hydra.run.dirr (hydra.run: dir)", "did you mean hydra.run.dir?"]),
    # + and ~ only where the schema allows, groups only where the entry point has them
    ("train", ["+data.path=x.jsonl"],
     ["+data.path=x.jsonl: cannot add data.path (data: batch_size,", "+ adds keys only under"]),
    ("evaluate", ["+turns=3"], ["+turns=3: turns already exists; drop the +"]),
    ("evaluate", ["~turns"], ["~turns: turns cannot be deleted"]),
    ("train", ["task=drift"],
     ["task=drift: train.py has no task group (groups: data, experiment, logger, mechanism, model, trainer)"]),
    ("train", ["mechanism=lorra"], ["unknown mechanism 'lorra'; allowed: ", "lora, lyra, none", "did you mean lora?"]),
    ("evaluate", ["judge=3"], ["judge=3: judge is a group of keys (judge: api_key_env, model, timeout_s, url)"]),
    # syntax
    ("evaluate", ["turns=[1,2"], ["cannot parse the override turns=[1,2", "override_grammar"]),
    ("evaluate", ["turns=1,2"], ["turns=1,2: a comma-separated value is a sweep and needs --multirun", "turns=[1,2]"]),
    ("evaluate", ["turns=${nope}"], ["turns=${nope}: cannot resolve"]),
    # wrong type: int, float, bool, str, list keys
    ("evaluate", ["turns=abc"], ["turns=abc: expected an integer >= 1"]),
    ("evaluate", ["turns=2.5"], ["turns=2.5: expected an integer >= 1"]),
    ("train", ["module.optimizer.lr=fast"], ["module.optimizer.lr=fast: expected a number > 0"]),
    ("evaluate", ["do_sample=yes"], ["do_sample=yes: expected true or false"]),
    ("evaluate", ["control=1"], ["control=1: expected true or false"]),
    ("evaluate", ["persona=[stoic,botanist]"], ["persona=[stoic,botanist]: expected null or a string"]),
    ("evaluate", ["personas=true"], ["personas=true: expected null or a string or a list of strings"]),
    ("evaluate", ["probe_turns=4"], ["probe_turns=4: expected a list of integers >= 0"]),
    ("train", ["data.sources=x.jsonl"], ["data.sources=x.jsonl: expected null or a list of strings"]),
    ("evaluate", ["task=steer_sweep", "task.alphas=[0,big]"], ["task.alphas=[0,big]: expected a list of numbers"]),
    ("train", ["seed=null"], ["seed=null: expected an integer"]),
    ("evaluate", ["-m", "turns=2,abc"], ["turns=abc: expected an integer >= 1"]),
    # out of range, choices
    ("evaluate", ["turns=-1"], ["turns=-1: expected an integer >= 1"]),
    ("evaluate", ["conversations=0"], ["conversations=0: expected an integer >= 1"]),
    ("evaluate", ["max_new_tokens=0"], ["max_new_tokens=0: expected an integer >= 1"]),
    ("evaluate", ["devices=0"], ["devices=0: expected an integer >= 1"]),
    ("evaluate", ["temperature=0"], ["temperature=0: expected a number > 0"]),
    ("evaluate", ["probe_turns=[0,-1]"], ["probe_turns=[0,-1]: expected a list of integers >= 0"]),
    ("evaluate", ["turns=4", "probe_turns=[0,2,8]"], ["probe_turns=[0,2,8]: probe turn 8 is beyond turns=4",
                                                    "expected integers in 0..4"]),
    ("train", ["drift.probe_turns=[0,8]"], ["drift.probe_turns=[0,8]: probe turn 8 is beyond drift.turns=4"]),
    ("train", ["module.optimizer.lr=0"], ["module.optimizer.lr=0: expected a number > 0"]),
    ("train", ["module.optimizer.lr=-1e-4"], ["module.optimizer.lr=-1e-4: expected a number > 0"]),
    ("train", ["data.batch_size=0"], ["data.batch_size=0: expected an integer >= 1"]),
    ("train", ["data.val_fraction=1.5"], ["data.val_fraction=1.5: expected a number in [0, 1)"]),
    ("train", ["trainer.max_steps=-2"], ["trainer.max_steps=-2: expected an integer >= -1"]),
    ("train", ["mechanism=lyra", "mechanism.options.layers=[-1]"],
     ["mechanism.options.layers=[-1]: expected null or a list of integers >= 0"]),
    ("evaluate", ["task=persistence", "task.top_p=0"], ["task.top_p=0: expected a number in (0, 1]"]),
    ("evaluate", ["task=steer_sweep", "task.metric=mean"], ["task.metric=mean: expected one of adherence, margin"]),
    ("train", ["model.dtype=float8"], ["model.dtype=float8: expected one of float32, bfloat16, float16"]),
    ("train", ["model=tiny-llama", "+model.quantization=nf5"],
     ["model.quantization=nf5: expected null or one of nf4, int8"]),
]


@pytest.mark.parametrize("config, overrides, facts", MISTAKES, ids=[" ".join(m[1]) for m in MISTAKES])
def test_a_config_mistake_is_one_line(config, overrides, facts):
    line = fails(config, *overrides)
    for fact in facts:
        assert fact in line, f"{fact!r} not in {line!r}"


def test_the_first_message_is_about_the_key_the_user_gave():
    # data.seed interpolates seed and is checked too; the line names what was typed
    assert fails("train", "seed=null") == "error: seed=null: expected an integer"
    assert fails("evaluate", "turns=abc") == "error: turns=abc: expected an integer >= 1"


ACCEPTED = [
    ("evaluate", ["task=steer_sweep", "task.alphas=[0,0.1]"]),
    ("evaluate", ["mechanism=lyra", "mechanism.options.layers=[5]"]),
    ("evaluate", ["mechanism=steer", "mechanism.options.layers=15", "mechanism.options.alpha=-0.5"]),
    ("evaluate", ["ckpt=outputs/train/lora/run", "turns=8", "probe_turns=[0,1,4,8]", "conversations=3"]),
    ("evaluate", ["compare=[outputs/eval/A,outputs/eval/B]"]),
    ("evaluate", ["personas=[stoic,botanist]", "seed=null", "probe_kinds=[name]", "projection_layer=3"]),
    ("evaluate", ["judge.url=http://localhost:8000/v1", "judge.model=grader", "judge.timeout_s=2.5"]),
    ("evaluate", ["task=persistence", "task.seeds=[0,1]", "task.directions=[a.safetensors]", "task.system_prompt="]),
    ("evaluate", ["task=weight_diff", "task.pos=a", "task.neg=b", "out_dir=/tmp/x"]),
    ("evaluate", ["-m", "turns=2,4", "mechanism=none,lora"]),
    ("train", ["model=tiny-llama", "+model.quantization=nf4", "model.tiny.seed=1"]),
    ("train", ["+callbacks.swa._target_=lightning.pytorch.callbacks.StochasticWeightAveraging",
               "+callbacks.swa.swa_lrs=1e-3"]),
    ("train", ["+trainer.limit_val_batches=2", "~trainer.deterministic", "trainer.precision=16",
               "trainer.devices=auto"]),
    ("train", ["module.scheduler=null", "module.optimizer.lr=1e-4", "+module.optimizer.betas=[0.9,0.95]"]),
    ("train", ["ckpt_path=last", "hydra.run.dir=/tmp/run", "+drift.baseline=true", "trainer.val_check_interval=0.5"]),
    ("train", ["trainer=ddp", "data.sources=[a.jsonl,b.jsonl]", "data.max_examples=8", "data.val_fraction=0"]),
]


@pytest.mark.parametrize("config, overrides", ACCEPTED, ids=[" ".join(a[1]) for a in ACCEPTED])
def test_valid_overrides_pass(config, overrides):
    assert check_cli(overrides, config) is not None


def test_help_and_other_configs_are_left_to_hydra():
    assert check_cli(["--help"], "train") is None
    assert check_cli(["--config-name", "other", "turns=abc"], "evaluate") is None


def _groups(config):
    return {"train": ["model", "mechanism", "data", "trainer", "logger"],
            "evaluate": ["model", "mechanism", "logger", "task"]}[config]


def _choices(group):
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


@pytest.mark.parametrize("config", ["train", "evaluate"])
def test_every_config_choice_passes_and_every_key_has_a_type(config):
    """Every choice of every group (zipped: a few compositions cover them all) validates as it is, and every
    key has a type: a null or [] default needs its entry in config/schema.py RULES."""
    groups = {g: _choices(g) for g in _groups(config)}
    for i in range(max(len(c) for c in groups.values())):
        overrides = [f"{g}={c[i % len(c)]}" for g, c in groups.items()]
        cfg = check_cli(overrides, config)
        untyped = [k for k, spec in schema_of(cfg, config).items() if not spec.kinds]
        assert not untyped, f"{overrides}: no type for {untyped} (add them to config/schema.py RULES)"
    assert "model.quantization" in addable(CONF)


def _commands(text: str) -> list[str]:
    """Shell lines that run train.py or evaluate.py, backslash continuations joined."""
    joined = re.sub(r"\\\n\s*(#\s*)?", " ", text)
    return [l for l in joined.splitlines() if re.search(r"(python\S*|\$PY)\s+(\S*/)?(train|evaluate)\.py\b", l)]


def _documented() -> list[tuple[str, list[str]]]:
    texts = [b for page in pages().values() for b in re.findall(r"```(?:bash|sh)?\n(.*?)```", page, re.S)]
    for path in sorted((CONF / "task").glob("*.yaml")):  # `#   python evaluate.py ...` comment lines
        texts.append("\n".join(l.lstrip("#").strip() for l in path.read_text().splitlines() if l.startswith("#")))
    demo = (REPO / "scripts" / "demo.sh").read_text()
    extra = re.findall(r"EXTRA=\((.*?)\)", demo, re.S)[-1]
    demo = re.sub(r"\$\{(\w+):-([^}]*)\}", r"\2", demo).replace('"${EXTRA[@]}"', extra).replace('"$@"', "")
    texts.append(demo.replace("$RUN", "outputs/demo/run").replace("$MECHANISM", "lyra"))
    out = []
    for command in (c for t in texts for c in _commands(t)):
        args = shlex.split(re.sub(r"<[^>]*>", "PLACEHOLDER", command), comments=True)  # <run>, <adapter dir>
        at = next(i for i, a in enumerate(args) if a.endswith(("train.py", "evaluate.py")))
        out.append((Path(args[at]).stem, [a for a in args[at + 1:] if a != "..."]))
    return out


def test_documented_overrides_pass():
    """The commands in the code blocks of README.md and docs/*.md, conf/task/*.yaml comments and scripts/demo.sh."""
    documented = _documented()
    assert len(documented) >= 15, documented
    for config, args in documented:
        try:
            check_cli(args, config)
        except UserError as e:
            pytest.fail(f"{config}.py {' '.join(args)}: error: {e}")


@pytest.fixture(scope="module")
def end_to_end(tmp_path_factory):
    """Both entry points at once (in parallel: each imports torch), each in an empty working directory."""
    env = {**os.environ, "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    runs = {}
    for script, arg in (("train.py", "data.path=x.jsonl"), ("evaluate.py", "turns=abc")):
        cwd = tmp_path_factory.mktemp(script.removesuffix(".py"))
        proc = subprocess.Popen([sys.executable, str(REPO / script), arg], cwd=cwd, env=env, text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        runs[script] = (proc, cwd)
    out = {}
    for script, (proc, cwd) in runs.items():
        stdout, stderr = proc.communicate(timeout=240)
        out[script] = (proc.returncode, stdout, stderr, cwd)
    return out


@pytest.mark.parametrize("script, facts", [
    ("train.py", ["error: unknown key data.path (data: batch_size, chain_turns,"]),
    ("evaluate.py", ["error: turns=abc: expected an integer >= 1"]),
])
def test_entry_point_prints_one_line_and_exits_2(end_to_end, script, facts):
    rc, stdout, stderr, cwd = end_to_end[script]
    lines = [l for l in stderr.splitlines() if l.strip()]
    assert rc == 2, stderr[-3000:]
    assert "Traceback" not in stderr and len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
    for fact in facts:
        assert fact in lines[0]
    assert not list(cwd.iterdir()), f"left behind: {list(cwd.iterdir())}"  # no outputs/ (nor wandb/)
