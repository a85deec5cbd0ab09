"""Generated training data cached as JSONL (data=contrastive, data=persona_pool): line 1 is {"settings": ...},
every further line one record. The file name carries a digest of the settings, and a file is only reused when
its first line holds exactly the settings asked for, so other settings (another model fingerprint, other
generation settings) always make a new file and never reuse old answers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Callable

from persona_lit.errors import UserError


def cache_path(cache_dir: str | Path, stem: str, settings: dict[str, Any]) -> Path:
    """cache_dir/<stem>-<first 12 hex digits of sha256(settings)>.jsonl"""
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{stem}-{digest}.jsonl"


def read_cache(path: Path, settings: dict[str, Any], what: str, valid: Callable[[dict], bool],
               fields: str) -> list[dict[str, Any]] | None:
    """The cached records if `path` holds records made with exactly `settings`, else None (generate anew). A file
    that is not JSONL, or whose records fail `valid`, is a one-line UserError naming `what` and `fields`."""
    if not path.is_file():
        return None
    try:
        lines = path.read_bytes().decode("utf-8").split("\n")
        header = json.loads(lines[0]) if lines[0].strip() else {}
        records = [json.loads(line) for line in lines[1:] if line.strip()]
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise UserError(f"{path}: a damaged {what} cache (not UTF-8 JSONL); delete it to regenerate") from None
    if not isinstance(header, dict) or header.get("settings") != settings:
        return None
    if not all(isinstance(r, dict) and valid(r) for r in records):
        raise UserError(f"{path}: a damaged {what} cache (records lack {fields}); delete it to regenerate")
    return records


def write_cache(path: Path, settings: dict[str, Any], records: list[dict[str, Any]]) -> None:
    """Settings line, then one record a line; atomic (a killed run leaves no half-written cache)."""
    from persona_lit.outputs import staged_file

    path.parent.mkdir(parents=True, exist_ok=True)
    with staged_file(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps({"settings": settings}) + "\n")
            for r in records:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
