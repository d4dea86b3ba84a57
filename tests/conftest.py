"""Shared fixtures and helpers for ckptmgr's tests.

``slow`` tests (long crash and fuzz loops) are skipped unless the run selects them with
``-m slow`` or sets ``CKPTMGR_SLOW=1``.
"""

from __future__ import annotations

import math
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

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


# --------------------------------------------------------------------- tree equality


def _float_bits(value: float) -> bytes:
    return struct.pack("<d", value)


def _same_array_values(actual: np.ndarray[Any, Any], expected: np.ndarray[Any, Any]) -> bool:
    if expected.dtype.kind == "b":
        return bool(np.array_equal(actual, expected))
    if expected.dtype in (np.dtype(np.longdouble), np.dtype(np.clongdouble)):
        # long double carries padding bytes whose content is undefined: compare values
        # (NaN equal to NaN) and the sign of zeros instead of bytes.
        pairs = [(actual.real, expected.real), (actual.imag, expected.imag)]
        return all(
            np.array_equal(a, e, equal_nan=True) and np.array_equal(np.signbit(a), np.signbit(e))
            for a, e in pairs
        )
    # Everything else bit for bit: NaN payloads, -0.0, bfloat16 raw bytes.
    return bool(np.ascontiguousarray(actual).tobytes() == np.ascontiguousarray(expected).tobytes())


def assert_tree_equal(actual: Any, expected: Any, path: str = "state") -> None:
    """Exact equality of two state trees: container types, key order, dtypes (byte
    order included), shapes, and values bit for bit (NaN equals NaN, -0.0 is not 0.0)."""
    assert type(actual) is type(expected), f"{path}: {type(actual).__name__} != {type(expected).__name__}"
    if type(expected) is dict:
        assert list(actual) == list(expected), f"{path}: keys {list(actual)!r} != {list(expected)!r}"
        for key in expected:
            assert_tree_equal(actual[key], expected[key], f"{path}[{key!r}]")
    elif type(expected) in (list, tuple):
        assert len(actual) == len(expected), f"{path}: length {len(actual)} != {len(expected)}"
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            assert_tree_equal(a, e, f"{path}[{i}]")
    elif isinstance(expected, (np.ndarray, np.generic)):
        assert actual.dtype == expected.dtype and actual.dtype.str == expected.dtype.str, (
            f"{path}: dtype {actual.dtype!r} ({actual.dtype.str}) != {expected.dtype!r} ({expected.dtype.str})"
        )
        assert actual.shape == expected.shape, f"{path}: shape {actual.shape} != {expected.shape}"
        assert _same_array_values(np.asarray(actual), np.asarray(expected)), (
            f"{path}: values differ\n{actual!r}\n{expected!r}"
        )
    elif type(expected) is float:
        assert _float_bits(actual) == _float_bits(expected) or (math.isnan(actual) and math.isnan(expected)), (
            f"{path}: {actual!r} != {expected!r}"
        )
    elif type(expected) is complex:
        assert_tree_equal(actual.real, expected.real, f"{path}.real")
        assert_tree_equal(actual.imag, expected.imag, f"{path}.imag")
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


@pytest.fixture(scope="session")
def tree_equal() -> Callable[[Any, Any], None]:
    """:func:`assert_tree_equal`, for test modules (session-scoped: usable with Hypothesis)."""
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


def checkpoint_files(directory: Path) -> list[str]:
    """Names of the native checkpoint files in ``directory``, sorted."""
    return sorted(n for n in os.listdir(directory) if n.startswith(CKPT_PREFIX) and n.endswith(".h5"))


def temp_files(directory: Path) -> list[str]:
    """Leftovers of interrupted saves (``.ckpt-<hex>.tmp...``)."""
    return sorted(n for n in os.listdir(directory) if n.startswith(".ckpt-"))


@pytest.fixture
def ckpt_dir(tmp_path: Path) -> Path:
    return tmp_path / "run"
