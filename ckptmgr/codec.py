"""State trees to and from HDF5 files — the only module that knows HDF5.

On-disk layout of one checkpoint file (readable with plain h5py)::

    /                         attrs: ckptmgr_format = 1, ckptmgr_manifest_crc32 = <int>
    /ckptmgr_manifest         uint8 dataset: UTF-8 JSON manifest (see below)
    /state                    the tree: a group per dict/list/tuple, a dataset per leaf
    /state/params/w           e.g. state["params"]["w"]
    /state/opt/0              list and tuple items are named by index
    /state/~3                 a dict key that is not a plain name (has "/", starts with
                              ".", ...) is stored under "~<position>"; its real key is
                              in the manifest

The manifest holds the checkpoint's own metadata (``step``, ``time``, ``metrics``,
``tracker``, ``nbytes``, ``checksum``) and ``tree``, the authoritative description of
the state: container types, dict keys in order, and for each leaf its kind, dtype,
shape and checksum. Leaves are stored as:

==========  ====================================================================
kind        dataset
==========  ====================================================================
ndarray     the array itself (any int/uint/float/complex width, bool); dtypes
            HDF5 cannot describe (bfloat16 and other ml_dtypes) are stored as raw
            bytes, ``uint8`` with a trailing axis of the item size
npscalar    a 0-d dataset of the scalar's dtype
bool        0-d bool; ``int`` 0-d int64; ``float`` 0-d float64; ``complex``
            0-d complex128
bigint      a Python int outside int64: uint8 two's-complement, little-endian
str         uint8, UTF-8 bytes; ``bytes``: uint8
none        no dataset
==========  ====================================================================

Checksums: the manifest's ``checksum`` names the algorithm of the leaves' ``crc``
values. Files are written with ``"crc32c"`` (CRC-32C, Castagnoli, hardware-accelerated
through the ``crc32c`` package: about 13 GB/s against zlib's 2-3 GB/s, which made
verification cost more than the read itself) and with ``"crc32"`` (zlib) where that
package is missing; both are read, so files of either kind (and every file written
before CRC-32C was adopted, all ``"crc32"``) stay readable and verified. The manifest's
own ``ckptmgr_manifest_crc32`` and payload sidecars stay zlib CRC-32.

Writing is one large contiguous write per array (slabs for big ones, each checksummed
just before it is written, while it is in cache), and the disk starts on the data
while the rest is still being copied (:class:`storage.Writeback`): on each 4 MiB of
the first 32 MiB as soon as it is written, then every 32 MiB.

Reading goes the other way: a leaf whose bytes HDF5 would copy unchanged (a plain
contiguous dataset) is read with pread straight from the descriptor HDF5 opened,
into its final array, in 1 MiB slabs each checksummed while it is still in cache, so
verifying costs a few percent of the read. Other leaves (bools, compact datasets, a
non-default HDF5 driver) go through HDF5's own read.

Reading never unpickles, follows no soft or external link, refuses virtual and
externally stored datasets, object and variable-length dtypes, and only allocates
what the file actually stores.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np
from h5py import h5a, h5d, h5fd, h5g, h5l, h5s, h5t

from . import storage
from .errors import CheckpointError, CorruptCheckpointError
from .info import LeafInfo

_crc32c: Any
try:
    import crc32c as _crc32c
except ImportError:  # pragma: no cover - crc32c is a dependency; zlib keeps working without it
    _crc32c = None

FORMAT_VERSION = 1
MANIFEST = "ckptmgr_manifest"
STATE = "state"
MAX_DEPTH = 200
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
MAX_NDIM = 32

_SAFE_NAME = re.compile(r"[A-Za-z0-9_\-][A-Za-z0-9_.\-]{0,127}")
_NATIVE_KINDS = frozenset("biufc")
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1
_LEAF_KINDS = frozenset(
    {"ndarray", "npscalar", "bool", "int", "bigint", "float", "complex", "str", "bytes", "none"}
)
_CONTAINERS = {"dict": dict, "list": list, "tuple": tuple}

Tree = Any


def checksum(buffer: Any, value: int = 0) -> int:
    """CRC-32 of a buffer (continuing from ``value``)."""
    return zlib.crc32(buffer, value)


CHECKSUM_NAME = "crc32"

# Leaf checksums by manifest name; the first available one is used for writing.
_LEAF_CHECKSUMS: dict[str, Callable[[Any, int], int]] = {"crc32": zlib.crc32}
if _crc32c is not None:
    _LEAF_CHECKSUMS["crc32c"] = _crc32c.crc32c
LEAF_CHECKSUM_NAME = "crc32c" if _crc32c is not None else "crc32"
_KNOWN_LEAF_CHECKSUMS = frozenset({"crc32", "crc32c"})

# Big arrays are written (and checksummed) in slabs of about _SLAB_BYTES; a background
# fdatasync starts every _WRITEBACK_BYTES (storage.Writeback.kick). Until the first of
# those, slabs are _START_BYTES and the disk is started on each as soon as it is
# written (Writeback.start): a 16 MiB save then no longer waits for the disk to begin
# until it is all copied.
_SLAB_BYTES = 16 * 1024 * 1024
_WRITEBACK_BYTES = 32 * 1024 * 1024
_START_BYTES = 4 * 1024 * 1024
# Leaves are read (and checksummed) in slabs of this size: a core's L2 cache.
_READ_SLAB_BYTES = 1024 * 1024


def _leaf_checksum(manifest: Mapping[str, Any], where: str) -> Callable[[Any, int], int]:
    name = manifest.get("checksum")
    fn = _LEAF_CHECKSUMS.get(name) if isinstance(name, str) else None
    if fn is None:
        raise CheckpointError(
            f"{where}: verifying its {name} checksums needs the crc32c package (pip install crc32c)"
        )
    return fn


# --------------------------------------------------------------------------- dtypes


def _ml_dtypes() -> Any:
    try:
        import ml_dtypes
    except ImportError:
        return None
    return ml_dtypes


def _is_numpy_native(dtype: np.dtype[Any]) -> bool:
    """A NumPy int/uint/float/complex/bool dtype, which HDF5 stores as itself.

    The kind alone does not tell: ml_dtypes' float8_e5m2 has kind "f" (and the string
    "<f1", which NumPy cannot parse back), yet HDF5 knows nothing of it.
    """
    return (dtype.kind in _NATIVE_KINDS and dtype.fields is None and dtype.shape == ()
            and dtype.type.__module__ == "numpy")


def _dtype_to_str(dtype: np.dtype[Any]) -> str | None:
    """The manifest name of a supported dtype, or None if the dtype is not supported."""
    if _is_numpy_native(dtype):
        return str(dtype.str)
    mld = _ml_dtypes()
    if mld is not None and dtype.kind in "Vf" and dtype.fields is None:
        name = dtype.name
        if isinstance(getattr(mld, name, None), type) and np.dtype(getattr(mld, name)) == dtype:
            return str(name)
    return None


_parsed_dtypes: dict[str, np.dtype[Any]] = {}  # the manifest names met so far that are valid


def _dtype_from_str(text: object, where: str) -> np.dtype[Any]:
    """The dtype a manifest names; raises CorruptCheckpointError for one not supported."""
    dtype = _parsed_dtypes.get(text) if type(text) is str else None
    if dtype is None:
        # Only valid names are kept: a few dozen at most, whatever files say.
        dtype = _parsed_dtypes[text] = _parse_dtype(text, where)  # type: ignore[index]
    return dtype


def _parse_dtype(text: object, where: str) -> np.dtype[Any]:
    if not isinstance(text, str) or len(text) > 32:
        raise CorruptCheckpointError(f"{where}: invalid dtype {text!r}")
    if text[:1] in "<>|=":
        try:
            dtype = np.dtype(text)
        except TypeError as exc:
            raise CorruptCheckpointError(f"{where}: invalid dtype {text!r}") from exc
        if dtype.str != text or _dtype_to_str(dtype) != text:
            raise CorruptCheckpointError(f"{where}: unsupported dtype {text!r}")
        return dtype
    mld = _ml_dtypes()
    if mld is None:
        raise CorruptCheckpointError(
            f"{where}: dtype {text!r} needs the ml_dtypes package (pip install ml_dtypes)"
        )
    candidate = getattr(mld, text, None) if re.fullmatch(r"[a-z0-9_]+", text) else None
    if not isinstance(candidate, type):
        raise CorruptCheckpointError(f"{where}: unsupported dtype {text!r}")
    dtype = np.dtype(candidate)
    if _dtype_to_str(dtype) != text:
        raise CorruptCheckpointError(f"{where}: unsupported dtype {text!r}")
    return dtype


def _is_raw(dtype: np.dtype[Any]) -> bool:
    return not _is_numpy_native(dtype)


# ------------------------------------------------------------------------ encoding


def _keystr(path: tuple[str | int, ...]) -> str:
    return "state" + "".join(f"[{p!r}]" for p in path)


@dataclass
class _Leaf:
    node: dict[str, Any]
    array: np.ndarray[Any, Any]


def _child_name(key: str, position: int) -> str:
    return key if _SAFE_NAME.fullmatch(key) else f"~{position}"


def _encode_leaf(value: Any, where: tuple[str | int, ...]) -> tuple[str, np.ndarray[Any, Any] | None]:
    # bool before int: bool is a subclass of int.
    if value is None:
        return "none", None
    vtype = type(value)
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

    def copied(self) -> EncodedTree:
        """The same tree with private copies of its arrays (the caller may change its own)."""
        return EncodedTree(self.spec, [_Leaf(leaf.node, leaf.array.copy()) for leaf in self.leaves])


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
            leaves.append(_Leaf(node, array))
            node["_h5path"] = h5path
        return node

    try:
        spec = walk(tree, (), "/" + STATE)
    except RecursionError as exc:
        raise ValueError(
            "Expected a state tree without cycles. Received: a tree too deep to walk"
        ) from exc
    return EncodedTree(spec, leaves)


def _contiguous_bytes(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """The bytes the checksum covers: C order, bools normalised to 0/1."""
    if array.dtype.kind == "b":
        array = np.not_equal(array.view(np.uint8), 0)
    return _c_order(array).reshape(-1).view(np.uint8)


def _c_order(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    # Not np.ascontiguousarray: it turns 0-d arrays into 1-d ones.
    return array if array.flags.c_contiguous else array.copy(order="C")


def write_file(path: str | os.PathLike[str], tree: Tree | EncodedTree, meta: Mapping[str, Any]) -> int:
    """Write ``tree`` and ``meta`` to a new HDF5 file at ``path``; return the state's bytes.

    ``tree`` is a state tree or one already encoded (:func:`encode_tree`). The file is
    not fsynced here; the storage layer does that. ``meta`` must be JSON-serialisable;
    it is stored in the manifest next to the tree description.
    """
    encoded = tree if isinstance(tree, EncodedTree) else encode_tree(tree)
    spec, leaves = encoded.spec, encoded.leaves
    total = 0
    sink = _WriteSink(path)
    writeback = storage.Writeback(sink.fileno())
    try:
        total = _write_h5(sink, spec, leaves, meta, writeback)
    except Exception:
        # HDF5 tripping over a write that was dropped is the recorded error's doing.
        if sink.error is None:
            raise
    finally:
        error = writeback.close()
        if error is not None and sink.error is None:
            sink.error = error
        sink.close()
    if sink.error is not None:
        raise sink.error
    return total


class _Progress:
    """How much of a file is written, telling its :class:`storage.Writeback` when to act.

    The first ``_WRITEBACK_BYTES`` are written in slabs of ``_START_BYTES``, each queued
    for the disk once written (:meth:`storage.Writeback.start`: no waiting, no thread);
    from then on a background fdatasync every ``_WRITEBACK_BYTES`` keeps the disk busy
    (:meth:`storage.Writeback.kick`), with slabs of ``_SLAB_BYTES`` (queueing each of
    those too only moved the disk's bookkeeping into the writer: no faster at 256 MiB).
    Counted per slab, not per array, so that one big array overlaps too.
    """

    def __init__(self, writeback: storage.Writeback) -> None:
        self._writeback = writeback
        self._unflushed = 0
        self._unstarted = 0
        self._kicked = False

    def slab_bytes(self) -> int:
        """The size of the slabs to write now."""
        return _SLAB_BYTES if self._kicked else _START_BYTES

    def wrote(self, nbytes: int) -> None:
        self._unflushed += nbytes
        self._unstarted += nbytes
        if self._unflushed >= _WRITEBACK_BYTES:
            self._writeback.kick()
            self._kicked = True
            self._unflushed = self._unstarted = 0
        elif self._unstarted >= _START_BYTES and not self._kicked:
            self._writeback.start()
            self._unstarted = 0


def _write_h5(
    sink: _WriteSink, spec: dict[str, Any], leaves: list[_Leaf], meta: Mapping[str, Any],
    writeback: storage.Writeback,
) -> int:
    crc = _LEAF_CHECKSUMS[LEAF_CHECKSUM_NAME]
    total = 0
    progress = _Progress(writeback)
    with h5py.File(sink, "w", locking=False) as f:
        for leaf in leaves:
            node = leaf.node
            h5path = node.pop("_h5path")
            data = _c_order(leaf.array)
            if _is_raw(data.dtype):
                data = data.reshape(-1).view(np.uint8).reshape((*data.shape, data.dtype.itemsize))
            if data.nbytes <= progress.slab_bytes() or data.dtype.kind == "b" or data.shape[0] < 2:
                node["crc"] = crc(_contiguous_bytes(data), 0)
                f.create_dataset(h5path, data=data)
                progress.wrote(data.nbytes)
            else:
                ds = f.create_dataset(h5path, shape=data.shape, dtype=data.dtype)
                node["crc"] = _write_slabs(ds, data, crc, progress)
            total += data.nbytes
        _create_empty_groups(f, spec, "/" + STATE)
        manifest = dict(meta)
        manifest.update(format=FORMAT_VERSION, checksum=LEAF_CHECKSUM_NAME, nbytes=total, tree=spec)
        blob = json.dumps(manifest, separators=(",", ":"), allow_nan=True).encode("utf-8")
        if len(blob) > MAX_MANIFEST_BYTES:
            # Readers refuse a bigger manifest: writing it would make a checkpoint that
            # cannot be restored.
            raise ValueError(
                f"Expected a state tree whose description (keys, types, shapes) fits in "
                f"{MAX_MANIFEST_BYTES} bytes. Received: {len(leaves)} leaves described in "
                f"{len(blob)} bytes; store large collections of small values as arrays"
            )
        f.create_dataset(MANIFEST, data=np.frombuffer(blob, np.uint8))
        f.attrs["ckptmgr_format"] = FORMAT_VERSION
        f.attrs["ckptmgr_manifest_crc32"] = np.uint32(checksum(blob))
    return total


def _write_slabs(
    ds: h5py.Dataset, data: np.ndarray[Any, Any], crc: Callable[[Any, int], int], progress: _Progress,
) -> int:
    """Write a big C-ordered array in slabs of rows; return the checksum of its bytes.

    Each slab is checksummed right before it is written, while it is in cache.
    """
    flat = data.reshape(-1).view(np.uint8)
    row_bytes = data.nbytes // data.shape[0]  # > 0: an empty array is written whole
    value = 0
    start = 0
    while start < data.shape[0]:
        stop = min(start + max(1, progress.slab_bytes() // row_bytes), data.shape[0])
        value = crc(flat[start * row_bytes:stop * row_bytes], value)
        ds.write_direct(data, np.s_[start:stop], np.s_[start:stop])
        progress.wrote((stop - start) * row_bytes)
        start = stop
    return value


class _WriteSink:
    """The file HDF5 writes a checkpoint through (h5py's ``fileobj`` driver).

    An OS error (disk full, I/O error) is recorded instead of raised, and later writes
    are dropped: HDF5 does not recover from a failed write (the file stays open inside
    the library, freeing its objects raises again, and a later file operation can
    crash the process), so it must never see one. :func:`write_file` raises the
    recorded error once HDF5 has closed the file; the file is garbage by then and the
    caller deletes it.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        # Exclusive: never overwrite what is there. Closed by close().
        self._fh = open(path, "x+b")  # noqa: SIM115
        self.error: OSError | None = None

    def _guard(self, action: Callable[[], Any], default: Any) -> Any:
        if self.error is None:
            try:
                return action()
            except OSError as exc:
                self.error = exc
        return default

    def fileno(self) -> int:
        return self._fh.fileno()

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._fh.seek(offset, whence)

    def tell(self) -> int:
        return self._fh.tell()

    def readinto(self, buffer: Any) -> int:
        return self._fh.readinto(buffer)

    def read(self, size: int = -1) -> bytes:
        return self._fh.read(size)

    def write(self, buffer: Any) -> int:
        nbytes = memoryview(buffer).nbytes
        return int(self._guard(lambda: self._fh.write(buffer), nbytes))

    def truncate(self, size: int | None = None) -> int:
        return int(self._guard(lambda: self._fh.truncate(size), size or 0))

    def flush(self) -> None:
        self._guard(self._fh.flush, None)

    def close(self) -> None:
        self._guard(self._fh.close, None)
        self._fh.close()


@contextlib.contextmanager
def _reading(where: str) -> Iterator[None]:
    """Turn what h5py raises on a damaged file into CorruptCheckpointError.

    h5py reports damaged metadata (a flipped bit in a B-tree, an object header, a
    datatype message) as KeyError, RuntimeError, TypeError or ValueError, and as an
    OSError without an errno; callers must be able to tell "corrupt, fall back" from
    "the OS failed", so only OSErrors with an errno pass through.
    """
    try:
        yield
    except (CorruptCheckpointError, SelectionError):
        raise
    except (KeyError, RuntimeError, TypeError, ValueError, IndexError, OverflowError) as exc:
        raise CorruptCheckpointError(f"{where}: damaged HDF5 structure ({exc})") from exc
    except OSError as exc:
        # FileNotFoundError: deleted under a reader by the writer's retention (the
        # caller lists again); _open raises it without an errno.
        if exc.errno or isinstance(exc, (FileNotFoundError, PermissionError)):
            raise
        raise CorruptCheckpointError(f"{where}: damaged HDF5 structure ({exc})") from exc


def _create_empty_groups(f: h5py.File, spec: dict[str, Any], h5path: str) -> None:
    """Containers with no stored leaf still appear as groups, for plain-h5py readers."""
    kind = spec["t"]
    if kind not in _CONTAINERS:
        return
    f.require_group(h5path)
    for position, item in enumerate(spec["items"]):
        if kind == "dict":
            key, child = item
            _create_empty_groups(f, child, f"{h5path}/{_child_name(key, position)}")
        else:
            _create_empty_groups(f, item, f"{h5path}/{position}")


# ------------------------------------------------------------------------ decoding
#
# Reading opens the file with h5py and does the rest with h5py's low-level API (h5g,
# h5l, h5a, h5d): its high-level objects make property lists and wrappers on every
# access (a dataset's is_virtual, external, chunks and compression each make a
# creation property list; so does opening it), which cost about 0.3 ms a leaf, most of
# reading a checkpoint of small arrays, and half of read_meta. Here a dataset is opened
# once, by a link checked to be a hard one, its storage checked with one creation
# property list, and the groups above it stay open for the next leaf.

_INT64 = h5t.py_create(np.dtype(np.int64))
_memory_types: dict[np.dtype[Any], Any] = {}
_LINK_KINDS = {h5l.TYPE_SOFT: "SoftLink", h5l.TYPE_EXTERNAL: "ExternalLink"}


def _open(path: str | os.PathLike[str]) -> h5py.File:
    try:
        return h5py.File(path, "r", locking=False)
    except FileNotFoundError:
        raise
    except OSError as exc:
        if not os.path.exists(path):
            raise FileNotFoundError(str(path)) from exc
        if isinstance(exc, PermissionError) or (exc.errno is not None and exc.errno != 0):
            raise
        raise CorruptCheckpointError(f"{os.fspath(path)}: not a readable HDF5 file ({exc})") from exc


class _File:
    """A checkpoint file open for reading; a context manager that closes all it opened.

    :meth:`dataset` opens a leaf by its path, following hard links only, and keeps the
    groups on that path open: the next leaf, usually a sibling, reuses them.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.where = os.fspath(path)
        self.id = _open(path).id
        self.size = 0
        self._groups: list[tuple[str, Any]] = [("", self.id)]  # open groups, root first

    def __enter__(self) -> _File:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        # Every object opened in the file is closed where it was opened (the groups
        # here), so closing the file's identifier closes the file; h5py.File.close()
        # would first search the library for objects still open (about 50 us).
        for _name, gid in reversed(self._groups[1:]):
            gid.close()
        del self._groups[1:]
        self.id.close()

    def filesize(self) -> int:
        if not self.size:
            self.size = int(self.id.get_filesize())
        return self.size

    def child(self, gid: Any, name: str, open_as: Callable[[Any, bytes], Any], wrong_kind: str) -> Any:
        """Open ``gid``'s member ``name`` with ``open_as`` (``h5g.open`` or ``h5d.open``).

        Soft, external and user-defined links are refused, never followed; a member of
        the wrong kind is refused with the message ``wrong_kind``.
        """
        key = name.encode("utf-8", "surrogatepass")
        try:
            kind = gid.links.get_info(key).type
        except RuntimeError:  # HDF5's "name doesn't exist"
            raise CorruptCheckpointError(f"{self.where}: missing {name!r}") from None
        if kind != h5l.TYPE_HARD:
            link = _LINK_KINDS.get(kind, "user-defined link")
            raise CorruptCheckpointError(f"{self.where}: {name!r} is a {link}, refused")
        try:
            return open_as(gid, key)
        except (KeyError, ValueError) as exc:  # HDF5's "not a dataset", "not a group"
            raise CorruptCheckpointError(f"{self.where}: {wrong_kind}") from exc

    def dataset(self, h5path: str) -> Any:
        """The dataset at ``h5path`` (absolute, as the tree names it), opened."""
        parts = h5path.split("/")  # "", "state", ..., leaf
        groups = self._groups
        keep = 1
        limit = min(len(groups), len(parts) - 1)
        while keep < limit and groups[keep][0] == parts[keep]:
            keep += 1
        for _name, gid in reversed(groups[keep:]):
            gid.close()
        del groups[keep:]
        for part in parts[keep:-1]:
            groups.append((part, self.child(groups[-1][1], part, h5g.open, f"{h5path} is not where the tree says")))
        return self.child(groups[-1][1], parts[-1], h5d.open, f"{h5path} is not a dataset")


def _int_attribute(f: _File, name: bytes) -> int | str | None:
    """The root's integer scalar attribute ``name``; None if missing; a description if it is
    something else (never read: it could be a reference or a variable-length string)."""
    if not h5a.exists(f.id, name):
        return None
    aid = h5a.open(f.id, name)
    try:
        tid = aid.get_type()
        if tid.get_class() != h5t.INTEGER:
            return f"a non-integer attribute (HDF5 type class {tid.get_class()})"
        if aid.get_space().get_simple_extent_type() != h5s.SCALAR:
            return "an attribute that is not a scalar"
        value = np.empty((), np.int64)
        aid.read(value, mtype=_INT64)  # any integer type converts; uint32 exactly
        return int(value)
    finally:
        aid.close()


def _read_manifest(f: _File) -> dict[str, Any]:
    where = f.where
    fmt = _int_attribute(f, b"ckptmgr_format")
    if fmt is None:
        raise CorruptCheckpointError(f"{where}: not a ckptmgr checkpoint (no ckptmgr_format)")
    if fmt != FORMAT_VERSION:
        raise CorruptCheckpointError(f"{where}: unsupported format version {fmt!r}")
    h5path = "/" + MANIFEST
    ds = f.child(f.id, MANIFEST, h5d.open, "malformed manifest")
    try:
        shape = ds.shape
        if shape is None or len(shape) != 1 or not ds.get_type().equal(_memory_type(np.dtype(np.uint8))):
            raise CorruptCheckpointError(f"{where}: malformed manifest")
        size = shape[0]
        _check_dataset_storage(ds, size, where, h5path)
        if size > MAX_MANIFEST_BYTES:
            raise CorruptCheckpointError(f"{where}: manifest too large ({size} bytes)")
        buffer = np.empty(size, np.uint8)
        if size:
            ds.read(h5s.ALL, h5s.ALL, buffer)
    finally:
        ds.close()
    blob = buffer.tobytes()
    expected = _int_attribute(f, b"ckptmgr_manifest_crc32")
    if type(expected) is not int or checksum(blob) != expected:
        raise CorruptCheckpointError(f"{where}: manifest checksum mismatch")
    try:
        manifest = json.loads(blob.decode("utf-8"))
    except (ValueError, RecursionError) as exc:
        raise CorruptCheckpointError(f"{where}: manifest is not valid JSON ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("checksum") not in _KNOWN_LEAF_CHECKSUMS:
        raise CorruptCheckpointError(f"{where}: malformed manifest")
    return manifest


def _check_dataset_storage(ds: Any, nbytes: int, where: str, h5path: str) -> None:
    """Refuse all but plain contiguous or compact storage of exactly ``nbytes`` bytes."""
    dcpl = ds.get_create_plist()
    layout = dcpl.get_layout()
    if layout == h5d.VIRTUAL or dcpl.get_external_count():
        raise CorruptCheckpointError(f"{where}: {h5path} uses external or virtual storage, refused")
    if layout not in (h5d.CONTIGUOUS, h5d.COMPACT) or dcpl.get_nfilters():
        raise CorruptCheckpointError(f"{where}: {h5path} has an unexpected layout")
    if nbytes and ds.get_storage_size() != nbytes:
        raise CorruptCheckpointError(
            f"{where}: {h5path} stores {ds.get_storage_size()} bytes, expected {nbytes}"
        )


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a checkpoint file, checksum-verified, without reading arrays.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CorruptCheckpointError: not a ckptmgr file, or its manifest is damaged.
        OSError: the file could not be read.
    """
    with _reading(os.fspath(path)), _File(path) as f:
        return _read_manifest(f)


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
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_NDIM
        or not all(type(n) is int and 0 <= n < 2**62 for n in shape)
    ):
        raise CorruptCheckpointError(f"{where}: invalid shape {shape!r}")
    return tuple(shape)


def _direct_fd(f: _File) -> int | None:
    """The descriptor HDF5 reads ``f`` through, where leaves can be read from it directly."""
    # HDF5_DRIVER can pick another driver for the whole process.
    if f.id.get_access_plist().get_driver() != h5fd.SEC2:
        return None
    handle = f.id.get_vfd_handle()
    return handle if type(handle) is int else None


def _memory_type(dtype: np.dtype[Any]) -> Any:
    """HDF5's type for ``dtype`` in memory (what a read converts to), made once per dtype."""
    tid = _memory_types.get(dtype)
    if tid is None:
        tid = _memory_types[dtype] = h5t.py_create(dtype)
    return tid


def _direct_offset(ds: Any, dtype: np.dtype[Any], nbytes: int, f: _File, h5path: str) -> int | None:
    """Where ``ds``'s bytes start in the file, when they are the array's bytes as they are.

    That is a contiguous dataset (chunked, filtered, external and virtual ones are
    refused before this) whose file type is ``dtype``'s own, which HDF5 would copy
    without converting it (the caller checks). Bools keep HDF5's read; a compact
    dataset (stored in its header) has no offset.
    """
    if dtype.kind == "b":
        return None
    offset = ds.get_offset()
    if offset is None:
        return None
    if offset + nbytes > f.filesize():
        raise CorruptCheckpointError(f"{f.where}: {h5path} runs past the end of the file")
    return int(offset)


def _pread_checked(
    fd: int, offset: int, flat: np.ndarray[Any, Any], crc: Callable[[Any, int], int] | None, where: str,
    h5path: str,
) -> int:
    """Read ``flat.nbytes`` bytes at ``offset`` into ``flat``; return their checksum (0 without ``crc``).

    In slabs the size of a core's L2 cache, each checksummed as soon as it is read: the
    CRC then reads the slab from cache at twice the speed it reads memory, and costs
    a few percent of the read instead of a second pass over the whole state.
    """
    view = flat.data
    value = 0
    done = 0
    total = len(view)
    while done < total:
        stop = min(done + _READ_SLAB_BYTES, total)
        got = os.preadv(fd, [view[done:stop]], offset + done)
        if got <= 0:
            raise CorruptCheckpointError(f"{where}: {h5path} ends early (truncated file)")
        if crc is not None:
            value = crc(view[done:done + got], value)
        done += got
    return value


def _shape_text(shape: tuple[int, ...] | None) -> str:
    return "(no dataspace)" if shape is None else str(list(shape))


def _read_leaf(
    f: _File, node: dict[str, Any], h5path: str, crc: Callable[[Any, int], int] | None, fd: int | None,
) -> np.ndarray[Any, Any]:
    """Read one leaf straight into its final array; with ``crc``, verify its checksum.

    ``fd`` is :func:`_direct_fd`'s: a plain contiguous dataset is read from it with
    pread, bypassing HDF5 (same bytes, without its per-read overhead), in cache-sized
    slabs each checksummed while still in cache.
    """
    where = f.where
    dtype = _dtype_from_str(node.get("dtype"), where)
    shape = _validate_shape(node, where)
    nbytes = math.prod(shape) * dtype.itemsize
    raw = _is_raw(dtype)
    stored_shape = (*shape, dtype.itemsize) if raw else shape
    stored_dtype = np.dtype(np.uint8) if raw else dtype
    ds = f.dataset(h5path)
    try:
        # A file type equal to the array's own needs no conversion (the usual case, and
        # cheaper to tell than the NumPy dtype h5py derives from the file type).
        as_is = ds.get_type().equal(_memory_type(stored_dtype))
        if ds.shape != stored_shape or not (as_is or ds.dtype == stored_dtype):
            raise CorruptCheckpointError(
                f"{where}: {h5path} is {ds.dtype}{_shape_text(ds.shape)}, "
                f"the manifest says {stored_dtype}{list(stored_shape)}"
            )
        _check_dataset_storage(ds, nbytes, where, h5path)
        out = np.empty(shape, dtype)
        offset = _direct_offset(ds, stored_dtype, nbytes, f, h5path) if as_is and fd is not None and nbytes else None
        if fd is not None and offset is not None:
            value = _pread_checked(fd, offset, out.reshape(-1).view(np.uint8), crc, where, h5path)
        else:
            if nbytes:
                ds.read(h5s.ALL, h5s.ALL, out.reshape(-1).view(np.uint8).reshape(stored_shape) if raw else out)
            value = crc(_contiguous_bytes(out), 0) if crc is not None else 0
    finally:
        ds.close()
    if crc is not None and value != node.get("crc"):
        raise CorruptCheckpointError(f"{where}: checksum mismatch in {h5path}")
    return out


def _decode_scalar(kind: str, array: np.ndarray[Any, Any], where: str) -> Any:
    expected = {
        "bool": "|b1",
        "int": "<i8",
        "float": "<f8",
        "complex": "<c16",
        "bigint": "|u1",
        "str": "|u1",
        "bytes": "|u1",
    }
    if array.dtype.str != expected.get(kind, array.dtype.str):
        raise CorruptCheckpointError(f"{where}: {kind} leaf stored as {array.dtype}")
    if kind in ("bool", "int", "float", "complex"):
        if array.shape != ():
            raise CorruptCheckpointError(f"{where}: {kind} leaf has shape {array.shape}")
        return {"bool": bool, "int": int, "float": float, "complex": complex}[kind](array[()])
    if array.ndim != 1:
        raise CorruptCheckpointError(f"{where}: {kind} leaf has shape {array.shape}")
    data = array.tobytes()
    if kind == "bigint":
        return int.from_bytes(data, "little", signed=True)
    if kind == "str":
        try:
            return data.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError as exc:
            raise CorruptCheckpointError(f"{where}: str leaf is not UTF-8") from exc
    return data


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
                if sel is None or key in sel:
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


def _check_claimed_bytes(f: _File, spec: Any) -> None:
    """Refuse a tree (validating it) whose arrays add up to more bytes than the file has.

    Each leaf's dataset must store exactly its bytes, but HDF5 hard links (or crafted
    layouts) can put one stored dataset under many names: reading each would allocate
    its size again, a 1 MB file making the reader allocate gigabytes.
    """
    where = f.where
    total = 0
    for _keys, _h5path, node in iter_leaves(spec, where):
        total += math.prod(_validate_shape(node, where)) * _dtype_from_str(node.get("dtype"), where).itemsize
    size = f.filesize()
    if total > size:
        raise CorruptCheckpointError(f"{where}: the tree claims {total} bytes of arrays, the file has {size}")


def read_file(
    path: str | os.PathLike[str], *, verify: bool = True, select: Selection | None = None
) -> tuple[Tree, dict[str, Any]]:
    """Read a checkpoint file; return ``(tree, manifest)``.

    With ``verify`` every array read has its checksum checked against the manifest.
    With ``select`` (see :func:`selection`) only those subtrees are read.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CorruptCheckpointError: the file is damaged, tampered with or hostile.
        CheckpointError: ``verify`` of a ``crc32c`` file without the crc32c package.
        OSError: the file could not be read.
    """
    where = os.fspath(path)
    with _reading(where), _File(path) as f:
        manifest = _read_manifest(f)
        spec = manifest.get("tree")
        # Validate the whole description before allocating anything.
        _check_claimed_bytes(f, spec)
        crc = _leaf_checksum(manifest, where) if verify else None
        fd = _direct_fd(f)

        def leaf_value(node: dict[str, Any], h5path: str) -> Any:
            array = _read_leaf(f, node, h5path, crc, fd)
            kind = node["t"]
            if kind == "ndarray":
                return array
            if kind == "npscalar":
                if array.shape != ():
                    raise CorruptCheckpointError(f"{where}: scalar {h5path} has a shape")
                return array[()]
            return _decode_scalar(kind, array, where)

        try:
            tree = _build(spec, leaf_value, where, select)
        except SelectionError:
            raise
        except (KeyError, TypeError, ValueError, RecursionError) as exc:
            if isinstance(exc, CorruptCheckpointError):
                raise
            raise CorruptCheckpointError(f"{where}: malformed tree ({exc})") from exc
    return tree, manifest


def verify_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check every checksum of a checkpoint file without keeping the arrays; return its manifest.

    Raises:
        FileNotFoundError, CorruptCheckpointError, CheckpointError, OSError: as :func:`read_file`.
    """
    where = os.fspath(path)
    with _reading(where), _File(path) as f:
        manifest = _read_manifest(f)
        _check_claimed_bytes(f, manifest.get("tree"))
        crc = _leaf_checksum(manifest, where)
        fd = _direct_fd(f)
        for _keys, h5path, node in list(iter_leaves(manifest.get("tree"), where)):
            _read_leaf(f, node, h5path, crc, fd)
    return manifest


# ------------------------------------------------------------------ payload sidecars


def encode_sidecar(meta: Mapping[str, Any]) -> bytes:
    """The sidecar of a payload checkpoint: its metadata as JSON, with its own CRC.

    ``meta`` holds ``name``, ``size`` and ``crc32`` of the payload file besides the
    usual ``step``, ``time``, ``metrics``, ``tracker``.
    """
    body = json.dumps(dict(meta, format=FORMAT_VERSION, checksum=CHECKSUM_NAME),
                      separators=(",", ":"), sort_keys=True, allow_nan=True)
    return json.dumps({"ckptmgr_payload": body, "crc32": checksum(body.encode("utf-8"))}).encode("utf-8")


def decode_sidecar(blob: bytes, where: str = "") -> dict[str, Any]:
    """Parse and check a sidecar written by :func:`encode_sidecar`.

    Raises:
        CorruptCheckpointError: damaged, tampered with or malformed.
    """
    try:
        outer = json.loads(blob.decode("utf-8"))
        body = outer["ckptmgr_payload"]
        if not isinstance(body, str) or checksum(body.encode("utf-8")) != outer["crc32"]:
            raise CorruptCheckpointError(f"{where}: metadata checksum mismatch")
        meta = json.loads(body)
    except CorruptCheckpointError:
        raise
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise CorruptCheckpointError(f"{where}: malformed metadata ({exc})") from exc
    if (
        not isinstance(meta, dict)
        or meta.get("format") != FORMAT_VERSION
        or meta.get("checksum") != CHECKSUM_NAME
        or not isinstance(meta.get("name"), str)
        or type(meta.get("step")) is not int
        or meta["step"] < 0
        or type(meta.get("size")) is not int
        or type(meta.get("crc32")) is not int
    ):
        raise CorruptCheckpointError(f"{where}: malformed metadata")
    try:
        # The payload's path is the directory plus this name: "../x" or "a/b" would
        # make readers verify and return, and retention delete, a file elsewhere.
        storage.check_payload_name(meta["name"])
    except ValueError as exc:
        raise CorruptCheckpointError(f"{where}: malformed metadata (payload name {meta['name']!r})") from exc
    return meta
