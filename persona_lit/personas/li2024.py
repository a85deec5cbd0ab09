"""The 100 system prompts of Li et al. 2024 (persona drift) as Personas, each with its one upstream probe and
its check (interpreted by li2024_checks.py, never executed).

Data: shared/data/persona_drift_li2024/hundred_system_prompts.jsonl (SOURCES.md, A6).
"""

from __future__ import annotations

import json
from pathlib import Path

from persona_lit.errors import UserError
from persona_lit.personas.li2024_checks import compile_check
from persona_lit.personas.types import Persona, Probe

_FIELDS = {"index": int, "category": str, "system_prompt": str, "probe": str, "adherence_check": str}


def load_li2024(path: str | Path, skip_unsupported: bool = True) -> list[Persona]:
    """One Persona per record: name `li2024-<index>`, description = category, one probe of kind = category.
    By default records whose check is unsupported are left out; with skip_unsupported=False they are kept
    and calling their check raises UserError (check.supported / check.unsupported say why)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Li et al. 2024 data file not found: {path}")
    personas, seen = [], set()
    for lineno, raw in enumerate(path.read_bytes().split(b"\n"), 1):
        where = f"{path}:{lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise UserError(f"{where}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                            f"allowed: UTF-8 JSONL, one record a line") from None
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError as e:
            raise UserError(f"{where}: not valid JSON ({e}); allowed: one JSON object a line") from None
        except RecursionError:
            raise UserError(f"{where}: JSON nested too deeply; allowed: one JSON object a line") from None
        for key, typ in _FIELDS.items():
            if not isinstance(rec, dict) or type(rec.get(key)) is not typ:
                raise UserError(f"{where}: field {key!r} is missing or not a {typ.__name__} "
                                f"(a record has {', '.join(_FIELDS)})")
        if rec["index"] in seen:
            raise UserError(f"{where}: duplicate index {rec['index']}")
        seen.add(rec["index"])
        try:
            check = compile_check(rec["adherence_check"])
        except UserError as e:
            raise UserError(f"{where}: adherence_check: {e}") from None
        if check.supported or not skip_unsupported:
            probe = Probe(question=rec["probe"], check=check, kind=rec["category"])  # type: ignore[arg-type]
            personas.append(Persona(name=f"li2024-{rec['index']}", system_prompt=rec["system_prompt"],
                                    description=rec["category"], probes=(probe,)))
    return personas
