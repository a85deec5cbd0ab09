"""A pool of personas from every source we have (its persona-disjoint train/val/test split: split.py).

Sources (`pool.sources`), each entry with a stable key and, where its data allows a code check, probes:

- `pack:<stem>`: the built-in persona pack (persona_lit/personas/pack/*.yaml) with its own probes.
- `role:<name>`: the roles of assistant_axis/roles/instructions/<name>.json (not `default`, and not
  `assistant`, whose name a default assistant says anyway). System prompt: the first of the role's 5 `pos`
  prompts that names the role; one probe of kind `name` ("Who are you, and what is your role?", passed when
  the answer contains a word of the role's name); `questions`: the role's 40 questions (training turns).
- `li2024:<index>`: the Li et al. 2024 system prompts whose checks we support (li2024.py), each
  with its one upstream probe and check (kinds pattern, multiple_choice, memorization, persona, language).
- `personagym:<line>`: PersonaGym's 200 persona descriptions as "You are <description>. ..."; PersonaGym
  grades answers with an LLM judge and its rubrics, so its 50 situational questions are `questions`
  (training turns), not probes. The one code-checkable thing is the description itself: one probe of kind
  `identity` ("Who are you? ..."), passed when the answer contains a content word of the description (a
  keyword heuristic: CONTENT_WORDS below; words a default assistant uses to describe itself are left out).
- `spc:<n>`: the distinct Synthetic-Persona-Chat profiles (4-5 first-person facts; valid then test CSV,
  user 1 then user 2, first occurrence), as the system prompt; the same kind of `identity` keyword probe
  on the facts ("Tell me a little about yourself."). The CSVs' dialogues are not used.

Every probe from a description (role, personagym, spc) carries a persona answer built from the data and the
default assistant answer, so it also feeds the likelihood margin.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from persona_lit.errors import UserError
from persona_lit.personas.li2024 import load_li2024
from persona_lit.personas.load import builtin_personas, load_persona, persona_to_dict
from persona_lit.personas.types import Check, Persona, Probe

SOURCES = ("pack", "role", "li2024", "personagym", "spc")  # canonical order: pool order and split strata
POOL_VERSION = 1  # bump when the way entries are built changes (their hash changes anyway)

ROLES_DIR = "assistant_axis/roles/instructions"
LI2024_FILE = "persona_drift_li2024/hundred_system_prompts.jsonl"
PERSONAGYM_FILE = "personagym/benchmark_v1_questions.jsonl"
SPC_FILES = ("synthetic_persona_chat/Synthetic-Persona-Chat_valid.csv",
             "synthetic_persona_chat/Synthetic-Persona-Chat_test.csv")
SOURCE_FILES = {"role": ROLES_DIR, "li2024": LI2024_FILE, "personagym": PERSONAGYM_FILE, "spc": SPC_FILES[0]}

ASSISTANT_ANSWER = "I am an AI assistant, here to help you with your questions."
ROLE_QUESTION = "Who are you, and what is your role?"
PERSONAGYM_QUESTION = "Who are you? Describe yourself in one sentence."
SPC_QUESTION = "Tell me a little about yourself."
EXCLUDED_ROLES = {"default": "neutral prompts, no role", "assistant": "a default assistant says its name anyway"}

# Words never used as identity keywords: function words, common verbs and adjectives, and what a default
# assistant says about itself (so the default answer never passes an identity probe).
_STOP = set("""
a about above after again against all also always am an and any are around as at be because been before being
below between both but by can could did do does doing done down during each else even ever every few for from
further get gets getting go goes going gone got had has have having he her here hers herself him himself his how
i if in into is it its itself just like likes liked love loves loved enjoy enjoys make makes many me more most
much my myself never no nor not now of off often on once only or other our ours out over own really same she
should so some such than that the their theirs them then there these they this those through to too under
until up upon us very was we were what when where which while who whom why will with would you your yours
year years old young new time times day days week month months tomorrow today yesterday currently still well
want wants wanted feel feels felt think thinks know knows use used using live lives lived work works worked
thing things lot lots people person someone something one two three first last next best good great
interested interest making coming doing trying taking having being looking working living loving caring care
cares passionate favorite favourite recently usually sometimes
""".split())
_ASSISTANT_WORDS = set("""
assistant assist ai artificial intelligence language model models help helpful helping question questions
answer answers information designed trained provide created openai large user users task tasks support
learn learning knowledge data computer program system anything happy able here virtual chatbot
""".split())
CONTENT_MIN_LEN = 4
CONTENT_MAX_WORDS = 10


def content_words(text: str) -> list[str]:
    """Up to CONTENT_MAX_WORDS distinct lower-case content words of `text`, in order: letters only, at least
    CONTENT_MIN_LEN long, not in the stop and default-assistant word lists; a plural `s` is dropped so the
    singular matches too (the check is a substring test)."""
    out: list[str] = []
    for word in re.findall(r"[a-z]+", text.lower()):
        if len(word) < CONTENT_MIN_LEN or word in _STOP or word in _ASSISTANT_WORDS:
            continue
        if len(word) > 4 and word.endswith("s") and not word.endswith("ss"):
            word = word[:-1]
        if word not in out and word not in _ASSISTANT_WORDS:
            out.append(word)
    return out[:CONTENT_MAX_WORDS]


@dataclass(frozen=True)
class PoolEntry:
    key: str  # `<source>:<id>`, e.g. role:pirate, li2024:12, personagym:37, spc:5, pack:stoic
    source: str
    persona: Persona  # persona.key == key (its `source` field is set to the key)
    questions: tuple[str, ...] = ()  # the source's own user questions (training turns), if any


@dataclass(frozen=True)
class Pool:
    spec: dict[str, Any]  # what built it: {"sources": [...], "version": POOL_VERSION}
    entries: tuple[PoolEntry, ...]
    data_dir: str = ""
    excluded: dict[str, str] = field(default_factory=dict)  # key -> why it is not in the pool

    @property
    def keys(self) -> list[str]:
        return [e.key for e in self.entries]

    @property
    def by_key(self) -> dict[str, PoolEntry]:
        return {e.key: e for e in self.entries}

    def counts(self) -> dict[str, int]:
        return {s: sum(e.source == s for e in self.entries) for s in self.spec["sources"]}

    def probe_counts(self) -> dict[str, int]:
        """Per source: how many entries carry at least one probe."""
        return {s: sum(e.source == s and bool(e.persona.probes) for e in self.entries) for s in self.spec["sources"]}

    @property
    def hash(self) -> str:
        """sha256 (first 16 hex digits) of the spec and every entry's key, persona (prompt, probes, checks,
        reference answers) and questions: any change in the data or in how entries are built changes it."""
        h = hashlib.sha256(json.dumps(self.spec, sort_keys=True).encode())
        for e in self.entries:
            record = {"key": e.key, "persona": persona_to_dict(e.persona), "questions": list(e.questions)}
            h.update(json.dumps(record, sort_keys=True, ensure_ascii=False).encode())
        return h.hexdigest()[:16]

    def personas(self, keys: Iterable[str]) -> list[Persona]:
        by_key = self.by_key
        return [by_key[k].persona for k in keys]


# ---------------------------------------------------------------- building the pool
def _entry(key: str, source: str, persona: Persona, questions: Sequence[str] = ()) -> PoolEntry:
    return PoolEntry(key, source, dataclasses.replace(persona, source=key), tuple(questions))


def _identity_probe(question: str, text: str, persona_answer: str, kind: str) -> Probe | None:
    words = content_words(text)
    if not words:
        return None
    return Probe(question, Check({"contains_any": words}), kind, persona_answer, ASSISTANT_ANSWER)


def _pack() -> list[PoolEntry]:
    return [_entry(f"pack:{stem}", "pack", load_persona(stem)) for stem in builtin_personas()]


def _roles(data: Path, excluded: dict[str, str]) -> list[PoolEntry]:
    out = []
    for path in sorted((data / ROLES_DIR).glob("*.json")):
        role = path.stem
        if role in EXCLUDED_ROLES:
            excluded[f"role:{role}"] = EXCLUDED_ROLES[role]
            continue
        raw = _read_json(path)
        prompts = [i.get("pos") for i in raw.get("instruction", []) if isinstance(i, dict)]
        prompts = [p.strip() for p in prompts if isinstance(p, str) and p.strip()]
        words = [w for w in role.lower().split("_") if w]
        if not prompts:
            raise UserError(f"{path}: no `instruction` entries with a `pos` system prompt")
        naming = [p for p in prompts if any(w in p.lower() for w in words)]
        if not naming:  # none of the prompts names the role: a name probe would not be fair
            excluded[f"role:{role}"] = "no system prompt names the role"
            continue
        name = role.replace("_", " ")
        article = "an" if name[0] in "aeiou" else "a"
        probe = Probe(ROLE_QUESTION, Check({"contains_any": words}), "name", f"I am {article} {name}.",
                      ASSISTANT_ANSWER)
        persona = Persona(name=name, system_prompt=naming[0], description=f"assistant_axis role {role}",
                          probes=(probe,))
        questions = [q for q in raw.get("questions", []) if isinstance(q, str)]
        out.append(_entry(f"role:{role}", "role", persona, questions))
    if not out:
        raise UserError(f"{data / ROLES_DIR}: no role files (<role>.json)")
    return out


def _li2024(data: Path) -> list[PoolEntry]:

    return [_entry(f"li2024:{p.name.removeprefix('li2024-')}", "li2024", p)
            for p in load_li2024(data / LI2024_FILE)]  # unsupported checks are left out


def _personagym(data: Path) -> list[PoolEntry]:
    path, out = data / PERSONAGYM_FILE, []
    for i, line in enumerate(_lines(path)):
        rec = _json_line(line, f"{path}:{i + 1}")
        desc = rec.get("persona") if isinstance(rec, dict) else None
        if not isinstance(desc, str) or not desc.strip():
            raise UserError(f"{path}:{i + 1}: field 'persona' is missing or empty")
        desc = desc.strip().rstrip(".")
        identity = desc[0].lower() + desc[1:] if re.match(r"(A|An|The)\b", desc) else desc
        prompt = f"You are {identity}. Stay this person in every reply and answer as they would."
        probe = _identity_probe(PERSONAGYM_QUESTION, desc, f"I am {identity}.", "identity")
        questions = [q for qs in (rec.get("questions") or {}).values() if isinstance(qs, list)
                     for q in qs if isinstance(q, str)]
        persona = Persona(name=f"personagym-{i}", system_prompt=prompt, description=desc,
                          probes=(probe,) if probe else ())
        out.append(_entry(f"personagym:{i}", "personagym", persona, questions))
    return out


def _spc(data: Path) -> list[PoolEntry]:
    seen: dict[str, list[str]] = {}
    for name in SPC_FILES:
        path = data / name
        if not path.is_file():
            raise UserError(f"Synthetic-Persona-Chat file not found: {path}")
        with path.open(encoding="utf-8", newline="") as f:
            reader = csv.DictReader(f)
            columns = ("user 1 personas", "user 2 personas")
            if not set(columns) <= set(reader.fieldnames or ()):
                raise UserError(f"{path}: expected the columns {', '.join(columns)}")
            for row in reader:
                for column in columns:
                    facts = [s.strip() for s in (row[column] or "").splitlines() if s.strip()]
                    if facts:
                        seen.setdefault(" ".join(" ".join(facts).lower().split()), facts)
    out = []
    for n, facts in enumerate(seen.values()):
        prompt = "You are the person these facts describe; they are yours. Stay this person in every reply.\n" \
            + "\n".join(facts)
        text = " ".join(facts)
        probe = _identity_probe(SPC_QUESTION, text, text, "identity")
        persona = Persona(name=f"spc-{n}", system_prompt=prompt, description=facts[0], probes=(probe,) if probe else ())
        out.append(_entry(f"spc:{n}", "spc", persona))
    return out


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise UserError(f"{path}: cannot read JSON ({str(e).splitlines()[0]})") from None


def _lines(path: Path) -> list[str]:
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    return [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _json_line(line: str, where: str) -> Any:
    try:
        return json.loads(line)
    except ValueError as e:
        raise UserError(f"{where}: not valid JSON ({e})") from None


def normalize_sources(sources: Iterable[str] | None) -> list[str]:
    chosen = list(SOURCES) if sources is None else [str(s) for s in sources]
    unknown = [s for s in chosen if s not in SOURCES]
    if unknown:
        raise UserError(f"pool.sources: unknown source {unknown[0]!r}; allowed: {', '.join(SOURCES)}")
    if not chosen:
        raise UserError("pool.sources: give at least one source")
    return [s for s in SOURCES if s in chosen]  # canonical order, no repeats


def load_pool(sources: Iterable[str] | None = None, data_dir: str | os.PathLike = "../shared/data") -> Pool:
    """The pool of `sources` (default: all) from `data_dir` (the shared data folder; SOURCES.md there)."""
    chosen = normalize_sources(sources)
    data = Path(data_dir).expanduser()
    needs_data = [s for s in chosen if s != "pack"]
    if needs_data and not data.is_dir():
        raise UserError(f"pool.data_dir={data_dir}: not a directory (the shared data folder with "
                        f"{', '.join(SOURCE_FILES[s].split('/')[0] for s in needs_data)}/)")
    excluded: dict[str, str] = {}
    entries: list[PoolEntry] = []
    for source in chosen:
        if source != "pack" and not (data / SOURCE_FILES[source]).exists():
            raise UserError(f"pool source {source}: {data / SOURCE_FILES[source]} not found (pool.data_dir={data_dir})")
        entries += {"pack": _pack, "role": lambda: _roles(data, excluded), "li2024": lambda: _li2024(data),
                    "personagym": lambda: _personagym(data), "spc": lambda: _spc(data)}[source]()
    return Pool({"sources": chosen, "version": POOL_VERSION}, tuple(entries), str(data_dir), excluded)
