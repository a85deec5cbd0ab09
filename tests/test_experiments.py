"""conf/experiment/ bundles: each composes with its entry point to exactly the config of the documented command it
reproduces (README.md or a page of docs/: tests/documentation.py), passes the config check, is refused in one line by
the other entry point, and every documented table that has a command has its bundles and an
`or: python ... experiment=...` line beside it, on the same page. Composition only: nothing loads a model."""

import re
import shlex
import shutil
from functools import lru_cache
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from persona_lit.config.check import check_cli
from persona_lit.config.overrides import bundle_entries
from persona_lit.errors import UserError
from tests.documentation import hand_kept, pages, text

REPO = Path(__file__).resolve().parent.parent
CONF = REPO / "conf"
PAGES = pages()  # README.md and docs/*.md
DOCS = text()
FLAT = re.sub(r"\s+", " ", DOCS)  # prose commands wrap across lines
BUNDLES = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


def entry(name: str) -> str:
    entries = bundle_entries(CONF, "experiment", name)
    assert entries is not None and len(entries) == 1, f"{name}: needs one `# entry: train|evaluate` header line"
    return entries[0]


# --- the documented commands, as overrides --------------------------------------------------------------------------

def code_command(marker: str) -> list[str]:
    """The overrides of the one documented code-block command (continuations joined) that contains `marker`."""
    blocks = re.findall(r"```(?:bash|sh)?\n(.*?)```", DOCS, re.S)
    lines = [l for b in blocks for l in re.sub(r"\s*\\\n\s*", " ", b).splitlines()
             if re.search(r"(train|evaluate)\.py", l) and marker in l]
    assert len(lines) == 1, f"README.md + docs/: {len(lines)} code commands contain {marker!r}"
    args = shlex.split(lines[0], comments=True)
    return args[next(i for i, a in enumerate(args) if a.endswith(".py")) + 1:]


def prose(*fragments: str) -> None:
    """A prose command's pieces are still in the documentation as written (whitespace-normalised)."""
    for fragment in fragments:
        assert fragment in FLAT, f"README.md + docs/ no longer say {fragment!r}: update the bundle and this test"


def span_command(start: str) -> list[str]:
    """The overrides of a backticked `python <script>.py ...` span of the documentation that starts with `start`."""
    spans = [s for s in re.findall(r"`(python \w+\.py [^`]*)`", FLAT) if s.startswith(start)]
    assert len(spans) == 1, f"README.md + docs/: {len(spans)} spans start with {start!r}"
    return shlex.split(spans[0])[2:]


def demo_commands() -> dict[str, list[str]]:
    """scripts/demo.sh with its defaults (MECHANISM=lyra, STEPS=20, TURNS=8, CONVERSATIONS=3), $RUN fixed."""
    text = (REPO / "scripts" / "demo.sh").read_text()
    extra = " ".join(re.findall(r"EXTRA=\((.*?)\)", text, re.S)[-1].split())
    text = re.sub(r"\$\{(\w+):-([^}]*)\}", r"\2", text).replace('"${EXTRA[@]}"', extra).replace('"$@"', "")
    text = re.sub(r"\\\n\s*", " ", text.replace("$RUN", "outputs/demo/lyra_smollm2").replace('"$MECHANISM"', "lyra"))
    out = {}
    for line in text.splitlines():
        m = re.match(r"\s*\$PY (train|evaluate)\.py (.*)", line)
        if m:
            out[m[1]] = shlex.split(m[2])
    return out


def drift_table(*extra: str) -> list[str]:
    """The 40-turn one-persona protocol (docs/experiments.md): its command span, the persona it names, and the row's
    own overrides."""
    prose("with `mechanism=none|lyra` (or `ckpt=` a training run; `control=false` and `baseline=false` except for "
          "`none`; the window row adds `mechanism.options.history_window=256`)",
          "persona `pirate_mentor` (Captain Marlowe Quill)")
    return span_command("python evaluate.py turns=40") + ["persona=pirate_mentor", *extra]


