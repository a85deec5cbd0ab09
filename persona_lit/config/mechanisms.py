"""One options dataclass per mechanism: its fields, defaults, types, ranges and documentation in one place.

Each is registered in Hydra's ConfigStore as `mechanism/<name>_schema` (register()), and conf/mechanism/<name>.yaml
lists it first in its defaults: Hydra then composes `mechanism.options` from the dataclass and refuses a value of
the wrong type or a key the dataclass does not have. The config check (check.py, run before Hydra for one-line
errors with "did you mean") reads each field's range and choices from its `rule` (schema.py's grammar:
`kind[?] [range] [{choice,...}]`). build_mechanism(name, **options) receives exactly these fields.

A field typed Any holds a union Hydra's structured configs cannot express (an int or a list of ints, a path or a
list of paths); its rule says what it accepts.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf


def opt(default: Any, rule: str | None = None, doc: str = "") -> Any:
    return field(default=default, metadata={"rule": rule, "doc": doc})


@dataclass
class NoneOptions:
    """The baseline: the persona only as the system prompt; nothing trains."""


@dataclass
class LoraOptions:
    """A PEFT LoRA persona adapter on the decoder layers' linear projections."""
    r: int = opt(16, ">= 1", "the adapter's rank")
    alpha: float = opt(32.0, "float > 0", "the LoRA scale numerator (scale = alpha / r)")
    dropout: float = opt(0.05, "[0, 1)", "dropout on the adapter's input")
    target_modules: Any = opt(None, "str|list[str]?", "module names to adapt; null = every linear projection of "
                                                      "the decoder layers")
    init_lora_weights: bool = opt(True, None, "true: B = 0 (the adapter starts as the base model)")


@dataclass
class LyraOptions:
    """Chosen layers attend to [persona ; current turn] only."""
    layers: Optional[list[int]] = opt(None, "list[int]? >= 0", "null = Gemma-3's global layers, or for Llama every "
                                                              "6th layer and the last (SmolLM2: 5, 11, 17, 23, 29)")
    train_layers: Optional[bool] = opt(None, "bool?", "the chosen layers' attention weights train: null = yes in "
                                                      "train.py, no (frozen Lyra) in evaluate.py without ckpt")
    lora_r: int = opt(0, ">= 0", "> 0 (with train_layers): a LoRA of this rank on the chosen layers trains instead")
    lora_alpha: Optional[float] = opt(None, "float? > 0", "null = 2 * lora_r")
    history_window: int = opt(0, ">= 0", "ablation: > 0 lets the chosen layers also see the last N history tokens "
                                         "(re-rotated)")


@dataclass
class TripletOptions:
    """Gated residual cross-attention to a bounded memory of earlier hidden states."""
    layers: Optional[list[int]] = opt(None, "list[int]? >= 0", "null = the original's relative depths (52/77/97%): "
                                                              "SmolLM2 15, 22, 28; Gemma-3-270M 9, 13, 16")
    linkage: float = opt(1.0, "[0, 1]", "multiplies the learnable gate; 0 = the base model bit for bit")
    gain: float = opt(1.0, None, "scales the memory signal")
    memory_tokens: int = opt(512, ">= 1", "each token reads the last N tokens before it (across turns)")


@dataclass
class SteerOptions:
    """Activation steering along a persona direction: h += alpha * activation_norm[L] * unit_L at each chosen block
    L (index L = the block's output), optionally a floor on the projection h.unit_L (activation capping)."""
    direction: Optional[str] = opt(None, "str?", "required: a direction file (.safetensors written by "
                                                 "task=direction) of this base model")
    layers: Any = opt(None, "int|list[int]? >= 0", "decoder blocks to steer, e.g. [15]; null = the middle block")
    alpha: float = opt(0.25, None, "strength in units of the layer's typical activation norm; 0 = the base model")
    positions: str = opt("all", "{all,prompt,response}", "all | prompt (persona, user turns, headers) | response")
    cap: Optional[float] = opt(None, "float?", "null, or a floor: h.unit_L lifted to >= cap * activation_norm[L]")
    history: str = opt("steered", "{steered,clean}", "steered: steered states stay in the KV cache | clean: only the "
                                                     "current turn is steered")
    train_vector: Optional[bool] = opt(None, "bool?", "a zero-initialised steer_delta per steered layer trains: "
                                                      "null = yes in train.py, no in evaluate.py without ckpt")


