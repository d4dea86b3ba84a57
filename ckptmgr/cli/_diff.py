"""``ckptmgr diff DIR A B``: which arrays changed between two checkpoints, and by how much."""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from ckptmgr import CheckpointInfo, CheckpointManager

from ._common import (
    EXIT_OK,
    EXIT_USAGE,
    CliError,
    KeyPath,
    _key_text,
    _number,
    _open_reader,
    _print_json,
    _resolve,
    _shape_text,
    _table,
)

# ------------------------------------------------------------------------------ diff


@dataclasses.dataclass
class _Leaf:
    """One leaf of a restored state tree, described for comparison."""

    value: Any
    kind: str
    array: np.ndarray[Any, Any] | None  # None for str, bytes, None and ints beyond int64

    @property
    def text(self) -> str:
        """``float32[3, 4]`` for arrays, ``int 200`` for Python scalars, ``str 'abc'``."""
        if self.kind in ("ndarray", "npscalar") and self.array is not None:
            return f"{self.array.dtype.name}{_shape_text(list(self.array.shape))}"
        if self.kind == "none":
            return "None"
        shown = repr(self.value)
        return f"{self.kind} {shown if len(shown) <= 24 else shown[:21] + '...'}"


def _leaf(value: Any) -> _Leaf:
    if isinstance(value, np.ndarray):
        return _Leaf(value, "ndarray", value)
    if isinstance(value, np.generic):
        return _Leaf(value, "npscalar", np.asarray(value))
    if value is None:
        return _Leaf(value, "none", None)
    kind = type(value).__name__
    if type(value) in (bool, int, float, complex):
        array = np.asarray(value)
        return _Leaf(value, kind, array if array.dtype.kind in "biufc" else None)  # big ints: object
    return _Leaf(value, kind, None)


def _flatten(tree: Any) -> tuple[dict[KeyPath, _Leaf], dict[KeyPath, str]]:
    """The leaves of a state tree by key path, and the container types by key path."""
    leaves: dict[KeyPath, _Leaf] = {}
    containers: dict[KeyPath, str] = {}
    stack: list[tuple[KeyPath, Any]] = [((), tree)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, dict):
            containers[path] = "dict"
            stack.extend(reversed([((*path, k), v) for k, v in node.items()]))
        elif isinstance(node, (list, tuple)):
            containers[path] = type(node).__name__
            stack.extend(reversed([((*path, i), v) for i, v in enumerate(node)]))
        else:
            leaves[path] = _leaf(node)
    return leaves, containers


def _as_numbers(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any] | None:
    """``array`` as float64 (complex128 for complex), or None if it holds no numbers."""
    kind = array.dtype.kind
    if kind == "c":
        return array.astype(np.complex128)
    if kind in "biuf":
        return array.astype(np.float64)
    if kind == "V":  # bfloat16 and the other ml_dtypes
        try:
            return array.astype(np.float64)
        except (TypeError, ValueError):
            return None
    return None


def _norm(x: np.ndarray[Any, Any]) -> float:
    with np.errstate(all="ignore"):
        return float(np.linalg.norm(x.reshape(-1)))


def _entry(path: KeyPath, a: str | None, b: str | None, status: str | None = None) -> dict[str, Any]:
    """A diff entry with every field (``None`` where a statistic does not apply)."""
    return {
        "key": _key_text(path), "path": list(path), "status": status, "a": a, "b": b,
        "dtype_changed": None, "shape_changed": None, "max_abs_diff": None,
        "norm_a": None, "norm_b": None, "norm_diff": None, "changed_elements": None, "elements": None,
    }