def trained_run(mechanism: str, *extra: str) -> list[str]:
    """The drift table's trained runs: "30 steps, `data.chain_turns=2 data.filler_turns=1 data.max_length=768
    data.batch_size=2`; Lyra with `train_layers=true module.distill_weight=1.0` at lr 5e-5", triplet at lr 2e-3."""
    prose("Trained runs: 30 steps, `data.chain_turns=2 data.filler_turns=1 data.max_length=768 data.batch_size=2`",
          "`triplet` trained (lr 2e-3)")
    return [f"mechanism={mechanism}", "trainer.max_steps=30", "data.chain_turns=2", "data.filler_turns=1",
            "data.max_length=768", "data.batch_size=2", "persona=pirate_mentor", *extra]


def steer_history(history: str, baseline: str) -> list[str]:
    prose("role-pirate direction, α 0.3 at block 15, persona prompt kept, 2 conversations, `turns=20 "
          "\"probe_turns=[0,1,10,20]\" \"probe_kinds=[name]\" capability_exchanges=2 capability_tokens=32 "
          "control=false`, `baseline=true` for the first")
    shown = code_command("mechanism.options.history=clean")  # the documented steer command (history=clean)
    return [a for a in shown if not a.startswith("mechanism.options.history=")] + [
        f"mechanism.options.history={history}", "conversations=2", "probe_turns=[0,1,10,20]", "probe_kinds=[name]",
        "capability_exchanges=2", "capability_tokens=32", "control=false", f"baseline={baseline}"]


DIRECTIONS = "outputs/directions/smollm2"
LYRA_RUN = "outputs/train/lyra/lyra_trained_smollm2"
TRIPLET_RUN = "outputs/train/triplet/triplet_trained_smollm2"
POOL_RUN = "outputs/train/lyra/lyra_pool_smollm2"
LONGPOOL_RUN = "outputs/train/lyra/lyra_longpool_smollm2"
LONGPOOL10_RUN = "outputs/train/lyra/lyra10_longpool_smollm2"
LORA10_RUN = "outputs/train/lyra/lyra10_lora_pool_smollm2"
LOWLR10_RUN = "outputs/train/lyra/lyra10_lowlr_pool_smollm2"
LORAHI10_RUN = "outputs/train/lyra/lyra10_lorahi_pool_smollm2"


def out(name: str) -> str:
    return f"out_dir=outputs/eval/{name}"


