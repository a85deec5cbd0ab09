"""Evaluate persona persistence: python evaluate.py ckpt=PATH [turns=12 conversations=1 persona=...]
(the console script persona-lit-evaluate runs the same; persona_lit/cli.py)"""

import sys

try:
    from persona_lit.cli import evaluate
except ImportError as e:  # an untested transformers/Lightning (persona_lit/versions.py): one line, exit 2
    if type(e).__name__ != "UntestedVersionError":
        raise
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)

if __name__ == "__main__":
    evaluate()
