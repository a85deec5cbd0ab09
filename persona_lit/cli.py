"""The two commands, as console scripts (pyproject's [project.scripts]) and behind train.py / evaluate.py:
`persona-lit-train mechanism=lyra` is `python train.py mechanism=lyra`, from any directory. The configs are read
from the checkout's conf/ (an editable install, `pip install -e .`, the one docs/install.md describes); relative
paths in them (outputs/, cache/, ../shared/data) are relative to the working directory."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

from persona_lit.build import CONF_DIR, preflight
from persona_lit.config.mechanisms import OPTIONS, described, register
from persona_lit.errors import exit_on_user_error

HELP = {"-h", "--help"}


def run(config_name: str, job: Callable[[Any], None], argv: list[str] | None = None) -> None:
    """Checks the overrides (one line, exit 2, for a mistake), then runs `job` on Hydra's composed config."""
    import hydra

    if not (CONF_DIR / f"{config_name}.yaml").is_file():
        print(f"error: {CONF_DIR / (config_name + '.yaml')} not found: persona_lit's commands read the checkout's "
              f"conf/; install it with `pip install -e <checkout>` (docs/install.md)", file=sys.stderr)
        sys.exit(2)
    argv = sys.argv[1:] if argv is None else argv
    exit_on_user_error(preflight)(argv, config=config_name)
    register()

    @hydra.main(config_path=str(CONF_DIR), config_name=config_name, version_base="1.3")
    @exit_on_user_error
    def main(cfg: Any) -> None:
        job(cfg)

    try:
        main()
    finally:  # Hydra's --help exits after its part
        if HELP & set(argv):
            print("\n".join(options_help(argv)))


def options_help(argv: list[str]) -> list[str]:
    """--help's last part: the options of the mechanism chosen on the command line (all of them when none is)."""
    chosen = [a.split("=", 1)[1] for a in argv if a.startswith("mechanism=")]
    names = [n for n in chosen if n in OPTIONS] or list(OPTIONS)
    out = ["== Mechanism options (persona_lit/config/mechanisms.py; set as mechanism.options.<name>=...) =="]
    for name in names:
        out += described(name)
    return out


def _train(cfg: Any) -> None:
    from persona_lit.training.run import train as train_run

    train_run(cfg)


def _evaluate(cfg: Any) -> None:
    from persona_lit.evaluation.runner import evaluate as evaluate_run

    evaluate_run(cfg)


def train() -> None:
    """persona-lit-train: train a persona mechanism (conf/train.yaml)."""
    run("train", _train)


def evaluate() -> None:
    """persona-lit-evaluate: the drift protocol on a checkpoint or a training-free mechanism (conf/evaluate.yaml)."""
    run("evaluate", _evaluate)
