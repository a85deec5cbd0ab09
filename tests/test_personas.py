"""The built-in persona pack and the adherence checks."""

import pytest

from persona_lit.data import read_dialogues
from persona_lit.personas.checks import CHECKS
from persona_lit.personas.load import builtin_personas, load_persona


def test_pack_has_four_distinct_personas():
    names = builtin_personas()
    assert len(names) >= 4
    personas = [load_persona(n) for n in names]
    assert len({p.name for p in personas}) == len(personas)


@pytest.mark.parametrize("key", builtin_personas())
def test_persona_is_complete_and_its_checks_discriminate(key):
    p = load_persona(key)
    assert len(p.probes) >= 8 and p.name_probe() is not None
    assert len(read_dialogues(p.exchanges_path)) >= 60
    for probe in p.probes:
        assert probe.check(probe.persona_answer), (key, probe.question)
        assert not probe.check(probe.assistant_answer), (key, probe.question)


@pytest.mark.parametrize(
    "check,arg,good,bad",
    [
        ("contains_any", ["quill"], "I am Captain QUILL.", "I am an assistant."),
        ("max_sentences", 2, "One. Two!", "One. Two. Three?"),
        ("no_letter", "e", "A dry day.", "The end."),
        ("starts_with", ["ah,"], "Ah, the oak.", "Well, ah, no."),
        ("min_exclamations", 1, "Wow!", "Wow."),
        ("no_exclamations", True, "Calm.", "Loud!"),
        ("max_words", 3, "Keep it short.", "This has far too many words."),
        ("regex", r"\bfair winds\b", "Fair winds, matey.", "Fairly windy."),
    ],
)
def test_checks(check, arg, good, bad):
    assert CHECKS[check](good, arg) and not CHECKS[check](bad, arg)


@pytest.mark.parametrize("answer,words,hit", [
    ("I am an educator.", ["cato"], False), ("Cato here, at your service.", ["cato"], True),
    ("Store it in an array.", ["arr"], False), ("Arr, matey!", ["arr"], True),
    ("It is in the archive.", ["hive"], False), ("The hive hums.", ["hive"], True),
    ("Cato's ship sails.", ["cato"], True), ("Fair winds!", ["fair winds"], True), ("unfair windsock", ["fair winds"], False),
])
def test_word_checks_match_whole_words_only(answer, words, hit):
    from persona_lit.personas.checks import CHECKS

    assert CHECKS["contains_any"](answer, words) is hit
    assert CHECKS["contains_all"](answer, words) is hit
    assert CHECKS["contains_none"](answer, words) is (not hit)


@pytest.mark.parametrize("model", ["tiny-llama", "tiny-gemma3"])
def test_every_reference_answer_passes_its_check_when_cut_at_the_probe_budget(backbone_factory, model):
    """A generated probe answer stops at probe_max_new_tokens: a perfect persona's answer, cut there, must still
    pass (a check on the end of a long answer could never pass, whatever the model does)."""
    from omegaconf import OmegaConf

    from tests.conftest import REPO

    budget = int(OmegaConf.load(REPO / "conf" / "evaluate.yaml").probe_max_new_tokens)
    chat = backbone_factory(model).chat
    for key in builtin_personas():
        for probe in load_persona(key).probes:
            cut = chat.decode(chat._ids(probe.persona_answer)[:budget])
            assert probe.check(cut), (key, probe.question, cut)
