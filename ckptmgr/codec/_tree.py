"""State trees <-> their description (the manifest's ``tree``) and the arrays to store."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import CorruptCheckpointError
from ..info import LeafInfo
from . import _format
from ._format import (
    _CONTAINERS,
    _INT64_MAX,
    _INT64_MIN,
    _LEAF_KINDS,
    _SAFE_NAME,
    MAX_DEPTH,
    MAX_DIM,
    MAX_NDIM,
    PACK_ALIGN,
    STATE,
    Tree,
    _dtype_from_str,
    _dtype_to_str,
    _is_raw,
    _keystr,
)


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


@dataclass(slots=True)
class _Leaf:
    """A leaf stored as a dataset of its own."""

    slot: int  # where its checksum goes in the tree's JSON pieces (EncodedTree.spec)
    array: np.ndarray[Any, Any]
    h5path: str  # the dataset's path


@dataclass(slots=True)
class _Run:
    """Packed leaves of one dtype that follow each other in the tree: one copy call."""

    start: int
    nbytes: int
    arrays: list[np.ndarray[Any, Any]]


class _Packing:
    """Where each leaf under PACK_THRESHOLD bytes lies in the pack, and how to fill it.

    Leaves lie back to back in tree order, each at a multiple of its item size (at most
    PACK_ALIGN): aligned for its dtype, and leaves of one dtype follow each other without
    a gap. Each run of one dtype is filled with one ``np.concatenate`` (C order, any
    strides) instead of a call per leaf. The index lists describe the leaves for
    PACK_INDEX.
    """

    def __init__(self) -> None:
        self.nbytes = 0
        self.runs: list[_Run] = []
        self._dtype: np.dtype[Any] | None = None
        self._run = _Run(0, 0, [])
        self._convert = False
        self.names: list[str] = []
        self.dtypes: list[str] = []
        self.shapes: list[str] = []
        self.offsets: list[int] = []
        self.sizes: list[int] = []

    @property
    def count(self) -> int:
        return len(self.offsets)

    def place(self, array: np.ndarray[Any, Any], h5path: str, dtype_name: str, shape_text: str) -> int:
        """Add a leaf; return its offset in the pack."""
        dtype = array.dtype
        # (Not "dtype != None": NumPy reads None as float64.)
        if dtype is not self._dtype and (self._dtype is None or dtype != self._dtype):
            self.nbytes += -self.nbytes % min(dtype.itemsize, PACK_ALIGN)
            self._run = _Run(self.nbytes, 0, [])
            self.runs.append(self._run)
            self._dtype = dtype
            # Bools are stored as bytes 0/1 (normalised per leaf); dtypes HDF5 cannot
            # describe are copied as their bytes.
            self._convert = dtype.kind == "b" or _is_raw(dtype)
        if self._convert:
            array = _packed_bytes(array)
        at = self.nbytes
        nbytes = array.nbytes
        self.nbytes = at + nbytes
        run = self._run
        run.nbytes += nbytes
        run.arrays.append(array)
        self.names.append(h5path)
        self.dtypes.append(dtype_name)
        self.shapes.append(shape_text)
        self.offsets.append(at)
        self.sizes.append(nbytes)
        return at

    def fill(self, into: np.ndarray[Any, Any] | None = None) -> np.ndarray[Any, Any]:
        """The pack's bytes: a new buffer, or ``into`` (an earlier pack of the same size)."""
        reuse = into is not None and into.nbytes == self.nbytes
        out = into if reuse and into is not None else np.empty(self.nbytes, np.uint8)
        end = 0
        for run in self.runs:
            out[end:run.start] = 0  # the alignment gap: zeros, not old memory
            end = run.start + run.nbytes
            if run.nbytes:
                np.concatenate(run.arrays, axis=None, out=out[run.start:end].view(run.arrays[0].dtype))
        return out

    def without_arrays(self) -> _Packing:
        """The same layout and index, holding no reference to the caller's arrays."""
        copy = _Packing()
        copy.nbytes, copy.names, copy.dtypes, copy.shapes, copy.offsets, copy.sizes = (
            self.nbytes, self.names, self.dtypes, self.shapes, self.offsets, self.sizes)
        return copy


