"""Gradient checkpointing (train.py module.gradient_checkpointing=true): peak memory and step time against the
same training step without it, measured in the same run.

Each arm (off, on) runs in a fresh subprocess, so its peak resident memory is its own: the child loads the
model, attaches the mechanism, resets the kernel's peak-RSS mark (/proc/self/clear_refs), then runs forward and
backward on one fixed batch (random token ids, labels on every token, seeded) and reports the peak RSS above its
resident size before the step (activations, gradients, temporaries), the step's seconds, the loss and the
gradient norm. The arms alternate over `--repeats` (off, on, off, on, ...); medians per arm are reported and the
ratios on/off printed. The losses must be equal and the gradient norms agree (the same computation, recomputed).

    .venv/bin/python bench/checkpointing.py [--model smollm2-135m-instruct|tiny-llama] [--mechanism lora]
        [--batch 2] [--seq-len 512] [--repeats 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def child(args: argparse.Namespace) -> dict:
    """One arm: forward + backward once, in this process."""
    import torch
    from omegaconf import OmegaConf

    sys.path.insert(0, str(REPO))
    from persona_lit.models.backbones import load_backbone
    from persona_lit.build import attach_mechanism
    from persona_lit.config.mechanisms import schema_node

    torch.manual_seed(0)
    backbone = load_backbone(OmegaConf.load(REPO / "conf" / "model" / f"{args.model}.yaml"))
    mech_cfg = schema_node(args.mechanism)
    if args.mechanism == "lyra":
        mech_cfg.options.train_layers = True
    model, mechanism = attach_mechanism(backbone, mech_cfg)
    model.train()
    if args.arm == "on":
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    g = torch.Generator().manual_seed(1)
    vocab = backbone.model.config.vocab_size
    ids = torch.randint(0, vocab, (args.batch, args.seq_len), generator=g)
    mask = torch.ones_like(ids)
    extra = {"segment_ids": torch.zeros_like(ids)} if mechanism.uses_segments else {}
    if mechanism.uses_assistant_mask:
        extra["assistant_mask"] = torch.ones_like(ids, dtype=torch.bool)
    Path("/proc/self/clear_refs").write_text("5")  # peak RSS mark := current RSS
    before = _kib("VmRSS")
    start = time.perf_counter()
    loss = model(input_ids=ids, attention_mask=mask, labels=ids, **extra).loss
    loss.backward()
    seconds = time.perf_counter() - start
    peak = _kib("VmHWM")
    grads = [p.grad for p in mechanism.trainable_parameters() if p.grad is not None]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(x) for x in grads])).item()
    return {"peak_mib": (peak - before) / 1024, "seconds": seconds, "loss": loss.item(), "grad_norm": norm}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--mechanism", default="lora")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--json", default=None)
    p.add_argument("--arm", choices=["off", "on"], default=None, help=argparse.SUPPRESS)  # the child's arm
    args = p.parse_args()
    if args.arm:
        print("RESULT " + json.dumps(child(args)))
        return
    runs: dict[str, list[dict]] = {"off": [], "on": []}
    for _ in range(args.repeats):
        for arm in ("off", "on"):
            cmd = [sys.executable, __file__, "--model", args.model, "--mechanism", args.mechanism, "--batch",
                   str(args.batch), "--seq-len", str(args.seq_len), "--arm", arm]
            out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
            if out.returncode != 0:
                sys.exit(f"bench/checkpointing.py: the {arm} arm failed: {out.stderr.strip().splitlines()[-1:]}")
            line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")][-1]
            runs[arm].append(json.loads(line.removeprefix("RESULT ")))
    med = {arm: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for arm, rs in runs.items()}
    result = {
        "model": args.model, "mechanism": args.mechanism, "batch": args.batch, "seq_len": args.seq_len,
        "repeats": args.repeats, "arms": med,
        "peak_ratio": med["on"]["peak_mib"] / med["off"]["peak_mib"],
        "time_ratio": med["on"]["seconds"] / med["off"]["seconds"],
        "loss_diff": abs(med["on"]["loss"] - med["off"]["loss"]),
        "grad_norm_rel_diff": abs(med["on"]["grad_norm"] - med["off"]["grad_norm"]) / max(med["off"]["grad_norm"], 1e-12),
    }
    print(f"{args.model} {args.mechanism} batch {args.batch} x {args.seq_len}: peak memory above the loaded model "
          f"{med['off']['peak_mib']:.0f} MiB off, {med['on']['peak_mib']:.0f} MiB on (ratio {result['peak_ratio']:.2f}); "
          f"step time ratio {result['time_ratio']:.2f}; loss off {med['off']['loss']:.6f} on {med['on']['loss']:.6f}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
