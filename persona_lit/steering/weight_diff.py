"""A persona direction in weight space: ΔW from two PEFT LoRA adapters ("pos" and "neg").

Per target module, with each adapter's own PEFT scaling s = lora_alpha / r (lora_alpha / sqrt(r) with
use_rslora; rank_pattern / alpha_pattern looked up the way PEFT does, get_pattern_key):

    ΔW = s_pos · B_pos A_pos − s_neg · B_neg A_neg          (never (B_pos − B_neg)(A_pos − A_neg))

so ΔW is exactly (merged pos − base) − (merged neg − base). PEFT's key names
(`base_model.model.<module>.lora_A.weight`) are mapped to the base model's own parameter names
(`<module>.weight`) and every one is checked against model.named_parameters() and its shape: nothing
matched, anything unmatched, a shape mismatch, or two adapters on different base models or module sets
is a one-line UserError. The file is safetensors keyed by those parameter names (fp32) with metadata.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from persona_lit.errors import UserError
from persona_lit.outputs import staged_file

KEY = re.compile(r"^base_model\.model\.(.+)\.lora_([AB])\.weight$")
FORMAT = "persona_lit.weight_diff.v1"
# LoRA variants whose delta is not s·B·A on a linear weight: reject rather than compute something else.
UNSUPPORTED = ("use_dora", "fan_in_fan_out", "modules_to_save", "lora_bias", "trainable_token_indices")


def _pattern_value(patterns: dict, module: str, default):
    for key, value in (patterns or {}).items():  # PEFT's get_pattern_key: first key matching "(.*\.)?key$"
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_adapter(directory: str | Path, key: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """An adapter directory's config and, per module name, its scaled delta s·B·A (fp32)."""
    d = Path(directory)
    cfg_path, weights = d / "adapter_config.json", d / "adapter_model.safetensors"
    if not cfg_path.is_file() or not weights.is_file():
        raise UserError(f"{key}={d}: need a PEFT adapter directory with adapter_config.json and "
                        f"adapter_model.safetensors (train.py mechanism=lora exports one)")
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise UserError(f"{key}={cfg_path}: not readable JSON ({type(e).__name__}); allowed: PEFT's "
                        f"adapter_config.json") from None
    if not isinstance(config, dict):
        raise UserError(f"{key}={cfg_path}: a JSON {type(config).__name__}; allowed: PEFT's adapter_config.json "
                        f"(an object)")
    if str(config.get("peft_type", "")).upper() != "LORA":
        raise UserError(f"{key}={d}: peft_type={config.get('peft_type')!r}; allowed: LORA")
    for name in UNSUPPORTED:
        if config.get(name):
            raise UserError(f"{key}={d}: adapter_config.json {name}={config[name]!r} is not supported; allowed: "
                            f"plain LoRA on linear weights ({name} unset or false)")
    rank_ok = lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1  # noqa: E731
    alpha_ok = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    for name, ok, pattern_name, allowed in (("r", rank_ok, "rank_pattern", "an integer >= 1"),
                                             ("lora_alpha", alpha_ok, "alpha_pattern", "a finite number")):
        patterns = config.get(pattern_name) or {}
        if not ok(config.get(name)):
            raise UserError(f"{key}={cfg_path}: {name}={config.get(name)!r}; allowed: {allowed}")
        if not isinstance(patterns, dict) or not all(ok(v) for v in patterns.values()):
            raise UserError(f"{key}={cfg_path}: {pattern_name}; allowed: a mapping of module patterns to {allowed}")
        for pattern in patterns:
            try:
                re.compile(rf"(.*\.)?({pattern})$")  # as _pattern_value matches it
            except (re.error, TypeError):
                raise UserError(f"{key}={cfg_path}: {pattern_name} key {pattern!r}; allowed: a regular expression") \
                    from None
    factors: dict[str, dict[str, torch.Tensor]] = {}
    try:
        with safe_open(str(weights), framework="pt") as f:
            for name in f.keys():
                m = KEY.match(name)
                if m is None:
                    raise UserError(f"{key}={weights}: tensor {name!r} is not a LoRA factor of a linear layer; "
                                    f"allowed: base_model.model.<module>.lora_A/lora_B.weight")
                factors.setdefault(m.group(1), {})[m.group(2)] = f.get_tensor(name).float()
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input (SafetensorError, OSError...)
        raise UserError(f"{key}={weights}: not a safetensors file ({type(e).__name__}); allowed: PEFT's "
                        f"adapter_model.safetensors") from None
    if not factors:
        raise UserError(f"{key}={weights}: holds no LoRA factors")
    rslora = bool(config.get("use_rslora"))
    deltas = {}
    for module, ab in sorted(factors.items()):
        if set(ab) != {"A", "B"}:
            raise UserError(f"{key}={weights}: module {module} has lora_{''.join(ab)} but not both A and B")
        a, b = ab["A"], ab["B"]
        r = int(_pattern_value(config.get("rank_pattern"), module, config.get("r")))
        alpha = float(_pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha")))
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != r or b.shape[1] != r:
            raise UserError(f"{key}={d}: module {module} has A {tuple(a.shape)}, B {tuple(b.shape)} but r={r} "
                            f"in adapter_config.json (r / rank_pattern); allowed: A [r, in], B [out, r]")
        scale = alpha / math.sqrt(r) if rslora else alpha / r
        deltas[module] = (b.double() @ a.double() * scale).float()
        config.setdefault("_scales", {})[module] = scale
    return config, deltas


def build_delta(pos: str | Path, neg: str | Path, model: nn.Module,
                keys: tuple[str, str] = ("task.pos", "task.neg")) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """ΔW keyed by `model`'s parameter names, and the metadata to save with it; prints the match count."""
    (cpos, dpos), (cneg, dneg) = read_adapter(pos, keys[0]), read_adapter(neg, keys[1])
    bpos, bneg = cpos.get("base_model_name_or_path"), cneg.get("base_model_name_or_path")
    if (bpos or None) != (bneg or None):
        raise UserError(f"{keys[0]}={pos}, {keys[1]}={neg}: adapters of different base models ({bpos!r} vs "
                        f"{bneg!r}); allowed: two adapters of the same base model")
    if set(dpos) != set(dneg):
        odd = sorted(set(dpos) ^ set(dneg))
        raise UserError(f"{keys[0]}={pos}, {keys[1]}={neg}: the adapters target different modules ({len(odd)} "
                        f"differ, e.g. {odd[0]}); allowed: the same target_modules in both")
    params = dict(model.named_parameters())
    delta, unmatched = {}, []
    for module in sorted(dpos):
        name = f"{module}.weight"
        if name not in params:
            unmatched.append(name)
            continue
        if tuple(params[name].shape) != tuple(dpos[module].shape):
            raise UserError(f"{keys[0]}={pos}: {name} is {tuple(dpos[module].shape)} in the adapter but "
                            f"{tuple(params[name].shape)} in the model; allowed: adapters of this base model")
        delta[name] = (dpos[module] - dneg[module]).contiguous()
    print(f"persona_lit: weight_diff: {len(dpos)} modules found, {len(delta)} matched the model's parameters",
          flush=True)
    if unmatched or not delta:
        raise UserError(f"{keys[0]}={pos}: {len(unmatched)} of {len(dpos)} adapter modules match no parameter of "
                        f"this model (e.g. {unmatched[0]}); allowed: adapters trained on this base model (model=...)")
    from persona_lit.models.backbones import fingerprint

    meta = {"format": FORMAT, "pos": str(pos), "neg": str(neg), "base_model": str(bpos or ""),
            "fingerprint": fingerprint(model), "modules": str(len(delta)),
            "scales_pos": json.dumps(cpos["_scales"]), "scales_neg": json.dumps(cneg["_scales"]),
            "use_rslora": json.dumps([bool(cpos.get("use_rslora")), bool(cneg.get("use_rslora"))])}
    return delta, meta


def save_delta(path: str | Path, delta: dict[str, torch.Tensor], meta: dict[str, str]) -> Path:
    with staged_file(Path(path)) as tmp:
        save_file({k: v.float().contiguous() for k, v in delta.items()}, tmp, metadata=meta)
    return Path(path)


def load_delta(path: str | Path, key: str = "mechanism.options.delta") -> tuple[dict[str, torch.Tensor], dict]:
    p = Path(str(path))
    if not p.is_file():
        raise UserError(f"{key}={path}: no such file; allowed: a ΔW file written by task=weight_diff")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k).float() for k in f.keys()}
    except Exception as e:  # noqa: BLE001 - any unreadable file is the user's input
        raise UserError(f"{key}={path}: not a safetensors file ({type(e).__name__})") from None
    if meta.get("format") != FORMAT or not tensors:
        raise UserError(f"{key}={path}: not a ΔW file (format {meta.get('format')!r}); allowed: a file written "
                        f"by task=weight_diff")
    return tensors, meta