def _compare(path: KeyPath, a: _Leaf | None, b: _Leaf | None) -> dict[str, Any]:
    """One diff entry: status (changed/unchanged/added/removed) and the statistics that apply."""
    entry = _entry(path, a.text if a else None, b.text if b else None)
    if a is None or b is None:
        present = a or b
        assert present is not None
        numbers = _as_numbers(present.array) if present.array is not None else None
        entry["status"] = "added" if a is None else "removed"
        entry["norm_a" if b is None else "norm_b"] = _norm(numbers) if numbers is not None else None
        return entry
    x = _as_numbers(a.array) if a.array is not None else None
    y = _as_numbers(b.array) if b.array is not None else None
    if a.array is None or b.array is None or x is None or y is None:
        if a.kind != b.kind:
            same_value = False
        elif a.array is not None and b.array is not None:  # arrays of a dtype with no float view
            same_value = (a.array.dtype, a.array.shape, a.array.tobytes()) == (
                b.array.dtype, b.array.shape, b.array.tobytes())
        else:  # str, bytes, None, big int
            same_value = type(a.value) is type(b.value) and a.value == b.value
        entry["status"] = "unchanged" if same_value else "changed"
        return entry
    entry["dtype_changed"] = a.array.dtype != b.array.dtype
    entry["shape_changed"] = a.array.shape != b.array.shape
    entry["norm_a"], entry["norm_b"] = _norm(x), _norm(y)
    changed = a.kind != b.kind or entry["dtype_changed"] or entry["shape_changed"]
    if not entry["shape_changed"]:
        with np.errstate(all="ignore"):
            if a.array.dtype == b.array.dtype and a.array.dtype.kind in "biu":
                same = np.asarray(a.array == b.array)  # exact, even beyond float64's 2**53
            else:
                same = np.asarray((x == y) | (np.isnan(x) & np.isnan(y)))
            delta = np.where(same, 0.0, np.abs(y - x))
        entry["elements"] = int(same.size)
        entry["changed_elements"] = int(same.size - np.count_nonzero(same))
        entry["max_abs_diff"] = float(delta.max()) if delta.size else 0.0
        entry["norm_diff"] = _norm(delta)
        changed = changed or entry["changed_elements"] > 0
    entry["status"] = "changed" if changed else "unchanged"
    return entry


def _load_tree(mgr: CheckpointManager, info: CheckpointInfo) -> Any:
    """The verified state tree of a native checkpoint.

    Raises:
        CliError: ``info`` is a payload checkpoint (a framework-native file).
        CorruptCheckpointError, CheckpointError: as :meth:`CheckpointManager.restore`.
    """
    if info.kind != "tree":
        raise CliError(
            f"diff compares native checkpoints only; step {info.step} is a payload ({info.path})", EXIT_USAGE
        )
    tree = mgr.restore(info.step)
    if isinstance(tree, os.PathLike):  # a payload restores to the path of its verified file
        raise CliError(f"diff compares native checkpoints only; step {info.step} is a payload ({tree})", EXIT_USAGE)
    return tree


def _cmd_diff(args: argparse.Namespace) -> int:
    """``ckptmgr diff DIR A B``: which arrays changed between two checkpoints, and by how much."""
    mgr = _open_reader(args.directory)
    info_a, info_b = _resolve(mgr, args.a), _resolve(mgr, args.b)
    leaves_a, containers_a = _flatten(_load_tree(mgr, info_a))
    leaves_b, containers_b = _flatten(_load_tree(mgr, info_b))
    entries = [_compare(p, leaves_a.get(p), leaves_b.get(p)) for p in {**leaves_a, **leaves_b}]
    for path, kind in containers_a.items():
        other = containers_b.get(path)
        if other is not None and other != kind:
            entries.append(_entry(path, kind, other, "changed"))  # e.g. a list became a tuple
    counts = {s: sum(e["status"] == s for e in entries) for s in ("changed", "added", "removed", "unchanged")}
    metric_names = list({**info_a.metrics, **info_b.metrics})
    if args.json:

        def side(info: CheckpointInfo) -> dict[str, Any]:
            return {"step": info.step, "path": str(info.path), "metrics": dict(info.metrics)}

        _print_json({"directory": str(mgr.directory), "a": side(info_a), "b": side(info_b),
                     "summary": counts, "entries": entries})
        return EXIT_OK
    print(f"a  step {info_a.step}  {info_a.path}")
    print(f"b  step {info_b.step}  {info_b.path}")
    for name in metric_names:
        print(f"   {name}: {_number(info_a.metrics.get(name, '-'))} -> {_number(info_b.metrics.get(name, '-'))}")
    shown = [e for e in entries if args.all or e["status"] != "unchanged"]
    if shown:
        print()

        def stat(entry: Mapping[str, Any], name: str) -> str:
            value = entry.get(name)
            return "-" if value is None else _number(value)

        rows = [
            [e["status"], e["key"], e["a"] or "-", e["b"] or "-", stat(e, "max_abs_diff"),
             stat(e, "norm_a"), stat(e, "norm_b"), stat(e, "norm_diff"),
             f"{e['changed_elements']}/{e['elements']}" if e.get("elements") is not None else "-"]
            for e in shown
        ]
        headers = ["STATUS", "KEY", "A", "B", "MAX|B-A|", "L2(A)", "L2(B)", "L2(B-A)", "CHANGED"]
        for line in _table(headers, rows, right={4, 5, 6, 7, 8}):
            print(line)
    differences = counts["changed"] + counts["added"] + counts["removed"]
    summary = ", ".join(f"{n} {s}" for s, n in counts.items())
    print(f"\n{summary}" if differences else f"\nno differences ({counts['unchanged']} keys)")
    return EXIT_OK
