"""Exact equality of two state trees, for the tests and for their child processes.

A plain module, not a fixture only: the reliability harness's child processes
(``_reliability.crash_child``, ``reader_child``) check what they restore with it, and
they run outside pytest. Test modules take it as the ``tree_equal`` fixture
(``conftest.py``) or import it from here.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np


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
