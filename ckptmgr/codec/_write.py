"""Writing a state tree to a new HDF5 file: one large write per array, checksummed in cache."""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import h5py
import numpy as np
from h5py import h5d, h5p, h5s, h5t

from . import _format
from ._encode import EncodedTree, EncodePlan, encode_tree
from ._format import (
    _LEAF_CHECKSUMS,
    _SLAB_BYTES,
    _START_BYTES,
    _WRITEBACK_BYTES,
    FILE_ALIGN,
    FILE_ALIGN_THRESHOLD,
    FORMAT_VERSION,
    LEAF_CHECKSUM_NAME,
    MANIFEST,
    PACK,
    PACK_BLOCK,
    PACK_CRC,
    PACK_INDEX,
    STATE,
    Tree,
    _is_raw,
    checksum,
    gc_paused,
)


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
    total = 0
    sink = _WriteSink(path)
    started = (writeback or _NoWriteback)(sink.fileno())
    try:
        with gc_paused():
            total = _write_h5(sink, encoded, meta, started)
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


def _stored(array: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """The array as the file stores it: C order; dtypes HDF5 cannot describe as uint8
    with a trailing axis of the item size; bools as bytes 0/1."""
    data = _c_order(array)
    if _is_raw(data.dtype):
        data = data.reshape(-1).view(np.uint8).reshape((*data.shape, data.dtype.itemsize))
    elif data.dtype.kind == "b":
        data = np.not_equal(data.view(np.uint8), 0)
    return data


def _write_h5(
    sink: _WriteSink, encoded: EncodedTree, meta: Mapping[str, Any], writeback: Writeback,
) -> int:
    """Write format 2: small leaves packed into one dataset, big ones one dataset each.

    HDF5 only creates the datasets (their space allocated, never filled) and writes its
    own metadata; the arrays' bytes go to the file with ``pwrite`` at the offsets HDF5
    allocated: the pack (its leaves copied into one buffer, one ``np.concatenate`` per
    run of one dtype) in a few large writes, each big leaf in slabs.
    """
    crc = _LEAF_CHECKSUMS[LEAF_CHECKSUM_NAME]
    progress = _Progress(writeback)
    plan = encoded.plan
    with h5py.File(sink, "w", locking=False, alignment_threshold=FILE_ALIGN_THRESHOLD,
                   alignment_interval=FILE_ALIGN) as f:
        if not (encoded.leaves and encoded.leaves[0].h5path == "/" + STATE):  # the root is no big leaf
            f.require_group(STATE)
        # Every big leaf's dataset first, then their storage in order: their headers and
        # the groups' tables then lie together at the start of the file, where a cold
        # read finds them all in one go (between the arrays, each cost a read of its own).
        checksums = [0] * len(encoded.leaves)
        created: list[tuple[int, np.ndarray[Any, Any], Any]] = []
        try:
            for position, leaf in enumerate(encoded.leaves):
                data = _stored(leaf.array)
                if data.ndim == 0:
                    # HDF5 never allocates a scalar dataset early: it writes this one itself
                    # (only when nothing is packed, PACK_THRESHOLD 0: 0-d leaves are tiny).
                    checksums[position] = crc(_contiguous_bytes(data), 0)
                    f.create_dataset(leaf.h5path, data=data)
                    continue
                created.append((position, data, _create(f, leaf.h5path, data.shape, data.dtype)))
            offsets = [_allocate(dsid, encoded.leaves[position].h5path, data) for position, data, dsid in created]
        finally:
            for _position, _data, dsid in created:
                dsid.close()
        if created:
            # Each allocating write went through HDF5's sieve buffer, which writes it out
            # when the next write lands elsewhere (or at close): out now, before the
            # arrays are written over it.
            f.flush()
        for (position, data, _dsid), offset in zip(created, offsets, strict=True):
            checksums[position] = _write_slabs(sink, offset, data, crc, progress)
        manifest = {key: value for key, value in meta.items() if key != "tree"}
        manifest.update(format=FORMAT_VERSION, checksum=LEAF_CHECKSUM_NAME, nbytes=encoded.nbytes)
        if plan.packed_count:
            manifest["pack"] = {"block": PACK_BLOCK}
        head = json.dumps(manifest, separators=(",", ":"), allow_nan=True)
        blob = f'{head[:-1]},"tree":{encoded.tree_json(checksums)}}}'.encode()
        if len(blob) > _format.MAX_MANIFEST_BYTES:
            # Readers refuse a bigger manifest: writing it would make a checkpoint that
            # cannot be restored.
            raise ValueError(
                f"Expected a state tree whose description (keys, types, shapes) fits in "
                f"{_format.MAX_MANIFEST_BYTES} bytes. Received: {plan.packed_count + len(encoded.leaves)} "
                f"leaves described in {len(blob)} bytes; store large collections of small values as arrays"
            )
        manifest_crc = checksum(blob)
        f.create_dataset(MANIFEST, data=np.frombuffer(blob, np.uint8))
        f.attrs["ckptmgr_format"] = FORMAT_VERSION
        f.attrs["ckptmgr_manifest_crc32"] = np.uint32(manifest_crc)
        if plan.packed_count:
            # Written last: each block's checksum starts from the manifest's, so the
            # packed bytes only verify under the manifest that describes them.
            packed = encoded.pack()
            dsid = _create(f, "/" + PACK, packed.shape, packed.dtype, _ALLOCATED)
            try:
                offset = _offset(dsid, "/" + PACK, packed.nbytes)
            finally:
                dsid.close()
            blocks = _write_pack(sink, offset, packed, progress, crc, manifest_crc)
            f.create_dataset(PACK_CRC, data=np.asarray(blocks, dtype="<u4"))
            f.create_dataset(PACK_INDEX, data=_pack_index(plan))
    return encoded.nbytes


# _write_pack checksums whole blocks per slab: a block must not span two.
assert _START_BYTES % PACK_BLOCK == 0 and _SLAB_BYTES % PACK_BLOCK == 0


def _write_pack(
    sink: _WriteSink, offset: int, packed: np.ndarray[Any, Any], progress: _Progress,
    crc: Callable[[Any, int], int], seed: int,
) -> list[int]:
    """Write the pack at ``offset`` in slabs; return the checksum of each PACK_BLOCK bytes
    (each started from ``seed``). Slabs are whole blocks but the last."""
    blocks: list[int] = []
    for slab in _slabs(sink, offset, packed, progress):
        blocks += [crc(slab[start:start + PACK_BLOCK], seed) for start in range(0, slab.nbytes, PACK_BLOCK)]
    return blocks


def _pack_index(plan: EncodePlan) -> np.ndarray[Any, Any]:
    """A table of the packed leaves for people reading the file with h5py or HDFView:
    name (the HDF5 path the leaf would have), dtype, shape (JSON), offset and size in
    the pack. Readers never use it: the manifest is the authority."""
    # Storage paths are ASCII (odd keys are "~N"); each column as wide as its longest entry.
    names, dtypes, shapes = (np.array(column, dtype="S") for column in
                             (plan.index_names, plan.index_dtypes, plan.index_shapes))
    table = np.empty(len(names), dtype=[
        ("name", names.dtype), ("dtype", dtypes.dtype), ("shape", shapes.dtype), ("offset", "<u8"),
        ("nbytes", "<u8"),
    ])
    table["name"] = names
    table["dtype"] = dtypes
    table["shape"] = shapes
    table["offset"] = plan.index_offsets
    table["nbytes"] = plan.index_sizes
    return table


_file_types: dict[np.dtype[Any], Any] = {}


def _create(f: h5py.File, h5path: str, shape: tuple[int, ...], dtype: np.dtype[Any], dcpl: Any = None) -> Any:
    """Create a contiguous dataset (and the groups above it) never filled by HDF5, its
    file space allocated at its first write (see :func:`_allocate`), or at once with
    ``dcpl=_ALLOCATED``.

    Through h5py's low-level API: its high-level ``create_dataset`` makes property
    lists and wrappers costing about 0.1 ms a dataset.
    """
    tid = _file_types.get(dtype)
    if tid is None:
        tid = _file_types[dtype] = h5t.py_create(dtype, logical=True)
    return h5d.create(f.id, h5path.encode("ascii"), tid, h5s.create_simple(shape), dcpl=dcpl or _UNALLOCATED,
                      lcpl=_LCPL)


def _allocate(dsid: Any, h5path: str, data: np.ndarray[Any, Any]) -> int:
    """Make HDF5 allocate a dataset's file space; return where it starts.

    HDF5 allocates a contiguous dataset's space whole at its first write: one element
    is written, through HDF5's sieve buffer (the caller flushes it before writing the
    array over it).
    """
    if data.nbytes:
        space = dsid.get_space()
        space.select_hyperslab((0,) * data.ndim, (1,) * data.ndim)
        dsid.write(h5s.create_simple((1,)), space, np.zeros(1, data.dtype), mtype=_file_types[data.dtype])
    return _offset(dsid, h5path, data.nbytes)


def _offset(dsid: Any, h5path: str, nbytes: int) -> int:
    """Where HDF5 allocated a dataset's ``nbytes`` bytes."""
    offset = dsid.get_offset()
    if nbytes and (offset is None or dsid.get_storage_size() != nbytes):
        # Writing at a guessed offset would overwrite the file's own structure.
        raise RuntimeError(f"HDF5 did not allocate {h5path} ({nbytes} bytes)")
    return int(offset or 0)


def _property_lists() -> tuple[Any, Any, Any]:
    dcpls = []
    for alloc_time in (h5d.ALLOC_TIME_LATE, h5d.ALLOC_TIME_EARLY):
        dcpl = h5p.create(h5p.DATASET_CREATE)
        dcpl.set_layout(h5d.CONTIGUOUS)
        dcpl.set_alloc_time(alloc_time)
        dcpl.set_fill_time(h5d.FILL_TIME_NEVER)
        dcpls.append(dcpl)
    lcpl = h5p.create(h5p.LINK_CREATE)
    lcpl.set_create_intermediate_group(True)
    lcpl.set_char_encoding(h5t.CSET_UTF8)
    return dcpls[0], dcpls[1], lcpl


_UNALLOCATED, _ALLOCATED, _LCPL = _property_lists()


def _write_slabs(
    sink: _WriteSink, offset: int, data: np.ndarray[Any, Any], crc: Callable[[Any, int], int],
    progress: _Progress,
) -> int:
    """Write a big C-ordered array at ``offset`` in slabs; return the checksum of its bytes."""
    value = 0
    for slab in _slabs(sink, offset, data.reshape(-1).view(np.uint8), progress):
        value = crc(slab, value)
    return value


def _slabs(
    sink: _WriteSink, offset: int, flat: np.ndarray[Any, Any], progress: _Progress,
) -> Iterator[np.ndarray[Any, Any]]:
    """Write ``flat`` (bytes) at ``offset`` in slabs, yielding each one just before it is
    written: the caller checksums it while it is in cache."""
    start = 0
    while start < flat.nbytes:
        stop = min(start + progress.slab_bytes(), flat.nbytes)
        yield flat[start:stop]
        sink.pwrite(flat[start:stop], offset + start)
        progress.wrote(stop - start)
        start = stop


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

    def pwrite(self, buffer: np.ndarray[Any, Any], offset: int) -> None:
        """Write a 1-D uint8 array at ``offset`` (all of it: short writes resumed)."""
        if self.error is not None:
            return
        fd = self._fh.fileno()
        view = buffer.data  # a memoryview of its bytes
        try:
            while len(view):
                done = os.pwrite(fd, view, offset)
                if done <= 0:
                    raise OSError(errno.EIO, f"pwrite wrote nothing at offset {offset}")
                offset += done
                view = view[done:]
        except OSError as exc:
            self.error = exc

    def truncate(self, size: int | None = None) -> int:
        return int(self._guard(lambda: self._fh.truncate(size), size or 0))

    def flush(self) -> None:
        self._guard(self._fh.flush, None)

    def close(self) -> None:
        self._guard(self._fh.close, None)
        self._fh.close()
