"""Weight steering after merge runs at base speed: merged decode vs base decode vs activation-hook steering
(mechanism=steer) decode, in the same run (KV-cached greedy, one question, fp32, one row; arms interleaved
each repeat, medians reported); merge + restore (mechanism.disabled() enter + exit) timed separately.

    .venv/bin/python bench/weight_steer.py [--model smollm2-135m-instruct] [--tokens 64] [--repeats 5]
        [--delta FILE] [--alpha 1.0] [--steer-alpha 0.25]

Without --delta, a random rank-8 ΔW on every linear projection of every decoder layer (1% of each weight's
norm) stands in: speed does not depend on the values. The steer arm uses a random direction at the middle block.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from persistence import plain_decode  # noqa: E402  (bench/persistence.py: KV-cached greedy, nothing else)

from persona_lit.models.backbones import decoder_layers, load_backbone  # noqa: E402
from persona_lit.build import attach_mechanism  # noqa: E402
from persona_lit.mechanisms.lora import linear_targets  # noqa: E402
from persona_lit.steering.persistence import prompt_ids  # noqa: E402
from persona_lit.steering.vectors import Direction  # noqa: E402
from persona_lit.steering.weight_diff import FORMAT, save_delta  # noqa: E402

CONF = Path(__file__).resolve().parent.parent / "conf"
QUESTION = "Tell me about the history of the printing press and why it mattered."


def random_delta(model, rank: int = 8) -> dict[str, torch.Tensor]:
    g, targets, out = torch.Generator().manual_seed(0), set(linear_targets(model)), {}
    for name, p in model.named_parameters():
        if name.endswith(".weight") and name.rsplit(".", 2)[-2] in targets and ".layers." in name:
            d = torch.randn(p.shape[0], rank, generator=g) @ torch.randn(rank, p.shape[1], generator=g)
            out[name] = d * (0.01 * float(p.detach().float().norm()) / float(d.norm()))
    return out


def mechanism_cfg(name: str, **options):
    cfg = OmegaConf.load(CONF / "mechanism" / f"{name}.yaml")
    for k, v in options.items():
        cfg.options[k] = v
    return cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--delta", default=None)
    ap.add_argument("--alpha", type=float, default=1.0)
    ap.add_argument("--steer-alpha", type=float, default=0.25)
    args = ap.parse_args()
    model_cfg = OmegaConf.load(CONF / "model" / f"{args.model}.yaml")
    base = load_backbone(model_cfg)
    base.model.eval()
    tmp = Path(tempfile.mkdtemp(prefix="bench-weight-steer-"))
    delta_path = args.delta
    if delta_path is None:
        delta = random_delta(base.model)
        delta_path = save_delta(tmp / "delta.safetensors", delta,
                                {"format": FORMAT, "fingerprint": base.fingerprint, "pos": "random", "neg": "random"})
    layers, hidden = len(decoder_layers(base.model)), base.model.config.hidden_size
    g = torch.Generator().manual_seed(1)
    direction = Direction(torch.randn(layers, hidden, generator=g), torch.ones(layers),
                          {"fingerprint": base.fingerprint}).save(tmp / "direction.safetensors")
    weight_model, weight_mech = attach_mechanism(load_backbone(model_cfg),
                                                 mechanism_cfg("weight_steer", delta=str(delta_path), alpha=args.alpha))
    steer_model, _ = attach_mechanism(load_backbone(model_cfg),
                                      mechanism_cfg("steer", direction=str(direction), alpha=args.steer_alpha))
    prompt = prompt_ids(base.chat, QUESTION, None)
    arms = {"base": base.model, "merged": weight_model.eval(), "steer": steer_model.eval()}
    for model in arms.values():  # warm-up (and the merged arm's first forward)
        plain_decode(model, prompt, 4)
    times: dict[str, list[float]] = {k: [] for k in arms}
    cycles = []
    for _ in range(args.repeats):
        for name, model in arms.items():
            start = time.perf_counter()
            plain_decode(model, prompt, args.tokens)
            times[name].append(time.perf_counter() - start)
        start = time.perf_counter()
        with weight_mech.disabled():  # restore on enter, merge again on exit
            pass
        cycles.append(time.perf_counter() - start)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"model {args.model}, {args.tokens} tokens, {args.repeats} repeats, {len(weight_mech.names)} ΔW tensors")
    for k, v in med.items():
        print(f"  {k:7s} decode: {v:.3f} s ({1e3 * v / args.tokens:.1f} ms/token)")
    print(f"  ratios: merged/base {med['merged'] / med['base']:.3f}, steer/base {med['steer'] / med['base']:.3f}, "
          f"merged/steer {med['merged'] / med['steer']:.3f}")
    print(f"  merge + restore (disabled() enter + exit, outside the decode timings): "
          f"{1e3 * statistics.median(cycles):.1f} ms")


if __name__ == "__main__":
    main()
