"""How much decode speed Lyra can gain at turn N at most: the base model's decode time spent in the self-attention
of Lyra's chosen layers, at turn 1 and at turn N, same model, same run.

Lyra's chosen layers attend to [persona ; current turn] only, so at turn N they cost about what they cost at turn 1;
every other layer, the MLPs and the head cost what the base model pays. The best Lyra can do at turn N is therefore
the base model's decode time with the chosen layers' attention time of turn N replaced by that of turn 1:

    bound = T_N / (T_N - A_N + A_1)

(T: decode time per step; A: time inside the chosen layers' self_attn, both medians over `--repeats`). The base
model is timed with forward hooks around each layer's self_attn; the history is bench/overhead.py's (MT-bench
questions with a fixed answer, teacher-forced), decoding through the conversation runner.

    .venv/bin/python bench/lyra_bound.py [--model smollm2-135m-instruct] [--layers 5,11,17,23,29] [--turns 50]
        [--batch 1] [--new-tokens 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from overhead import history  # noqa: E402  (bench/overhead.py: the teacher-forced history)

from persona_lit.models.backbones import decoder_layers, load_backbone  # noqa: E402
from persona_lit.evaluation.conversation import ConversationRunner  # noqa: E402
from persona_lit.mechanisms.lyra import default_layers  # noqa: E402
from persona_lit.mechanisms.none import NoMechanism  # noqa: E402
from persona_lit.personas.load import load_persona  # noqa: E402

CONF = Path(__file__).resolve().parent.parent / "conf"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--layers", default=None, help="comma-separated; default: Lyra's default layers")
    parser.add_argument("--turns", type=int, default=50)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    bb = load_backbone(OmegaConf.load(CONF / "model" / f"{args.model}.yaml"))
    model = bb.model.eval()
    layers = [int(i) for i in args.layers.split(",")] if args.layers else default_layers(model)
    spent = {"attn": 0.0}
    began: dict[int, float] = {}
    for i in layers:
        attn = decoder_layers(model)[i].self_attn
        attn.register_forward_pre_hook(lambda m, a, i=i: began.__setitem__(i, time.perf_counter()))
        attn.register_forward_hook(lambda m, a, o, i=i: spent.__setitem__("attn", spent["attn"] + time.perf_counter()
                                                                             - began[i]))
    runner = ConversationRunner(model, bb.chat, NoMechanism(), max_new_tokens=args.new_tokens,
                                min_new_tokens=args.new_tokens)
    persona = load_persona("pirate_mentor")
    convs = {t: history(runner, persona, args.batch, t) for t in (1, args.turns)}
    question = runner.chat.user_turn_ids("Tell me about the history of tea, in detail.", False)
    per_step: dict[int, tuple[list[float], list[float]]] = {t: ([], []) for t in convs}
    for _ in range(args.repeats):
        for t, conv in convs.items():
            fork = conv.select(torch.arange(conv.rows))
            runner.extend(fork, question[:-1])  # the question's prefill, untimed
            fork.append([question[-1:]] * fork.rows, runner.chat.pad_id)  # its last token: the first decode step
            spent["attn"] = 0.0
            start = time.perf_counter()
            runner._decode(fork, args.new_tokens)
            total = time.perf_counter() - start
            per_step[t][0].append(total / args.new_tokens)
            per_step[t][1].append(spent["attn"] / args.new_tokens)
    (t1, a1), (tn, an) = [(statistics.median(x), statistics.median(y)) for x, y in per_step.values()]
    tokens = len(convs[args.turns].row_ids(0))
    print(f"{args.model}, layers {layers} of {len(decoder_layers(model))}, batch {args.batch}, "
          f"turn {args.turns} = {tokens} tokens of history, threads {torch.get_num_threads()}")
    print(f"decode ms/step: turn 1 {t1 * 1e3:.1f} (chosen layers' attention {a1 * 1e3:.1f}, {a1 / t1:.0%}), "
          f"turn {args.turns} {tn * 1e3:.1f} (chosen layers' attention {an * 1e3:.1f}, {an / tn:.0%})")
    print(f"bound on Lyra's decode speedup at turn {args.turns}: {tn / (tn - an + a1):.2f}x")


if __name__ == "__main__":
    main()
