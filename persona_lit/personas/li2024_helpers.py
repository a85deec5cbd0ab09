"""The helper functions that Li et al. 2024's adherence checks call, by upstream name: our own readings
of the system prompts (the upstream definitions were never available to us). Approximations are named
in each docstring; see li2024_checks.py for how a check's text is interpreted (never executed)."""

from __future__ import annotations

import json
import math
import re
from typing import Any, Callable

from persona_lit.errors import UserError

_WORD = re.compile(r"[^\W_]+(?:['\-][^\W_]+)*")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.replace("\u2019", "'"))


def _lower_words(text: str) -> list[str]:
    return [w.lower() for w in _words(text) if any(c.isalpha() for c in w)]


def _share(flags: list[bool]) -> float:
    return sum(flags) / len(flags) if flags else 0.0


def _has(text: str, phrase: str) -> bool:
    """`phrase` occurs as whole words, case-insensitive."""
    pattern = rf"(?<![^\W_]){re.escape(phrase.lower())}(?![^\W_])"
    return re.search(pattern, text.replace("\u2019", "'").lower()) is not None


def _sentences(x: str) -> list[str]:
    """Split after . ! ? (keeping the mark) and at line breaks; drop pieces without letters or digits."""
    return [p.strip() for p in re.split(r"(?<=[.!?])\s+|\n+", x.strip()) if any(c.isalnum() for c in p)]


def _alternating(words: list[str], kind: Callable[[str], Any]) -> float:
    """Share of neighbouring word pairs whose kinds differ (a None kind never differs)."""
    return _share([None not in (kind(a), kind(b)) and kind(a) != kind(b) for a, b in zip(words, words[1:])])


def _once_count(words: list[str]) -> int:
    return sum(words.count(w) == 1 for w in set(words))


class _OneSyllable:
    """Stands in for upstream's `one_syllable_words_list` (not available). Approximation: one vowel group
    (a e i o u y), not counting a silent final "e" as in "make"."""

    def __contains__(self, word: str) -> bool:
        groups = len(re.findall(r"[aeiouy]+", word))
        return groups - (groups > 1 and re.search(r"[^aeiouyl]e$", word) is not None) == 1


def _target_share(x: str, targets: Any) -> float:
    """Word list: share of words that are targets ("meows", "purrrr" count for "meow", "purr").
    one_syllable_words_list: share of sentences made only of one-syllable words (a share of words would pass
    ordinary English, about 70% of whose words have one syllable)."""
    if isinstance(targets, _OneSyllable):
        return _share([all(w in targets for w in _lower_words(s)) for s in _sentences(x)])
    pats = [re.compile(re.escape(t.lower()) + re.escape(t[-1].lower()) + "*(?:s|es)?") for t in targets]
    return _share([any(p.fullmatch(w) for p in pats) for w in _lower_words(x)])


_POSITIVE = frozenset(
    "love loved loves loving lovely happy happiness happily joy joyful joyous glad delighted delight delightful "
    "wonderful amazing awesome fantastic great excellent good beautiful brilliant fun enjoy enjoyed enjoying "
    "excited exciting thrilled cheerful smile smiles smiling laugh laughter best perfect pleasure pleased nice "
    "sweet adore adorable proud hope hopeful grateful thankful blessed bright magical marvelous superb terrific "
    "incredible yay hooray celebrate celebration kind warm precious treasure charming gorgeous stunning "
    "fabulous splendid peaceful comfort cherish cherished sunshine favorite favourite gift gifts".split())
_NEGATIVE = frozenset(
    "sad sadness sorrow sorrowful depressed depressing depression miserable misery gloomy gloom grief grim cry "
    "crying tears lonely hopeless despair pain painful hurt hurts suffer suffering awful terrible horrible bad "
    "worst hate hated hates hating disgusting disgust disgusted gross nasty ugly stupid idiot idiotic dumb moron "
    "fool foolish pathetic loser useless worthless boring bored dull dreary bleak death die dead dying empty "
    "meaningless pointless fail failure broken angry anger annoying annoyed kill destroy evil cruel fear afraid "
    "scared anxious worry worried regret tired weary suck sucks crap damn vile toxic revolting sick slimy vomit "
    "bitter lame trash garbage".split())
_NEGATORS = frozenset("not no never don't doesn't didn't isn't wasn't aren't can't won't nothing dont isnt".split())


