"""State trees <-> their description (the manifest's ``tree``) and the arrays to store."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import CorruptCheckpointError
from ..info import LeafInfo
from ._format import (
    _CONTAINERS,
    _INT64_MAX,
    _INT64_MIN,
    _LEAF_KINDS,
    _SAFE_NAME,
    MAX_DEPTH,
    MAX_NDIM,
    STATE,
    Tree,
    _dtype_from_str,
    _dtype_to_str,
    _keystr,
    gc_paused,
)


@dataclass(slots=True)
class _Leaf:
    node: dict[str, Any]  # its description in the manifest's tree
    array: np.ndarray[Any, Any]
    h5path: str  # where it is stored (or would be, packed)


def _child_name(key: str, position: int) -> str:
    return key if _SAFE_NAME.fullmatch(key) else f"~{position}"


def _encode_leaf(value: Any, where: tuple[str | int, ...]) -> tuple[str, np.ndarray[Any, Any] | None]:
    vtype = type(value)
    if vtype is np.ndarray and _dtype_to_str(value.dtype) is not None and value.ndim <= MAX_NDIM:
        return "ndarray", value  # the usual leaf first
    # bool before int: bool is a subclass of int.
    if value is None:
        return "none", None
    if vtype is bool:
        return "bool", np.array(value, dtype=np.bool_)
    if vtype is int:
        if _INT64_MIN <= value <= _INT64_MAX:
            return "int", np.array(value, dtype=np.int64)
        nbytes = (value.bit_length() + 8) // 8
        return "bigint", np.frombuffer(value.to_bytes(nbytes, "little", signed=True), np.uint8)
    if vtype is float:
        return "float", np.array(value, dtype=np.float64)
    if vtype is complex:
        return "complex", np.array(value, dtype=np.complex128)
    if vtype is str:
        return "str", np.frombuffer(value.encode("utf-8", "surrogatepass"), np.uint8)
    if vtype is bytes:
        return "bytes", np.frombuffer(value, np.uint8)
    if vtype is np.ndarray or isinstance(value, np.generic):
        kind = "ndarray" if vtype is np.ndarray else "npscalar"
        array = np.asarray(value)
        if _dtype_to_str(array.dtype) is None:
            raise TypeError(
                f"Expected a numeric, bool or ml_dtypes array at {_keystr(where)}. "
                f"Received: dtype={array.dtype}"
            )
        if array.ndim > MAX_NDIM:
            raise ValueError(
                f"Expected at most {MAX_NDIM} dimensions at {_keystr(where)}. "
                f"Received: shape={array.shape}"
            )
        return kind, array
    raise TypeError(
        f"Expected a state tree of dict (str keys), list, tuple, NumPy array or scalar, "
        f"int, float, complex, bool, str, bytes or None at {_keystr(where)}. "
        f"Received: {vtype.__module__}.{vtype.__qualname__}{_framework_hint(vtype)}"
    )


# The core imports no framework; a framework's own types get a pointer to its adapter.
_FRAMEWORK_HINTS = {
    "torch": " (a PyTorch object: convert the state with ckptmgr.adapters.torch.to_tree(...) "
             "and back with from_tree/load_tree)",
    "tensorflow": " (a TensorFlow object: convert the state with ckptmgr.adapters.tf.to_tree(...))",
    "keras": " (a Keras object: convert the state with ckptmgr.adapters.tf.to_tree(...), or use "
             "ckptmgr.adapters.keras' callbacks)",
    "jax": " (a JAX array: convert it with numpy.asarray(x), e.g. jax.tree_util.tree_map(numpy.asarray, state))",
    "jaxlib": " (a JAX array: convert it with numpy.asarray(x), e.g. jax.tree_util.tree_map(numpy.asarray, state))",
}


def _framework_hint(vtype: type) -> str:
    return _FRAMEWORK_HINTS.get(vtype.__module__.partition(".")[0], "")


@dataclass(frozen=True)
class EncodedTree:
    """A validated state tree: its JSON-able description and the arrays to store.

    What :func:`write_file` writes. An asynchronous save encodes the tree once, in the
    caller's thread, and copies only the arrays (:meth:`copied`) before handing it to
    the background writer.
    """

    spec: dict[str, Any]
    leaves: list[_Leaf]

    def copied(self, into: EncodedTree | None = None) -> EncodedTree:
        """The same tree with private copies of its arrays (the caller may change its own).

        ``into``: an earlier copy no longer in use (the previous asynchronous save,
        written): its arrays are reused where shape and dtype match, so a save copies
        into memory that is already there instead of allocating the state again (and
        faulting every page of it in): the copy then runs at memcpy speed.
        """
        spare = into.leaves if into is not None and len(into.leaves) == len(self.leaves) else None
        out = []
        with gc_paused():
            for position, leaf in enumerate(self.leaves):
                array = leaf.array
                target = spare[position].array if spare is not None else None
                if target is not None and target.shape == array.shape and target.dtype == array.dtype:
                    np.copyto(target, array)
                else:
                    target = array.copy()
                out.append(_Leaf(leaf.node, target, leaf.h5path))
        return EncodedTree(self.spec, out)


def encode_tree(tree: Tree) -> EncodedTree:
    """Describe ``tree`` as a JSON-able spec plus the arrays to store, validating it.

    Raises:
        TypeError: a leaf or key of an unsupported type (the message names its path).
        ValueError: the tree is nested deeper than ``MAX_DEPTH`` (or is cyclic).
    """
    leaves: list[_Leaf] = []

    def walk(value: Any, where: tuple[str | int, ...], h5path: str) -> dict[str, Any]:
        if len(where) > MAX_DEPTH:
            raise ValueError(
                f"Expected a state tree at most {MAX_DEPTH} levels deep (or a cycle). "
                f"Received: a tree nested deeper at {_keystr(where[:5])}..."
            )
        vtype = type(value)
        if vtype is dict:
            items = []
            for position, (key, child) in enumerate(value.items()):
                if type(key) is not str:
                    raise TypeError(
                        f"Expected str dict keys at {_keystr(where)}. Received: key={key!r}"
                    )
                name = _child_name(key, position)
                if type(child) is np.ndarray and _dtype_to_str(child.dtype) is not None and child.ndim <= MAX_NDIM:
                    # The usual leaf, without a call per leaf.
                    leaf = {"t": "ndarray", "dtype": _dtype_to_str(child.dtype), "shape": list(child.shape)}
                    leaves.append(_Leaf(leaf, child, f"{h5path}/{name}"))
                    items.append([key, leaf])
                else:
                    items.append([key, walk(child, (*where, key), f"{h5path}/{name}")])
            return {"t": "dict", "items": items}
        if vtype is list or vtype is tuple:
            return {
                "t": "list" if vtype is list else "tuple",
                "items": [
                    walk(child, (*where, i), f"{h5path}/{i}") for i, child in enumerate(value)
                ],
            }
        if isinstance(value, (dict, list, tuple)):
            raise TypeError(
                f"Expected plain dict, list or tuple containers at {_keystr(where)}. "
                f"Received: {vtype.__module__}.{vtype.__qualname__} "
                "(convert it, e.g. dict(x) or tuple(x), so that restore can return it)"
            )
        kind, array = _encode_leaf(value, where)
        node: dict[str, Any] = {"t": kind}
        if array is not None:
            dtype_name = _dtype_to_str(array.dtype)
            node.update(dtype=dtype_name, shape=list(array.shape))
            leaves.append(_Leaf(node, array, h5path))
        return node

    try:
        with gc_paused():
            spec = walk(tree, (), "/" + STATE)
    except RecursionError as exc:
        raise ValueError(
            "Expected a state tree without cycles. Received: a tree too deep to walk"
        ) from exc
    return EncodedTree(spec, leaves)


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
    spec: Any, leaf_value: Callable[[dict[str, Any], str], Any], where: str, select: Selection | None = None
) -> Any:
    """Rebuild the tree of ``spec``; ``leaf_value(node, h5path)`` supplies each leaf.

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
                    out[key] = leaf_value(child, f"{h5path}/{_child_name(key, position)}")
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

    return build(spec, "/" + STATE, 0, select, ())


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
        if type(n) is not int or not 0 <= n < 2**62:
            raise CorruptCheckpointError(f"{where}: invalid shape {shape!r}")
    return tuple(shape)
