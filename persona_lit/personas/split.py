"""The seeded, content-disjoint train/val/test split of the persona pool (pool.py), stored with every run, and
the personas an evaluation takes from it (`personas=test_split`).

The split (`split(pool, seed, fractions)`) is per source (stratified) and by content group: personas that share
content are one group (`content_groups`: a Synthetic-Persona-Chat fact, the same prompt line, or near-duplicate
prompts such as PersonaGym's "A 72-year-old doctor from Tokyo ..." and "A 70-year-old doctor from Tokyo ..."),
and a group goes to one part whole. Each source's groups are shuffled with a seed derived from (seed, source)
and cut into test, val, train shares (by personas, a group never cut) of at least one group each, so every
source is in every part and no persona, fact or near-duplicate description is in two parts. `write_split`/`read_split` store it as JSON with the
pool's spec and hash; reading it back rebuilds the pool and refuses (one-line UserError) if the hash differs.

Contract with training (data=persona_pool): a training run calls `store_split(run_dir, pool_cfg)` (pool_cfg
with the keys of evaluate.yaml's `pool:` node: sources, data_dir, seed, fractions) so that the run directory
holds SPLIT_FILE, and keeps the same settings under `data.pool` in its checkpoint config. Evaluation with
`personas=test_split ckpt=<that run>` then uses the stored split (`split_for_evaluation`).
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

from persona_lit.errors import UserError
from persona_lit.personas.pool import Pool, load_pool

PARTS = ("train", "val", "test")
SPLIT_NAMES = {"train_split": "train", "val_split": "val", "test_split": "test"}  # personas=<name>
SPLIT_FILE = "persona_split.json"
SPLIT_FORMAT = "persona_lit.persona_split/1"
DISJOINT = "content"  # what a split written here is disjoint by (older files: by persona key only)
NEAR_DUPLICATE = 0.7  # prompts whose distinctive words overlap this much (Jaccard) are one content group


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
        return {"format": SPLIT_FORMAT, "disjoint": DISJOINT, "seed": self.seed, "fractions": self.fractions, "pool": self.pool_spec,
                "pool_hash": self.pool_hash, "counts": {p: self.sources_of(p) for p in PARTS},
                **{p: self.parts[p] for p in PARTS}}


def check_fractions(fractions: Sequence[float] | Mapping[str, float]) -> dict[str, float]:
    values = [fractions[p] for p in PARTS] if isinstance(fractions, Mapping) else list(fractions)
    if len(values) != 3 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
        raise UserError(f"pool.fractions={list(values)}: expected three numbers (train, val, test)")
    if any(v <= 0 for v in values) or abs(sum(values) - 1.0) > 1e-6:
        raise UserError(f"pool.fractions={list(values)}: each share must be > 0 and they must sum to 1")
    return {p: float(v) for p, v in zip(PARTS, values)}


def _distinctive_words(prompts: Sequence[str]) -> list[set[str]]:
    """Each prompt's words (letters only), less those in more than half the prompts (a source's template)."""
    words = [set(re.findall(r"[a-z]+", p.lower())) for p in prompts]
    common = {w for w in set().union(*words) if sum(w in ws for ws in words) > len(words) / 2} if words else set()
    return [ws - common for ws in words]


def content_groups(entries: Sequence[Any]) -> list[list[str]]:
    """The keys of `entries` (one source's pool entries) in groups that share content, each group in pool order,
    groups in the order of their first key: two personas are in one group when their prompts share a line (after
    the first, lower-cased, numbers and punctuation dropped: a Synthetic-Persona-Chat fact), or, in a source of
    fewer than 1,000 personas, when their distinctive words overlap by NEAR_DUPLICATE or more (Jaccard; numbers
    dropped, so descriptions that differ only in an age are one group)."""
    keys = [e.key for e in entries]
    parent = list(range(len(keys)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def join(i: int, j: int) -> None:
        parent[find(i)] = find(j)

    owner: dict[str, int] = {}
    prompts = [e.persona.system_prompt for e in entries]
    for i, prompt in enumerate(prompts):
        for line in prompt.splitlines()[1:]:
            norm = " ".join(re.findall(r"[a-z]+", line.lower()))
            if norm:
                join(i, owner.setdefault(norm, i))
    if len(keys) < 1000:
        words = _distinctive_words(prompts)
        for i in range(len(keys)):
            for j in range(i):
                union = words[i] | words[j]
                if union and len(words[i] & words[j]) / len(union) >= NEAR_DUPLICATE:
                    join(i, j)
    groups: dict[int, list[str]] = {}
    for i, key in enumerate(keys):
        groups.setdefault(find(i), []).append(key)
    return list(groups.values())


def split(pool: Pool, seed: int, fractions: Sequence[float] | Mapping[str, float] = (0.8, 0.1, 0.1)) -> Split:
    """Content-disjoint train/val/test keys, stratified by source, deterministic for (pool, seed, fractions):
    within each source its content groups (content_groups) in a shuffle seeded by (seed, source), then test and
    val take whole groups until they hold round(n * share) personas, at least one group each, and train the rest
    (at least one group). A source with fewer than 3 content groups is a UserError."""
    shares = check_fractions(fractions)
    parts: dict[str, set[str]] = {p: set() for p in PARTS}
    for source in pool.spec["sources"]:
        entries = [e for e in pool.entries if e.source == source]
        groups = content_groups(entries)
        if len(groups) < 3:
            raise UserError(f"pool source {source} has {len(entries)} persona(s) in {len(groups)} content group(s): "
                            f"too few for a train/val/test split (each part needs one); drop it from pool.sources")
        shuffled = groups[:]
        random.Random(f"persona_lit.split:{int(seed)}:{source}").shuffle(shuffled)  # str seeds are stable
        n, at = len(entries), 0
        for part, left_after in (("test", 2), ("val", 1)):  # groups that must stay for the parts after this one
            target, taken = max(1, round(n * shares[part])), 0
            while at < len(shuffled) - left_after and (taken == 0 or taken < target):
                parts[part].update(shuffled[at])
                taken, at = taken + len(shuffled[at]), at + 1
        parts["train"].update(k for g in shuffled[at:] for k in g)
    order = pool.keys
    return Split(int(seed), shares, dict(pool.spec), pool.hash, {p: [k for k in order if k in parts[p]] for p in PARTS})


def write_split(path: str | os.PathLike, s: Split) -> Path:
    """The split as JSON (keys per part, seed, fractions, pool spec, pool hash, counts per source)."""
    from persona_lit.outputs import write_json

    return write_json(path, s.to_json())


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
    if raw.get("disjoint") != DISJOINT:
        print(f"persona_lit: warning: {path} is disjoint by persona key only (written before content groups): its "
              f"test personas may share facts or near-duplicate descriptions with its train personas", flush=True)
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

    from persona_lit.training.checkpoint import resolve_checkpoint_path

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


def round_robin(keys: Sequence[str], sources: Sequence[str], limit: int | None, seed: int | None = None) -> list[str]:
    """At most `limit` keys, taking one per source in turn: each source in its split order, or (`seed` given) in an
    order drawn with that seed, a random sample stratified by source (another seed, another sample)."""
    if limit is None or limit >= len(keys):
        return list(keys)
    queues = {s: [k for k in keys if k.split(":", 1)[0] == s] for s in sources}
    if seed is not None:
        for source, queue in queues.items():
            random.Random(f"persona_lit.sample:{int(seed)}:{source}").shuffle(queue)  # str seeds are stable
    out: list[str] = []
    while len(out) < limit:
        for s in sources:
            if queues[s] and len(out) < limit:
                out.append(queues[s].pop(0))
    return out


def evaluation_personas(cfg: Any) -> PoolSelection | None:
    """The personas of `personas=<part>_split` (None when cfg.personas is not a split), at most
    pool.max_personas of them: a random sample drawn with the evaluation's `seed`, stratified by source (round-robin
    over sources); prints where the split came from."""
    part = split_request(cfg.personas)
    if part is None:
        return None
    s, pool, note = split_for_evaluation(cfg)
    limit = cfg.pool.get("max_personas")
    sample_seed = int(cfg.get("seed") or 0)
    keys = round_robin(s.parts[part], s.pool_spec["sources"], None if limit is None else int(limit), sample_seed)
    chosen = PoolSelection(pool.personas(keys))
    chosen.info = {"part": part, "keys": keys, "of": len(s.parts[part]), "seed": s.seed, "sample_seed": sample_seed,
                   "sources": {k: k.split(":", 1)[0] for k in keys}, "fractions": s.fractions,
                   "pool": s.pool_spec, "pool_hash": s.pool_hash, "from": note}
    print(f"persona_lit: {len(keys)} of the {len(s.parts[part])} {part} personas of the pool "
          f"({', '.join(s.pool_spec['sources'])}; split {note})")
    return chosen
