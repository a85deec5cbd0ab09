"""`task=weight_projection`: how far each fine-tuned checkpoint moved its weights along a persona's ΔW.

For every checkpoint this framework wrote (a `lora` adapter, trained Lyra layers, ...), the checkpoint is restored
with its mechanism and, for every module W of the ΔW file, its *effective* weight is read off the restored model
by feeding the identity matrix through that module in eval mode (E = M(I) − M(0), so a PEFT LoRA layer gives
W + s·B·A, a trained Lyra layer its trained weight; a module the mechanism left alone gives W itself). Its change
D = E − W_base is then projected on ΔW:

    coefficient c = <D, ΔW> / ||ΔW||²     (the α with which weight steering would add the same ΔW component)
    cosine       = <D, ΔW> / (||D|| ||ΔW||)

overall and per decoder layer (sums over the layer's modules). With `task.evals` (one drift evaluation out_dir
per checkpoint, e.g. `python evaluate.py ckpt=<ckpt>`) the behaviour change the drift protocol measured at
`task.turn` (`task.metric` of the mechanism minus the baseline arm, paired by conversation) is set against c:
Pearson and Spearman correlation across checkpoints (no interval below 4 checkpoints; with few checkpoints it is
a description, not a test). Outputs: results.json, report.md, projection.png.

    python evaluate.py task=weight_projection task.delta=outputs/delta/delta.safetensors \
      "task.ckpts=[RUN_A/train,RUN_B/train]" "task.evals=[RUN_A/eval,RUN_B/eval]" out_dir=outputs/projection
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from persona_lit.errors import UserError
from persona_lit.outputs import staged_dir
from persona_lit.steering.weight_diff import load_delta

LAYER = re.compile(r"\blayers\.(\d+)\.")
WRAPPERS = ("base_layer", "base")  # PEFT's and our wrappers keep the wrapped module under these names


def normalized(name: str) -> str:
    """A module name with PEFT's `base_model.model.` prefix and wrapper segments removed."""
    name = name.removeprefix("base_model.model.")
    return ".".join(part for part in name.split(".") if part not in WRAPPERS)


@torch.no_grad()
def effective_weights(model: nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """For each parameter name `<module>.weight` of the base model, the weight its module now applies: the
    outermost module of `model` whose normalized name is <module>, fed the identity (eval mode, fp32)."""
    wanted = {n.removesuffix(".weight"): n for n in names}
    found: dict[str, nn.Module] = {}
    for name, module in model.named_modules():
        key = normalized(name)
        if key in wanted and key not in found:
            found[key] = module
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise UserError(f"task.delta: module {missing[0]} is not in the checkpoint's model ({len(missing)} of "
                        f"{len(wanted)} missing); allowed: a ΔW file of the checkpoint's base model")
    was_training = model.training
    model.eval()
    out = {}
    try:
        for key, module in found.items():
            inner = getattr(module, "base_layer", module)
            weight = getattr(inner, "weight", None)
            if not isinstance(weight, torch.Tensor):
                raise UserError(f"task.delta: {key} has no weight in the checkpoint's model")
            n_in = _in_features(module, weight)
            eye = torch.eye(n_in, dtype=weight.dtype, device=weight.device)
            y = module(eye) - module(torch.zeros_like(eye))
            out[wanted[key]] = y.float().T.contiguous().cpu()  # rows: outputs, columns: inputs, like W
    finally:
        model.train(was_training)
    return out


def _in_features(module: nn.Module, weight: torch.Tensor) -> int:
    for m in (module, getattr(module, "base_layer", None)):
        if m is not None and getattr(m, "in_features", None):
            return int(m.in_features)
    return int(weight.shape[1])


def project(change: dict[str, torch.Tensor], delta: dict[str, torch.Tensor]) -> dict[str, Any]:
    """Overall and per-layer coefficient and cosine of `change` on `delta` (same keys)."""
    groups: dict[str, list[str]] = {}
    for name in sorted(delta):
        m = LAYER.search(name)
        groups.setdefault(m.group(1) if m else "other", []).append(name)

    def stats(keys: list[str]) -> dict[str, float | None]:
        dot = sum(float((change[k].double() * delta[k].double()).sum()) for k in keys)
        dd = sum(float(delta[k].double().pow(2).sum()) for k in keys)
        cc = sum(float(change[k].double().pow(2).sum()) for k in keys)
        return {"coefficient": dot / dd if dd > 0 else None,
                "cosine": dot / math.sqrt(dd * cc) if dd > 0 and cc > 0 else None, "change_norm": math.sqrt(cc)}

    layers = sorted((k for k in groups if k != "other"), key=int)
    return {"overall": stats(sorted(delta)),
            "layers": {int(k): stats(groups[k]) for k in layers},
            **({"other": stats(groups["other"])} if "other" in groups else {})}


def checkpoint_change(ckpt: str, delta: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
                      fingerprint: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    from persona_lit.build import restore

    backbone, model, mechanism, persona, config = restore(ckpt)
    if backbone.fingerprint != fingerprint:
        raise UserError(f"task.ckpts: {ckpt} was trained on another base model than the ΔW file's "
                        f"(fingerprint {backbone.fingerprint} vs {fingerprint})")
    effective = effective_weights(model, sorted(delta))
    change = {k: effective[k] - base[k] for k in delta}
    return change, {"mechanism": mechanism.name, "persona": persona.key}


def behaviour(eval_dir: str, metric: str, turn: int, index: int) -> tuple[float | None, Any]:
    """(mechanism − baseline at `turn`, its [low, high]) from a drift evaluation's results.json."""
    path = Path(str(eval_dir)) / "results.json"
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))["metrics"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise UserError(f"task.evals[{index}]={eval_dir}: no drift results.json there ({type(e).__name__}); allowed: "
                        f"the out_dir of a drift evaluation (evaluate.py, results.json with metrics)") from None
    if not isinstance(metrics, dict):
        raise UserError(f"task.evals[{index}]={path}: 'metrics' is not an object; allowed: the results.json of a drift "
                        f"evaluation")
    m = metrics.get(f"vs_baseline/{metric}")
    if m is not None and not (isinstance(m, dict) and all(isinstance(m.get(k), list) for k in
                                                         ("turn", "mean", "ci_low", "ci_high"))
                              and len({len(m[k]) for k in ("turn", "mean", "ci_low", "ci_high")}) == 1):
        raise UserError(f"task.evals[{index}]={path}: vs_baseline/{metric} is not a per-turn metric (allowed: turn, "
                        f"mean, ci_low, ci_high lists of one length)")
    if m is None:
        have = sorted(k if k.isprintable() else repr(k) for k in metrics if "/" not in k)
        raise UserError(f"task.evals[{index}]={eval_dir}: no vs_baseline/{metric} (an evaluation with baseline=true "
                        f"and that metric; it has: {', '.join(have)})")
    if turn not in m["turn"]:
        raise UserError(f"task.evals[{index}]={eval_dir}: turn {turn} is not a probe turn there ({m['turn']})")
    i = m["turn"].index(turn)
    values = m["mean"][i], m["ci_low"][i], m["ci_high"][i]
    if not all(v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)) for v in values):
        raise UserError(f"task.evals[{index}]={path}: vs_baseline/{metric} at turn {turn} is {list(values)}; allowed: "
                        f"numbers or null")
    return m["mean"][i], [m["ci_low"][i], m["ci_high"][i]]


