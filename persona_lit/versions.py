"""The transformers and Lightning versions CI tests, checked when persona_lit is imported.

persona_lit reaches into transformers internals (the cache layer classes, rotary embedding signatures,
the attention interface) and uses Lightning 2.6's `fit(weights_only=...)`, so a release outside the
tested range can fail deep inside a run or, worse, run and measure something else. Importing persona_lit
with one installed raises UntestedVersionError (an ImportError) whose message is one line; train.py and
evaluate.py print it as `error: ...` and exit 2. PERSONA_LIT_ALLOW_UNTESTED=1 turns it into a warning.

Reads installed versions with importlib.metadata: transformers and Lightning are not imported here.
These ranges are the ones in pyproject.toml (tests/test_versions.py keeps them equal).
"""

from __future__ import annotations

import os
import warnings
from importlib import metadata

from packaging.specifiers import SpecifierSet
from packaging.version import InvalidVersion, Version

TESTED = {
    "transformers": ">=5.23,<5.24",
    "lightning": ">=2.6,<2.7",
}
ALLOW_ENV = "PERSONA_LIT_ALLOW_UNTESTED"


class UntestedVersionError(ImportError):
    """An installed transformers/Lightning is outside the range CI tests."""


def untested() -> list[tuple[str, str, str]]:
    """(package, installed version, tested range) for each checked package that is installed and out of range."""
    found = []
    for package, spec in TESTED.items():
        try:
            installed = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue  # not installed: the real import says so where it is needed
        try:
            ok = SpecifierSet(spec).contains(Version(installed), prereleases=True)
        except InvalidVersion:
            ok = False
        if not ok:
            found.append((package, installed, spec))
    return found


def message(found: list[tuple[str, str, str]]) -> str:
    what = "; ".join(f"{p} {v} is untested (tested: {s})" for p, v, s in found)
    return (
        f"persona_lit: {what}; install the tested set with `pip install -c constraints.txt -e .` "
        f"or set {ALLOW_ENV}=1 to run anyway"
    )


def check() -> None:
    """Raise UntestedVersionError (one line) if an untested version is installed; only warn with the escape hatch."""
    found = untested()
    if not found:
        return
    if os.environ.get(ALLOW_ENV, "") not in ("", "0"):
        warnings.warn(message(found), stacklevel=2)
        return
    raise UntestedVersionError(message(found))
