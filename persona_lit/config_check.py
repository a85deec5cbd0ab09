"""Every command-line override checked before Hydra runs: one `error: ...` line (exit 2, via UserError) for a
malformed override, an unknown key, a value of the wrong type or out of range.

check_cli(argv, "train" | "evaluate") composes the config with Hydra's compose API (nothing is written) and
checks, in order:
  1. syntax: each override parses (Hydra's override grammar); a comma sweep needs --multirun;
  2. groups: `group=choice` names a file of conf/<group>/ and a group of that entry point;
  3. keys: `key=value` names a key of the composed config (else: the keys that exist at that level, the
     closest one, and the other group choices that have it). `+key=value` adds a key only where the schema
     is open (OPEN: Lightning Trainer / optimizer / scheduler arguments and extra callbacks, which their
     targets check) or for the keys in ADDABLE (keys of other model configs, DriftCallback extras);
     `~key` deletes only under OPEN;
  4. types: every key of the composed config against a schema derived from the YAML defaults
     (int, float, bool, str, list[int], list[float], list[str]) plus RULES, which give ranges, choices and the
     type of keys whose default says nothing (null, []), in persona_lit/config_schema.py. Defaults live only in
     the YAML.

`experiment=NAME` (conf/experiment/NAME.yaml, `# @package _global_`) is a bundle of overrides. Its second line
`# entry: train` or `# entry: evaluate` names the entry point it is for; the other one refuses it in one line. The
schema comes from the config composed WITHOUT the bundle (but with the group choices it makes), so every key a
bundle sets must exist there and its value is checked like a command-line value (errors say `from experiment=NAME`).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from persona_lit.config_schema import ADDABLE, LIMITS, OPEN, Spec, schema, spec_for
from persona_lit.errors import UserError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

HELP_FLAGS = {"-h", "--help", "--hydra-help", "-i", "--info", "-sc", "--shell-completion", "--version"}
OTHER_CONFIG_FLAGS = {"-cn", "--config-name", "-cp", "--config-path", "-cd", "--config-dir", "--experimental-rerun"}
VALUE_FLAGS = {"-c", "--cfg", "-p", "--package"}  # flags whose next argument is their value
GRAMMAR = "https://hydra.cc/docs/advanced/override_grammar/basic/"

# --- the command line -------------------------------------------------------------------------------------------

@dataclass
class Given:
    """One parsed override."""
    text: str
    key: str
    kind: str  # change, add, force_add, delete
    values: list[Any]  # one, or a sweep's elements
    raw: list[str]  # the values as typed
    sweep: bool = False


def _split_flags(argv: list[str]) -> tuple[list[str], set[str]]:
    overrides, flags, skip = [], set(), False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg.startswith("-") and not arg.startswith("~"):
            name = arg.split("=", 1)[0]
            flags.add(name)
            skip = name in VALUE_FLAGS | OTHER_CONFIG_FLAGS and "=" not in arg
            continue
        if arg.strip():
            overrides.append(arg)
    return overrides, flags


def parse(overrides: list[str], multirun: bool) -> list[Given]:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.core.override_parser.types import OverrideType, ValueType
    from hydra.errors import HydraException

    parser = OverridesParser.create()
    kinds = {OverrideType.CHANGE: "change", OverrideType.ADD: "add", OverrideType.FORCE_ADD: "force_add",
             OverrideType.DEL: "delete"}
    out = []
    for text in overrides:
        try:
            o = parser.parse_override(text)
        except HydraException as e:  # OverrideParseException, or a HydraException from the grammar's listener
            reason = str(e).splitlines()[0].strip()
            raise UserError(f"cannot parse the override {text}: {reason} (quote it for the shell, e.g. "
                            f"\"probe_turns=[0,1,4]\"; grammar: {GRAMMAR})") from None
        key = o.key_or_group + (f"@{o.package}" if o.package else "")
        raw_value = text.split("=", 1)[1] if "=" in text else ""
        if o.is_sweep_override():
            if o.value_type == ValueType.GLOB_CHOICE_SWEEP:
                raise _Skip()
            if not multirun:
                raise UserError(f"{text}: a comma-separated value is a sweep and needs --multirun; a list is "
                                f"{o.key_or_group}=[{raw_value}], a string is {o.key_or_group}='{raw_value}'")
            values = list(o.sweep_iterator())
            raw = [str(v) for v in o.sweep_string_iterator()]
            out.append(Given(text, key, kinds[o.type], values, raw, sweep=True))
        else:
            value = o.value() if o.type != OverrideType.DEL else None
            out.append(Given(text, key, kinds[o.type], [value], [raw_value]))
    return out


class _Skip(Exception):
    """An override this pass cannot judge (glob sweeps): leave the whole command line to Hydra."""


def group_choices(conf_dir: Path, group: str) -> list[str]:
    return sorted(p.stem for p in (conf_dir / group).glob("*.yaml"))


ENTRY_LINE = re.compile(r"^#\s*entry:\s*(?P<entries>[\w, ]+?)\s*$")


def bundle_entries(conf_dir: Path, group: str, choice: str) -> tuple[str, ...] | None:
    """The entry points a group file declares in its header comments (`# entry: evaluate`, or
    `# entry: train, evaluate`); None when it declares none (then both may compose it)."""
    for line in (conf_dir / group / f"{choice}.yaml").read_text().splitlines():
        if not line.startswith("#"):
            break
        m = ENTRY_LINE.match(line.strip())
        if m:
            return tuple(e for e in re.split(r"[,\s]+", m["entries"]) if e)
    return None


def bundle_values(conf_dir: Path, group: str, choice: str) -> dict:
    """A bundle's own keys (without its defaults list), as written in its file."""
    raw = OmegaConf.to_container(OmegaConf.load(conf_dir / group / f"{choice}.yaml"), resolve=False) or {}
    raw.pop("defaults", None)
    return raw


