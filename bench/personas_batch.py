"""The drift protocol over several personas: their conversations in one batch (drift.run_personas, what
evaluate.py does) against one persona at a time (each persona's conversations a batch of their own, as
evaluate.py did before), same model, same turns, same run.

Both arms run every arm of the protocol (persona, baseline, control) with probes and the capability cost, on
`--personas` personas of the persona pack and `--conversations` MT-bench streams each; the arms alternate over
`--repeats` and the medians are compared. It also checks that both arms gave the same answers and verdicts
(greedy: a row is the conversation it would be alone). The last line is
`ratio one-at-a-time/mixed: X.XX` (> 1: batching personas together is faster).

    .venv/bin/python bench/personas_batch.py [--model smollm2-135m-instruct] [--mechanism lyra] [--personas 4]
        [--conversations 2] [--turns 4] [--new-tokens 32] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from persona_lit.models.backbones import load_backbone
from persona_lit.build import attach_mechanism
from persona_lit.evaluation.conversation import ConversationRunner
from persona_lit.data import read_mt_bench, turn_stream
from persona_lit.data.mt_bench import neutral_exchanges
from persona_lit.evaluation.protocol import run_personas, run_protocol
from persona_lit.personas.load import builtin_personas, load_persona

CONF = Path(__file__).resolve().parent.parent / "conf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--mechanism", default="lyra")
    parser.add_argument("--personas", type=int, default=4)
    parser.add_argument("--conversations", type=int, default=2)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    bb = load_backbone(OmegaConf.load(CONF / "model" / f"{args.model}.yaml"))
    model, mech = attach_mechanism(bb, OmegaConf.load(CONF / "mechanism" / f"{args.mechanism}.yaml"))
    model.eval()
    runner = ConversationRunner(model, bb.chat, mech, max_new_tokens=args.new_tokens, probe_max_new_tokens=24)
    personas = [load_persona(n) for n in builtin_personas()[: args.personas]]
    questions = read_mt_bench()
    streams = [list(turn_stream(questions, args.turns, seed=s)) for s in range(args.conversations)]
    capability = neutral_exchanges(2, {t.question_id for s in streams for t in s})
    common = dict(probe_turns=[0, args.turns], capability=capability, capability_tokens=32, progress=False)
    units = args.personas * args.conversations

    def one_at_a_time():
        return [run_protocol(runner, p, streams, batch=args.conversations, **common) for p in personas]

    def mixed():
        return run_personas(runner, personas, streams, batch=units, **common)

    times: dict[str, list[float]] = {"one-at-a-time": [], "mixed": []}
    results = {}
    for _ in range(args.repeats):
        for name, fn in (("one-at-a-time", one_at_a_time), ("mixed", mixed)):
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    same = all([r.answer for r in a] == [r.answer for r in b] and [[(p.answer, p.passed) for p in r.probes] for r in a]
               == [[(p.answer, p.passed) for p in r.probes] for r in b]
               for x, y in zip(results["one-at-a-time"], results["mixed"])
               for arm in ("persona_arm", "baseline_arm", "control_arm")
               for a, b in zip(getattr(x, arm), getattr(y, arm)))
    print(f"{args.model}, mechanism={args.mechanism}, {args.personas} personas x {args.conversations} conversations, "
          f"{args.turns} turns of {args.new_tokens} new tokens, threads {torch.get_num_threads()}")
    for name, t in times.items():
        print(f"{name:>14}: median {statistics.median(t):.1f} s over {len(t)} runs ({', '.join(f'{x:.1f}' for x in t)})")
    print(f"same answers and verdicts in both arms: {same}")
    print(f"ratio one-at-a-time/mixed: {statistics.median(times['one-at-a-time']) / statistics.median(times['mixed']):.2f}")


if __name__ == "__main__":
    main()
