"""Result directories written all at once: a killed run leaves no half-written results."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from persona_lit.errors import UserError

UNFINISHED = "UNFINISHED"  # the marker file inside a staged directory until it is renamed into place


@contextlib.contextmanager
def staged_dir(out_dir: Path, key: str = "out_dir") -> Iterator[Path]:
    """Yields a temporary sibling of `out_dir` to write into; renamed to `out_dir` when the block ends
    without error, deleted otherwise. `out_dir` must not exist or be empty. Until the rename the temporary
    directory holds a file UNFINISHED: a run killed inside the block leaves a hidden `.<name>.*` directory
    marked as such, never results that look complete."""
    out_dir = Path(out_dir)
    try:
        if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())):  # before anything is written
            raise UserError(f"{key}={out_dir}: exists and is not an empty directory (it may hold results); allowed: "
                            f"a new or empty directory")
        out_dir.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}."))
    except OSError as e:
        raise UserError(f"{key}={out_dir}: cannot write there ({e.strerror})") from None
    try:
        (tmp / UNFINISHED).write_text("written by a run that has not finished (or was killed): not a result\n")
        yield tmp
        (tmp / UNFINISHED).unlink()
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; results are as readable as any directory
        if out_dir.exists():
            out_dir.rmdir()
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def staged_file(path: Path) -> Iterator[str]:
    """Yields a temporary file name beside `path` to write; on success it gets the usual permissions
    (umask) and is renamed onto `path` (atomic), on error it is deleted: a killed run leaves the old file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; a result is as readable as any other file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def write_json(path: str | os.PathLike, data: object) -> Path:
    """`data` as indented JSON at `path` (its folder made), written to a temporary sibling and renamed: a reader
    never sees half a file."""
    import json

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path