def _suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return close[0] if close else ""


def _groups_of(conf_dir: Path, config: str) -> list[str]:
    """The config groups in the entry point's defaults list."""
    raw = OmegaConf.to_container(OmegaConf.load(conf_dir / f"{config}.yaml"))
    out = []
    for entry in raw.get("defaults", []):
        if isinstance(entry, dict):
            (name, _), = entry.items()
            if not name.startswith(("override ", "hydra/")):
                out.append(name.split("@")[0])
    return out


def _null_groups(conf_dir: Path, config: str) -> set[str]:
    """The groups whose default is null (`- experiment: null`): off unless chosen on the command line."""
    raw = OmegaConf.to_container(OmegaConf.load(conf_dir / f"{config}.yaml"))
    return {name.split("@")[0] for entry in raw.get("defaults", []) if isinstance(entry, dict)
            for name, value in entry.items() if value is None and not name.startswith(("override ", "hydra/"))}


def check_groups(given: list[Given], conf_dir: Path, config: str) -> None:
    groups = _groups_of(conf_dir, config)
    nullable = _null_groups(conf_dir, config)
    for g in given:
        name = g.key.split("@")[0]
        if "." in name or "/" in name or not (conf_dir / name).is_dir():
            continue
        if name not in groups:
            raise UserError(f"{g.text}: {config}.py has no {name} group (groups: {', '.join(sorted(groups))})")
        if g.kind == "delete":
            raise UserError(f"{g.text}: the {name} group cannot be removed; choose one of "
                            f"{', '.join(group_choices(conf_dir, name))}")
        if g.kind == "add":
            raise UserError(f"{g.text}: {name} is already in {config}.py's defaults; drop the +")
        for value in g.values:
            choices = group_choices(conf_dir, name)
            if value is None and name in nullable:
                raise UserError(f"{g.text}: {name} is off unless chosen (leave {g.text} out); allowed: "
                                f"{', '.join(choices)}")
            if value is None:
                raise UserError(f"{g.text}: the {name} group needs a choice; allowed: {', '.join(choices)}")
            if str(value) not in choices:
                usable = [c for c in choices if config in (bundle_entries(conf_dir, name, c) or (config,))]
                close = _suggest(str(value), usable)
                raise UserError(f"unknown {name} {str(value)!r}; allowed: {', '.join(usable)}"
                                + (f"; did you mean {close}?" if close else ""))
            entries = bundle_entries(conf_dir, name, str(value))
            if entries is not None and config not in entries:
                usage = " or ".join(f"python {e}.py {name}={value}" for e in entries)
                raise UserError(f"{name}={value} is a bundle for {' and '.join(f'{e}.py' for e in entries)}, "
                                f"not {config}.py ({usage})")


def compose_config(conf_dir: Path, config: str, overrides: list[str]) -> DictConfig:
    """Hydra's compose (nothing is written); any composition error becomes one line."""
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(str(conf_dir), version_base="1.3"):
            return compose(config, overrides=overrides, return_hydra_config=True)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - Hydra and OmegaConf raise several kinds; each gets one line
        raise UserError(one_line(e, overrides)) from None