# bundle -> the documented command it reproduces (as overrides), plus the fixed paths that replace the documented
# <run> placeholders and timestamped defaults (the chain: a later bundle reads an earlier bundle's output).
EXPECTED = {
    "demo_lyra_smollm2": lambda: demo_commands()["train"],
    "demo_lyra_smollm2_eval": lambda: demo_commands()["evaluate"],
    "none_smollm2": lambda: drift_table("mechanism=none", out("none_smollm2")),
    "lyra_frozen_smollm2": lambda: drift_table("mechanism=lyra", "control=false", "baseline=false",
                                               out("lyra_frozen_smollm2")),
    "lyra_window_smollm2": lambda: drift_table("mechanism=lyra", "mechanism.options.history_window=256",
                                               "control=false", "baseline=false", out("lyra_window_smollm2")),
    "lyra_trained_smollm2": lambda: trained_run(
        "lyra", "mechanism.options.train_layers=true", "module.distill_weight=1.0", "module.optimizer.lr=5e-5",
        f"hydra.run.dir={LYRA_RUN}"),
    "lyra_trained_smollm2_eval": lambda: [a for a in drift_table(f"ckpt={LYRA_RUN}", "control=false",
                                                                 "baseline=false", out("lyra_trained_smollm2"))
                                          if a != "persona=pirate_mentor"],  # the checkpoint carries its persona
    "triplet_trained_smollm2": lambda: trained_run("triplet", "module.optimizer.lr=2e-3",
                                                   f"hydra.run.dir={TRIPLET_RUN}"),
    "triplet_trained_smollm2_eval": lambda: [a for a in drift_table(f"ckpt={TRIPLET_RUN}", "control=false",
                                                                    "baseline=false", out("triplet_trained_smollm2"))
                                             if a != "persona=pirate_mentor"],
    "directions_smollm2": lambda: code_command("task=direction model=smollm2-135m-instruct"),
    "steer_sweep_pirate_smollm2": lambda: code_command("task=steer_sweep mechanism=steer")
    + [out("steer_sweep_pirate_smollm2")],
    "steer_history_steered_smollm2": lambda: steer_history("steered", "true") + [out("steer_history_steered_smollm2")],
    "steer_history_clean_smollm2": lambda: steer_history("clean", "false") + [out("steer_history_clean_smollm2")],
    "persistence_smollm2": lambda: code_command("task=persistence model=smollm2-135m-instruct"),
    # docs/experiments.md "Training on the persona pool": its commands and measured tables
    "pool_none_smollm2": lambda: code_command("evaluate.py personas=test_split pool.max_personas=4") + [out("pool_none_smollm2")],
    "pool_repeat_smollm2": lambda: code_command('turns=12 "probe_turns=[0,1,4,8,12]" conversations=2 '
                                                "control=false") + [out("pool_repeat_smollm2")],
    "pool_repeat_smollm2_long": lambda: code_command("mechanism=repeat mechanism.options.every=4 personas=test_split "
                                                     "pool.max_personas=4 turns=48") + [out("pool_repeat_smollm2_long")],
    # the other two training-free baselines on the same personas: to turn 48, and their bleed arms
    **{f"pool_{m}_smollm2_long": (lambda m=m: code_command(f"mechanism={m} personas=test_split pool.max_personas=4")
                                  + [out(f"pool_{m}_smollm2_long")]) for m in ("instaboost", "split_softmax")},
    **{f"pool_{m}_smollm2_bleed": (lambda m=m: code_command(f"mechanism={m} bleed=true turns=12")
                                   + [out(f"pool_{m}_smollm2_bleed")]) for m in ("instaboost", "split_softmax")},
    "lyra_pool_smollm2": lambda: code_command("mechanism.options.train_layers=true data=persona_pool data.max_personas=32")
    + [f"hydra.run.dir={POOL_RUN}"],
    "lyra_longpool_smollm2": lambda: code_command("train_layers=true data=persona_pool data.max_personas=64")
    + [f"hydra.run.dir={LONGPOOL_RUN}"],
    "lyra_longpool_smollm2_long": lambda: [a.replace("outputs/train/lyra/<run>", LONGPOOL_RUN)
                                           for a in code_command("ckpt=outputs/train/lyra/<run> turns=48")]
    + [out("lyra_longpool_smollm2_long")],
    **{f"{m}_pool_smollm2": (lambda m=m: code_command(f"mechanism={m} data=persona_pool")
                             + [f"hydra.run.dir=outputs/train/{m}/{m}_pool_smollm2"]) for m in ("triplet", "lora")},
    **{f"{m}_pool_smollm2_eval": (lambda m=m: [a.replace(f"outputs/train/{m}/<run>", f"outputs/train/{m}/{m}_pool_smollm2")
                                               for a in code_command(f"ckpt=outputs/train/{m}/<run> personas=test_split")]
                                  + [out(f"{m}_pool_smollm2")]) for m in ("triplet", "lora")},
    "lyra_pool_smollm2_eval": lambda: [a.replace("outputs/train/lyra/<run>", POOL_RUN)
                                       for a in code_command("ckpt=outputs/train/lyra/<run> personas=test_split "
                                                             "pool.max_personas=4 turns=12")]
    + [out("lyra_pool_smollm2")],
    "lyra_pool_smollm2_long": lambda: [a.replace("outputs/train/lyra/<run>", POOL_RUN)
                                       for a in code_command("ckpt=outputs/train/lyra/<run> personas=test_split "
                                                             "pool.max_personas=4 turns=48")]
    + [out("lyra_pool_smollm2_long")],
    "lyra_pool_smollm2_bleed": lambda: [a.replace("outputs/train/lyra/<run>", POOL_RUN)
                                        for a in code_command("personas=test_split pool.max_personas=2")]
    + [out("lyra_pool_smollm2_bleed")],
    "lyra_longpool_smollm2_bleed": lambda: [a.replace("outputs/train/lyra/<run>", LONGPOOL_RUN)
                                            for a in code_command("ckpt=outputs/train/lyra/<run> turns=12")]
    + [out("lyra_longpool_smollm2_bleed")],
    # the same with 10 chosen layers: its own train command, the evaluation commands above on its run
    "lyra10_longpool_smollm2": lambda: code_command('train_layers=true "mechanism.options.layers=')
    + [f"hydra.run.dir={LONGPOOL10_RUN}"],
    "lyra10_longpool_smollm2_long": lambda: [a.replace("outputs/train/lyra/<run>", LONGPOOL10_RUN)
                                             for a in code_command("ckpt=outputs/train/lyra/<run> turns=48")]
    + [out("lyra10_longpool_smollm2_long")],
    "lyra10_frozen_pool_smollm2_long": lambda: code_command('evaluate.py mechanism=lyra "mechanism.options.layers=')
    + [out("lyra10_frozen_pool_smollm2_long")],
    "lyra10_longpool_smollm2_bleed": lambda: [a.replace("outputs/train/lyra/<run>", LONGPOOL10_RUN)
                                              for a in code_command("ckpt=outputs/train/lyra/<run> turns=12")]
    + [out("lyra10_longpool_smollm2_bleed")],
    # the same 10 layers with a LoRA on them: its own train command, the evaluation commands above on its run
    "lyra10_lora_pool_smollm2": lambda: code_command('lora_r=16 "mechanism.options.layers=')
    + [f"hydra.run.dir={LORA10_RUN}"],
    "lyra10_lora_pool_smollm2_long": lambda: [a.replace("outputs/train/lyra/<run>", LORA10_RUN)
                                              for a in code_command("ckpt=outputs/train/lyra/<run> turns=48")]
    + [out("lyra10_lora_pool_smollm2_long")],
    "lyra10_lora_pool_smollm2_bleed": lambda: [a.replace("outputs/train/lyra/<run>", LORA10_RUN)
                                               for a in code_command("ckpt=outputs/train/lyra/<run> turns=12")]
    + [out("lyra10_lora_pool_smollm2_bleed")],
    "lyra10_lowlr_pool_smollm2_bleed": lambda: [a.replace("outputs/train/lyra/<run>", LOWLR10_RUN)
                                                for a in code_command("ckpt=outputs/train/lyra/<run> turns=12")]
    + [out("lyra10_lowlr_pool_smollm2_bleed")],
    "lyra10_lorahi_pool_smollm2_bleed": lambda: [a.replace("outputs/train/lyra/<run>", LORAHI10_RUN)
                                                 for a in code_command("ckpt=outputs/train/lyra/<run> turns=12")]
    + [out("lyra10_lorahi_pool_smollm2_bleed")],
    "lyra10_lowlr_pool_smollm2_6k": lambda: [a.replace("outputs/train/lyra/<run>", LOWLR10_RUN)
                                             for a in code_command("ckpt=outputs/train/lyra/<run> turns=56")]
    + [out("lyra10_lowlr_pool_smollm2_6k")],
    "lyra10_lorahi_pool_smollm2": lambda: code_command("lora_r=16 module.optimizer.lr=1e-3")
    + [f"hydra.run.dir={LORAHI10_RUN}"],
    "lyra10_lorahi_pool_smollm2_long": lambda: [a.replace("outputs/train/lyra/<run>", LORAHI10_RUN)
                                                for a in code_command("ckpt=outputs/train/lyra/<run> turns=48")]
    + [out("lyra10_lorahi_pool_smollm2_long")],
    "lyra10_lowlr_pool_smollm2": lambda: code_command("train_layers=true module.optimizer.lr=5e-5")
    + [f"hydra.run.dir={LOWLR10_RUN}"],
    "lyra10_lowlr_pool_smollm2_long": lambda: [a.replace("outputs/train/lyra/<run>", LOWLR10_RUN)
                                               for a in code_command("ckpt=outputs/train/lyra/<run> turns=48")]
    + [out("lyra10_lowlr_pool_smollm2_long")],
    # the training-free baselines through the drift table's protocol (no measured row yet)
    **{f"{m}_smollm2": (lambda m=m: drift_table(f"mechanism={m}", "control=false", "baseline=false",
                                                out(f"{m}_smollm2")))
       for m in ("repeat", "instaboost", "split_softmax")},
}