@dataclass
class WeightSteerOptions:
    """Weight-space persona steering: W <- W + alpha * sum_i weights[i] * dW_i, merged on attach."""
    delta: Any = opt(None, "str|list[str]?", "required: a dW file (.safetensors written by task=weight_diff) of this "
                                             "base model, or a list of them to compose")
    weights: Optional[list[float]] = opt(None, "list[float]?", "with a list of dW files: one weight each (null = 1)")
    alpha: float = opt(1.0, None, "strength: 1 = the pos adapter minus the neg adapter; 0 = the base model")
    control: Optional[str] = opt(None, "str? {random}", "null: dW itself | random: a seeded random direction per "
                                                        "tensor with that tensor's norm of dW")
    seed: int = opt(0, None, "seed of control=random")


@dataclass
class RepeatOptions:
    """The persona's system prompt re-inserted into the history before user turns k, 2k, 3k, ..."""
    every: int = opt(4, ">= 0", "k, in user turns; 0 (or more than the conversation's turns) = mechanism=none")


@dataclass
class InstaboostOptions:
    """InstABoost: a constant bias on the attention logits of the system-prompt keys at the chosen layers."""
    bias: float = opt(1.0, None, "logit bias (log of the reference code's multiplier); 0 = the base model; < 0 "
                                 "draws attention away from the system prompt (a control)")
    layers: Optional[list[int]] = opt(None, "list[int]? >= 0", "decoder layers to reweight; null = every layer")


@dataclass
class SplitSoftmaxOptions:
    """Split-softmax: the share pi of each attention row on the system-prompt keys becomes pi^exponent."""
    exponent: float = opt(0.5, "> 0", "0 < k < 1 raises the system prompt's share; 1 = the base model; > 1 lowers it")
    layers: Optional[list[int]] = opt(None, "list[int]? >= 0", "decoder layers to reweight; null = every layer")


OPTIONS: dict[str, type] = {
    "none": NoneOptions, "lora": LoraOptions, "lyra": LyraOptions, "triplet": TripletOptions,
    "steer": SteerOptions, "weight_steer": WeightSteerOptions, "repeat": RepeatOptions,
    "instaboost": InstaboostOptions, "split_softmax": SplitSoftmaxOptions,
}


def schema_node(name: str) -> DictConfig:
    """The `mechanism` node a mechanism's schema gives: its name and its options' defaults, typed."""
    return OmegaConf.create({"name": name, "options": OmegaConf.structured(OPTIONS[name])})


def register() -> None:
    """Stores every mechanism's schema in Hydra's ConfigStore (idempotent); train.py, evaluate.py and the config
    check call it before composing."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    for name in OPTIONS:
        store.store(group="mechanism", name=f"{name}_schema", node=schema_node(name))


def defaults(name: str) -> dict[str, Any]:
    """A mechanism's option defaults, plain."""
    return {f.name: f.default for f in fields(OPTIONS[name]) if f.default is not MISSING}


def rule(name: str | None, option: str) -> str | None:
    """The rule of mechanism `name`'s field `option` (None: its type says it all, or no such field)."""
    cls = OPTIONS.get(str(name))
    for f in fields(cls) if cls else ():
        if f.name == option:
            return f.metadata.get("rule")
    return None


def described(name: str) -> list[str]:
    """`--help` lines for a mechanism's options: name, default, accepted values, what it does."""
    cls = OPTIONS[name]
    out = [f"mechanism={name}: {(cls.__doc__ or '').strip().splitlines()[0]}"]
    for f in fields(cls):
        out.append(f"  mechanism.options.{f.name}={f.default!r}" + (f"  [{f.metadata['rule']}]" if f.metadata.get(
            "rule") else "") + (f"  {f.metadata['doc']}" if f.metadata.get("doc") else ""))
    return out