@lru_cache(maxsize=32)
def _compose_base(conf_dir: Path, config: str, group_overrides: tuple[str, ...]) -> DictConfig:
    """The defaults of the chosen groups (read-only: callers copy what they change)."""
    cfg = compose_config(conf_dir, config, list(group_overrides))
    OmegaConf.set_readonly(cfg, True)
    return cfg


def one_line(e: Exception, overrides: list[str]) -> str:
    lines = [l.strip().rstrip(".") for l in str(e).splitlines() if l.strip()]
    lines = [l for l in lines if "HYDRA_FULL_ERROR" not in l and not l.startswith(("full_key:", "object_type"))]
    text = "; ".join(lines[:3]) or type(e).__name__
    return text if any(o in text for o in overrides) else f"{text} (overrides: {' '.join(overrides)})"


def _user_part(cfg: DictConfig) -> DictConfig:
    return OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])


def _plain(cfg: DictConfig, resolve: bool, given: dict[str, Given] | None = None) -> dict:
    try:
        return OmegaConf.to_container(cfg, resolve=resolve)
    except Exception as e:  # noqa: BLE001 - an interpolation that does not resolve
        key = getattr(e, "full_key", None) or "?"
        g = (given or {}).get(key)
        raise UserError(f"{g.text if g else key}: cannot resolve ({str(e).splitlines()[0]})") from None


def _node_at(plain: Any, parts: list[str]) -> tuple[bool, Any, int]:
    """(found, node, depth reached) walking a plain container."""
    node = plain
    for i, part in enumerate(parts):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return False, node, i
    return True, node, len(parts)


def _keys(node: Any, top: bool = False) -> str:
    keys = sorted(k for k in node if not str(k).startswith("_") and not (top and k == "hydra")) \
        if isinstance(node, dict) else []
    return ", ".join(keys) or "no keys"


def _in_open(parts: list[str]) -> str | None:
    for i in range(1, len(parts)):
        if ".".join(parts[:i]) in OPEN:
            return ".".join(parts[:i])
    return None


@lru_cache(maxsize=8)
def _group_files(conf_dir: Path, group: str) -> dict[str, dict]:
    out = {}
    for choice in group_choices(conf_dir, group):
        raw = OmegaConf.to_container(OmegaConf.load(conf_dir / group / f"{choice}.yaml"))
        raw.pop("defaults", None)
        out[choice] = raw
    return out


def _elsewhere(conf_dir: Path, parts: list[str], chosen: Any) -> list[str]:
    """The other choices of the key's group whose file has this key."""
    if not (conf_dir / parts[0]).is_dir() or len(parts) < 2:
        return []
    return [c for c, raw in _group_files(conf_dir, parts[0]).items()
            if c != chosen and _node_at(raw, parts[1:])[0]]


def addable(conf_dir: Path) -> set[str]:
    return ADDABLE | {f"model.{k}" for raw in _group_files(conf_dir, "model").values() for k in raw}


def check_keys(given: list[Given], base: dict, conf_dir: Path, config: str, choices: dict[str, Any]) -> None:
    """Every `key=value` names an existing key; `+key` adds only where the schema allows it; `~key` only under OPEN."""
    where = (f"+ adds keys only under {', '.join(sorted(OPEN))}, model keys of other model configs and "
             f"{', '.join(sorted(ADDABLE))}")
    for g in given:
        key = g.key
        if "@" in key or "/" in key or (conf_dir / key).is_dir():
            continue  # groups (check_groups), Hydra's own groups and packages (compose checks them)
        parts = key.split(".")
        found, node, depth = _node_at(base, parts)
        if parts[0] == "hydra":  # Hydra's own keys: a plain typo here; anything else is left to compose
            if not found and g.kind == "change" and isinstance(node, dict) and node and depth == len(parts) - 1:
                raise UserError(_unknown(key, parts, node, depth, conf_dir, choices))
            continue
        if g.kind == "add" and found:
            raise UserError(f"{g.text}: {key} already exists; drop the + ({g.text.lstrip('+')})")
        if g.kind == "delete":
            if not found:
                raise UserError(_unknown(key, parts, node, depth, conf_dir, choices))
            if not _in_open(parts):
                raise UserError(f"{g.text}: {key} cannot be deleted (only keys under {', '.join(sorted(OPEN))}); "
                                f"set it instead")
            continue
        if found:
            if isinstance(node, dict) and any(v is not None and not isinstance(v, dict) for v in g.values):
                raise UserError(f"{g.text}: {key} is a group of keys ({key}: {_keys(node)}); set one of them, "
                                f"e.g. {key}.{next(iter(node), 'x')}=...")
            for value in g.values:  # a dict value: its keys must exist too
                if isinstance(value, dict) and isinstance(node, dict):
                    for sub in value:
                        if sub not in node and not (key in OPEN or _in_open(parts + [str(sub)])):
                            raise UserError(_unknown(f"{key}.{sub}", parts + [str(sub)], node, len(parts),
                                                     conf_dir, choices))
            continue
        if depth < len(parts) - 1 and not (isinstance(node, dict)):
            raise UserError(f"{g.text}: {'.'.join(parts[:depth])} is a value, not a group of keys")
        if g.kind in ("add", "force_add") and (_in_open(parts) or key in addable(conf_dir)):
            continue
        message = _unknown(key, parts, node, depth, conf_dir, choices)
        if g.kind in ("add", "force_add"):
            message = f"{g.text}: cannot add {key} {message.removeprefix('unknown key ' + key + ' ')}; {where}"
        raise UserError(message)


