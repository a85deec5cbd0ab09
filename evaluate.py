"""Evaluate persona persistence: python evaluate.py ckpt=PATH [turns=12 conversations=1 persona=...]"""

import sys

import hydra
from omegaconf import DictConfig

try:
    from persona_lit.build import preflight
    from persona_lit.errors import exit_on_user_error
except ImportError as e:  # an untested transformers/Lightning (persona_lit/versions.py): one line, exit 2
    if type(e).__name__ != "UntestedVersionError":
        raise
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


@hydra.main(config_path="conf", config_name="evaluate", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    from persona_lit.evaluation.runner import evaluate

    evaluate(cfg)


if __name__ == "__main__":
    exit_on_user_error(preflight)(sys.argv[1:], config="evaluate")
    main()
