"""Li et al. 2024's 100 system prompts: loading, our whitelist parser of the upstream checks, and the helpers."""

import ast
import json
from copy import deepcopy
from pathlib import Path

import pytest

from persona_lit.personas import li2024, li2024_checks, li2024_helpers
from persona_lit.errors import UserError
from persona_lit.personas.li2024 import load_li2024
from persona_lit.personas.li2024_checks import compile_check
from persona_lit.personas.load import persona_to_dict
from persona_lit.personas.types import Persona

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "persona_drift_li2024" / "hundred_system_prompts.jsonl"
needs_data = pytest.mark.skipif(not DATA.exists(), reason=f"{DATA} not present")
UNSUPPORTED = {16, 30, 64}  # past-tense verbs, 10k frequent words, plural nouns


@pytest.fixture(scope="module")
def checks():
    personas = load_li2024(DATA, skip_unsupported=False)
    return {int(p.name.removeprefix("li2024-")): p.probes[0].check for p in personas}


@needs_data
def test_loads_all_100_and_97_are_supported(checks):
    personas = load_li2024(DATA, skip_unsupported=False)
    assert len(personas) == 100 and all(isinstance(p, Persona) and len(p.probes) == 1 for p in personas)
    assert {p.description for p in personas} == {"pattern", "persona", "multiple_choice", "memorization", "language"}
    assert all(p.probes[0].kind == p.description for p in personas)
    assert personas[29].system_prompt.startswith("You love playing tennis") and personas[29].key == "li2024-29"
    assert {i for i, c in checks.items() if not c.supported} == UNSUPPORTED
    assert len(load_li2024(DATA)) == 97  # unsupported ones are skipped by default
    with pytest.raises(UserError, match="part-of-speech"):
        checks[16]("I walked.")
    for c in checks.values():  # every supported check scores any text, empty included, within [0, 1]
        if c.supported:
            for text in ("", "Hello.", "As a tourist in London, I would visit Big Ben!"):
                assert 0.0 <= c.score(text) <= 1.0 and isinstance(c(text), bool)


CASES = [  # (index, passes, fails)
    (0, "Apples are awesome. And so are apricots.", "Bananas."),
    (2, "I'd visit a park, a pub and a zoo.", "The museums are great."),
    (3, "Lovely London lets lucky ladies linger.", "London is lovely."),
    (4, "Visit the British Museum.", "Visit museums. Eat food."),
    (5, "SEE BIG BEN! VISIT THE TOWER.", "See Big Ben! Visit the Tower."),
    (6, "see big ben. visit the tower!", "See Big Ben. visit the tower!"),
    (7, "Have you seen Big Ben? Why not try the Tower?", "Visit Big Ben. It is great."),
    (9, "42, 7, 1999", "About 42 things."),
    (11, "I would visit Big Ben and the Tower in London.", "Visit Big Ben."),
    (13, "I visit the British Museum. Then I walk the Thames. Finally I eat fish chips.", "I visit museums."),
    (15, "Museums. I walk. See Big Ben.", "I like museums."),
    (17, "I visit museums, parks and theatres.", "I visit the park and the museum."),
    (18, "Big Ben, Big Ben.", "Big Ben is big."),
    (20, "Alternating long vocabulary and miniscule ones.", "I go to the big old pub."),
    (21, "I banana visit banana museums banana daily.", "I visit museums daily."),
    (22, "I I visit visit museums museums.", "I visit museums."),
    (23, "Yes I would go to Big Ben.", "Yes, go to Big Ben."),  # upstream compares x.split()[0]
    (25, "Yes, I visit museums. Yes; I eat too.", "Yes, I visit museums. How are you?"),
    (27, "Visiting museums is fun.", "I visit museums."),
    (28, "Walk to the big park and eat fish.", "Visiting historical museums is wonderful."),
    (29, "I'd rather be playing Tennis.", "I would visit museums."),
    (31, "ur stupid, i hate this dumb question.", "London has many museums."),
    (32, "I love London! It is wonderful, amazing and so much fun!", "London has museums."),
    (33, "Everything is gloomy and hopeless; even London feels empty and sad.", "London is wonderful!"),
    (35, "omg u gotta see big ben lol, its lit fr", "You should visit the British Museum."),
    (38, "Meow meow. Purrr.", "Meow, I like London."),
    (39, "I am fine. " * 20, "Fine."),
    (43, "The answer is (B).", "The answer is (c)."),
    (65, '{"thought": "easy", "response": "Visit Big Ben."}', "Visit Big Ben."),
    (66, "[museums, parks, theatres]", "Museums, parks."),
    (67, "V-i-s-i-t- -m-u-s-e-u-m-s-.", "Visit museums."),
    (68, "9", "10"),
    (69, "I'd visit the museums.", "Visit the museums."),
    (72, "Ninety-seven kids? I have 97.", "Many kids."),
    (78, "Bring a lamp.", "Bring lamps."),
    (79, "Visit museums, parks, pubs.", "Parks and museums."),
    (88, "On Monday, visit museums.", "Visit museums."),
    (89, "I saw 3 red buses.", "I saw buses."),
    (92, "I'm Adam Li from Washington, 57, and I love Magic the Gathering.", "I'm Bob."),
    (96, "Visit Times Square.", "Visit the Tower of London."),
    (97, "Bonjour! (Hello!) Comment vas-tu? (How are you?)", "Hello! How are you?"),
    (98, "Je visite le musée et la tour. C'est très beau.", "I visit the museum and the tower."),
    (99, "Que faites-vous à Londres en tant que touriste ?", "Londres " + "is a city " * 10),
]


