"""The pinned environments agree with the version ranges users get from pyproject.toml.

``constraints.txt`` pins what ``make test``/``make demo`` install; ``constraints-min.txt``
pins the lowest versions ``make test-min`` checks. A range edited without its pin (or the
other way round) would make CI test something users never get.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

packaging = pytest.importorskip("packaging.requirements")
if sys.version_info < (3, 11):
    pytest.skip("tomllib needs Python 3.11", allow_module_level=True)
import tomllib  # noqa: E402 - after the version check
from packaging.requirements import Requirement  # noqa: E402
from packaging.utils import canonicalize_name  # noqa: E402
from packaging.version import Version  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _pins(name: str) -> dict[str, str]:
    pins = {}
    for line in (ROOT / name).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        match = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        assert match, f"{name}: not a plain pin: {line!r}"
        assert canonicalize_name(match[1]) not in pins, f"{name}: {match[1]} pinned twice"
        pins[canonicalize_name(match[1])] = match[2]
    return pins


def _project() -> dict[str, object]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    assert isinstance(project, dict)
    return project


def _requirements(groups: tuple[str, ...] = ()) -> list[Requirement]:
    project = _project()
    reqs = [Requirement(r) for r in project["dependencies"]]  # type: ignore[attr-defined]
    extras = project["optional-dependencies"]
    for group in groups:
        reqs += [Requirement(r) for r in extras[group]]  # type: ignore[index]
    return reqs


def test_every_requirement_of_make_test_is_pinned_within_its_range() -> None:
    pins = _pins("constraints.txt")
    for req in _requirements(("test", "keras", "torch", "s3", "bench")):
        name = canonicalize_name(req.name)
        if req.marker is not None and not req.marker.evaluate():
            continue
        assert name in pins, f"constraints.txt does not pin {req.name} (run tools/lock)"
        assert req.specifier.contains(pins[name], prereleases=True), (
            f"constraints.txt pins {req.name}=={pins[name]}, outside pyproject.toml's {req}"
        )


def test_the_min_constraints_are_the_core_lower_bounds() -> None:
    pins = _pins("constraints-min.txt")
    lower = {}
    for req in _requirements(("test",)):
        bounds = [s.version for s in req.specifier if s.operator == ">="]
        if bounds:
            lower[canonicalize_name(req.name)] = Version(bounds[0])
    # Every pin is a lower bound of pyproject.toml, and every core dependency has one.
    for name, version in pins.items():
        assert lower.get(name) == Version(version), f"constraints-min.txt pins {name}=={version}; pyproject says >={lower.get(name)}"
    for req in _requirements():
        assert canonicalize_name(req.name) in pins, f"constraints-min.txt lacks the core dependency {req.name}"


def test_the_wheel_holds_every_module(tmp_path: Path) -> None:
    """A wheel built from the tree holds every module of ckptmgr and of its adapters.

    The tests run on an editable install, which finds every file in the tree: a
    subpackage missing from pyproject.toml's package list (ckptmgr.codec, .storage and
    .cli were, for a while) would only break users who install the wheel.
    """
    import shutil
    import subprocess
    import zipfile

    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "ckptmgr", "adapters"):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, src / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(tmp_path / "dist"), str(src)],
        check=True, timeout=300,
    )
    wheel = next((tmp_path / "dist").glob("ckptmgr-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"ckptmgr/{p.relative_to(ROOT / 'ckptmgr').as_posix()}" for p in (ROOT / "ckptmgr").rglob("*.py")}
    expected |= {f"ckptmgr/adapters/{p.relative_to(ROOT / 'adapters').as_posix()}" for p in (ROOT / "adapters").rglob("*.py")}
    assert sorted(expected - names) == []
    assert "ckptmgr/py.typed" in names
