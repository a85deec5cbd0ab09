"""Train a persona mechanism: python train.py mechanism=lora model=smollm2-135m-instruct trainer.max_steps=30
(the console script persona-lit-train runs the same; persona_lit/cli.py)"""

import sys

try:
    from persona_lit.cli import train
except ImportError as e:  # an untested transformers/Lightning (persona_lit/versions.py): one line, exit 2
    if type(e).__name__ != "UntestedVersionError":
        raise
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)

if __name__ == "__main__":
    train()