def correlation(xs: list[float], ys: list[float]) -> dict[str, Any]:
    n = len(xs)
    if n < 3:
        return {"n": n, "pearson": None, "spearman": None, "note": "fewer than 3 checkpoints: no correlation"}

    def pearson(a, b):
        ma, mb = sum(a) / n, sum(b) / n
        cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
        va, vb = sum((x - ma) ** 2 for x in a), sum((y - mb) ** 2 for y in b)
        return cov / math.sqrt(va * vb) if va > 0 and vb > 0 else None

    def ranks(a):
        order = sorted(range(n), key=lambda i: a[i])
        r = [0.0] * n
        i = 0
        while i < n:
            j = i
            while j + 1 < n and a[order[j + 1]] == a[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    r = pearson(xs, ys)
    out: dict[str, Any] = {"n": n, "pearson": r, "spearman": pearson(ranks(xs), ranks(ys))}
    if r is not None and n >= 4 and abs(r) < 1:  # Fisher z interval
        z, se = math.atanh(r), 1 / math.sqrt(n - 3)
        out["pearson_ci95"] = [math.tanh(z - 1.96 * se), math.tanh(z + 1.96 * se)]
    return out


def run_task(cfg: Any) -> Path:
    t = cfg.task
    ckpts = list(t.ckpts or [])
    if not t.delta:
        raise UserError("task.delta=null: give a ΔW file (evaluate.py task=weight_diff writes one)")
    if not ckpts:
        raise UserError("task.ckpts=null: give a list of checkpoints (training run dirs or final.safetensors)")
    evals = list(t.evals or [])
    if evals and len(evals) != len(ckpts):
        raise UserError(f"task.evals: {len(evals)} evaluations for {len(ckpts)} checkpoints; give one per checkpoint")
    delta, meta = load_delta(str(t.delta), key="task.delta")
    from persona_lit.models.backbones import load_backbone
    from persona_lit.build import plain

    labels = list(t.labels) if t.labels else [str(c) for c in ckpts]
    if len(labels) != len(ckpts):
        raise UserError(f"task.labels: {len(labels)} labels for {len(ckpts)} checkpoints")
    behaviours = [behaviour(e, str(t.metric), int(t.turn), i) for i, e in enumerate(evals)]  # fail before loading
    base_model = load_backbone(cfg.model).model
    from persona_lit.models.backbones import fingerprint

    fp = fingerprint(base_model)
    if meta.get("fingerprint") and meta["fingerprint"] != fp:
        raise UserError(f"task.delta={t.delta}: built for another base model than model={cfg.model.name}")
    base = {k: p.detach().float().clone() for k, p in base_model.named_parameters() if k in delta}
    del base_model
    rows = []
    for i, ckpt in enumerate(ckpts):
        change, info = checkpoint_change(str(ckpt), delta, base, fp)
        row = {"ckpt": str(ckpt), "label": labels[i], **info, **project(change, delta)}
        if evals:
            row["behaviour"], row["behaviour_ci95"] = behaviours[i]
        rows.append(row)
        print(f"persona_lit: weight_projection: {labels[i]}: coefficient {row['overall']['coefficient']:.4f}, "
              f"cosine {row['overall']['cosine'] if row['overall']['cosine'] is None else round(row['overall']['cosine'], 4)}",
              flush=True)
    pairs = [(r["overall"]["coefficient"], r["behaviour"]) for r in rows
             if evals and r.get("behaviour") is not None and r["overall"]["coefficient"] is not None]
    corr = correlation([p[0] for p in pairs], [p[1] for p in pairs]) if evals else None
    results = {"delta": str(t.delta), "metric": str(t.metric), "turn": int(t.turn), "rows": rows,
               "correlation": corr, "config": plain(cfg.task)}
    out_dir = Path(cfg.out_dir)
    with staged_dir(out_dir) as tmp:
        (tmp / "results.json").write_text(json.dumps(results, indent=1))
        (tmp / "report.md").write_text(report(results))
        plot(tmp / "projection.png", results)
    print(report(results))
    print(f"persona_lit: weight projection written to {out_dir} (report.md, results.json, projection.png)")
    return out_dir


def _f(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def report(results: dict[str, Any]) -> str:
    lines = [f"# Weight projection on ΔW ({results['delta']})", "",
             "coefficient = <ΔW_ckpt, ΔW> / ||ΔW||² (the weight-steering α of the same component); cosine = "
             "<ΔW_ckpt, ΔW> / (||ΔW_ckpt|| ||ΔW||), over every module of the ΔW file.", ""]
    has_b = any("behaviour" in r for r in results["rows"])
    head = "| checkpoint | mechanism | coefficient | cosine | ||ΔW_ckpt|| |" + (
        f" {results['metric']} vs baseline, turn {results['turn']} |" if has_b else "")
    lines += [head, "|---|---|---|---|---|" + ("---|" if has_b else "")]
    for r in results["rows"]:
        o = r["overall"]
        line = f"| {r['label']} | {r['mechanism']} | {_f(o['coefficient'], 4)} | {_f(o['cosine'])} | {_f(o['change_norm'])} |"
        if has_b:
            lo, hi = (r.get("behaviour_ci95") or [None, None])
            ci = f" [{_f(lo, 2)}, {_f(hi, 2)}]" if lo is not None else ""
            line += f" {_f(r.get('behaviour'), 2)}{ci} |"
        lines.append(line)
    c = results.get("correlation")
    if c:
        lines += ["", f"Across {c['n']} checkpoints: " + (c.get("note") or (
            f"Pearson r = {_f(c['pearson'], 2)}" + (f" [{_f(c['pearson_ci95'][0], 2)}, {_f(c['pearson_ci95'][1], 2)}]"
                                                   if c.get("pearson_ci95") else " (no interval below 4)")
            + f", Spearman ρ = {_f(c['spearman'], 2)} between the coefficient and the behaviour change."))]
    lines += ["", "Per-layer coefficients and cosines: results.json (`layers`), projection.png.", ""]
    return "\n".join(lines)


def plot(path: Path, results: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = results["rows"]
    has_b = any(r.get("behaviour") is not None for r in rows)
    fig, axes = plt.subplots(1, 2 if has_b else 1, figsize=(11 if has_b else 6.5, 4.2))
    ax = axes[0] if has_b else axes
    for r in rows:
        layers = sorted(r["layers"])
        ax.plot(layers, [r["layers"][k]["cosine"] or 0.0 for k in layers], marker=".", label=r["label"])
    ax.axhline(0, color="grey", linewidth=0.8)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("cosine(ΔW_ckpt, ΔW) per layer")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    if has_b:
        bx = axes[1]
        for r in rows:
            if r.get("behaviour") is None:
                continue
            lo, hi = r.get("behaviour_ci95") or [None, None]
            yerr = [[r["behaviour"] - lo], [hi - r["behaviour"]]] if lo is not None else None
            bx.errorbar([r["overall"]["coefficient"]], [r["behaviour"]], yerr=yerr, fmt="o", capsize=3)
            bx.annotate(r["label"], (r["overall"]["coefficient"], r["behaviour"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=7)
        bx.axhline(0, color="grey", linewidth=0.8)
        bx.set_xlabel("coefficient on ΔW (overall)")
        bx.set_ylabel(f"{results['metric']} vs baseline, turn {results['turn']}")
        c = results.get("correlation") or {}
        if c.get("pearson") is not None:
            bx.set_title(f"Pearson r = {c['pearson']:.2f}, Spearman ρ = {c['spearman']:.2f} (n = {c['n']})", fontsize=9)
        bx.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