# Every hand-kept table of README.md and docs/: the line that starts it -> the bundles that reproduce it ([] = no
# command: not measured).
TABLES = {
    "| mechanism | what it does | trains |": [],
    "| turn (history tokens) | 0 (76) | 1 (305) | 4 (596) | 8 (1144) |":
        ["demo_lyra_smollm2", "demo_lyra_smollm2_eval"],
    "| turn | 0 | 1 | 10 | 20 | 40 |": ["none_smollm2", "lyra_frozen_smollm2", "lyra_window_smollm2",
                                       "lyra_trained_smollm2", "lyra_trained_smollm2_eval",
                                       "triplet_trained_smollm2", "triplet_trained_smollm2_eval"],
    "| at turn 4 (2 conversations) |": ["directions_smollm2", "steer_sweep_pirate_smollm2"],
    "| turn | 0 | 1 | 10 | 20 |\n": ["directions_smollm2", "steer_history_steered_smollm2",
                                    "steer_history_clean_smollm2"],
    "| persona | mean centred projection after release": ["directions_smollm2", "persistence_smollm2"],
    "| arm | name recall, turn 4 | likelihood margin |": [],  # weight vs activation steering: its commands only
    "| checkpoint | coefficient on ΔW |": [],  # weight projection: its commands only
    "| mechanism | forward | train step |": [],  # bench/overhead.py: a benchmark, not a config
    "| turn (history tokens) | 1 (334) | 4 (626) | 8 (1,172) | 12 (1,630) |":
        ["lyra_pool_smollm2", "lyra_pool_smollm2_eval", "pool_repeat_smollm2", "lyra_pool_smollm2_bleed",
         "triplet_pool_smollm2", "triplet_pool_smollm2_eval", "lora_pool_smollm2", "lora_pool_smollm2_eval"],
    "| turn (history tokens) | 0 (38) | 1 (334) | 16 (2,017) | 32 (3,836) | 48 (5,342) |":
        ["lyra_pool_smollm2", "lyra_pool_smollm2_long", "pool_repeat_smollm2_long", "pool_instaboost_smollm2_long",
         "pool_split_softmax_smollm2_long"],
    "| turn (history tokens), Lyra trained on 16-turn conversations |":
        ["lyra_longpool_smollm2", "lyra_longpool_smollm2_long"],
    "| turn (history tokens), Lyra with 10 layers |":
        ["lyra10_longpool_smollm2", "lyra10_longpool_smollm2_long", "lyra10_frozen_pool_smollm2_long"],
    "| turn (history tokens), 10 layers: full weights or a LoRA, two step sizes each |":
        ["lyra10_lora_pool_smollm2", "lyra10_lora_pool_smollm2_long", "lyra10_lowlr_pool_smollm2",
         "lyra10_lowlr_pool_smollm2_long", "lyra10_lorahi_pool_smollm2", "lyra10_lorahi_pool_smollm2_long"],
}
# Measured figures in prose (no table) that have a command.
PROSE = {"Measured with the directions command of": ["directions_smollm2"],
         "- Its bleed arm (no persona, Lyra on": ["lyra_longpool_smollm2", "lyra_longpool_smollm2_bleed"],
         "- The 10-layer Lyra's bleed arm": ["lyra10_longpool_smollm2", "lyra10_longpool_smollm2_bleed"],
         "- The LoRA's bleed arm": ["lyra10_lora_pool_smollm2", "lyra10_lora_pool_smollm2_bleed"],
         "- The lr-1e-3 LoRA's bleed arm": ["lyra10_lorahi_pool_smollm2", "lyra10_lorahi_pool_smollm2_bleed"],
         "- The lr-5e-5 run's bleed arm": ["lyra10_lowlr_pool_smollm2", "lyra10_lowlr_pool_smollm2_bleed"],
         "- The lr-5e-5 run to turn 56": ["lyra10_lowlr_pool_smollm2", "lyra10_lowlr_pool_smollm2_6k"]}
