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
