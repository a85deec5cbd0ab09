"""The adherence checks a persona's probes use: CHECKS (name -> (answer, argument) -> bool) and CHECK_ARGS (what
each check's argument must be, checked when a persona is read, not when an answer is scored)."""

from __future__ import annotations

import re
from typing import Any, Callable

from persona_lit.errors import UserError
from persona_lit.personas.li2024_checks import compile_check, li2024_check

_SENTENCE_END = re.compile(r"[.!?]+(?:\s+|$)")
_WORD = re.compile(r"[A-Za-z']+")


def _sentences(text: str) -> list[str]:
    return [s for s in _SENTENCE_END.split(text.strip()) if s.strip()]


def _words(text: str) -> list[str]:
    return _WORD.findall(text)


def _as_list(arg: Any) -> list[str]:
    return [arg] if isinstance(arg, str) else list(arg)


def _has(text: str, word: str) -> bool:
    """`word` (or phrase) in `text` as whole words, case-insensitive: "cato" is not in "educator", "arr" not in
    "array" (a word character may not touch either end)."""
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, flags=re.IGNORECASE) is not None


# Every check takes (answer, argument) -> bool. Case-insensitive where words are concerned; contains_* match whole
# words (list inflected forms as words of their own: [leaf, leaves]).
CHECKS: dict[str, Callable[[str, Any], bool]] = {
    "contains_any": lambda text, words: any(_has(text, w) for w in _as_list(words)),
    "contains_all": lambda text, words: all(_has(text, w) for w in _as_list(words)),
    "contains_none": lambda text, words: not any(_has(text, w) for w in _as_list(words)),
    "max_sentences": lambda text, n: 0 < len(_sentences(text)) <= int(n),
    "min_sentences": lambda text, n: len(_sentences(text)) >= int(n),
    "max_words": lambda text, n: 0 < len(_words(text)) <= int(n),
    "min_words": lambda text, n: len(_words(text)) >= int(n),
    "no_letter": lambda text, letter: str(letter).lower() not in text.lower(),
    "starts_with": lambda text, prefixes: text.strip().lower().startswith(
        tuple(p.lower() for p in _as_list(prefixes))
    ),
    "ends_with": lambda text, suffixes: text.strip().lower().endswith(
        tuple(s.lower() for s in _as_list(suffixes))
    ),
    "regex": lambda text, pattern: re.search(pattern, text, flags=re.IGNORECASE) is not None,
    "not_regex": lambda text, pattern: re.search(pattern, text, flags=re.IGNORECASE) is None,
    "all_lowercase": lambda text, flag: (text == text.lower()) == bool(flag),
    "min_exclamations": lambda text, n: text.count("!") >= int(n),
    "no_exclamations": lambda text, flag: ("!" not in text) == bool(flag),
    # Li et al. 2024's one-line checks, parsed with ast and interpreted on a whitelist (never eval'd)
    "li2024": li2024_check,
}


def _words_arg(v: Any) -> bool:
    return isinstance(v, str) or (isinstance(v, list) and all(isinstance(w, str) for w in v))


def _count_arg(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _regex_arg(v: Any) -> bool:
    try:
        return isinstance(v, str) and re.compile(v, flags=re.IGNORECASE) is not None
    except (re.error, RecursionError, OverflowError):
        return False


def _li2024_arg(v: Any) -> bool:
    try:
        return isinstance(v, str) and compile_check(v) is not None
    except UserError:
        return False


# What each check's argument must be (checked when a persona is read, not when an answer is scored).
CHECK_ARGS: dict[str, tuple[Callable[[Any], bool], str]] = {
    **{k: (_words_arg, "a string or a list of strings")
       for k in ("contains_any", "contains_all", "contains_none", "starts_with", "ends_with")},
    **{k: (_count_arg, "an integer >= 0")
       for k in ("max_sentences", "min_sentences", "max_words", "min_words", "min_exclamations")},
    "no_letter": (lambda v: isinstance(v, str) and v != "", "a non-empty string"),
    "regex": (_regex_arg, "a valid regular expression (a string)"),
    "not_regex": (_regex_arg, "a valid regular expression (a string)"),
    "all_lowercase": (lambda v: isinstance(v, bool), "true or false"),
    "no_exclamations": (lambda v: isinstance(v, bool), "true or false"),
    "li2024": (_li2024_arg, "a `lambda x: ...` check of Li et al. 2024 (persona_lit/personas/li2024_checks.py)"),
}
assert set(CHECK_ARGS) == set(CHECKS), "every check needs its argument rule in CHECK_ARGS"