def _sentiment(x: str, kind: str) -> float:
    """Approximates NLTK VADER (not used) with a lexicon, polarity flipped right after "not", "never", ...
    "pos" / "neg" = 4 * matching words / words, capped at 1 (more than one in eight scores above 0.5);
    "neu" = share of other words; "compound" = (P - N) / sqrt((P - N)^2 + 15), normalised as VADER does."""
    words, pos, neg = _lower_words(x), 0, 0
    for i, w in enumerate(words):
        polarity = ((w in _POSITIVE) - (w in _NEGATIVE)) * (-1 if i and words[i - 1] in _NEGATORS else 1)
        pos, neg = pos + (polarity > 0), neg + (polarity < 0)
    n = max(len(words), 1)
    scores = {"pos": min(1.0, 4 * pos / n), "neg": min(1.0, 4 * neg / n), "neu": 1 - (pos + neg) / n,
              "compound": (pos - neg) / math.sqrt((pos - neg) ** 2 + 15)}
    if kind not in scores:
        raise UserError(f"get_sentiment: unknown kind {kind!r}; allowed: {', '.join(scores)}")
    return scores[kind]


_SLANG = frozenset(
    "u ur lol omg tbh idk gonna wanna gotta kinda lowkey highkey fr ngl bruh bro dude literally vibe vibes sus lit "
    "af imo btw ya yall y'all nah yo cuz bc rn smh thx pls plz sooo soooo cool chill dope slay bestie totally "
    "dont cant wont im ive thats youre isnt doesnt didnt whats lmao rofl ok k legit fam".split())


def _teenager(x: str) -> float:
    """Approximation: mean of (share of sentences starting in lower case) and (slang density: 5 * slang words
    / words, capped at 1; the list includes apostrophe-less contractions such as "dont")."""
    lower = _share([not next((c for c in s if c.isalpha()), "a").isupper() for s in _sentences(x)])
    return (lower + min(1.0, 5 * _share([w in _SLANG for w in _lower_words(x)]))) / 2


def _json_object(x: str) -> bool:
    """A JSON object with "thought" and "response" keys (a ```json fence around it is allowed)."""
    try:
        obj = json.loads(re.sub(r"^```(?:json)?\s*|\s*```$", "", x.strip()))
    except ValueError:
        return False
    return isinstance(obj, dict) and {"thought", "response"} <= set(obj)


_NUMBERS = {w: i for i, w in enumerate("zero one two three four five six seven eight nine ten eleven twelve "
                                       "thirteen fourteen fifteen sixteen seventeen eighteen nineteen twenty".split())}
_COLORS = ("red orange yellow green blue purple violet pink brown black white gray grey indigo gold golden silver "
           "beige turquoise cyan magenta maroon navy teal crimson scarlet lavender").split()


def _close_to(x: str, target: float) -> float:
    """1 / (1 + |n - target|) for the reply's first number (digits, or zero..twenty); 0 without one."""
    m = re.search(r"\d+(?:\.\d+)?|\b(?:" + "|".join(_NUMBERS) + r")\b", x.lower())
    return 1 / (1 + abs((_NUMBERS[m[0]] if m[0] in _NUMBERS else float(m[0])) - target)) if m else 0.0


_FRENCH = frozenset(
    "le la les un une des du de et est sont pour dans avec sur pas que qui ce cette ces vous nous je tu il elle "
    "ils elles mon ma mes ton votre vos notre nos au aux mais où très être avoir fait faire peut aussi comme "
    "bonjour merci oui ça comment quoi pourquoi bien faites visiter voir tant".split())
_ENGLISH = frozenset(
    "the an and is are was were of to in for with that this it you i we they he she my your be have has do does "
    "not but at by from what which will can would there here hello yes thanks thank how why see visit".split())


def _french(text: str) -> bool | None:
    """Approximates language detection (langdetect is not used): French cues (stop words, elisions such as
    l' qu', accented letters) outnumber English stop words. None when there is neither."""
    tokens = [t for w in _lower_words(text) for t in w.split("-")]
    cue = re.compile(r"(?:[ldjcnsmt]|qu)'|.*[àâçéèêëîïôûùœ]")
    fr = sum(t in _FRENCH or cue.match(t) is not None for t in tokens)
    en = sum(t in _ENGLISH for t in tokens)
    return None if fr == en == 0 else fr > en


def _french_english_pairs(x: str) -> bool:
    """French, then its English translation in parentheses, repeated: "Bonjour! (Hello!) Ça va? (How are
    you?)". Every outside piece leans French and every parenthesis English (approximation, see _french)."""
    pieces = [p.strip() for p in re.split(r"\(([^()]*)\)", x)]  # outside, inside, ..., inside, outside
    return len(pieces) > 1 and not pieces[-1] and all(_french(p) is True for p in pieces[:-1:2]) \
        and all(_french(p) is False for p in pieces[1::2])


_ITEM = r"\s*[^\[\].!?,\s][^\[\].!?,]*"  # a list item: not empty, no brackets or sentence punctuation


