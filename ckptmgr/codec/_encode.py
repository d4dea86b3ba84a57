"""A state tree -> its manifest description and the arrays to store (what a save writes).

Encoding a tree decides everything about its file but the bytes: the manifest's
``tree`` (as JSON text), which leaves are packed and where, which are datasets of their
own. All of that depends only on the tree's structure (containers, keys, and each leaf's
kind, dtype and shape), which a training run keeps from save to save: it is kept as an
:class:`EncodePlan`, and the next tree of the same structure reuses it. Telling that the
structure is the same (:func:`_flatten`) costs a few C-level passes per container;
describing a tree afresh costs about a microsecond of Python per leaf, which at 20,000
leaves was twice the time of copying the state.
"""

from __future__ import annotations

import json
import operator
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import numpy as np

from . import _format
from ._format import (
    _INT64_MAX,
    _INT64_MIN,
    _SAFE_NAME,
    MAX_DEPTH,
    MAX_NDIM,
    PACK_ALIGN,
    STATE,
    Tree,
    _dtype_to_str,
    _is_raw,
    _keystr,
    gc_paused,
)


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


# ------------------------------------------------------------------------- the plan


@dataclass(frozen=True, slots=True)
class _RunPlan:
    """Packed leaves of one dtype that follow each other in the tree: one copy call."""

    start: int  # its offset in the pack
    nbytes: int
    convert: bool  # bools stored as bytes 0/1, dtypes HDF5 cannot describe as bytes
    take: Callable[[Sequence[Any]], Sequence[np.ndarray[Any, Any]]]  # its leaves, from all of them


@dataclass(frozen=True, slots=True)
class _BigPlan:
    """A leaf stored as a dataset of its own."""

    slot: int  # where its checksum goes in the JSON pieces
    index: int  # its place among the tree's leaf arrays
    h5path: str  # the dataset's path


@dataclass(frozen=True)
class EncodePlan:
    """How every tree of one structure is stored: all of a save but the bytes.

    ``parts``: the manifest's ``tree`` as JSON text in pieces, each big leaf's checksum
    still to be put in its slot once written. Text, not a tree of dicts: 20,000 leaves
    made 80,000 containers for the garbage collector to traverse (about 20 ms), and
    ``json.dumps`` took as long again. ``runs``: how the pack is filled; ``bigs``: the
    leaves stored as datasets of their own; the ``index_*`` lists describe the packed
    leaves for PACK_INDEX. ``signature``: the structure (:func:`_flatten`), None if the
    plan cannot be reused.
    """

    signature: list[Any] | None
    parts: list[str]
    runs: list[_RunPlan]
    bigs: list[_BigPlan]
    pack_nbytes: int
    nbytes: int  # the state's bytes
    index_names: list[str]
    index_dtypes: list[str]
    index_shapes: list[str]
    index_offsets: list[int]
    index_sizes: list[int]

    @property
    def packed_count(self) -> int:
        return len(self.index_offsets)


