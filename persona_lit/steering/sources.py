"""Where a direction's (instruction, question) pairs come from: `task.sources` of task=direction.

    persona:<name|file.yaml>  its system prompt vs the model's default; questions: its probe questions, then
                              the user turns of its exchanges file
    role:<name>               <assistant_axis_dir>/roles/instructions/<name>.json: each "pos" instruction vs
                              the default assistant's instruction of the same index (roles/instructions/
                              default.json; "" = the model's default system prompt, {model_name} filled in)
    trait:<name>              <assistant_axis_dir>/traits/instructions/<name>.json: "pos" vs "neg" instruction

Every question is asked under every kept instruction, on both sides: sample k of the positive side and
sample k of the negative side share their question.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from persona_lit.errors import UserError
from persona_lit.personas.load import load_persona

KINDS = ("persona", "role", "trait")


@dataclass
class Source:
    spec: str  # as given, e.g. "role:pirate"
    kind: str  # persona, role or trait
    name: str  # the persona key, role or trait name
    pos: list[tuple[str | None, str]] = field(default_factory=list)  # (system prompt or None = default, question)
    neg: list[tuple[str | None, str]] = field(default_factory=list)  # same questions, without the persona

    @property
    def slug(self) -> str:
        """The file stem of its outputs: `role-pirate`, `persona-pirate_mentor`."""
        return f"{self.kind}-{re.sub(r'[^A-Za-z0-9_.-]+', '_', self.name)}"

    def instructions(self) -> dict[str, list[str | None]]:
        """The distinct system prompts of each side, in order (stored in the direction's metadata)."""
        return {side: list(dict.fromkeys(s for s, _ in pairs)) for side, pairs in (("pos", self.pos), ("neg", self.neg))}


def _read_json(path: Path, where: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); {where}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read it ({e}); {where}") from None


def _instruction_file(path: Path, sides: tuple[str, ...], need_questions: bool) -> tuple[list[dict], list[str]]:
    """(instructions, questions) of an assistant-axis file, checked: one line naming what is wrong."""
    expected = (f"expected {{\"instruction\": [{{{', '.join(repr(s) for s in sides)}: text}}, ...]"
                + (", \"questions\": [text, ...]}" if need_questions else "}"))
    raw = _read_json(path, expected)
    if not isinstance(raw, dict) or not isinstance(raw.get("instruction"), list) or not raw["instruction"]:
        raise UserError(f"{path}: no non-empty \"instruction\" list; {expected}")
    for i, item in enumerate(raw["instruction"]):
        if not isinstance(item, dict) or not all(isinstance(item.get(s), str) for s in sides):
            raise UserError(f"{path}: instruction[{i}] lacks a {' or '.join(repr(s) for s in sides)} string; {expected}")
    questions = raw.get("questions")
    if need_questions and (not isinstance(questions, list) or not questions
                           or not all(isinstance(q, str) and q.strip() for q in questions)):
        raise UserError(f"{path}: \"questions\" must be a non-empty list of non-empty strings; {expected}")
    return raw["instruction"], list(questions or [])


def _named_file(root: Path, kind: str, name: str, key: str) -> Path:
    folder = root / f"{kind}s" / "instructions"
    if not folder.is_dir():
        raise UserError(f"task.assistant_axis_dir={root}: no {kind}s/instructions folder there "
                        f"(the assistant-axis data: roles/instructions/*.json, traits/instructions/*.json)")
    path = folder / f"{name}.json"
    if "/" in name or not name or not path.is_file() or (kind == "role" and name == "default"):
        raise UserError(f"{key}={kind}:{name}: no {kind} {name!r}; allowed: the file names in {folder} "
                        f"(list them with `ls {folder}`)")
    return path


def _default_instructions(root: Path, model_name: str) -> list[str | None]:
    path = root / "roles" / "instructions" / "default.json"
    if not path.is_file():
        raise UserError(f"task.assistant_axis_dir={root}: roles/instructions/default.json (the default "
                        f"assistant's instructions, the negative side of every role) is missing")
    items, _ = _instruction_file(path, ("pos",), need_questions=False)
    return [item["pos"].replace("{model_name}", model_name) or None for item in items]


def exchange_questions(path: Path) -> list[str]:
    """The user turns of a persona's exchanges file (chat `messages` JSONL)."""
    if not path.is_file():
        raise UserError(f"{path}: the persona's exchanges file is missing")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            messages = json.loads(line)["messages"]
            out += [m["content"] for m in messages if m["role"] == "user"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{path}:{n}: expected {{\"messages\": [{{\"role\": ..., \"content\": ...}}]}}") from None
    return out


def _paired(pos: list[str | None], neg: list[str | None], questions: list[str]) -> tuple[list, list]:
    return ([(s, q) for s in pos for q in questions], [(s, q) for s in neg for q in questions])


def parse_source(spec: str, index: int, root: Path, model_name: str, instructions: int, questions: int) -> Source:
    """One entry of task.sources, with at most `instructions` instructions and `questions` questions."""
    key = f"task.sources[{index}]"
    kind, sep, name = str(spec).partition(":")
    if not sep or kind not in KINDS or not name.strip():
        raise UserError(f"{key}={spec!r}: expected persona:<name or file.yaml>, role:<name> or trait:<name>")
    name = name.strip()
    if kind == "persona":
        persona = load_persona(name)
        asked = [p.question for p in persona.probes]
        if persona.exchanges_path is not None:
            asked += exchange_questions(Path(persona.exchanges_path))
        asked = list(dict.fromkeys(q for q in asked if q.strip()))[:questions]
        if not asked:
            raise UserError(f"{key}={spec}: persona {persona.name!r} has no probe questions and no exchanges")
        pos, neg = _paired([persona.system_prompt], [None], asked)
        return Source(str(spec), kind, persona.key, pos, neg)
    path = _named_file(root, kind, name, key)
    sides = ("pos",) if kind == "role" else ("pos", "neg")
    items, asked = _instruction_file(path, sides, need_questions=True)
    items, asked = items[:instructions], asked[:questions]
    if kind == "role":
        defaults = _default_instructions(root, model_name)
        if len(defaults) < len(items):
            raise UserError(f"{root / 'roles/instructions/default.json'}: {len(defaults)} default instructions, "
                            f"fewer than the {len(items)} instructions of {path.name} used here")
        pos, neg = _paired([i["pos"] for i in items], defaults[: len(items)], asked)
    else:
        pos, neg = _paired([i["pos"] for i in items], [i["neg"] for i in items], asked)
    return Source(str(spec), kind, name, pos, neg)


def parse_sources(specs: Any, root: str | Path, model_name: str, instructions: int, questions: int) -> list[Source]:
    """Every entry of task.sources, checked before any model loads (bad names and files fail here)."""
    if isinstance(specs, str) or not specs:
        raise UserError(f"task.sources={specs!r}: expected a non-empty list, e.g. [role:pirate,trait:optimistic]")
    for key, value in (("task.instructions", instructions), ("task.questions", questions)):
        if not isinstance(value, int) or value < 1:
            raise UserError(f"{key}={value!r}: must be an integer >= 1")
    out = [parse_source(s, i, Path(root).expanduser(), model_name, instructions, questions)
           for i, s in enumerate(specs)]
    seen: dict[str, str] = {}
    for s in out:
        if s.slug in seen:
            raise UserError(f"task.sources: {seen[s.slug]!r} and {s.spec!r} are the same source ({s.slug})")
        seen[s.slug] = s.spec
    return out
