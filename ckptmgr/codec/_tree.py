"""Reading a manifest's ``tree``: its leaves, a selection of subtrees, the tree rebuilt."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, cast

from ..errors import CorruptCheckpointError
from ..info import LeafInfo
from ._format import (
    _CONTAINERS,
    _LEAF_KINDS,
    _SAFE_NAME,
    MAX_DEPTH,
    MAX_DIM,
    MAX_NDIM,
    STATE,
    _dtype_from_str,
    _keystr,
)


def _child_name(key: str, position: int) -> str:
    return key if _SAFE_NAME.fullmatch(key) else f"~{position}"


def iter_leaves(spec: Any, where: str = "") -> Iterator[tuple[tuple[str | int, ...], str, dict[str, Any]]]:
    """Yield ``(key path, HDF5 path, node)`` for every stored leaf of a manifest tree.

    Raises:
        CorruptCheckpointError: the tree description is malformed.
    """
    stack: list[tuple[Any, tuple[str | int, ...], str]] = [(spec, (), "/" + STATE)]
    while stack:
        node, keys, h5path = stack.pop()
        if len(keys) > MAX_DEPTH or not isinstance(node, dict):
            raise CorruptCheckpointError(f"{where}: malformed tree at {_keystr(keys)}")
        kind = node.get("t")
        if kind in _CONTAINERS:
            items = node.get("items")
            if not isinstance(items, list):
                raise CorruptCheckpointError(f"{where}: malformed tree at {_keystr(keys)}")
            children = []
            for position, item in enumerate(items):
                if kind == "dict":
                    if not (isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)):
                        raise CorruptCheckpointError(f"{where}: malformed dict at {_keystr(keys)}")
                    children.append((item[1], (*keys, item[0]), f"{h5path}/{_child_name(item[0], position)}"))
                else:
                    children.append((item, (*keys, position), f"{h5path}/{position}"))
            if kind == "dict" and len({child[1][-1] for child in children}) != len(children):
                raise CorruptCheckpointError(f"{where}: duplicate dict keys at {_keystr(keys)}")
            stack.extend(reversed(children))
        elif kind == "none":
            continue
        elif kind in _LEAF_KINDS:
            yield keys, h5path, node
        else:
            raise CorruptCheckpointError(f"{where}: unknown node kind {kind!r} at {_keystr(keys)}")


class SelectionError(KeyError):
    """A selected key path is not in the checkpoint's tree (a KeyError naming it)."""

    def __str__(self) -> str:
        return str(self.args[0])


# A selection of subtrees: key path segment -> the selection below it; an empty dict
# selects everything below (the subtree at a selected path is read whole).
Selection = dict[str, "Selection"]


def selection(paths: Iterable[Sequence[str]]) -> Selection:
    """The selection of the subtrees at ``paths`` (each a sequence of key segments)."""
    root: Selection = {}
    whole: set[int] = set()
    for path in paths:
        node = root
        for segment in path:
            if id(node) in whole:
                break
            node = node.setdefault(segment, {})
        else:
            node.clear()
            whole.add(id(node))
    return root


def _build(
    spec: Any, leaf_value: Callable[[dict[str, Any], str], Any], where: str, select: Selection | None = None,
    quick_leaf: Callable[[dict[str, Any]], Any] | None = None,
) -> Any:
    """Rebuild the tree of ``spec``; ``leaf_value(node, h5path)`` supplies each leaf.

    ``quick_leaf(node)``, where given, is asked first for an array leaf that is a dict's
    value: it returns the array, or None to leave it to ``leaf_value`` (which raises the
    errors); the leaf's path is then only made when needed.

    With ``select``, only the selected subtrees are built (and so read), under the same
    containers: a dict keeps the selected keys, a list or tuple the selected items, in
    their order. A selected path that is not in the tree raises KeyError naming it.
    """

    def build(node: Any, h5path: str, depth: int, sel: Selection | None, keys: tuple[str | int, ...]) -> Any:
        if depth > MAX_DEPTH or not isinstance(node, dict):
            raise CorruptCheckpointError(f"{where}: malformed tree")
        kind = node.get("t")
        if sel is not None and not sel:
            sel = None  # everything below
        if kind == "dict":
            out: dict[str, Any] = {}
            for position, (key, child) in enumerate(node["items"]):
                if sel is None and type(child) is dict and child.get("t") == "ndarray":
                    value = quick_leaf(child) if quick_leaf is not None else None
                    out[key] = (value if value is not None
                                else leaf_value(child, f"{h5path}/{_child_name(key, position)}"))
                elif sel is None or key in sel:
                    out[key] = build(child, f"{h5path}/{_child_name(key, position)}", depth + 1,
                                     None if sel is None else sel[key], (*keys, key))
            if sel is None and len(out) != len(node["items"]):
                raise CorruptCheckpointError(f"{where}: duplicate dict keys")
            _check_selected(sel, out.keys(), keys)
            return out
        if kind in ("list", "tuple"):
            wanted = None if sel is None else {str(i) for i in range(len(node["items"]))} & set(sel)
            items = [build(child, f"{h5path}/{i}", depth + 1, None if sel is None else sel[str(i)], (*keys, i))
                     for i, child in enumerate(node["items"]) if wanted is None or str(i) in wanted]
            _check_selected(sel, wanted or (), keys)
            return items if kind == "list" else tuple(items)
        if sel is not None:
            raise SelectionError(
                f"No key {_keystr((*keys, next(iter(sel))))} in {where}: {_keystr(keys)} is not a container"
            )
        if kind == "none":
            return None
        return leaf_value(node, h5path)

    def _check_selected(sel: Selection | None, found: Iterable[str], keys: tuple[str | int, ...]) -> None:
        missing = [] if sel is None else sorted(set(sel) - set(found))
        if missing:
            raise SelectionError(f"No key {_keystr((*keys, missing[0]))} in {where}")

    try:
        return build(spec, "/" + STATE, 0, select, ())
    finally:
        # build calls itself through its closure: a cycle that would hold leaf_value, and
        # through it the reader and its buffers, until the collector ran.
        build = cast(Any, None)


def describe_leaves(manifest: Mapping[str, Any], where: str) -> list[LeafInfo]:
    """Every stored leaf of a manifest's tree: key path, kind, dtype, shape, bytes.

    Raises:
        CorruptCheckpointError: the tree description is malformed.
    """
    out = []
    for keys, _h5path, node in iter_leaves(manifest.get("tree"), where):
        shape = _validate_shape(node, where)
        dtype = _dtype_from_str(node.get("dtype"), where)
        out.append(LeafInfo(keys, str(node["t"]), dtype.name, shape, math.prod(shape) * dtype.itemsize))
    return out


def _validate_shape(node: dict[str, Any], where: str) -> tuple[int, ...]:
    shape = node.get("shape")
    if type(shape) is not list or len(shape) > MAX_NDIM:
        raise CorruptCheckpointError(f"{where}: invalid shape {shape!r}")
    for n in shape:
        if type(n) is not int or not 0 <= n < MAX_DIM:
            raise CorruptCheckpointError(f"{where}: invalid shape {shape!r}")
    return tuple(shape)