def check_bundle_keys(bundle: dict, tree: dict, conf_dir: Path, choices: dict[str, Any], origin: str) -> dict[str, str]:
    """Every key a bundle sets names a key of the config composed without it (or lies under OPEN, or is an
    ADDABLE / other-model key); returns {path: origin} for the keys it sets (an added key: its whole value)."""
    out: dict[str, str] = {}
    extra = addable(conf_dir)

    def walk(node: dict, prefix: list[str]) -> None:
        for key, value in node.items():
            parts = prefix + [str(key)]
            path = ".".join(parts)
            found, base, depth = _node_at(tree, parts)
            if not found:
                if _in_open(parts) or path in extra:
                    out[path] = origin
                    continue
                if depth < len(parts) - 1 and not isinstance(base, dict):
                    raise UserError(f"{origin}: {'.'.join(parts[:depth])} is a value, not a group of keys "
                                    f"(the bundle sets {path})")
                raise UserError(f"{origin}: {_unknown(path, parts, base, depth, conf_dir, choices)}")
            if isinstance(value, dict) and isinstance(base, dict) and value:
                walk(value, parts)
            else:
                out[path] = origin

    walk(bundle, [])
    return out


def _unknown(key: str, parts: list[str], node: Any, depth: int, conf_dir: Path, choices: dict[str, Any]) -> str:
    level = ".".join(parts[:depth]) or "top level"
    line = f"unknown key {key} ({level}: {_keys(node, top=depth == 0)})"
    close = _suggest(parts[depth], _keys(node, top=depth == 0).split(", ")) if isinstance(node, dict) else ""
    if close:
        line += f"; did you mean {'.'.join(parts[:depth] + [close])}?"
    others = _elsewhere(conf_dir, parts, choices.get(parts[0]))
    if others:
        line += f"; {key} is a key of {parts[0]}={', '.join(others)}"
        if parts[0] == "model":
            line += f" (add it here with +{key}=...)"
    return line