def random_like(delta: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The control: per tensor a random Gaussian direction scaled to that tensor's Frobenius norm of ΔW."""
    g = torch.Generator().manual_seed(int(seed))
    out = {}
    for name in sorted(delta):
        r = torch.randn(delta[name].shape, generator=g, dtype=torch.float64)
        out[name] = (r * (delta[name].double().norm() / r.norm())).float()
    return out


@contextlib.contextmanager
def merged_delta(model: nn.Module, delta: dict[str, torch.Tensor], alpha: float) -> Iterator[int]:
    """W += alpha·ΔW inside (yields the number of tensors merged), the original weights put back after
    (bit-exact: kept as copies). Every key of `delta` must be a parameter of `model`."""
    params = dict(model.named_parameters())
    missing = [k for k in delta if k not in params]
    if missing or not delta:
        raise UserError(f"ΔW: {len(missing)} of {len(delta)} tensors match no parameter of this model "
                        f"(e.g. {(missing or ['<none>'])[0]}); allowed: a ΔW file of this model")
    kept = {k: params[k].detach().clone() for k in delta}
    try:
        with torch.no_grad():
            for k, d in delta.items():
                p = params[k]
                p.copy_((kept[k].float() + alpha * d.to(p.device)).to(p.dtype))
        yield len(delta)
    finally:
        with torch.no_grad():
            for k, w in kept.items():
                params[k].copy_(w)


def run_task(cfg: Any) -> Path:
    """evaluate.py task=weight_diff task.pos=<adapter dir> task.neg=<adapter dir>: out_dir/delta.safetensors
    and out_dir/delta.json (modules, norms, scales)."""
    from persona_lit.models.backbones import load_backbone
    from persona_lit.outputs import staged_dir

    t = cfg.task
    for k in ("pos", "neg"):
        if not t.get(k):
            raise UserError(f"task.{k}={t.get(k)}: give a PEFT adapter directory (train.py mechanism=lora ...)")
    if cfg.get("ckpt"):
        raise UserError(f"ckpt={cfg.ckpt}: task=weight_diff reads a base model (model=...); drop ckpt")
    backbone = load_backbone(cfg.model)
    delta, meta = build_delta(str(t.pos), str(t.neg), backbone.model)
    out_dir = Path(cfg.out_dir)
    with staged_dir(out_dir) as tmp:
        save_delta(tmp / "delta.safetensors", delta, meta)
        summary = {**{k: v for k, v in meta.items() if not k.startswith("scales")},
                   "scales_pos": json.loads(meta["scales_pos"]), "scales_neg": json.loads(meta["scales_neg"]),
                   "norms": {k: float(v.norm()) for k, v in delta.items()}}
        (tmp / "delta.json").write_text(json.dumps(summary, indent=1))
    print(f"persona_lit: ΔW written to {out_dir / 'delta.safetensors'} ({len(delta)} tensors)", flush=True)
    return out_dir
