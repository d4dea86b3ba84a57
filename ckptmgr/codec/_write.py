"""Writing a state tree to a new HDF5 file: one large write per array, checksummed in cache."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import h5py
import numpy as np

from . import _format
from ._format import (
    _CONTAINERS,
    _LEAF_CHECKSUMS,
    _SLAB_BYTES,
    _START_BYTES,
    _WRITEBACK_BYTES,
    FORMAT_VERSION,
    LEAF_CHECKSUM_NAME,
    MANIFEST,
    STATE,
    Tree,
    _is_raw,
    checksum,
)
from ._tree import EncodedTree, _child_name, _Leaf, encode_tree


class Writeback(Protocol):
    """What :func:`write_file` asks of the disk while it writes (``storage.Writeback``
    on a local disk: start writing back what is written, without waiting)."""

    def start(self) -> None: ...

    def kick(self) -> None: ...

    def close(self) -> OSError | None: ...


class _NoWriteback:
    """No early writeback: the final fsync writes everything."""

    def __init__(self, fd: int) -> None:
        del fd

    def start(self) -> None:
        pass

    def kick(self) -> None:
        pass

    def close(self) -> OSError | None:
        return None


def _contiguous_bytes(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """The bytes the checksum covers: C order, bools normalised to 0/1."""
    if array.dtype.kind == "b":
        array = np.not_equal(array.view(np.uint8), 0)
    return _c_order(array).reshape(-1).view(np.uint8)


def _c_order(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    # Not np.ascontiguousarray: it turns 0-d arrays into 1-d ones.
    return array if array.flags.c_contiguous else array.copy(order="C")


def write_file(
    path: str | os.PathLike[str], tree: Tree | EncodedTree, meta: Mapping[str, Any],
    *, writeback: Callable[[int], Writeback] | None = None,
) -> int:
    """Write ``tree`` and ``meta`` to a new HDF5 file at ``path``; return the state's bytes.

    ``tree`` is a state tree or one already encoded (:func:`encode_tree`). The file is
    not fsynced here; the storage layer does that. ``meta`` must be JSON-serialisable;
    it is stored in the manifest next to the tree description. ``writeback(fd)``
    makes what tells the disk to start on the data as it is written (the storage
    layer's, on a local disk); without it the final fsync does all the work.
    """
    encoded = tree if isinstance(tree, EncodedTree) else encode_tree(tree)
    spec, leaves = encoded.spec, encoded.leaves
    total = 0
    sink = _WriteSink(path)
    started = (writeback or _NoWriteback)(sink.fileno())
    try:
        total = _write_h5(sink, spec, leaves, meta, started)
    except Exception:
        # HDF5 tripping over a write that was dropped is the recorded error's doing.
        if sink.error is None:
            raise
    finally:
        error = started.close()
        if error is not None and sink.error is None:
            sink.error = error
        sink.close()
    if sink.error is not None:
        raise sink.error
    return total


class _Progress:
    """How much of a file is written, telling its :class:`Writeback` when to act.

    The first ``_WRITEBACK_BYTES`` are written in slabs of ``_START_BYTES``, each queued
    for the disk once written (:meth:`Writeback.start`: no waiting, no thread);
    from then on a background fdatasync every ``_WRITEBACK_BYTES`` keeps the disk busy
    (:meth:`Writeback.kick`), with slabs of ``_SLAB_BYTES`` (queueing each of
    those too only moved the disk's bookkeeping into the writer: no faster at 256 MiB).
    Counted per slab, not per array, so that one big array overlaps too.
    """

    def __init__(self, writeback: Writeback) -> None:
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
    writeback: Writeback,
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
        if len(blob) > _format.MAX_MANIFEST_BYTES:
            # Readers refuse a bigger manifest: writing it would make a checkpoint that
            # cannot be restored.
            raise ValueError(
                f"Expected a state tree whose description (keys, types, shapes) fits in "
                f"{_format.MAX_MANIFEST_BYTES} bytes. Received: {len(leaves)} leaves described in "
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