# The helpers the upstream checks call, by upstream name; our readings of the system prompts.
HELPERS: dict[str, Callable[..., Any]] = {
    "split_into_sentences": _sentences,
    # "start your reply with the letter A": the reply's first letter, case-insensitive
    "fraction_starts_with": lambda x, letter: next((c for c in x if c.isalpha()), "").lower() == letter.lower(),
    # "entirely in capital (lowercase) letters": share of sentences whose cased letters are all upper (lower)
    "fraction_of_case_letters": lambda x, is_upper=True: _share(
        [all(c.isupper() == is_upper for c in s if c.isupper() or c.islower()) for s in _sentences(x)]),
    "fraction_sentences_that_are_questions": lambda x: _share([s.endswith("?") for s in _sentences(x)]),
    "fraction_non_letter": lambda x: _share([not c.isalpha() for c in x if not c.isspace()]),
    # "only numbers": share of letters-and-digits that are digits (punctuation such as "," is ignored)
    "fraction_digit": lambda x: _share([c.isdigit() for c in x if c.isalnum()]),
    "is_alliteration": lambda x: len({w[0] for w in _lower_words(x)}) == 1,  # every word, same first letter
    "are_first_and_last_words_same": lambda x: len(w := _lower_words(x)) >= 2 and w[0] == w[-1],
    "count_num_words": lambda x: len(_words(x)) == 10,  # "exactly 10 words"
    "count_num_words_one": lambda x: len(_words(x)) == 1,
    "is_valid_sentence_word_count": lambda sentences, counts: [len(_words(s)) for s in sentences] == list(counts),
    # sentence i (1-based) has exactly i words
    "is_increasing_sentence_word_count": lambda sentences: bool(sentences) and all(
        len(_words(s)) == i for i, s in enumerate(sentences, 1)),
    # "never repeat a word": 1 / (1 + repeats), repeats = words - distinct words; one repeat fails (0.5)
    "fraction_unique_words": lambda x: 1 / (1 + len(w) - len(set(w))) if (w := _lower_words(x)) else 0.0,
    # "every word must appear at least twice": 1 / (1 + words said only once)
    "fraction_repeated_words": lambda x: 1 / (1 + _once_count(w)) if (w := _lower_words(x)) else 0.0,
    # share of neighbouring word pairs where one word is all upper case and the other all lower case
    "fraction_alter_upper_lower": lambda x: _alternating(
        [w for w in _words(x) if any(c.isalpha() for c in w)],
        lambda w: "U" if w.isupper() else "L" if w.islower() else None),
    # short (<= 4 letters) and long words alternate; chance-corrected (ordinary text alternates half the time)
    "fraction_alter_short_long": lambda x: max(0.0, 2 * _alternating(_lower_words(x), lambda w: len(w) <= 4) - 1),
    "fraction_alter_banana": lambda x: _alternating(_lower_words(x), lambda w: w == "banana"),
    # every word said twice in a row: "I I like like tea tea"
    "is_valid_repeat": lambda x: len(w := _lower_words(x)) % 2 == 0 and bool(w) and w[::2] == w[1::2],
    # share of sentences whose first token, stripped of punctuation, is exactly `word`
    "sentences_start_with": lambda sentences, word: _share(
        [s.split()[0].strip(".,;:!?\"'()") == word for s in sentences]),
    "does_not_contain": lambda x, phrases: not any(_has(x, p) for p in phrases),  # whole words, any case
    "fraction_of_target_words_hit": lambda x, targets: _share([_has(x, t) for t in targets]),
    "fraction_of_text_that_is_a_target": _target_share,
    "get_sentiment": _sentiment,
    "teenager_score": _teenager,
    "is_valid_json_format": _json_object,
    # `[item, item, ...]`: non-empty items without sentence punctuation
    "is_valid_list_format": lambda x: bool(re.fullmatch(rf"\s*\[{_ITEM}(?:,{_ITEM})*\]\s*", x)),
    # one character between dashes throughout, "H-e-l-l-o-." (a trailing dash is allowed)
    "is_valid_dash_format": lambda x: len(p := x.strip().removesuffix("-").split("-")) >= 2
    and all(len(c) == 1 for c in p),
    "close_to_num": _close_to,
    "contains_color_and_number": lambda x: bool(re.search(r"\d", x) or any(_has(x, n) for n in _NUMBERS))
    and any(_has(x, c) for c in _COLORS),
    # share of sentences leaning French among those with language cues (approximation, see _french)
    "get_french_percentage": lambda x: _share([v for v in map(_french, _sentences(x)) if v is not None]),
    "is_valid_alternating_french_english": _french_english_pairs,
    "len": len, "any": any, "all": all, "min": min, "max": max, "abs": abs,
}
CONSTANTS: dict[str, Any] = {"one_syllable_words_list": _OneSyllable()}
UNSUPPORTED = {"fraction_past_tense_verbs": "needs a part-of-speech tagger to find verbs",
               "count_plural_nouns": "needs a part-of-speech tagger to find nouns",
               "frequent_words_list": "needs upstream's 10k frequent-word list"}
