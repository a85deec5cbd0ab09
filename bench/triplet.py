"""Triplet cost over the base model, and the logit probe of the original done properly, in one run.

Cost (same run, arms interleaved per repeat, medians): a clean base model vs the same weights with
`triplet` attached (memory_tokens 512, linkage 1, gates set to 0.1 so the branch really runs), on a
history longer than the memory (so every read sees a full 512-token memory):
  - prefill: forward 128 new tokens on top of the cached history;
  - full forward: one 512-token sequence, no cache (the teacher-forcing shape);
  - decode: generate `--new-tokens` tokens on top of the cached history.
Logit probe: over a fixed prompt set (persona + question, every position), max and mean |Δlogit| and
KL(P_linked || P_base) at linkage 1, for the fresh mechanism and after `--steps` Lightning training steps
on the joyful_writer persona.

    .venv/bin/python bench/triplet.py [--model smollm2-135m-instruct] [--repeats 7] [--new-tokens 32] [--steps 20]
        [--threads N]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from persona_lit.models.backbones import load_backbone
from persona_lit.build import attach_mechanism
from persona_lit.data import read_mt_bench, turn_stream
from persona_lit.personas.load import load_persona

CONF = Path(__file__).resolve().parent.parent / "conf"
ANSWER = ("Here is a careful answer. First, consider the main idea and why it matters. Second, look at a "
          "simple example that shows it at work. Third, note the usual mistakes and how to avoid them.")
PROMPTS = ["What is your name?", "Who are you, in one sentence?", "Describe a rainy afternoon.",
           "How do I boil an egg?", "Tell me about the moon.", "What should I read next?"]


def history_ids(chat, min_tokens: int) -> list[int]:
    ids = chat.persona_ids(load_persona("pirate_mentor").system_prompt)
    open_turn = chat.opens_user_turn(load_persona("pirate_mentor").system_prompt)
    for turn in turn_stream(read_mt_bench(), 40, seed=0, exclude_categories=["roleplay"]):
        ids += chat.user_turn_ids(turn.text, open_turn) + chat._ids(ANSWER) + chat.close_assistant()
        open_turn = False
        if len(ids) >= min_tokens:
            return ids
    raise RuntimeError("not enough MT-bench text")


def timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process): on a shared machine CPU time is the steadier of the two."""
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - wall, time.process_time() - cpu


@torch.no_grad()
def cost(base, linked, mech, chat, args) -> dict[str, dict[str, list[tuple[float, float]]]]:
    hist = history_ids(chat, 700)
    new = chat.user_turn_ids(turn_stream(read_mt_bench(), 60, seed=1)[-1].text + " " + ANSWER * 2)[:128]
    seq = torch.tensor([hist[:512]])
    prefix = torch.tensor([hist])
    caches = {}
    for name, model in (("base", base), ("triplet", linked)):
        mech.begin_conversation(None)
        caches[name] = model(input_ids=prefix, use_cache=True).past_key_values
    memory = mech.snapshot()
    assert mech.memory_size() == 512
    times: dict[str, dict[str, list[tuple[float, float]]]] = {}
    arms = [("base", base), ("triplet", linked)]
    for r in range(args.repeats + 1):  # repeat 0 warms both arms up and is dropped
        for name, model in arms if r % 2 else arms[::-1]:  # interleaved, alternating order: noise hits both alike
            cache = copy.deepcopy(caches[name])
            mech.restore(memory)
            ids = torch.tensor([new])
            mask = torch.ones(1, len(hist) + len(new), dtype=torch.long)
            times.setdefault(f"prefill {len(new)} on {len(hist)}", {}).setdefault(name, []).append(
                timed(lambda: model(input_ids=ids, attention_mask=mask, past_key_values=cache, use_cache=True)))
            times.setdefault("full forward 512", {}).setdefault(name, []).append(timed(lambda: model(input_ids=seq)))
            cache = copy.deepcopy(caches[name])
            mech.restore(memory)
            prompt = torch.tensor([hist + new[:1]])
            times.setdefault(f"decode {args.new_tokens} tok", {}).setdefault(name, []).append(timed(
                lambda: model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), past_key_values=cache,
                                       max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                       do_sample=False, pad_token_id=chat.pad_id)))
    return {what: {name: t[1:] for name, t in arms.items()} for what, arms in times.items()}