# Bundles for documented commands that have no measured table yet.
UNMEASURED = ["pool_none_smollm2", "repeat_smollm2",
              "instaboost_smollm2", "split_softmax_smollm2", "pool_split_softmax_smollm2_bleed",
              "pool_instaboost_smollm2_bleed"]


# --- composition ------------------------------------------------------------------------------------------------

@lru_cache(maxsize=None)
def checked(name: str):
    """The config check on `<entry>.py experiment=NAME`: what Hydra composes for it, once per bundle."""
    return check_cli([f"experiment={name}"], entry(name))


def user_part(cfg) -> dict:
    return OmegaConf.to_container(OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"]), resolve=False)


def choices(cfg) -> dict:
    """The group choices but experiment and eval (an eval group only sets values: those are compared in full)."""
    return {k: v for k, v in cfg.hydra.runtime.choices.items()
            if k not in ("experiment", "eval") and not k.startswith("hydra/")}


def diff(a, b, prefix=""):
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str)
                for d in diff(a.get(k, "<absent>"), b.get(k, "<absent>"), f"{prefix}{k}.")]
    return [] if a == b and type(a) is type(b) else [f"{prefix[:-1]}: documented {b!r}, bundle {a!r}"]


def test_every_bundle_is_mapped_and_declared():
    assert sorted(EXPECTED) == BUNDLES, "a bundle without its documented command in EXPECTED, or the reverse"
    mapped = {b for bundles in [*TABLES.values(), *PROSE.values()] for b in bundles} | set(UNMEASURED)
    assert mapped == set(BUNDLES)
    for name in BUNDLES:
        lines = (CONF / "experiment" / f"{name}.yaml").read_text().splitlines()
        assert lines[0] == "# @package _global_", name
        assert lines[1] in ("# entry: train", "# entry: evaluate"), name
        header = "\n".join(l for l in lines if l.startswith("#"))
        assert f"python {entry(name)}.py experiment={name}" in header, f"{name}: its comment gives its command"
        assert "README" in header or "docs/" in header, f"{name}: its comment names the documented table it gives"


