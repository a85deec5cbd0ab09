"""A pool of personas from every source we have, and a seeded, persona-disjoint train/val/test split.

(Meant to move into a `persona_lit/personas/` package later; it lives beside personas.py for now.)

Sources (`pool.sources`), each entry with a stable key and, where its data allows a code check, probes:

- `pack:<stem>`: the built-in persona pack (persona_lit/persona_pack/*.yaml) with its own probes.
- `role:<name>`: the roles of assistant_axis/roles/instructions/<name>.json (not `default`, and not
  `assistant`, whose name a default assistant says anyway). System prompt: the first of the role's 5 `pos`
  prompts that names the role; one probe of kind `name` ("Who are you, and what is your role?", passed when
  the answer contains a word of the role's name); `questions`: the role's 40 questions (training turns).
- `li2024:<index>`: the Li et al. 2024 system prompts whose checks we support (persona_lit/li2024.py), each
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

The split (`split(pool, seed, fractions)`) is per source (stratified): each source's keys are shuffled with a
seed derived from (seed, source) and cut into test, val, train shares of at least one persona each, so every
source is in every part and no persona is in two parts. `write_split`/`read_split` store it as JSON with the
pool's spec and hash; reading it back rebuilds the pool and refuses (one-line UserError) if the hash differs.

Contract with training (data=persona_pool): a training run calls `store_split(run_dir, pool_cfg)` (pool_cfg
with the keys of evaluate.yaml's `pool:` node: sources, data_dir, seed, fractions) so that the run directory
holds SPLIT_FILE, and keeps the same settings under `data.pool` in its checkpoint config. Evaluation with
`personas=test_split ckpt=<that run>` then uses the stored split (`split_for_evaluation`).
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from persona_lit.errors import UserError
from persona_lit.personas import Check, Persona, Probe, builtin_personas, load_persona, persona_to_dict

SOURCES = ("pack", "role", "li2024", "personagym", "spc")  # canonical order: pool order and split strata
PARTS = ("train", "val", "test")
SPLIT_NAMES = {"train_split": "train", "val_split": "val", "test_split": "test"}  # personas=<name>
SPLIT_FILE = "persona_split.json"
SPLIT_FORMAT = "persona_lit.persona_split/1"
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
    from persona_lit.li2024 import load_li2024

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


# ---------------------------------------------------------------- the split
@dataclass(frozen=True)
class Split:
    seed: int
    fractions: dict[str, float]  # train, val, test
    pool_spec: dict[str, Any]
    pool_hash: str
    parts: dict[str, list[str]]  # part -> keys, each in pool order

    def sources_of(self, part: str) -> dict[str, int]:
        counts: dict[str, int] = {s: 0 for s in self.pool_spec["sources"]}
        for key in self.parts[part]:
            counts[key.split(":", 1)[0]] += 1
        return counts

    def to_json(self) -> dict[str, Any]:
        return {"format": SPLIT_FORMAT, "seed": self.seed, "fractions": self.fractions, "pool": self.pool_spec,
                "pool_hash": self.pool_hash, "counts": {p: self.sources_of(p) for p in PARTS},
                **{p: self.parts[p] for p in PARTS}}


def check_fractions(fractions: Sequence[float] | Mapping[str, float]) -> dict[str, float]:
    values = [fractions[p] for p in PARTS] if isinstance(fractions, Mapping) else list(fractions)
    if len(values) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise UserError(f"pool.fractions={list(values)}: expected three numbers (train, val, test)")
    if any(v <= 0 for v in values) or abs(sum(values) - 1.0) > 1e-6:
        raise UserError(f"pool.fractions={list(values)}: each share must be > 0 and they must sum to 1")
    return {p: float(v) for p, v in zip(PARTS, values)}


def split(pool: Pool, seed: int, fractions: Sequence[float] | Mapping[str, float] = (0.8, 0.1, 0.1)) -> Split:
    """Persona-disjoint train/val/test keys, stratified by source, deterministic for (pool, seed, fractions):
    within each source a shuffle seeded by (seed, source), then test and val take round(n * share) keys, at
    least one each, and train the rest (at least one). A source with fewer than 3 personas is a UserError."""
    shares = check_fractions(fractions)
    parts: dict[str, set[str]] = {p: set() for p in PARTS}
    for source in pool.spec["sources"]:
        keys = [e.key for e in pool.entries if e.source == source]
        if len(keys) < 3:
            raise UserError(f"pool source {source} has {len(keys)} persona(s): too few for a train/val/test split "
                            f"(each part needs one); drop it from pool.sources")
        shuffled = keys[:]
        random.Random(f"persona_lit.split:{int(seed)}:{source}").shuffle(shuffled)  # str seeds are stable
        n_test = max(1, round(len(keys) * shares["test"]))
        n_val = max(1, round(len(keys) * shares["val"]))
        while n_test + n_val > len(keys) - 1:  # train keeps at least one (n >= 3, so 1 + 1 always fits)
            if n_test >= n_val:
                n_test -= 1
            else:
                n_val -= 1
        parts["test"].update(shuffled[:n_test])
        parts["val"].update(shuffled[n_test : n_test + n_val])
        parts["train"].update(shuffled[n_test + n_val :])
    order = pool.keys
    return Split(int(seed), shares, dict(pool.spec), pool.hash, {p: [k for k in order if k in parts[p]] for p in PARTS})


def write_split(path: str | os.PathLike, s: Split) -> Path:
    """The split as JSON (keys per part, seed, fractions, pool spec, pool hash, counts per source)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(s.to_json(), indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_split(path: str | os.PathLike, pool: Pool | None = None,
               data_dir: str | os.PathLike = "../shared/data") -> tuple[Split, Pool]:
    """A stored split and its pool, rebuilt from the stored spec (from `data_dir`) unless given; a pool whose
    hash differs from the stored one (the data or the pool code changed) is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"persona split file not found: {path}")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise UserError(f"{path}: not valid JSON ({type(e).__name__}: {' '.join(str(e).split())[:200]}); allowed: "
                        f"a persona split written by evaluate.py/train.py ({SPLIT_FORMAT})") from None
    if not isinstance(raw, dict) or raw.get("format") != SPLIT_FORMAT or not all(p in raw for p in PARTS):
        raise UserError(f"{path}: not a persona split ({SPLIT_FORMAT}: seed, fractions, pool, pool_hash, "
                        f"{', '.join(PARTS)})")
    spec = raw.get("pool") or {}
    if not isinstance(spec, dict) or not isinstance(spec.get("sources", []), list) \
            or not all(isinstance(raw[p], list) for p in PARTS) \
            or not isinstance(raw.get("seed"), int) or isinstance(raw.get("seed"), bool):
        raise UserError(f"{path}: a damaged persona split (allowed: pool an object, seed an integer, "
                        f"{', '.join(PARTS)} lists of persona keys)")
    if pool is None:
        pool = load_pool(spec.get("sources"), data_dir)
    if pool.hash != raw.get("pool_hash"):
        raise UserError(f"{path}: the persona pool changed since this split was written (pool hash "
                        f"{raw.get('pool_hash')!r} there, {pool.hash} now from {pool.data_dir} with sources "
                        f"{','.join(pool.spec['sources'])}); write a new split or restore the data it was made from")
    parts = {p: [str(k) for k in raw[p]] for p in PARTS}
    known, seen = set(pool.keys), set()
    for p in PARTS:
        bad = [k for k in parts[p] if k not in known or k in seen]
        if bad:
            raise UserError(f"{path}: {p} key {bad[0]!r} is not in the pool or is in two parts")
        seen.update(parts[p])
    fractions = raw.get("fractions")
    if not (isinstance(fractions, list) or (isinstance(fractions, dict) and set(PARTS) <= set(fractions))):
        raise UserError(f"{path}: fractions={fractions!r}; allowed: three numbers (train, val, test)")
    try:
        shares = check_fractions(fractions)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None
    return Split(int(raw["seed"]), shares, spec, raw["pool_hash"], parts), pool


def store_split(run_dir: str | os.PathLike, pool_cfg: Mapping[str, Any]) -> Split:
    """For a training run: build the pool and split from `pool_cfg` (sources, data_dir, seed, fractions) and
    write them to run_dir/SPLIT_FILE; returns the split (train on split.parts["train"])."""
    pool = load_pool(pool_cfg.get("sources"), pool_cfg.get("data_dir") or "../shared/data")
    s = split(pool, int(pool_cfg.get("seed") or 0), list(pool_cfg.get("fractions") or (0.8, 0.1, 0.1)))
    write_split(Path(run_dir) / SPLIT_FILE, s)
    return s


# ---------------------------------------------------------------- evaluation (personas=test_split)
class PoolSelection(list):
    """A list of Personas chosen from a split, with `info` (where the split came from) for results.json."""

    info: dict[str, Any]


def split_request(personas: Any) -> str | None:
    """The part named by `personas` (test_split, [test_split], ...), None for a list of persona names; any
    other single string is a UserError (a list of personas is written [a,b])."""
    if personas is None:
        return None
    if isinstance(personas, str):
        if personas not in SPLIT_NAMES:
            raise UserError(f"personas={personas}: a single value names a split ({', '.join(SPLIT_NAMES)}); "
                            f"for personas give a list, e.g. personas=[{personas}]")
        return SPLIT_NAMES[personas]
    names = [str(p) for p in personas]
    if any(n in SPLIT_NAMES for n in names):
        if len(names) != 1:
            raise UserError(f"personas={names}: a split ({', '.join(SPLIT_NAMES)}) cannot be mixed with personas")
        return SPLIT_NAMES[names[0]]
    return None


def _run_dir_and_config(ckpt: str) -> tuple[Path, dict[str, Any]]:
    """The training run directory of a checkpoint and its config (metadata only: no tensors are read)."""
    from safetensors import safe_open

    from persona_lit.checkpoint import resolve_checkpoint_path

    path = resolve_checkpoint_path(ckpt)
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    try:
        with safe_open(str(path), framework="pt") as f:
            header = json.loads((f.metadata() or {}).get("persona_lit") or "{}")
    except Exception:  # noqa: BLE001 - restore() reports a broken checkpoint in full later
        header = {}
    return run_dir, header.get("config") or {}


def split_for_evaluation(cfg: Any) -> tuple[Split, Pool, str]:
    """(split, pool, note). Where the split comes from, first that applies: pool.split_file; the checkpoint's
    run directory (SPLIT_FILE, written by its training run); the checkpoint config's data.pool settings
    (recomputed, said so in the note); evaluate.yaml's pool settings."""
    p = cfg.pool
    data_dir = str(p.data_dir)
    if p.get("split_file"):
        s, pool = read_split(p.split_file, data_dir=data_dir)
        return s, pool, f"stored split {p.split_file}"
    if cfg.get("ckpt"):
        run_dir, config = _run_dir_and_config(str(cfg.ckpt))
        stored = run_dir / SPLIT_FILE
        if stored.is_file():
            s, pool = read_split(stored, data_dir=data_dir)
            return s, pool, f"the training run's split {stored}"
        trained = (config.get("data") or {}).get("pool") if isinstance(config.get("data"), dict) else None
        if isinstance(trained, dict):
            pool = load_pool(trained.get("sources"), data_dir)
            s = split(pool, int(trained.get("seed") or 0), list(trained.get("fractions") or (0.8, 0.1, 0.1)))
            return s, pool, (f"recomputed from the checkpoint's data.pool settings (seed {s.seed}): no {SPLIT_FILE} "
                             f"in {run_dir}")
        note = f"from pool.* (seed {int(p.seed)}): the checkpoint was not trained on the persona pool"
    else:
        note = f"from pool.* (seed {int(p.seed)})"
    pool = load_pool(list(p.sources), data_dir)
    return split(pool, int(p.seed), list(p.fractions)), pool, note


def round_robin(keys: Sequence[str], sources: Sequence[str], limit: int | None) -> list[str]:
    """At most `limit` keys, taking one per source in turn (each source in its split order)."""
    if limit is None or limit >= len(keys):
        return list(keys)
    queues = {s: [k for k in keys if k.split(":", 1)[0] == s] for s in sources}
    out: list[str] = []
    while len(out) < limit:
        for s in sources:
            if queues[s] and len(out) < limit:
                out.append(queues[s].pop(0))
    return out


def evaluation_personas(cfg: Any) -> PoolSelection | None:
    """The personas of `personas=<part>_split` (None when cfg.personas is not a split), at most
    pool.max_personas of them (round-robin over sources); prints where the split came from."""
    part = split_request(cfg.personas)
    if part is None:
        return None
    s, pool, note = split_for_evaluation(cfg)
    limit = cfg.pool.get("max_personas")
    keys = round_robin(s.parts[part], s.pool_spec["sources"], None if limit is None else int(limit))
    chosen = PoolSelection(pool.personas(keys))
    chosen.info = {"part": part, "keys": keys, "of": len(s.parts[part]), "seed": s.seed, "fractions": s.fractions,
                   "pool": s.pool_spec, "pool_hash": s.pool_hash, "from": note}
    print(f"persona_lit: {len(keys)} of the {len(s.parts[part])} {part} personas of the pool "
          f"({', '.join(s.pool_spec['sources'])}; split {note})")
    return chosen
