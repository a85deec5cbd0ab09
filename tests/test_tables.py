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