@pytest.mark.parametrize("name", BUNDLES)
def test_bundle_equals_its_documented_command(name):
    """The config check accepts both (it types the bundle's keys like command-line values) and returns what Hydra
    composes: the same config, group choices and run directory."""
    config, documented = entry(name), EXPECTED[name]()
    bundle_cfg = checked(name)
    documented_cfg = check_cli(documented, config)
    assert bundle_cfg.hydra.runtime.choices.experiment == name
    assert choices(bundle_cfg) == choices(documented_cfg), documented
    differences = diff(user_part(bundle_cfg), user_part(documented_cfg))
    assert not differences, f"{config}.py {' '.join(documented)}: {differences}"
    assert bundle_cfg.hydra.run.dir == documented_cfg.hydra.run.dir


def test_chains_read_what_earlier_bundles_write():
    """A bundle that reads an earlier step's output names exactly the path that step's bundle writes."""
    trains = {checked(n).hydra.run.dir: n for n in BUNDLES if entry(n) == "train"}
    directions = checked("directions_smollm2")
    written = {f"{directions.out_dir}/{s.replace(':', '-')}.safetensors" for s in directions.task.sources}
    for name in (n for n in BUNDLES if entry(n) == "evaluate"):
        cfg = checked(name)
        assert "${now:" not in str(OmegaConf.to_container(cfg, resolve=False).get("out_dir")), name
        if cfg.ckpt:
            assert cfg.ckpt in trains, f"{name}: ckpt={cfg.ckpt} is no train bundle's run directory"
            header = (CONF / "experiment" / f"{name}.yaml").read_text()
            assert f"python train.py experiment={trains[cfg.ckpt]}" in header, name
        used = [cfg.mechanism.options.get("direction")] + list(cfg.task.get("directions") or [])
        for path in filter(None, used):
            assert path in written, f"{name}: {path} is not written by directions_smollm2"
    assert len(trains) == len([n for n in BUNDLES if entry(n) == "train"]), "two train bundles share a run dir"
    assert not any("${now:" in d for d in trains), "a train bundle without a fixed hydra.run.dir"