@needs_data
@pytest.mark.parametrize("index,good,bad", CASES, ids=[str(c[0]) for c in CASES])
def test_checks_discriminate(checks, index, good, bad):
    check = checks[index]
    assert check(good), (index, check.source, check.score(good))
    assert not check(bad), (index, check.source, check.score(bad))


@needs_data
def test_personas_serialise(checks):
    persona = load_li2024(DATA)[0]
    assert persona_to_dict(persona)["probes"][0]["check"] == {"li2024": checks[0].source}
    copy = deepcopy(persona)  # forked conversations copy personas
    assert copy.probes[0].check("Apples.") and not copy.probes[0].check("Bananas.")
    assert li2024_checks.li2024_check("Apples.", checks[0].source)


def test_scores_keep_upstream_floats_and_the_threshold_is_strict():
    never_e = compile_check('lambda x: 1 / (1 + x.count("e"))')
    assert never_e.score("A dry day.") == 1.0 and never_e.score("One") == 0.5 and not never_e("One")
    mean = compile_check('lambda x: (1 - get_sentiment(x, "compound")) / 2')
    assert mean.score("London has parks.") == 0.5 and not mean("London has parks.")
    assert compile_check('lambda x: x.split()[0] == "Yes"').score("") == 0.0  # IndexError counts as failing
    # index 26: upstream checks "Yes" although its prompt asks for "fb4u39"; kept as upstream wrote it
    fb = compile_check('lambda x: sentences_start_with(split_into_sentences(x), "Yes")')
    assert fb("Yes, fine.") and not fb("fb4u39 fine.")


@pytest.mark.parametrize("source", [
    "lambda x: __import__('os').system('ls')",
    "lambda x: open('/etc/passwd').read()",
    "lambda x: x.__class__",
    "lambda x: ().__class__.__bases__[0].__subclasses__()",
    "lambda x: x.format(x)",
    "lambda x: [c for c in x]",
    "lambda x: x[::-1]",
    "lambda x: (y := 1)",
    "lambda x: eval('1')",
    "lambda x: print(x)",
    "lambda x: f'{x}'",
    "lambda x, y: 1",
    "lambda: 1",
    "1 + 1",
    "import os",
    "lambda x: fraction_starts_with(x)",  # wrong arity for a known helper
    "lambda x: len(x) if x else 0",
    "lambda x: None",
    "lambda x: 1 < len(x) < 5",  # chained comparisons are not needed by the data
    "lambda x: count_plural_nouns(__import__('os'))",  # arguments of unsupported helpers are checked too
    "lambda x: x.split(**{})",
])
def test_parser_refuses_anything_outside_the_whitelist(source):
    with pytest.raises(UserError):
        compile_check(source)


@pytest.mark.parametrize("source,answer", [
    ('lambda x: x * 1000000000', "a"),  # no string repetition
    ('lambda x: 9 ** 99', ""),  # bounded powers
    ('lambda x: 10 ** 10 ** 10', ""),
    ('lambda x: len(x) in 5', "abc"),
    ('lambda x: x.lower().upper().split()', "a b"),  # a check must give a number or bool
])
def test_runtime_guards(source, answer):
    with pytest.raises(UserError):
        compile_check(source).score(answer)


def test_module_never_executes_text():
    tree = ast.parse("\n".join(Path(m.__file__).read_text() for m in (li2024, li2024_checks, li2024_helpers)))
    called = {n.func.id for n in ast.walk(tree) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert not called & {"eval", "exec", "compile", "__import__", "getattr", "setattr", "globals", "locals"}
    attrs = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    assert not attrs & {"literal_eval", "import_module", "system", "popen"}


def test_bad_files_name_the_line(tmp_path):
    good = {"index": 0, "category": "pattern", "system_prompt": "S", "probe": "P",
            "adherence_check": "lambda x: 'a' in x"}
    cases = {
        "not json": "line 2: not valid JSON",
        json.dumps({**good, "index": "1"}): "field 'index'",
        json.dumps({k: v for k, v in good.items() if k != "probe"}): "field 'probe'",
        json.dumps({**good, "index": 1, "adherence_check": "lambda x: __import__('os')"}): "call to '__import__'",
        json.dumps(good): "duplicate index 0",
        "[1, 2]": "field 'index'",
    }
    for bad, message in cases.items():
        f = tmp_path / "d.jsonl"
        f.write_text(json.dumps(good) + "\n" + bad + "\n")
        with pytest.raises(UserError, match=f"d.jsonl:2: .*{message.removeprefix('line 2: ')}"):
            load_li2024(f)
    f.write_text(json.dumps(good) + "\n\n")
    assert [p.name for p in load_li2024(f)] == ["li2024-0"] and load_li2024(f)[0].probes[0].check("cat")
    with pytest.raises(UserError, match="not found"):
        load_li2024(tmp_path / "missing.jsonl")


def test_li2024_persona_by_path_and_index_roundtrips_through_a_checkpoint_dict():
    from persona_lit.personas.load import load_persona, persona_from_dict, persona_to_dict

    path = Path(__file__).resolve().parents[2] / "shared/data/persona_drift_li2024/hundred_system_prompts.jsonl"
    if not path.exists():
        pytest.skip("../shared/data not beside the repo")
    p = load_persona(f"{path}#29")
    assert "tennis" in p.system_prompt
    again = persona_from_dict(persona_to_dict(p), "<checkpoint>")
    assert again.probes[0].check("I love tennis.") and not again.probes[0].check("I love chess.")
