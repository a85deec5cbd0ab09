"""Lyra decode speed against the base model, measured in the same run.

Prints, for the base model (`none`) and `lyra` side by side:
  - decode tokens/s at turn 50 divided by decode tokens/s at turn 1 (how decoding slows as history grows);
  - Lyra decode tokens/s over base decode tokens/s at turn 1 (short context; target >= 0.95).
The history is built by teacher forcing MT-bench turns with fixed answers (cheap and identical for both
arms); each measurement generates exactly `--new-tokens` tokens on a fork of the conversation.

    .venv/bin/python bench/lyra.py [--model smollm2-135m-instruct] [--turns 50] [--new-tokens 32] [--repeats 3]
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
from persona_lit.personas.load import load_persona

CONF = Path(__file__).resolve().parent.parent / "conf"
ANSWER = ("Here is a careful answer. First, consider the main idea and why it matters. Second, look at a "
          "simple example that shows it at work. Third, note the usual mistakes and how to avoid them.")


def decode_rate(runner: ConversationRunner, conv, question: str, new_tokens: int) -> float:
    """Tokens/s of generating exactly `new_tokens` after `question`, on a fork of `conv`."""
    fork, state = conv.select(torch.tensor([0])), runner.mechanism.snapshot()
    runner.mechanism.begin_turn()
    turn = runner.chat.user_turn_ids(question, fork.open_turn)
    runner.extend(fork, turn[:-1])  # prefill the question first: the timing below is decoding only
    prompt = torch.tensor([fork.ids + turn[-1:]])
    start = time.perf_counter()
    with torch.no_grad():
        runner.model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), past_key_values=fork.cache,
                              max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                              pad_token_id=runner.chat.pad_id)
    seconds = time.perf_counter() - start
    runner.mechanism.restore(state)
    return new_tokens / seconds


def build(model_name: str, mechanism: str):
    bb = load_backbone(OmegaConf.load(CONF / "model" / f"{model_name}.yaml"))
    model, mech = attach_mechanism(bb, OmegaConf.create({"name": mechanism, "options": {}}))
    return ConversationRunner(model.eval(), bb.chat, mech), bb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--turns", type=int, default=50)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    turns = turn_stream(read_mt_bench(), args.turns, seed=0, exclude_categories=["roleplay"])
    persona = load_persona("pirate_mentor")
    arms = {name: build(args.model, name) for name in ("none", "lyra")}
    rates: dict[tuple[str, int], list[float]] = {}
    convs = {}
    for name, (runner, _) in arms.items():
        convs[name, 1] = runner.start(persona)
    probe_q = "What is your name?"
    for name, (runner, _) in arms.items():  # warm-up: first calls pay for allocation and kernel selection
        decode_rate(runner, convs[name, 1], probe_q, args.new_tokens)
    for t in range(1, args.turns + 1):
        for name, (runner, _) in arms.items():
            conv = convs[name, 1]
            runner.mechanism.begin_turn()
            runner.extend(conv, runner.chat.user_turn_ids(turns[t - 1].text, conv.open_turn))
            conv.open_turn = False
            runner.extend(conv, runner.chat._ids(ANSWER) + runner.chat.close_assistant())
        if t in (1, args.turns):
            for _ in range(args.repeats):  # interleaved arms: machine noise hits both alike
                for name, (runner, _) in arms.items():
                    rates.setdefault((name, t), []).append(decode_rate(runner, convs[name, 1], probe_q, args.new_tokens))
    med = {k: statistics.median(v) for k, v in rates.items()}
    history = convs["none", 1].cache.get_seq_length()
    print(f"model {args.model}, {args.new_tokens} new tokens, median of {args.repeats}, history at turn "
          f"{args.turns}: {history} tokens")
    print(f"{'arm':6} {'tok/s turn 1':>13} {'tok/s turn ' + str(args.turns):>14} {'ratio':>7}")
    for name in arms:
        a, b = med[name, 1], med[name, args.turns]
        print(f"{name:6} {a:13.1f} {b:14.1f} {b / a:7.2f}")
    lyra_mem = arms["lyra"][0].mechanism.memory_tokens()
    print(f"lyra chosen layers hold {lyra_mem} keys in total after turn {args.turns} (persona + last turn)")
    print(f"ratio lyra/base decode at turn 1: {med['lyra', 1] / med['none', 1]:.2f} (target >= 0.95)")
    print(f"ratio lyra/base decode at turn {args.turns}: {med['lyra', args.turns] / med['none', args.turns]:.2f}")


if __name__ == "__main__":
    main()