def matmul_share(config, n_layers: int) -> float:
    """The branch's projection matmuls per token over the base model's (attention scores aside: both are
    O(context), the branch's over at most 512 keys at a few layers)."""
    h, d = config.hidden_size, getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    attn = h * d * (2 * config.num_attention_heads + 2 * config.num_key_value_heads)
    base = config.num_hidden_layers * (attn + 3 * h * config.intermediate_size) + h * config.vocab_size
    return n_layers * attn / base


@torch.no_grad()
def probe(model, mech, chat) -> tuple[float, float, float]:
    system = load_persona("joyful_writer").system_prompt
    diffs, kls = [], []
    for q in PROMPTS:
        ids = torch.tensor([chat.turn_ids(q, first=True, system=system)])
        linked = model(input_ids=ids).logits[0].float()
        with mech.disabled():
            base = model(input_ids=ids).logits[0].float()
        diffs.append((linked - base).abs())
        lp, lq = F.log_softmax(linked, -1), F.log_softmax(base, -1)
        kls.append((lp.exp() * (lp - lq)).sum(-1))  # per position
    d, k = torch.cat(diffs), torch.cat(kls)
    return d.max().item(), d.mean().item(), k.mean().item()


def train(model, mech, bb, steps: int, lr: float) -> None:
    import lightning as L

    from persona_lit.data import PersonaDialogueDataModule
    from persona_lit.training.module import PersonaLitModule

    module = PersonaLitModule(model, mech, optimizer=lambda p: torch.optim.AdamW(p, lr=lr, weight_decay=0.0))
    data = PersonaDialogueDataModule(bb.chat, load_persona("joyful_writer"), max_length=256, batch_size=4)
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    trainer.fit(module, datamodule=data)
    model.eval()


def gates(model) -> str:
    return ", ".join(f"{p.item():+.4f}" for n, p in model.named_parameters() if n.endswith("triplet_gate"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (1 is steadier on a shared machine)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = OmegaConf.load(CONF / "model" / f"{args.model}.yaml")
    base = load_backbone(cfg).model.eval()
    bb = load_backbone(cfg)
    options = {"layers": None, "linkage": 1.0, "gain": 1.0, "memory_tokens": 512}
    model, mech = attach_mechanism(bb, OmegaConf.create({"name": "triplet", "options": options}))
    model.eval()
    print(f"model {args.model}, triplet layers {mech.layers}, memory_tokens 512, linkage 1, "
          f"torch threads {torch.get_num_threads()}")

    max_d, mean_d, kl = probe(model, mech, bb.chat)
    print(f"logit probe, fresh mechanism (gates {gates(model)}): max |Δlogit| {max_d:.3g}, mean |Δlogit| "
          f"{mean_d:.3g}, KL(P_linked || P_base) {kl:.3g}")

    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("triplet_gate"):
                p.fill_(0.1)  # the branch must run for its cost to count
    times = cost(base, model, mech, bb.chat, args)
    print(f"cost, {args.repeats} interleaved repeats, memory full at 512 tokens; seconds are medians, ratio is the "
          f"median of the per-repeat triplet/base ratios (target <= 1.10):")
    print(f"  {'what':24} {'base wall':>9} {'triplet':>8} {'ratio':>6} | {'base cpu':>8} {'triplet':>8} {'ratio':>6}")
    for what, arms in times.items():
        row = []
        for k in (0, 1):  # wall, then CPU time of this process
            b, t = ([x[k] for x in arms[name]] for name in ("base", "triplet"))
            ratio = statistics.median(ti / bi for ti, bi in zip(t, b))
            row.append(f"{statistics.median(b):9.3f} {statistics.median(t):8.3f} {ratio:6.3f}")
        print(f"  {what:24} {row[0]} | {row[1]}")
    print(f"  matmul FLOPs per token added by the branch (q/k/v/o at {len(mech.layers)} layers): "
          f"{100 * matmul_share(base.config, len(mech.layers)):.1f}% of the base model's")

    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("triplet_gate"):
                p.zero_()  # back to the fresh start before training
    start = time.perf_counter()
    train(model, mech, bb, args.steps, args.lr)
    print(f"trained {args.steps} steps on joyful_writer (AdamW lr {args.lr}, batch 4 x <=256 tokens) in "
          f"{time.perf_counter() - start:.0f}s; gates now {gates(model)}")
    max_d, mean_d, kl = probe(model, mech, bb.chat)
    print(f"logit probe, trained: max |Δlogit| {max_d:.3g}, mean |Δlogit| {mean_d:.3g}, "
          f"KL(P_linked || P_base) {kl:.3g}")


if __name__ == "__main__":
    main()