@pytest.mark.parametrize("name", BUNDLES)
def test_the_other_entry_point_refuses_a_bundle_in_one_line(name):
    other = {"train": "evaluate", "evaluate": "train"}[entry(name)]
    with pytest.raises(UserError) as e:
        check_cli([f"experiment={name}"], other)
    text = str(e.value)
    assert "\n" not in text and f"not {other}.py" in text and f"python {entry(name)}.py experiment={name}" in text


@pytest.mark.parametrize("config, typo, meant", [("train", "lyra_traned_smollm2", "lyra_trained_smollm2"),
                                                  ("evaluate", "lyra_windw_smollm2", "lyra_window_smollm2")])
def test_unknown_bundle_is_one_line_listing_this_entry_points_bundles(config, typo, meant):
    with pytest.raises(UserError) as e:
        check_cli([f"experiment={typo}"], config)
    allowed = re.fullmatch(rf"unknown experiment '{typo}'; allowed: (.*); did you mean {meant}\?", str(e.value))
    assert allowed, str(e.value)
    assert allowed[1].split(", ") == [n for n in BUNDLES if entry(n) == config]
    with pytest.raises(UserError, match="drop the +"):
        check_cli([f"+experiment={meant}"], config)


def test_command_line_wins_over_a_bundle_and_is_checked_with_it():
    cfg = check_cli(["experiment=none_smollm2", "conversations=3"], "evaluate")
    assert cfg.conversations == 3 and cfg.turns == 40
    with pytest.raises(UserError, match=r"^turns=abc: expected an integer >= 1$"):
        check_cli(["experiment=none_smollm2", "turns=abc"], "evaluate")
    with pytest.raises(UserError, match=r"probe_turns=\[0,1,10,20,40\] \(from experiment=none_smollm2\): probe turn "
                                        r"10 is beyond turns=8"):
        check_cli(["experiment=none_smollm2", "turns=8"], "evaluate")
    with pytest.raises(UserError, match=r"^experiment=lyra_window_smollm2: unknown key "
                                        r"mechanism.options.history_window .*is a key of mechanism=lyra"):
        check_cli(["experiment=lyra_window_smollm2", "mechanism=lora"], "evaluate")


@pytest.fixture(scope="module")
def conf_copy(tmp_path_factory):
    conf = tmp_path_factory.mktemp("conf") / "conf"
    shutil.copytree(CONF, conf)
    return conf


BAD = [
    ("evaluate", "turns: abc\n", ["turns=abc (from experiment=bad): expected an integer >= 1"]),
    ("evaluate", "defaults:\n  - override /mechanism: lyra\nmechanism:\n  options:\n    history_window: -1\n",
     ["mechanism.options.history_window=-1 (from experiment=bad): expected an integer >= 0"]),
    ("evaluate", "turn: 4\n", ["experiment=bad: unknown key turn (top level:", "did you mean turns?"]),
    ("train", "data:\n  chain_turn: 2\n", ["experiment=bad: unknown key data.chain_turn (data:",
                                          "did you mean data.chain_turns?"]),
    ("train", "module:\n  optimizer:\n    lr: fast\n",
     ["module.optimizer.lr=fast (from experiment=bad): expected a number > 0"]),
    ("evaluate", "probe_turns: [0, 50]\n",
     ["probe_turns=[0,50] (from experiment=bad): probe turn 50 is beyond turns=12"]),
    ("evaluate", "defaults:\n  - override /task: persistence\ntask:\n  seeds: 3\n",
     ["task.seeds=3 (from experiment=bad): expected a list of integers"]),
]


