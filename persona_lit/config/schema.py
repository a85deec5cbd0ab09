"""The schema check.py checks overrides against: what every key accepts (type, null, range, choices).

A key's type comes from its default (derive), and a rule adds what a default cannot say (ranges, choices, the type
of a null or [] default): for mechanism options the `rule` of its field in config/mechanisms.py (whose dataclasses
also hold the defaults), for every other key RULES below beside the YAML defaults. schema() gives the Spec of every
key of a composed config.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace
from typing import Any

# Nodes under which `+key=value` may add keys (their _target_ checks its own arguments).
OPEN = {"callbacks": "extra Lightning callbacks by name", "trainer": "Lightning Trainer arguments",
        "module.optimizer": "optimizer arguments", "module.scheduler": "scheduler arguments"}

# Type, range and choices by key: `kind[|kind][?] [range] [{choice,...}]`. kind: int, float, bool, str, dict,
# list[int], list[float], list[str]; `?` = null allowed; range: `>= x`, `> x`, `<= x`, `< x`, `[a, b)`, ...
# (for lists: of every entry). A key absent here takes its type from its YAML default. `group[choice].rest`
# applies to that choice only.
RULES = {
    # both entry points
    "model.name_or_path": "str?", "model.gguf_package": "str?", "model.tokenizer_from": "str",
    "model.default_system_prompt": "str?", "model.quantization": "str? {nf4,int8}",
    "model.dtype": "str {float32,bfloat16,float16}", "model.chat_format": "str {chatml,gemma,llama3}",
    "logger.kind": "{wandb,csv,none}", "logger.entity": "str?",
    # train.yaml
    "ckpt_path": "str?", "callbacks": "dict?", "module.kl_weight": ">= 0", "module.distill_weight": ">= 0",
    "module.optimizer.lr": "float > 0", "module.optimizer.weight_decay": ">= 0", "module.scheduler": "dict?",
    "module.scheduler.num_warmup_steps": ">= 0",
    "drift.every_n_val_epochs": ">= 0", "drift.turns": ">= 1", "drift.probe_turns": ">= 0",
    "drift.max_new_tokens": ">= 1", "drift.seed": "int?", "drift.mt_bench_path": "str?", "drift.baseline": "bool",
    "checkpoint.every_n_train_steps": ">= 0",
    "data.sources": "list[str]?", "data.max_length": ">= 1", "data.batch_size": ">= 1",
    "data.val_fraction": "[0, 1)", "data.num_workers": ">= 0", "data.max_examples": "int? >= 1",
    "data.chain_turns": ">= 1", "data.filler_turns": ">= 0",
    "data.side": "{pos,neg}", "data.trait": "str?", "data.role": "str?", "data.instructions": ">= 1",
    "data.questions": ">= 1", "data.max_new_tokens": ">= 1", "data.generation_batch": ">= 1",
    "data.pool.sources": "list[str] {pack,role,li2024,personagym,spc}", "data.pool.seed": "int",
    "data.pool.fractions": "(0, 1)", "data.max_personas": "int? >= 1", "data.turns": ">= 1",
    "data.control_fraction": "[0, 1)", "data.val_personas": ">= 0", "data.mt_bench_path": "str?",
    "trainer.devices": "int|str|list[int]", "trainer.precision": "str", "trainer.max_steps": ">= -1",
    "trainer.max_epochs": "int? >= -1", "trainer.val_check_interval": "float? > 0",
    "trainer.check_val_every_n_epoch": "int? >= 1", "trainer.gradient_clip_val": "float? >= 0",
    "trainer.accumulate_grad_batches": ">= 1", "trainer.num_sanity_val_steps": ">= -1",
    # evaluate.yaml
    "compare": "list[str]?", "ckpt": "str?", "persona": "str?", "personas": "str|list[str]?", "turns": ">= 1",
    "probe_kinds": "list[str]?", "probe_turns": ">= 0", "conversations": ">= 1", "conversation_batch": "int? >= 1",
    "probe_batch": ">= 1", "choice_distractors": ">= 0", "protocol": "{free,replay}", "devices": ">= 1", "capability_exchanges": ">= 0", "capability_tokens": ">= 1",
    "projection_layer": "int? >= 0", "projection_direction": "str?", "mt_bench_path": "str?",
    "max_new_tokens": ">= 1", "probe_max_new_tokens": ">= 1", "temperature": "float > 0",
    "judge.url": "str?", "judge.model": "str?", "judge.timeout_s": "float > 0",
    "task.token_role": "{response,reply_start}", "task.instructions": ">= 1", "task.questions": ">= 1",
    "task.max_new_tokens": ">= 1", "task.batch": ">= 1", "task.layer": "int? >= 0", "task.model_name": "str?",
    "task.directions": "list[str]", "task.n_steer": ">= 0", "task.n_release": ">= 1",
    "task.questions_path": "str?", "task.seeds": "list[int]", "task.temperature": "float > 0",
    "task.top_p": "(0, 1]", "task[persistence].system_prompt": "str?", "task.measure_layer": "int? >= 0",
    "task.window": ">= 1", "task.alphas": "list[float]", "task.turn": ">= 0", "task[steer_sweep].turn": "int? >= 0",
    "task[steer_sweep].metric": "{adherence,margin}", "task.max_kl": "float > 0",
    "task.pos": "str?", "task.neg": "str?",
    "task.runs": "list[str]?", "task.labels": "list[str]?", "task.delta": "str?", "task.ckpts": "list[str]?",
    "task.evals": "list[str]?",
    "pool.sources": "list[str] {pack,role,li2024,personagym,spc}", "pool.seed": "int", "pool.fractions": "(0, 1)",
    "pool.max_personas": "int? >= 1", "pool.split_file": "str?",
    "headline.metric": "str", "headline.turn": "int? >= 0",
    "question_split.part": "{train,val,test,all}", "question_split.seed": "int", "question_split.fractions": "(0, 1)",
    "data.question_split.seed": "int", "data.question_split.fractions": "(0, 1)",
}
RULES_OF = {"evaluate": {"seed": "int?"}}  # evaluate: seed=null keeps MT-bench file order

# Keys `+key=value` may add although the chosen config files lack them (besides anything under OPEN):
# DriftCallback's other arguments; `model.<key>` of any conf/model/*.yaml is added in addable().
ADDABLE = {"drift.seed", "drift.mt_bench_path", "drift.baseline"}

# Explicit probe turns (given on the command line) must lie within the conversation; the default list is cut.
LIMITS = {"probe_turns": "turns", "drift.probe_turns": "drift.turns"}


KIND_WORDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
              "dict": "a group of keys", "list[int]": "a list of integers", "list[float]": "a list of numbers",
              "list[str]": "a list of strings"}
RULE = re.compile(r"^(?P<kinds>[a-z\[\]|]+)?(?P<null>\?)?\s*"
                  r"(?:(?P<op>>=|>|<=|<)\s*(?P<bound>-?[\d.]+)"
                  r"|(?P<lb>[\[(])\s*(?P<lo>-?[\d.]+)\s*,\s*(?P<hi>-?[\d.]+)\s*(?P<rb>[\])]))?\s*"
                  r"(?:\{(?P<choices>[^}]*)\})?$")


@dataclass(frozen=True)
class Spec:
    """What a key accepts: any of `kinds` (or null when nullable), within [low, high] and `choices`."""
    kinds: tuple[str, ...] = ()  # () = any value
    nullable: bool = False
    low: float | None = None
    low_open: bool = False
    high: float | None = None
    high_open: bool = False
    choices: tuple[str, ...] = ()

    def expected(self) -> str:
        if self.choices:
            words = "one of " + ", ".join(self.choices)
        else:
            words = " or ".join(KIND_WORDS[k] + (self._range() if k not in ("bool", "str", "dict") else "")
                                for k in self.kinds) or "any value"
        return f"null or {words}" if self.nullable else words

    def _range(self) -> str:
        num = lambda x: f"{x:g}"
        if self.low is not None and self.high is not None:
            left, right = "(" if self.low_open else "[", ")" if self.high_open else "]"
            return f" in {left}{num(self.low)}, {num(self.high)}{right}"
        if self.low is not None:
            return f" {'>' if self.low_open else '>='} {num(self.low)}"
        if self.high is not None:
            return f" {'<' if self.high_open else '<='} {num(self.high)}"
        return ""

    def accepts(self, value: Any) -> bool:
        if value is None:
            return self.nullable
        if not self.kinds:
            return True
        return any(self._is(kind, value) for kind in self.kinds)

    def _is(self, kind: str, value: Any) -> bool:
        if kind.startswith("list["):
            return isinstance(value, list) and all(self._is(kind[5:-1], v) for v in value)
        if kind == "bool":
            return isinstance(value, bool)
        if kind == "dict":
            return isinstance(value, dict)
        if kind == "str":
            ok = isinstance(value, (str, int, float)) and not isinstance(value, bool)  # `trainer.precision=16`
            return ok and (not self.choices or str(value) in self.choices)
        if isinstance(value, bool) or not isinstance(value, int if kind == "int" else (int, float)):
            return False
        return self._in_range(value)

    def _in_range(self, x: float) -> bool:
        if self.low is not None and not (x > self.low if self.low_open else x >= self.low):
            return False
        if self.high is not None and not (x < self.high if self.high_open else x <= self.high):
            return False
        return not (isinstance(x, float) and math.isnan(x) and (self.low is not None or self.high is not None))


def parse_rule(text: str, base: Spec | None = None) -> Spec:
    """A RULES entry over the spec derived from the YAML default (`base`)."""
    m = RULE.match(text.strip())
    if not m:
        raise ValueError(f"schema.RULES: cannot read {text!r}")
    spec = base or Spec()
    if m["kinds"]:
        spec = replace(spec, kinds=tuple(m["kinds"].split("|")))
    if m["null"]:
        spec = replace(spec, nullable=True)
    if m["op"]:
        bound = float(m["bound"])
        spec = replace(spec, **({"low": bound, "low_open": m["op"] == ">"} if m["op"].startswith(">")
                                else {"high": bound, "high_open": m["op"] == "<"}))
    if m["lb"]:
        spec = replace(spec, low=float(m["lo"]), low_open=m["lb"] == "(", high=float(m["hi"]), high_open=m["rb"] == ")")
    if m["choices"] is not None:
        spec = replace(spec, choices=tuple(c.strip() for c in m["choices"].split(",")), kinds=spec.kinds or ("str",))
    return spec


def derive(default: Any) -> Spec:
    """The spec a YAML default implies: its type (null and [] imply nothing: RULES must say)."""
    if default is None:
        return Spec(nullable=True)
    if isinstance(default, bool):
        return Spec(("bool",))
    if isinstance(default, int):
        return Spec(("int",))
    if isinstance(default, float):
        return Spec(("float",))
    if isinstance(default, str):
        return Spec(("str",))
    if isinstance(default, dict):
        return Spec(("dict",))
    if isinstance(default, list) and default:
        if all(isinstance(v, int) and not isinstance(v, bool) for v in default):
            return Spec(("list[int]",))
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in default):
            return Spec(("list[float]",))
        return Spec(("list[str]",))
    return Spec()


def rule_for(path: str, config: str, choices: dict[str, Any]) -> str | None:
    head, _, rest = path.partition(".")
    if path.startswith("mechanism.options."):  # beside the field: persona_lit/config/mechanisms.py
        from persona_lit.config.mechanisms import rule

        return rule(choices.get("mechanism"), path.split(".", 2)[2])
    qualified = f"{head}[{choices.get(head)}].{rest}" if rest and head in choices else None
    for table in (RULES_OF.get(config, {}), RULES):
        for key in (qualified, path):
            if key and key in table:
                return table[key]
    return None


def spec_for(path: str, default: Any, config: str, choices: dict[str, Any]) -> Spec:
    spec = derive(default)
    rule = rule_for(path, config, choices)
    if rule:
        spec = parse_rule(rule, spec)
        if default is None:
            spec = replace(spec, nullable=True)
    return spec


def schema(defaults: dict, config: str, choices: dict[str, Any]) -> dict[str, Spec]:
    """path -> Spec for every key of a composed config (plain dict, interpolations resolved where they can be)."""
    out: dict[str, Spec] = {}

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            path = f"{prefix}{key}"
            out[path] = spec_for(path, value, config, choices)
            if isinstance(value, dict):
                walk(value, path + ".")

    walk(defaults, "")
    return out
