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
from collections.abc import Callable
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
