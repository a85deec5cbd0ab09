"""The documentation as the tests read it: README.md and the reference pages of docs/. Tests that check what the
documentation says (its commands, its tables, the bundles beside them) read every page, so a section can move
between pages without leaving its checks behind."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GENERATED = re.compile(r"<!-- generated: [\w-]+ -->\n.*?<!-- end generated -->", re.S)


def pages() -> dict[str, str]:
    """Path relative to the repository -> text: README.md first, then docs/*.md in name order."""
    paths = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    return {str(p.relative_to(REPO)): p.read_text() for p in paths}


def text() -> str:
    """Every page, one after the other (a blank line between pages, so no block runs across two)."""
    return "\n\n".join(pages().values())


def hand_kept(page: str) -> str:
    """A page with its generated blocks (scripts/tables.py, checked by tests/test_tables.py) blanked out, each
    replaced by as many characters so that offsets stay where they were."""
    return GENERATED.sub(lambda m: re.sub(r"[^\n]", " ", m[0]), page)
