"""Tested versions: pyproject's ranges, constraints.txt's pins and the import-time check agree, and an untested
transformers/Lightning stops persona_lit at import with one line (train.py/evaluate.py: `error: ...`, exit 2)."""

import importlib.metadata
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from persona_lit import versions

REPO = Path(__file__).resolve().parent.parent
ALLOW = "PERSONA_LIT_ALLOW_UNTESTED"


def fake_versions(monkeypatch, **fake: str) -> None:
    """importlib.metadata.version reports `fake` for the packages named, the truth for the others."""
    real = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: fake.get(name.replace("-", "_")) or real(name))


@pytest.mark.parametrize(
    "package, version, tested",
    [
        ("transformers", "5.0.0", ">=5.23,<5.24"),
        ("transformers", "5.24.0", ">=5.23,<5.24"),
        ("lightning", "2.5.1", ">=2.6,<2.7"),
    ],
)
def test_untested_version_raises_one_line(monkeypatch, package, version, tested):
    monkeypatch.delenv(ALLOW, raising=False)
    fake_versions(monkeypatch, **{package: version})
    with pytest.raises(ImportError) as info:
        versions.check()
    msg = str(info.value)
    assert isinstance(info.value, versions.UntestedVersionError)
    assert "\n" not in msg
    assert msg.startswith(f"persona_lit: {package} {version} is untested (tested: {tested})"), msg
    assert "pip install -c constraints.txt" in msg and f"{ALLOW}=1" in msg, msg


def test_tested_versions_pass(monkeypatch):
    monkeypatch.delenv(ALLOW, raising=False)
    fake_versions(monkeypatch, transformers="5.23.0", lightning="2.6.0")
    versions.check()
    fake_versions(monkeypatch, transformers="5.23.7", lightning="2.6.99")
    versions.check()


def test_two_untested_packages_still_one_line(monkeypatch):
    monkeypatch.delenv(ALLOW, raising=False)
    fake_versions(monkeypatch, transformers="5.0.0", lightning="2.5.0")
    with pytest.raises(versions.UntestedVersionError) as info:
        versions.check()
    msg = str(info.value)
    assert "\n" not in msg and "transformers 5.0.0" in msg and "lightning 2.5.0" in msg, msg


def test_escape_hatch_warns_instead(monkeypatch):
    fake_versions(monkeypatch, transformers="5.0.0")
    monkeypatch.setenv(ALLOW, "1")
    with pytest.warns(UserWarning, match=r"transformers 5\.0\.0 is untested"):
        versions.check()
    monkeypatch.setenv(ALLOW, "0")  # "0" is not a yes
    with pytest.raises(versions.UntestedVersionError):
        versions.check()


# --- the real thing in a fresh interpreter: an old transformers as installed metadata sees it ------------------


@pytest.fixture
def old_transformers(tmp_path) -> dict:
    """An environment whose importlib.metadata finds transformers 5.0.0 first (a dist-info on PYTHONPATH)."""
    dist = tmp_path / "shim" / "transformers-5.0.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: transformers\nVersion: 5.0.0\n")
    env = {k: v for k, v in os.environ.items() if k != ALLOW}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(dist.parent), env.get("PYTHONPATH")) if p)
    env["WANDB_MODE"] = "disabled"
    return env


def py(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("script", ["evaluate.py", "train.py"])
def test_entry_point_exits_2_with_one_line(old_transformers, script):
    proc = py(old_transformers, script, "ckpt=nowhere.ckpt", "logger=none")
    detail = f"rc={proc.returncode}\nstdout:{proc.stdout[-2000:]}\nstderr:{proc.stderr[-3000:]}"
    lines = [l for l in proc.stderr.splitlines() if l.strip()]
    assert proc.returncode == 2, detail
    assert "Traceback" not in proc.stderr, detail
    assert len(lines) == 1, detail
    assert lines[0].startswith("error: persona_lit: transformers 5.0.0 is untested (tested: >=5.23,<5.24)"), detail


def test_import_raises_and_escape_hatch(old_transformers):
    proc = py(old_transformers, "-c", "import persona_lit")
    assert proc.returncode == 1 and "UntestedVersionError: persona_lit: transformers 5.0.0" in proc.stderr, proc.stderr
    allowed = {**old_transformers, ALLOW: "1"}
    probe = "import sys, persona_lit; print('imported', 'transformers' in sys.modules, 'lightning' in sys.modules)"
    proc = py(allowed, "-W", "always", "-c", probe)
    assert proc.returncode == 0, proc.stderr
    # The check reads metadata only: importing persona_lit imports neither transformers nor Lightning.
    assert proc.stdout.strip() == "imported False False", proc.stdout
    assert "UserWarning: persona_lit: transformers 5.0.0 is untested" in proc.stderr, proc.stderr


# --- pyproject.toml, constraints.txt and persona_lit/versions.py agree ---------------------------------------------


def pyproject_requirements() -> dict[str, Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["test"]]
    return {canonicalize_name(r.name): r for r in reqs}


def constraint_pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        req = Requirement(line)
        (spec,) = req.specifier
        assert spec.operator == "==" and not req.extras and not req.marker, f"not an exact pin: {line!r}"
        name = canonicalize_name(req.name)
        assert name not in pins, f"{name} pinned twice"
        pins[name] = spec.version
    return pins


def test_constraints_pin_every_dependency_inside_pyproject_range():
    reqs, pins = pyproject_requirements(), constraint_pins()
    missing = sorted(set(reqs) - set(pins))
    assert not missing, f"pyproject dependencies not pinned in constraints.txt: {missing}"
    outside = {
        n: (pins[n], str(r.specifier)) for n, r in reqs.items() if not r.specifier.contains(pins[n], prereleases=True)
    }
    assert not outside, f"constraints.txt pins outside pyproject's ranges: {outside}"


def test_constraints_leave_out_the_project_and_pin_torch_without_local_label():
    pins = constraint_pins()
    assert "persona-lit" not in pins
    # `torch==2.13.0+cpu` only resolves where that wheel is on disk; `==2.13.0` also matches it when it is.
    assert Version(pins["torch"]).local is None, pins["torch"]
    makefile = (REPO / "Makefile").read_text()
    assert f"torch=={pins['torch']}" in makefile, "Makefile's first torch install and constraints.txt disagree"
    assert "-c constraints.txt" in makefile


def test_import_check_ranges_are_pyprojects():
    reqs, pins = pyproject_requirements(), constraint_pins()
    for package, spec in versions.TESTED.items():
        assert str(reqs[package].specifier) == str(Requirement(f"{package}{spec}").specifier), package
        assert Version(pins[package]) in reqs[package].specifier, package