def shown(value: Any) -> str:
    if isinstance(value, list):
        return "[" + ",".join(shown(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def check_values(cfg: dict, specs: dict[str, Spec], given: dict[str, Given], config: str,
                 choices: dict[str, Any], conf_dir: Path, origins: dict[str, str] | None = None) -> None:
    """Every key of the composed config (plain, resolved) against its spec; then the cross-key LIMITS.
    `origins`: {path: "experiment=NAME"} for values a bundle set (named in the error line)."""
    origins = {k: v for k, v in (origins or {}).items() if k not in given}
    extra = {k: spec_for(k, _model_default(conf_dir, k), config, choices) for k in addable(conf_dir)}

    problems: list[tuple[str, str]] = []  # (path, line), in config order

    def walk(node: dict, prefix: str) -> None:
        for key, value in node.items():
            path = f"{prefix}{key}"
            spec = specs.get(path) or extra.get(path)
            if spec is None:
                continue  # added under an OPEN node: its target checks it
            g = given.get(path)
            for v, raw in zip(g.values, g.raw) if g and g.sweep else [(value, g.raw[0] if g else shown(value))]:
                if not spec.accepts(v):
                    hint = f" (the interpolation gave the string {v!r})" \
                        if "${" in raw and isinstance(v, str) else ""
                    where = f" (from {origins[path]})" if path in origins else ""
                    problems.append((path, f"{path}={raw}{where}: expected {spec.expected()}{hint}"))
                    break
            if isinstance(value, dict):
                walk(value, path + ".")

    walk(cfg, "")
    if problems:  # a key the user gave first (`seed=null` rather than data.seed, which follows it)
        raise UserError(next((line for path, line in problems if path in given or path in origins), problems[0][1]))
    for key, limit in LIMITS.items():
        g = given.get(key)
        found, turns, _ = _node_at(cfg, limit.split("."))
        if not found or not isinstance(turns, int):
            continue
        if g:
            pairs, where = list(zip(g.values, g.raw)), ""
        elif key in origins:  # a bundle set the probe turns (a default list is cut, as without a bundle)
            value = _node_at(cfg, key.split("."))[1]
            pairs, where = [(value, shown(value))], f" (from {origins[key]})"
        else:
            continue
        for v, raw in pairs:
            beyond = [t for t in v or [] if isinstance(t, int) and t > turns]
            if beyond:
                raise UserError(f"{key}={raw}{where}: probe turn {beyond[0]} is beyond {limit}={turns}; "
                                f"expected integers in 0..{turns}")


def _model_default(conf_dir: Path, key: str) -> Any:
    if not key.startswith("model."):
        return None
    name = key.split(".", 1)[1]
    values = [raw[name] for raw in _group_files(conf_dir, "model").values() if raw.get(name) is not None]
    return values[0] if values else None


def check_cli(argv: list[str], config: str, conf_dir: Path = CONF_DIR) -> DictConfig | None:
    """Checks the overrides of `python <config>.py ARGV`; raises UserError (one line). Returns the composed
    config (None where this pass leaves the command line to Hydra: --help, another config, glob sweeps)."""
    overrides, flags = _split_flags(argv)
    if flags & (HELP_FLAGS | OTHER_CONFIG_FLAGS):
        return None
    multirun = bool(flags & {"-m", "--multirun"})
    try:
        given = parse(overrides, multirun)
    except _Skip:
        return None
    check_groups(given, conf_dir, config)
    first = [_first(g) for g in given]
    group_overrides = [f for f, g in zip(first, given) if "." not in g.key and "=" in f
                       and ((conf_dir / g.key.split("@")[0]).is_dir() or "/" in g.key)]
    chosen_cfg = _compose_base(conf_dir, config, tuple(group_overrides))
    choices = dict(chosen_cfg.hydra.runtime.choices)
    base_cfg, origins = chosen_cfg, {}
    experiment = choices.get("experiment") if "experiment" in _groups_of(conf_dir, config) else None
    if experiment:  # the schema and the known keys come from the config without the bundle, with its group choices
        groups = [g for g in _groups_of(conf_dir, config) if g != "experiment"]
        plain_groups = [o for o in group_overrides if o.lstrip("+~").split("=")[0].split("@")[0] not in groups
                        and not o.startswith("experiment=")]
        chosen = [f"{g}={choices[g]}" for g in groups if choices.get(g) is not None]
        base_cfg = _compose_base(conf_dir, config, tuple(plain_groups + chosen))
    base_user = _user_part(base_cfg)
    tree = {**_plain(base_user, resolve=False), "hydra": OmegaConf.to_container(base_cfg.hydra, resolve=False)}
    check_keys(given, tree, conf_dir, config, choices)
    if experiment:
        origins = check_bundle_keys(bundle_values(conf_dir, "experiment", experiment), tree, conf_dir, choices,
                                    f"experiment={experiment}")
    cfg = compose_config(conf_dir, config, first) if len(first) > len(group_overrides) else chosen_cfg
    by_key = {g.key: g for g in given if not (conf_dir / g.key).is_dir()}  # values, not group choices
    specs = schema(_resolved_defaults(base_user), config, choices)
    check_values(_plain(_user_part(cfg), resolve=True, given=by_key), specs, by_key, config, choices, conf_dir,
                 origins)
    return cfg


def schema_of(cfg: DictConfig, config: str) -> dict[str, Spec]:
    """The schema of a config composed with return_hydra_config=True (e.g. check_cli's result)."""
    return schema(_resolved_defaults(_user_part(cfg)), config, dict(cfg.hydra.runtime.choices))


def _first(g: Given) -> str:
    """The override with a sweep's first value (what one job of a multirun composes)."""
    if not g.sweep:
        return g.text
    prefix = g.text.split("=", 1)[0]
    return f"{prefix}={g.raw[0]}"


def _resolved_defaults(cfg: DictConfig) -> dict:
    """The defaults as plain values; an interpolation that does not resolve keeps its text (typed str)."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001
        return OmegaConf.to_container(cfg, resolve=False)
