"""Train a persona mechanism: python train.py mechanism=lora model=smollm2-135m-instruct trainer.max_steps=30"""

import sys

import hydra
from omegaconf import DictConfig

from persona_lit.build import preflight
from persona_lit.errors import exit_on_user_error


@hydra.main(config_path="conf", config_name="train", version_base="1.3")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    from persona_lit.training import train

    train(cfg)


if __name__ == "__main__":
    exit_on_user_error(preflight)(sys.argv[1:])
    main()
