"""Result directories written all at once: a killed run leaves no half-written results."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from persona_lit.errors import UserError


@contextlib.contextmanager
def staged_dir(out_dir: Path, key: str = "out_dir") -> Iterator[Path]:
    """Yields a temporary sibling of `out_dir` to write into; renamed to `out_dir` when the block ends
    without error, deleted otherwise. `out_dir` must not exist or be empty."""
    out_dir = Path(out_dir)
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    except OSError as e:
        raise UserError(f"{key}={out_dir}: cannot write there ({e.strerror})") from None
    try:
        yield tmp
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
