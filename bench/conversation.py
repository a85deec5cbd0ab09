"""The conversation runner (KV cache reused across turns) against the naive loop that re-encodes the
whole history every turn, same model, same turns, same run.

Prints time per turn at turn N over time per turn at turn 1 for both, and total naive time over total
cached time (target: >= 5x at 40 turns; the cached per-turn cost should grow only with attention over
the history). Every turn generates exactly `--new-tokens` tokens in both loops (equal work). The two loops
alternate turn by turn, so a change in the machine's speed during the run reaches both alike.
With --batch B > 1 it also runs B conversations as one padded batch against the same B one at a time
(`--batch-turns` turns each) and prints that ratio.

    .venv/bin/python bench/conversation.py [--model smollm2-135m-instruct] [--turns 40] [--new-tokens 32]
        [--batch 4] [--batch-turns 8]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from persona_lit.models.backbones import load_backbone
from persona_lit.evaluation.conversation import ConversationRunner
from persona_lit.data import read_mt_bench, turn_stream
from persona_lit.mechanisms.none import NoMechanism
from persona_lit.personas.load import load_persona

CONF = Path(__file__).resolve().parent.parent / "conf"


def cached_turns(runner: ConversationRunner, persona, streams):
    """All streams as one batch; yields the seconds of each turn."""
    conv = runner.start(persona, rows=len(streams))
    for turns in zip(*streams):
        start = time.perf_counter()
        runner.say(conv, [t.text for t in turns])
        yield time.perf_counter() - start


def naive_turns(model, chat, persona, turns, new_tokens: int):
    """Re-encodes persona + all earlier turns for every new turn (the cache lives within a turn only); yields the
    seconds of each turn."""
    ids = chat.persona_ids(persona.system_prompt)
    open_turn = chat.opens_user_turn(persona.system_prompt)
    for turn in turns:
        start = time.perf_counter()
        ids = ids + chat.user_turn_ids(turn.text, open_turn)
        open_turn = False
        prompt = torch.tensor([ids])
        with torch.no_grad():
            out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                 max_new_tokens=new_tokens, min_new_tokens=new_tokens, pad_token_id=chat.pad_id)
        ids = ids + out[0, prompt.shape[1]:].tolist() + chat.close_assistant()
        yield time.perf_counter() - start


def cached_loop(runner: ConversationRunner, persona, streams) -> list[float]:
    return list(cached_turns(runner, persona, streams))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--turns", type=int, default=40)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--batch-turns", type=int, default=8)
    args = parser.parse_args()
    bb = load_backbone(OmegaConf.load(CONF / "model" / f"{args.model}.yaml"))
    runner = ConversationRunner(bb.model, bb.chat, NoMechanism(), max_new_tokens=args.new_tokens,
                                min_new_tokens=args.new_tokens)  # equal work per turn in both loops
    persona = load_persona("pirate_mentor")
    questions = read_mt_bench()
    turns = turn_stream(questions, args.turns, seed=0, exclude_categories=["roleplay"])
    cached_loop(runner, persona, [turns[:2]])  # warm-up
    if args.batch > 1:
        streams = [turn_stream(questions, args.batch_turns, seed=k, exclude_categories=["roleplay"])
                   for k in range(args.batch)]
        batched = sum(cached_loop(runner, persona, streams))
        alone = sum(sum(cached_loop(runner, persona, [s])) for s in streams)
        print(f"{args.batch} conversations x {args.batch_turns} turns: one at a time {alone:.1f} s, as one batch "
              f"{batched:.1f} s, ratio {alone / batched:.2f}")
    cached, naive = [], []  # the two loops alternate turn by turn
    for c, n in zip(cached_turns(runner, persona, [turns]),
                    naive_turns(bb.model, bb.chat, persona, turns, args.new_tokens)):
        cached.append(c)
        naive.append(n)
    n = args.turns
    print(f"model {args.model}, {n} turns, {args.new_tokens} new tokens per turn")
    print(f"{'loop':7} {'turn 1 s':>9} {'turn ' + str(n) + ' s':>10} {'ratio':>6} {'total s':>8}")
    for name, t in (("cached", cached), ("naive", naive)):
        print(f"{name:7} {t[0]:9.2f} {t[-1]:10.2f} {t[-1] / t[0]:6.2f} {sum(t):8.1f}")
    print(f"ratio naive/cached total time at {n} turns: {sum(naive) / sum(cached):.2f} (target >= 5)")


if __name__ == "__main__":
    main()
