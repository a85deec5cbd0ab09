"""Generated tables (README.md, docs/) agree with the committed artifacts they are made from."""

import subprocess
import sys

from tests.conftest import REPO


def test_generated_tables_are_up_to_date():
    done = subprocess.run([sys.executable, "scripts/tables.py", "--check"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def test_a_stale_table_is_found(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("tables", REPO / "scripts" / "tables.py")
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)
    text = "x\n<!-- generated: eval_throughput -->\n| stale |\n<!-- end generated -->\n"
    rendered = tables.render(text)
    assert rendered != text and "| stale |" not in rendered and tables.render(rendered) == rendered


def test_free_and_replay_views_of_one_mechanism_are_compared_per_persona():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tables", REPO / "scripts" / "tables.py")
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)

    def res(name, protocol, diffs):
        head = {"metric": "choice/log_odds", "turn": 8}
        return {"name": name, "run": {"mechanism": "repeat", "model": "m", "headline": head,
                                      "protocol": {"name": protocol}},
                "by_persona": {k: {"vs_baseline/choice/log_odds": {"turn": [0, 8], "mean": [0.0, d]}}
                               for k, d in diffs.items()}}

    free = res("f", "free", {"a": 0.1, "b": 0.2, "c": 0.3, "d": 0.9})
    replay = res("r", "replay", {"a": 0.2, "b": 0.3, "c": 0.4, "e": 5.0})  # d and e: only one view measured them
    text = "\n".join(tables.protocol_agreement([free, replay]))
    assert "+0.200 free, +0.300 replay over the 3 personas" in text
    assert "correlation 1.00" in text and "gap 0.100" in text
    other = res("o", "replay", {"a": 0.2, "b": 0.3, "c": 0.4})
    other["run"]["mechanism"] = "lyra"
    assert tables.protocol_agreement([free, other]) == []  # different mechanisms are not two views of one


def test_a_trained_mechanism_is_paired_with_a_training_free_one_on_the_same_footing():
    import importlib.util

    spec = importlib.util.spec_from_file_location("tables", REPO / "scripts" / "tables.py")
    tables = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tables)

    def res(name, mechanism, ckpt, diffs, transcript="t1"):
        head = {"metric": "choice/log_odds", "turn": 8}
        return {"name": name, "run": {"mechanism": mechanism, "ckpt": ckpt, "model": "m", "headline": head,
                                      "conversations": 2, "question_split": {"hash": "q"},
                                      "persona_split": {"keys": ["a", "b", "c"]},
                                      "protocol": {"name": "replay", "transcript": transcript}},
                "by_persona": {k: {"vs_baseline/choice/log_odds": {"turn": [0, 8], "mean": [0.0, d]}}
                               for k, d in diffs.items()}}

    repeat = res("r", "repeat", None, {"a": 0.5, "b": 0.6, "c": 0.7})
    lyra = res("l", "lyra", "outputs/train/lyra/x", {"a": 1.5, "b": 1.5, "c": 1.8})
    text = "\n".join(tables.versus_training_free([repeat, lyra]))
    assert "`lyra` (trained, `l`) against `repeat` (training-free, `r`)" in text
    assert "+1.000 [" in text and "paired over 3 personas" in text and ": better." in text
    worse = res("w", "lyra", "x", {"a": 0.4, "b": 0.6, "c": 0.3})
    assert "no clear difference" in "\n".join(tables.versus_training_free([repeat, worse]))
    same = res("s", "lyra", "x", {"a": 1.5, "b": 1.6, "c": 1.7})
    assert "+1.000 for every persona (no interval): no interval, no verdict" in "\n".join(
        tables.versus_training_free([repeat, same]))
    assert "the same transcript" in text
    other = res("o", "lyra", "x", {"a": 1.5, "b": 1.5, "c": 1.8}, transcript="t2")
    assert "transcripts differ (t2 and t1" in "\n".join(tables.versus_training_free([repeat, other]))
    elsewhere = res("e", "lyra", "x", {"a": 1.5, "b": 1.5, "c": 1.8})
    elsewhere["run"]["persona_split"]["keys"] = ["a", "b", "d"]
    assert tables.versus_training_free([repeat, elsewhere]) == []  # other personas: nothing pairs
