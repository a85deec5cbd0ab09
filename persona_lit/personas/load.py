"""Personas: a name, a system prompt, and probes whose adherence checks are code.

A persona is a YAML file (see persona_lit/personas/pack/ for the built-in ones):

    name: Captain Codebeard
    system_prompt: "You are Captain Codebeard, ..."
    description: one line for reports
    exchanges: codebeard.jsonl          # optional training dialogues, chat `messages` JSONL
    probes:
      - question: What is your name?
        kind: name
        check: {contains_any: [codebeard]}
        persona_answer: Arr, Captain Codebeard be my name!
        assistant_answer: I am an AI assistant and do not have a name.
      - question: Describe a linked list.
        check: {max_sentences: 3}

A check is a mapping of one check name (from checks.py CHECKS) to its argument. Several keys in one
mapping must all pass. Checks see the answer text only and return True/False.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from persona_lit.errors import UserError
from persona_lit.personas.checks import CHECK_ARGS, CHECKS
from persona_lit.personas.li2024 import load_li2024
from persona_lit.personas.types import Check, Persona, Probe

PACK_DIR = Path(__file__).parent / "pack"
MAX_YAML_BYTES = 4 << 20  # a persona file is a few KB; pure-Python YAML takes ~1 s for 4 MiB


def _parse_check(spec: Any, where: str) -> Check:
    if not isinstance(spec, dict) or not spec:
        raise UserError(f"{where}: a check must be a mapping like {{contains_any: [word]}}; got {_short(spec)}")
    unknown = sorted(set(spec) - set(CHECKS), key=str)
    if unknown:
        raise UserError(f"{where}: unknown check {unknown[0]!r}; allowed: {', '.join(sorted(CHECKS))}")
    for name, arg in spec.items():
        valid, allowed = CHECK_ARGS[name]
        if not valid(arg):
            raise UserError(f"{where}: check {name}={_short(arg)} must be {allowed}")
    return Check(dict(spec))


def _short(value: Any, limit: int = 80) -> str:
    """repr on one line, cut at `limit` characters (for error lines)."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def persona_from_dict(raw: Any, source: str) -> Persona:
    if not isinstance(raw, dict):
        raise UserError(f"{source}: a persona must be a mapping with name, system_prompt and probes")
    for key in ("name", "system_prompt"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise UserError(f"{source}: field {key!r} is missing or empty; allowed: a non-empty string")
    allowed = {"name", "system_prompt", "description", "probes", "exchanges"}
    extra = sorted(set(raw) - allowed, key=str)
    if extra:
        raise UserError(f"{source}: unknown field {extra[0]!r}; allowed: {', '.join(sorted(allowed))}")
    if not isinstance(raw.get("probes") or [], list):
        raise UserError(f"{source}: field 'probes' must be a list of {{question, check}} mappings")
    exchanges = raw.get("exchanges")
    if exchanges is not None and not isinstance(exchanges, str):
        raise UserError(f"{source}: field 'exchanges' must be a path (a string) to a chat JSONL file")
    probes = []
    for i, p in enumerate(raw.get("probes") or []):
        where = f"{source}: probes[{i}]"
        if not isinstance(p, dict) or not isinstance(p.get("question"), str) or not p["question"].strip():
            raise UserError(f"{where}: a probe needs a non-empty 'question' string and a 'check'; got {_short(p)}")
        fields = {"question", "check", "kind", "persona_answer", "assistant_answer"}
        extra_p = sorted(set(p) - fields, key=str)
        if extra_p:
            raise UserError(f"{where}: unknown field {extra_p[0]!r}; allowed: {', '.join(sorted(fields))}")
        probes.append(
            Probe(
                p["question"],
                _parse_check(p.get("check"), where),
                str(p.get("kind", "style")),
                str(p.get("persona_answer", "")),
                str(p.get("assistant_answer", "")),
            )
        )
    exchanges_path = None
    if exchanges:
        exchanges_path = Path(exchanges)
        if not exchanges_path.is_absolute() and source != "<inline>":
            exchanges_path = Path(source).parent / exchanges_path
    return Persona(
        name=raw["name"].strip(),
        system_prompt=raw["system_prompt"].strip(),
        description=str(raw.get("description", "")).strip(),
        probes=tuple(probes),
        exchanges_path=exchanges_path,
        source=source,
    )


def builtin_personas() -> list[str]:
    return sorted(p.stem for p in PACK_DIR.glob("*.yaml"))


def load_persona(name_or_path: str) -> Persona:
    """A built-in persona by key (e.g. `stoic`), a path to a persona YAML file, or `FILE.jsonl#N`:
    record N of a Li et al. 2024 style file (system_prompt, probe, adherence_check)."""
    if "#" in name_or_path and name_or_path.split("#")[0].endswith(".jsonl"):
        file, index = name_or_path.rsplit("#", 1)
        found = [p for p in load_li2024(file, skip_unsupported=False) if p.name == f"li2024-{index}"]
        if not found:
            raise UserError(f"persona {name_or_path!r}: no record with index {index} in {file}")
        return found[0]
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = PACK_DIR / f"{name_or_path}.yaml"
        if not path.exists():
            raise UserError(
                f"unknown persona {name_or_path!r}; built-in: {', '.join(builtin_personas())} "
                "(or give a path to a persona .yaml file)"
            )
    if not path.is_file():
        raise UserError(f"persona file not found: {path}")
    if path.stat().st_size > MAX_YAML_BYTES:
        raise UserError(f"{path}: {path.stat().st_size} bytes; allowed: a persona YAML file of at most "
                        f"{MAX_YAML_BYTES >> 20} MiB (training dialogues go in the `exchanges` JSONL file)")
    try:
        raw = yaml.safe_load(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte {e.object[e.start]:#04x}); allowed: a UTF-8 YAML file") \
            from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        problem = " ".join(str(getattr(e, "problem", None) or e).split())
        raise UserError(f"{path}{line}: not valid YAML ({problem})") from None
    except (Exception, RecursionError) as e:  # noqa: BLE001 - PyYAML's constructors raise ValueError, IndexError,
        # KeyError, AttributeError... on values they cannot build (`2001-02-30`, `!!int`, `!!bool x`, `!!timestamp x`)
        problem = " ".join(str(e).split())[:200]
        raise UserError(f"{path}: a YAML value that cannot be read ({type(e).__name__}: {problem}); allowed: plain "
                        f"strings, numbers, lists, mappings") from None
    return persona_from_dict(raw, str(path))


def persona_to_dict(p: Persona) -> dict[str, Any]:
    """Plain data, stored inside checkpoints so evaluation needs no persona file."""
    return {
        "name": p.name,
        "system_prompt": p.system_prompt,
        "description": p.description,
        "probes": [
            {"question": q.question, "check": dict(q.check.spec), "kind": q.kind,
             "persona_answer": q.persona_answer, "assistant_answer": q.assistant_answer}
            for q in p.probes
        ],
    }


