"""Steer-then-release persistence: our single KV-cached pass against the original loop and against plain
decoding, measured in the same run (greedy, one question, fp32).

Arms (each repeat runs them in this order; medians are reported):
  - ours: persona_lit.steering.persistence.run_arm, steered arm + control arm (mechanism=steer for the first
    --n-steer forwards, disabled after; the projection hooked at --measure-layer every token);
  - original: the original experiment's loop with its ids fixed (persistence_reference.reference_arm): for every
    generated token the whole sequence so far runs through the model again, once for the steered arm and once
    for the unsteered control, i.e. two full forwards per token (no cache between tokens);
  - plain: KV-cached greedy decoding of the same number of tokens on a second copy of the model with no
    mechanism and no hooks (one model call per token, nothing else).
Prints the times, checks that ours and the original produce the same tokens (both arms) and projections,
and the ratios original/ours (target >= 20) and ours/plain per arm (target <= 1.10).

    .venv/bin/python bench/persistence.py [--model smollm2-135m-instruct] [--n-steer 50] [--n-release 200]
        [--repeats 3] [--original-repeats 1] [--direction FILE] [--alpha 8]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from transformers import DynamicCache

from persona_lit.models.backbones import decoder_layers, load_backbone
from persona_lit.build import attach_mechanism
from persona_lit.steering.persistence import Decoding, prompt_ids, run_arm
from persona_lit.steering.persistence_reference import reference_arm
from persona_lit.steering.vectors import Direction, load_direction

CONF = Path(__file__).resolve().parent.parent / "conf"
QUESTION = "Tell me about the history of the printing press and why it mattered."
GREEDY = Decoding(do_sample=False)


@torch.no_grad()
def plain_decode(model, prompt: list[int], steps: int) -> list[int]:
    """KV-cached greedy decoding, nothing else: prompt once, then one token per call."""
    cache, ids, out = DynamicCache(), torch.tensor([prompt]), []
    for _ in range(steps):
        logits = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1).logits
        token = int(logits[0, -1].argmax())
        out.append(token)
        ids = torch.tensor([[token]])
    return out


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--n-steer", type=int, default=50)
    parser.add_argument("--n-release", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3, help="repeats of ours and plain")
    parser.add_argument("--original-repeats", type=int, default=1, help="repeats of the (slow) original loop")
    parser.add_argument("--direction", default=None, help="a direction file (default: a random one)")
    parser.add_argument("--alpha", type=float, default=8.0)
    parser.add_argument("--layer", type=int, default=None, help="steered block (default: the middle one)")
    parser.add_argument("--measure-layer", type=int, default=None, help="default: 3/4 of the depth")
    args = parser.parse_args()
    cfg = OmegaConf.load(CONF / "model" / f"{args.model}.yaml")
    bb, plain_bb = load_backbone(cfg), load_backbone(cfg)
    n_layers, hidden = len(decoder_layers(bb.model)), bb.model.config.hidden_size
    layer = args.layer if args.layer is not None else n_layers // 2
    measure = args.measure_layer if args.measure_layer is not None else (3 * n_layers) // 4
    with tempfile.TemporaryDirectory() as tmp:
        path = args.direction or Direction(torch.randn(n_layers, hidden, generator=torch.Generator().manual_seed(0)),
                                           torch.ones(n_layers) * 10.0,
                                           {"model": bb.name, "fingerprint": bb.fingerprint}).save(Path(tmp) / "d.safetensors")
        mech_cfg = {"name": "steer", "options": {"direction": str(path), "layers": [layer], "alpha": args.alpha}}
        model, mech = attach_mechanism(bb, OmegaConf.create(mech_cfg))
        unit = load_direction(path).unit(measure)[None]
    model.eval()
    chat, n, m = bb.chat, args.n_steer, args.n_release
    prompt = prompt_ids(chat, QUESTION, None)

    def ours(steered: bool):
        return run_arm(model, chat, [prompt], [0], n, m, mech, measure, unit, GREEDY, steered=steered)

    def original(steered: bool):
        return reference_arm(model, chat, prompt, 0, n, m, mech, measure, unit, GREEDY, steered=steered)

    print(f"model {args.model}, prompt {len(prompt)} tokens, n_steer {n}, n_release {m}, steer block {layer} "
          f"alpha {args.alpha}, measure block {measure}, threads {torch.get_num_threads()}", flush=True)
    ours(True)  # warm-up
    times: dict[str, list[float]] = {"ours steered": [], "ours control": [], "plain": [], "original": []}
    for r in range(max(args.repeats, args.original_repeats)):
        if r < args.repeats:
            t, fast_s = timed(lambda: ours(True))
            times["ours steered"].append(t)
            t, fast_c = timed(lambda: ours(False))
            times["ours control"].append(t)
            t, plain_tokens = timed(lambda: plain_decode(plain_bb.model, prompt, n + m))
            times["plain"].append(t)
        if r < args.original_repeats:
            t_s, ref_s = timed(lambda: original(True))
            t_c, ref_c = timed(lambda: original(False))
            times["original"].append(t_s + t_c)
        print(f"repeat {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f} s" for k, v in times.items() if len(v) > r),
              flush=True)
    med = {k: statistics.median(v) for k, v in times.items()}
    ours_total = med["ours steered"] + med["ours control"]
    same = [torch.equal(f.tokens, r.tokens) for f, r in ((fast_s, ref_s), (fast_c, ref_c))]
    diff = max(float((f.projection - r.projection).abs().max()) for f, r in ((fast_s, ref_s), (fast_c, ref_c)))
    ends = int(fast_c.turn_end.sum())
    print(f"ours (steered + control arms): {ours_total:.1f} s; original loop (2 full forwards per token): "
          f"{med['original']:.1f} s; plain KV-cached decoding of {n + m} tokens: {med['plain']:.1f} s")
    print(f"token-identical to the original loop under greedy: steered {same[0]}, control {same[1]}; "
          f"max |projection difference| {diff:.2e}; control arm equals plain decoding: "
          f"{fast_c.tokens[0].tolist() == plain_tokens}{f' ({ends} Continue turns)' if ends else ''}")
    print(f"ratio original/ours: {med['original'] / ours_total:.2f} (target >= 20)")
    print(f"ratio ours/plain per arm: steered {med['ours steered'] / med['plain']:.3f}, control "
          f"{med['ours control'] / med['plain']:.3f} (target <= 1.10)")


if __name__ == "__main__":
    main()
