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
     type of keys whose default says nothing (null, []), in persona_lit/config/schema.py; a mechanism's options
     are typed, ranged and defaulted by its dataclass (persona_lit/config/mechanisms.py), Hydra's schema of its
     conf/mechanism/ file.

`experiment=NAME` (conf/experiment/NAME.yaml, `# @package _global_`) is a bundle of overrides. Its second line
`# entry: train` or `# entry: evaluate` names the entry point it is for; the other one refuses it in one line. The
schema comes from the config composed WITHOUT the bundle (but with the group choices it makes), so every key a
bundle sets must exist there and its value is checked like a command-line value (errors say `from experiment=NAME`).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from persona_lit.config.overrides import (CONF_DIR, HELP_FLAGS, OTHER_CONFIG_FLAGS, Given, Skip, bundle_values,
                                         check_groups, compose_base, compose_config, first_value, group_choices,
                                         groups_of, parse, split_flags, suggest)
from persona_lit.config.mechanisms import OPTIONS, schema_node
from persona_lit.config.schema import ADDABLE, LIMITS, OPEN, Spec, schema, spec_for
from persona_lit.errors import UserError

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
        if group == "mechanism" and choice in OPTIONS:  # its options: the schema's dataclass (config/mechanisms.py)
            raw = OmegaConf.to_container(OmegaConf.merge(schema_node(choice), raw))
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
    close = suggest(parts[depth], _keys(node, top=depth == 0).split(", ")) if isinstance(node, dict) else ""
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
    overrides, flags = split_flags(argv)
    if flags & (HELP_FLAGS | OTHER_CONFIG_FLAGS):
        return None
    multirun = bool(flags & {"-m", "--multirun"})
    try:
        given = parse(overrides, multirun)
    except Skip:
        return None
    check_groups(given, conf_dir, config)
    first = [first_value(g) for g in given]
    group_overrides = [f for f, g in zip(first, given) if "." not in g.key and "=" in f
                       and ((conf_dir / g.key.split("@")[0]).is_dir() or "/" in g.key)]
    try:
        chosen_cfg = compose_base(conf_dir, config, tuple(group_overrides))
    except UserError:  # Hydra's schema refused a bundle's key: say which bundle key, and where it belongs
        _explain_bundle(conf_dir, config, group_overrides)
        raise
    choices = dict(chosen_cfg.hydra.runtime.choices)
    base_cfg, origins = chosen_cfg, {}
    experiment = choices.get("experiment") if "experiment" in groups_of(conf_dir, config) else None
    if experiment:  # the schema and the known keys come from the config without the bundle, with its group choices
        groups = [g for g in groups_of(conf_dir, config) if g != "experiment"]
        plain_groups = [o for o in group_overrides if o.lstrip("+~").split("=")[0].split("@")[0] not in groups
                        and not o.startswith("experiment=")]
        chosen = [f"{g}={choices[g]}" for g in groups if choices.get(g) is not None]
        base_cfg = compose_base(conf_dir, config, tuple(plain_groups + chosen))
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


def _explain_bundle(conf_dir: Path, config: str, group_overrides: list[str]) -> None:
    """Where an experiment bundle cannot compose (a key of its own group choice under another one the command line
    made: Hydra's typed schemas refuse it), the bundle's key check against the command line's choices gives the
    one line that names the key and the choices that have it. Returns where that finds nothing."""
    bundle = [o.split("=", 1)[1] for o in group_overrides if o.startswith("experiment=")]
    if not bundle or "experiment" not in groups_of(conf_dir, config):
        return
    others = tuple(o for o in group_overrides if not o.startswith("experiment="))
    base = compose_base(conf_dir, config, others)
    tree = {**_plain(_user_part(base), resolve=False), "hydra": OmegaConf.to_container(base.hydra, resolve=False)}
    check_bundle_keys(bundle_values(conf_dir, "experiment", bundle[0]), tree, conf_dir,
                      dict(base.hydra.runtime.choices), f"experiment={bundle[0]}")


def schema_of(cfg: DictConfig, config: str) -> dict[str, Spec]:
    """The schema of a config composed with return_hydra_config=True (e.g. check_cli's result)."""
    return schema(_resolved_defaults(_user_part(cfg)), config, dict(cfg.hydra.runtime.choices))


def _resolved_defaults(cfg: DictConfig) -> dict:
    """The defaults as plain values; an interpolation that does not resolve keeps its text (typed str)."""
    try:
        return OmegaConf.to_container(cfg, resolve=True)
    except Exception:  # noqa: BLE001
        return OmegaConf.to_container(cfg, resolve=False)