def _packed_bytes(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """A leaf as the pack stores it: bools as 0/1, other dtypes HDF5 cannot describe as bytes."""
    if array.dtype.kind == "b":
        bools: np.ndarray[Any, Any] = np.not_equal(array.view(np.uint8), 0)
        return bools
    data: np.ndarray[Any, Any] = array if array.flags.c_contiguous else array.copy(order="C")
    return data.reshape(-1).view(np.uint8)


@dataclass(slots=True)
class _Leaf:
    """A leaf stored as a dataset of its own, with its array."""

    slot: int  # where its checksum goes in the JSON pieces
    array: np.ndarray[Any, Any]
    h5path: str  # the dataset's path


@dataclass(frozen=True)
class EncodedTree:
    """A validated state tree: its plan and its leaves' arrays (what :func:`write_file` writes).

    An asynchronous save encodes the tree once, in the caller's thread, and copies only
    the arrays (:meth:`copied`) before handing it to the background writer.
    ``arrays``: every leaf's array in tree order (none once copied); ``leaves``: the big
    ones, stored as datasets of their own; ``packed``: the pack's bytes once copied.
    """

    plan: EncodePlan
    arrays: Sequence[np.ndarray[Any, Any]]
    leaves: list[_Leaf]
    packed: np.ndarray[Any, Any] | None = None

    @property
    def nbytes(self) -> int:
        return self.plan.nbytes

    def tree_json(self, checksums: Iterable[int]) -> str:
        """The manifest's ``tree``, with each big leaf's checksum (in ``leaves``' order)."""
        parts = list(self.plan.parts)
        for leaf, value in zip(self.leaves, checksums, strict=True):
            parts[leaf.slot] = str(value)
        return "".join(parts)

    def pack(self, into: np.ndarray[Any, Any] | None = None) -> np.ndarray[Any, Any]:
        """The pack's bytes: those copied already, or copied now into a new buffer or
        ``into`` (an earlier pack of the same size): one ``np.concatenate`` (C order,
        any strides) per run of one dtype, not a call per leaf."""
        if self.packed is not None:
            return self.packed
        plan = self.plan
        reuse = into is not None and into.nbytes == plan.pack_nbytes
        out = into if reuse and into is not None else np.empty(plan.pack_nbytes, np.uint8)
        end = 0
        for run in plan.runs:
            out[end:run.start] = 0  # the alignment gap: zeros, not old memory
            end = run.start + run.nbytes
            if run.nbytes:
                arrays = run.take(self.arrays)
                if run.convert:
                    arrays = [_packed_bytes(array) for array in arrays]
                np.concatenate(arrays, axis=None, out=out[run.start:end].view(arrays[0].dtype))
        return out

    def copied(self, into: EncodedTree | None = None) -> EncodedTree:
        """The same tree with private copies of its arrays (the caller may change its own).

        ``into``: an earlier copy no longer in use (the previous asynchronous save,
        written): its memory is reused where sizes, shapes and dtypes match, so a save
        copies into memory that is already there instead of allocating the state again
        (and faulting every page of it in): the copy then runs at memcpy speed.
        """
        packed = self.pack(into.packed if into is not None else None)
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
        return EncodedTree(self.plan, (), out, packed)


# ---------------------------------------------------------------------- encoding


_plans: list[EncodePlan] = []  # the plans used last, most recent first
_plans_lock = threading.Lock()
_PLANS_KEPT = 8


def encode_tree(tree: Tree) -> EncodedTree:
    """Describe ``tree`` for the manifest and list the arrays to store, validating it.

    A tree of the structure of one of the last few encoded reuses its plan; any other
    is walked and described afresh (which raises for an invalid tree).

    Raises:
        TypeError: a leaf or key of an unsupported type (the message names its path).
        ValueError: the tree is nested deeper than ``MAX_DEPTH`` (or is cyclic).
    """
    with gc_paused():
        flat = _flatten(tree)
        if flat is not None:
            signature, arrays = flat
            with _plans_lock:
                for position, plan in enumerate(_plans):
                    if plan.signature == signature:
                        if position:
                            _plans.insert(0, _plans.pop(position))
                        return _encoded(plan, arrays)
        plan, arrays = _describe(tree, None if flat is None else flat[0])
        if plan.signature is not None:
            with _plans_lock:
                _plans.insert(0, plan)
                del _plans[_PLANS_KEPT:]
        return _encoded(plan, arrays)


def _encoded(plan: EncodePlan, arrays: list[np.ndarray[Any, Any]]) -> EncodedTree:
    return EncodedTree(plan, arrays, [_Leaf(big.slot, arrays[big.index], big.h5path) for big in plan.bigs])


class _Unplannable(Exception):
    """The tree is not one a plan can describe (invalid, or an unusual kind of value)."""


_dtype_of = operator.attrgetter("dtype")
_shape_of = operator.attrgetter("shape")
_JUST_ARRAYS = {np.ndarray}


def _flatten(tree: Tree) -> tuple[list[Any], list[np.ndarray[Any, Any]]] | None:
    """The tree's structure and its leaves' arrays (in tree order), or None.

    The structure (the signature) is a list with an entry per container: its type and
    keys (or length) and, for a container of nothing but arrays, their dtypes and shapes
    (C-level passes, no Python per leaf); an entry per other leaf: its kind, dtype and
    shape. Two trees of equal signatures store their leaves in the same places; a
    signature equal to that of a tree already described is one of a valid tree.
    None: something that only :func:`_describe` can judge (and raise for).
    """
    signature: list[Any] = [_format.PACK_THRESHOLD]
    arrays: list[np.ndarray[Any, Any]] = []

    def visit(value: Any, depth: int) -> None:
        vtype = type(value)
        if vtype is dict or vtype is list or vtype is tuple:
            if depth >= MAX_DEPTH:
                raise _Unplannable
            keys: tuple[Any, ...] | int
            if vtype is dict:
                children, keys = list(value.values()), tuple(value)
                if operator.countOf(map(type, keys), str) != len(keys):
                    raise _Unplannable  # np.str_("a") == "a": _describe refuses such a key
            else:
                children, keys = value, len(value)
            if children and set(map(type, children)) == _JUST_ARRAYS:
                signature.append(("arrays", vtype, keys, tuple(map(_dtype_of, children)),
                                  tuple(map(_shape_of, children))))
                arrays.extend(children)
                return
            signature.append(("container", vtype, keys))
            for child in children:
                visit(child, depth + 1)
            return
        if vtype is np.ndarray:
            signature.append(("array", value.dtype, value.shape))
            arrays.append(value)
            return
        try:
            kind, array = _encode_leaf(value, ())
        except (TypeError, ValueError):
            raise _Unplannable from None
        if array is None:
            signature.append((kind,))
        else:
            signature.append((kind, array.dtype, array.shape))
            arrays.append(array)

    try:
        visit(tree, 0)
    except (_Unplannable, RecursionError):
        return None
    finally:
        # visit calls itself through its closure: a cycle that would hold the arrays
        # until the collector ran. Emptied, the cell breaks it.
        visit = cast(Any, None)
    return signature, arrays


_shape_texts: dict[tuple[int, ...], str] = {}  # shapes as JSON, met so far


def _shape_text(shape: tuple[int, ...]) -> str:
    text = _shape_texts.get(shape)
    if text is None:
        text = "[" + ",".join([str(n) for n in shape]) + "]"
        if len(_shape_texts) < 4096:
            _shape_texts[shape] = text
    return text


def _take(indices: list[int]) -> Callable[[Sequence[Any]], Sequence[np.ndarray[Any, Any]]]:
    """A C-level function picking ``indices`` out of a sequence."""
    if indices == list(range(indices[0], indices[-1] + 1)):
        return operator.itemgetter(slice(indices[0], indices[-1] + 1))
    if len(indices) == 1:
        index = indices[0]
        return lambda arrays: (arrays[index],)
    return operator.itemgetter(*indices)


def _describe(tree: Tree, signature: list[Any] | None) -> tuple[EncodePlan, list[np.ndarray[Any, Any]]]:
    """Walk ``tree``, validating it: its plan (reusable with ``signature``) and its arrays.

    Packed leaves lie back to back in tree order, each at a multiple of its item size
    (at most PACK_ALIGN): aligned for its dtype, and leaves of one dtype that follow each
    other form a run without gaps.
    """
    parts: list[str] = []
    append = parts.append
    arrays: list[np.ndarray[Any, Any]] = []
    bigs: list[_BigPlan] = []
    names: list[str] = []
    dtypes: list[str] = []
    shapes: list[str] = []
    offsets: list[int] = []
    sizes: list[int] = []
    threshold = _format.PACK_THRESHOLD
    dtype_names = _format._dtype_names
    safe_name = _SAFE_NAME.fullmatch
    ndarray = np.ndarray
    runs: list[list[Any]] = []  # each [start, nbytes, leaf indices, convert]
    run: list[Any] = [0, 0, [], False]
    run_dtype: np.dtype[Any] | None = None
    pack_nbytes = 0

    def stored(head: str, array: np.ndarray[Any, Any], h5path: str, dtype_name: str, shape: str) -> None:
        """Append a leaf's description (``head`` opens it) and place its array."""
        nonlocal run, run_dtype, pack_nbytes
        nbytes = array.nbytes
        index = len(arrays)
        arrays.append(array)
        if nbytes >= threshold:
            append(f'{head}"dtype":"{dtype_name}","shape":{shape},"crc":')
            bigs.append(_BigPlan(len(parts), index, h5path))
            append("")  # the checksum, once written
            append("}")
            return
        dtype = array.dtype
        at = pack_nbytes
        # (Not "dtype != None": NumPy reads None as float64.)
        if dtype is not run_dtype and (run_dtype is None or dtype != run_dtype):
            at += -at % min(dtype.itemsize, PACK_ALIGN)
            run = [at, 0, [], dtype.kind == "b" or _is_raw(dtype)]
            runs.append(run)
            run_dtype = dtype
        pack_nbytes = at + nbytes
        run[1] += nbytes
        run[2].append(index)
        names.append(h5path)
        dtypes.append(dtype_name)
        shapes.append(shape)
        offsets.append(at)
        sizes.append(nbytes)
        append(f'{head}"dtype":"{dtype_name}","shape":{shape},"at":{at}}}')

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
                if type(child) is ndarray and len(where) < MAX_DEPTH:
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
    finally:
        walk = cast(Any, None)  # it calls itself: without this, a cycle holding the arrays (as _flatten)
    run_plans = [_RunPlan(start, nbytes, convert, _take(indices)) for start, nbytes, indices, convert in runs]
    if signature is not None and not _same_leaves(signature, arrays):
        signature = None  # never expected: then this plan is just not reused
    plan = EncodePlan(
        signature, parts, run_plans, bigs, pack_nbytes, sum(array.nbytes for array in arrays),
        names, dtypes, shapes, offsets, sizes,
    )
    return plan, arrays


def _same_leaves(signature: list[Any], arrays: list[np.ndarray[Any, Any]]) -> bool:
    """Whether :func:`_flatten` counted the leaves :func:`_describe` stored."""
    count = 0
    for entry in signature[1:]:
        if entry[0] == "arrays":
            count += len(entry[3])
        elif entry[0] != "container" and len(entry) == 3:
            count += 1
    return count == len(arrays)