def _packed_bytes(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """A leaf as the pack stores it: bools as 0/1, other dtypes HDF5 cannot describe as bytes."""
    if array.dtype.kind == "b":
        bools: np.ndarray[Any, Any] = np.not_equal(array.view(np.uint8), 0)
        return bools
    data: np.ndarray[Any, Any] = array if array.flags.c_contiguous else array.copy(order="C")
    return data.reshape(-1).view(np.uint8)


_shape_texts: dict[tuple[int, ...], str] = {}  # shapes as JSON, met so far


def _shape_text(shape: tuple[int, ...]) -> str:
    text = _shape_texts.get(shape)
    if text is None:
        text = "[" + ",".join([str(n) for n in shape]) + "]"
        if len(_shape_texts) < 4096:
            _shape_texts[shape] = text
    return text


@dataclass(frozen=True)
class EncodedTree:
    """A validated state tree: its description for the manifest and the arrays to store.

    What :func:`write_file` writes. An asynchronous save encodes the tree once, in the
    caller's thread, and copies only the arrays (:meth:`copied`) before handing it to
    the background writer.

    ``spec``: the manifest's ``tree`` as JSON text in pieces, each big leaf's checksum
    still to be put in its ``slot`` once written. Text, not a tree of dicts and lists:
    20,000 leaves made 80,000 containers for Python's garbage collector to traverse
    (about 20 ms), and ``json.dumps`` took as long again. ``leaves``: the leaves stored
    as datasets of their own (``PACK_THRESHOLD`` bytes or more); ``packing``: where
    the others lie in the pack; ``packed``: the pack's bytes once copied
    (:meth:`copied`; :func:`write_file` fills it otherwise).
    """

    spec: list[str]
    leaves: list[_Leaf]
    packing: _Packing
    nbytes: int  # the state's bytes
    packed: np.ndarray[Any, Any] | None = None

    def tree_json(self, checksums: Iterable[int]) -> str:
        """The manifest's ``tree``, with each big leaf's checksum (in ``leaves``' order)."""
        parts = list(self.spec)
        for leaf, value in zip(self.leaves, checksums, strict=True):
            parts[leaf.slot] = str(value)
        return "".join(parts)

    def copied(self, into: EncodedTree | None = None) -> EncodedTree:
        """The same tree with private copies of its arrays (the caller may change its own).

        ``into``: an earlier copy no longer in use (the previous asynchronous save,
        written): its memory is reused where sizes, shapes and dtypes match, so a save
        copies into memory that is already there instead of allocating the state again
        (and faulting every page of it in): the copy then runs at memcpy speed. The
        small leaves are copied into the pack (one call per run of one dtype), big ones
        one by one.
        """
        packed = self.packing.fill(into.packed if into is not None else None)
        spare = into.leaves if into is not None and len(into.leaves) == len(self.leaves) else None
        out = []
        for position, leaf in enumerate(self.leaves):
            array = leaf.array
            target = spare[position].array if spare is not None else None
            if target is not None and target.shape == array.shape and target.dtype == array.dtype:
                np.copyto(target, array)
            else:
                target = array.copy()
            out.append(_Leaf(leaf.slot, target, leaf.h5path))
        return EncodedTree(self.spec, out, self.packing.without_arrays(), self.nbytes, packed)


def encode_tree(tree: Tree) -> EncodedTree:
    """Describe ``tree`` for the manifest and list the arrays to store, validating it.

    Each leaf under ``PACK_THRESHOLD`` bytes gets its place in the pack (``at`` in its
    description); bigger ones are listed to be stored as datasets of their own.

    Raises:
        TypeError: a leaf or key of an unsupported type (the message names its path).
        ValueError: the tree is nested deeper than ``MAX_DEPTH`` (or is cyclic).
    """
    parts: list[str] = []
    append = parts.append
    leaves: list[_Leaf] = []
    packing = _Packing()
    place = packing.place
    threshold = _format.PACK_THRESHOLD
    dtype_names = _format._dtype_names
    safe_name = _SAFE_NAME.fullmatch
    ndarray = np.ndarray

    def stored(head: str, array: np.ndarray[Any, Any], h5path: str, dtype_name: str, shape: str) -> None:
        """Append a leaf's description (``head`` opens it) and place its array."""
        if array.nbytes < threshold:
            append(f'{head}"dtype":"{dtype_name}","shape":{shape},"at":{place(array, h5path, dtype_name, shape)}}}')
        else:
            append(f'{head}"dtype":"{dtype_name}","shape":{shape},"crc":')
            leaves.append(_Leaf(len(parts), array, h5path))
            append("")  # the checksum, once written
            append("}")

    def walk(value: Any, where: tuple[str | int, ...], h5path: str) -> None:
        if len(where) > MAX_DEPTH:
            raise ValueError(
                f"Expected a state tree at most {MAX_DEPTH} levels deep (or a cycle). "
                f"Received: a tree nested deeper at {_keystr(where[:5])}..."
            )
        vtype = type(value)
        if vtype is dict:
            append('{"t":"dict","items":[')
            comma = ""
            for position, (key, child) in enumerate(value.items()):
                if type(key) is not str:
                    raise TypeError(
                        f"Expected str dict keys at {_keystr(where)}. Received: key={key!r}"
                    )
                if safe_name(key):  # nothing to escape in JSON either
                    path, head = f"{h5path}/{key}", f'{comma}["{key}",'
                else:
                    path, head = f"{h5path}/~{position}", f"{comma}[{json.dumps(key)},"
                comma = ","
                if type(child) is ndarray:
                    # The usual leaf, without a call to walk.
                    dtype_name = dtype_names.get(child.dtype) or _dtype_to_str(child.dtype)
                    if dtype_name is not None and child.ndim <= MAX_NDIM:
                        stored(head + '{"t":"ndarray",', child, path, dtype_name, _shape_text(child.shape))
                        append("]")
                        continue
                append(head)
                walk(child, (*where, key), path)
                append("]")
            append("]}")
            return
        if vtype is list or vtype is tuple:
            append('{"t":"list","items":[' if vtype is list else '{"t":"tuple","items":[')
            for i, child in enumerate(value):
                if i:
                    append(",")
                walk(child, (*where, i), f"{h5path}/{i}")
            append("]}")
            return
        if isinstance(value, (dict, list, tuple)):
            raise TypeError(
                f"Expected plain dict, list or tuple containers at {_keystr(where)}. "
                f"Received: {vtype.__module__}.{vtype.__qualname__} "
                "(convert it, e.g. dict(x) or tuple(x), so that restore can return it)"
            )
        kind, array = _encode_leaf(value, where)
        if array is None:
            append(f'{{"t":"{kind}"}}')
            return
        dtype_name = _dtype_to_str(array.dtype)
        assert dtype_name is not None  # _encode_leaf checked it
        stored(f'{{"t":"{kind}",', array, h5path, dtype_name, _shape_text(array.shape))

    try:
        walk(tree, (), "/" + STATE)
    except RecursionError as exc:
        raise ValueError(
            "Expected a state tree without cycles. Received: a tree too deep to walk"
        ) from exc
    nbytes = sum(run.nbytes for run in packing.runs) + sum(leaf.array.nbytes for leaf in leaves)
    return EncodedTree(parts, leaves, packing, nbytes)


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
        if type(n) is not int or not 0 <= n < MAX_DIM:
            raise CorruptCheckpointError(f"{where}: invalid shape {shape!r}")
    return tuple(shape)