@pytest.mark.parametrize("config, body, facts", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_a_bundles_keys_are_checked_like_command_line_values(conf_copy, config, body, facts):
    name = f"bad{BAD.index((config, body, facts))}"  # one name per body: the config check caches compositions by name
    (conf_copy / "experiment" / f"{name}.yaml").write_text(f"# @package _global_\n# entry: {config}\n{body}")
    with pytest.raises(UserError) as e:
        check_cli([f"experiment={name}"], config, conf_copy)
    text = str(e.value)
    assert "\n" not in text
    for fact in facts:
        assert fact.replace("experiment=bad", f"experiment={name}") in text, text


def test_a_bundle_may_add_keys_where_the_command_line_may(conf_copy):
    """Under OPEN nodes (Trainer arguments, extra callbacks) a bundle adds keys, as `+key=value` does; the
    command line still wins over the bundle."""
    (conf_copy / "experiment" / "adds.yaml").write_text(
        "# @package _global_\n# entry: train\ntrainer:\n  enable_model_summary: false\n  max_steps: 7\n"
        "callbacks:\n  swa:\n    _target_: lightning.pytorch.callbacks.StochasticWeightAveraging\n    swa_lrs: 0.01\n")
    cfg = check_cli(["experiment=adds", "trainer.max_steps=9"], "train", conf_copy)
    assert cfg.trainer.enable_model_summary is False and cfg.trainer.max_steps == 9
    assert cfg.callbacks.swa.swa_lrs == 0.01


def test_every_documented_table_has_its_bundles_beside_it():
    """Each hand-kept table of README.md and docs/ is in TABLES (the generated blocks are tests/test_tables.py's);
    one with bundles has an `or: python ... experiment=...` line within its section of the same page naming each
    bundle with its entry point; every such line names real bundles of the right entry."""
    tables = {path: [m.start() for m in re.finditer(r"(?m)^\|.*\n(?=\|[-|]+\|\n)", hand_kept(page))]
              for path, page in PAGES.items()}
    assert sum(map(len, tables.values())) == len(TABLES), \
        f"a table not in TABLES ({ {p: len(s) for p, s in tables.items() if s} }): map it to its bundles (or to [])"
    or_lines = {path: [(m.start(), m[0]) for m in re.finditer(r"(?m)^or: .*$", page)] for path, page in PAGES.items()}
    for path, line_start, line in ((p, s, l) for p, lines in or_lines.items() for s, l in lines):
        named = re.findall(r"python (train|evaluate)\.py experiment=(\w+)", line)
        listed = re.findall(r"`(\w+)`", line) if "experiment=X" in line else []
        assert named or listed, f"{path}: {line}"
        for script, name in (n for n in named if n[1] != "X"):
            assert name in BUNDLES and entry(name) == script, f"{path}: {line}"
        for name in listed:
            assert name in BUNDLES, f"{path}: {line}"
    for marker, bundles in [*TABLES.items(), *PROSE.items()]:
        holders = [path for path, page in PAGES.items() if marker in page]
        assert len(holders) == 1 and PAGES[holders[0]].count(marker) == 1, (marker, holders)
        path = holders[0]
        at = PAGES[path].index(marker)
        near = " ".join(l for s, l in or_lines[path] if abs(s - at) < 1500)
        for name in bundles:
            assert f"experiment={name}" in near or f"`{name}`" in near, \
                f"{path}: no `or:` line near {marker.strip()!r} names {name}"
