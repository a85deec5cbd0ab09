"""The command line before Hydra runs: overrides parsed with Hydra's grammar (a comma sweep needs --multirun),
`group=choice` checked against conf/<group>/ and the entry point's groups, experiment bundles (`# entry:` line)
read, and Hydra's compose with any error as one line. check.py checks the keys and values of what this composes.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from persona_lit.errors import UserError

CONF_DIR = Path(__file__).resolve().parents[2] / "conf"

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


def split_flags(argv: list[str]) -> tuple[list[str], set[str]]:
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
                raise Skip()
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


class Skip(Exception):
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


def suggest(word: str, options) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return close[0] if close else ""


def groups_of(conf_dir: Path, config: str) -> list[str]:
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
    groups = groups_of(conf_dir, config)
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
                close = suggest(str(value), usable)
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

    from persona_lit.config.mechanisms import register

    register()
    try:
        with initialize_config_dir(str(conf_dir), version_base="1.3"):
            return compose(config, overrides=overrides, return_hydra_config=True)
    except UserError:
        raise
    except Exception as e:  # noqa: BLE001 - Hydra and OmegaConf raise several kinds; each gets one line
        raise UserError(one_line(e, overrides)) from None


@lru_cache(maxsize=32)
def compose_base(conf_dir: Path, config: str, group_overrides: tuple[str, ...]) -> DictConfig:
    """The defaults of the chosen groups (read-only: callers copy what they change)."""
    cfg = compose_config(conf_dir, config, list(group_overrides))
    OmegaConf.set_readonly(cfg, True)
    return cfg


def one_line(e: Exception, overrides: list[str]) -> str:
    lines = [l.strip().rstrip(".") for l in str(e).splitlines() if l.strip()]
    lines = [l for l in lines if "HYDRA_FULL_ERROR" not in l and not l.startswith(("full_key:", "object_type"))]
    text = "; ".join(lines[:3]) or type(e).__name__
    return text if any(o in text for o in overrides) else f"{text} (overrides: {' '.join(overrides)})"


def first_value(g: Given) -> str:
    """The override with a sweep's first value (what one job of a multirun composes)."""
    if not g.sweep:
        return g.text
    prefix = g.text.split("=", 1)[0]
    return f"{prefix}={g.raw[0]}"
