"""Probe forks: copying each fork's rows against sharing the conversation's cache (models/shared_prefix.py), in
the same process, alternating, at one history length.

SmolLM2-135M-Instruct in bf16, 8 conversation rows of different personas grown to `--history` tokens; one probe
turn's work as the drift protocol does it: `--probes` questions per row generated (48 new tokens each, the end
token held back so both sides decode the same number of steps), and two scored answers per question. "copy":
forks of `probe_batch` = 8 rows, each a copy of its rows' cache (one wave of probes at a time); "share": every wave
in one forked batch reading the history in place. Prints seconds per probe turn for each and their ratio.

    .venv/bin/python bench/probe_forks.py [--history 5000] [--probes 3] [--repeats 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from omegaconf import OmegaConf  # noqa: E402

from persona_lit.evaluation.conversation import ConversationRunner  # noqa: E402
from persona_lit.evaluation.probing import ScoreItem  # noqa: E402
from persona_lit.models.backbones import keep_rotary_fp32, load_backbone  # noqa: E402
from persona_lit.personas.types import Persona  # noqa: E402

ROWS, NEW_TOKENS = 8, 48


def probe_turn(runner: ConversationRunner, conv, probes: int) -> float:
    """Seconds for one probe turn's forks: generated answers in waves, then the scored answers."""
    index = [b for _ in range(probes) for b in range(ROWS)]
    questions = [f"Question {i}: who are you, and what do you do all day?" for i in range(len(index))]
    start = time.perf_counter()
    for chunk in range(0, len(index), runner.fork_rows(conv)):
        rows = index[chunk : chunk + runner.fork_rows(conv)]
        runner.on_fork(conv, rows, runner.say, questions[chunk : chunk + len(rows)], NEW_TOKENS, close=False)
    answers = ["I am Captain Quill, and I sail the seven seas teaching code. Fair winds!",
               "I'm an AI assistant, here to help with whatever you need."]
    runner.score(conv, [ScoreItem(b, q, a) for b, q in zip(index, questions) for a in answers])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--history", type=int, default=5000)
    parser.add_argument("--probes", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    backbone = load_backbone(OmegaConf.load(REPO / "conf" / "model" / "smollm2-135m-instruct.yaml"))
    model = keep_rotary_fp32(backbone.model.to(torch.bfloat16))
    runners = {mode: ConversationRunner(model, backbone.chat, None, probe_max_new_tokens=NEW_TOKENS,
                                        min_new_tokens=NEW_TOKENS, probe_batch=ROWS, share_forks=mode == "share")
               for mode in ("copy", "share")}
    personas = [Persona(name=f"p{i}", system_prompt="You are a pirate who mentors programmers. " * (i + 1))
                for i in range(ROWS)]
    conv = runners["copy"].start(personas, rows=ROWS)
    text = backbone.chat._ids("Tell me a long story about the sea, the ships and the storms. " * 4)
    while conv.tokens.shape[1] < args.history:
        conv.append([text] * ROWS, backbone.chat.pad_id)
        runners["copy"].forward_new(conv, logits_to_keep=1)
    seconds = {"copy": [], "share": []}
    for _ in range(args.repeats):
        for mode in ("copy", "share"):  # alternating: machine drift reaches both
            seconds[mode].append(probe_turn(runners[mode], conv, args.probes))
    best = {mode: min(s) for mode, s in seconds.items()}
    print(f"history {conv.tokens.shape[1]} tokens x {ROWS} rows, {args.probes} probes per row, bf16, "
          f"{torch.get_num_threads()} threads")
    for mode in ("copy", "share"):
        print(f"{mode:>5}: {best[mode]:.2f} s per probe turn (best of {args.repeats}: "
              f"{', '.join(f'{s:.2f}' for s in seconds[mode])})")
    print(f"ratio copy/share: {best['copy'] / best['share']:.2f}x")


if __name__ == "__main__":
    main()
