"""State trees to and from HDF5 files — the only package that knows HDF5.

Modules: ``_format`` (constants, checksums, dtype names), ``_encode`` (a tree -> its
description, the arrays to store and where: a reusable plan), ``_tree`` (a manifest's
tree -> its leaves, selections, the tree rebuilt), ``_write`` (writing a file), this
module (reading and verifying one), ``_sidecar`` (a payload's metadata file).

On-disk layout of one checkpoint file, format 2 (readable with plain h5py)::

    /                         attrs: ckptmgr_format = 2, ckptmgr_manifest_crc32 = <int>
    /ckptmgr_manifest         uint8 dataset: UTF-8 JSON manifest (see below)
    /ckptmgr_packed           uint8 dataset: every leaf under PACK_THRESHOLD (256 KiB)
                              bytes, back to back in tree order, each at a multiple of
                              its item size (at most 16), zeros in the gaps
    /ckptmgr_packed_crc       uint32 dataset: a checksum per 1 MiB of the pack
    /ckptmgr_packed_index     a table naming them for people (h5py, HDFView): name (the
                              path below), dtype, shape (JSON), offset, nbytes; readers
                              ignore it, the manifest is the authority
    /state                    the tree: a group per dict/list/tuple holding a big leaf,
    /state/params/w           a dataset per big leaf, e.g. state["params"]["w"], starting
                              at a multiple of 4096 bytes in the file (mmap-friendly)
    /state/opt/0              list and tuple items are named by index
    /state/~3                 a dict key that is not a plain name (has "/", starts with
                              ".", ...) is stored under "~<position>"; its real key is
                              in the manifest

Format 1 (files written before format 2) has no pack: every leaf is a dataset under
/state. It is read as before; files are always written in format 2.

The manifest holds the checkpoint's own metadata (``step``, ``time``, ``metrics``,
``tracker``, ``nbytes``, ``checksum``) and ``tree``, the authoritative description of
the state: container types, dict keys in order, and for each leaf its kind, dtype,
shape and, for a leaf of its own, its checksum; a packed leaf has ``at``, its offset
in the pack, instead. The pack is verified by a checksum per 1 MiB block
(``/ckptmgr_packed_crc``), each started from the manifest's own CRC-32: the packed bytes
verify only under the manifest that describes them, so a manifest edited to move a leaf
to another key or read it as another type (and re-signed) fails verification, as a
dataset's name, type and shape make it fail for a leaf of its own. Per-leaf checksums
cost more than the bytes of a small leaf (a call, and an entry in the manifest to write
and parse). Leaves are stored as (a
packed leaf holds the same bytes, the dtypes HDF5 cannot describe as raw bytes, bools
as bytes 0/1):

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

Writing: encoding a tree (``_encode``) settles everything but the bytes: the manifest's
description of the tree (as JSON text), where each packed leaf lies, which leaves are
datasets of their own. That plan depends only on the tree's structure, which a training
run keeps from save to save: the next tree of the same structure reuses it, told apart
by a few C-level passes per container instead of Python work per leaf. The small leaves
are copied into the pack with one ``np.concatenate`` per run of one dtype. HDF5 creates
the datasets, the big leaves' all first (their headers and the groups' tables then lie
together at the start of the file, where a cold read finds them in one go), allocates
their space (never filled) and writes its own metadata; the arrays' bytes are written
with ``pwrite`` at the offsets HDF5 allocated: the pack in a few large writes, big
leaves in slabs, each checksummed just before it is written, while it is in cache. A
per-leaf HDF5 dataset cost about 70 us to create and 40 us to read back, which made a
state of 20,000 small tensors take seconds; packed, with a plan, a leaf costs well under
a microsecond of Python. The disk starts on the data while the rest is still being
copied (the storage layer's writeback, injected): on each 4 MiB of the first 32 MiB as
soon as it is written, then every 32 MiB.

Reading goes the other way. The pack, which lies right after the manifest, is read next
in one pass into one buffer, and its leaves are views of it (``select`` reads only the
selected leaves); each is verified. A big leaf whose bytes HDF5 would copy unchanged (a
plain contiguous dataset) is read with pread straight from the descriptor HDF5 opened,
into its final array, in 1 MiB slabs each checksummed while it is still in cache, so
verifying costs a few percent of the read. Other leaves (bools, compact datasets, a
non-default HDF5 driver) go through HDF5's own read.

``read_file(..., mmap=True)`` maps the file read-only and returns views of it: the
manifest (CRC), the structure and every bound are checked, the arrays' checksums are
not (that would read every byte; ``verify_file`` does).

Reading never unpickles, follows no soft or external link, refuses virtual and
externally stored datasets, object and variable-length dtypes, and only allocates
what the file actually stores.
"""

from __future__ import annotations

import contextlib
import json
import math
import mmap
import os
from collections.abc import Callable, Iterator
from typing import Any

import h5py
import numpy as np
from h5py import h5a, h5d, h5fd, h5g, h5l, h5s, h5t

from ..errors import CorruptCheckpointError
from . import _format
from ._encode import EncodedTree, encode_tree
from ._format import (
    _KNOWN_LEAF_CHECKSUMS,
    _READ_SLAB_BYTES,
    CHECKSUM_NAME,
    FORMAT_VERSION,
    LEAF_CHECKSUM_NAME,
    MANIFEST,
    MAX_DEPTH,
    MAX_DIM,
    MAX_MANIFEST_BYTES,
    MAX_NDIM,
    PACK,
    PACK_BLOCK,
    PACK_CRC,
    READABLE_FORMATS,
    STATE,
    Tree,
    _dtype_from_str,
    _is_raw,
    _leaf_checksum,
    _parsed_dtypes,
    checksum,
    gc_paused,
)
from ._sidecar import decode_sidecar, encode_sidecar
from ._tree import (
    Selection,
    SelectionError,
    _build,
    _validate_shape,
    describe_leaves,
    iter_leaves,
    selection,
)
from ._write import Writeback, _contiguous_bytes, write_file

__all__ = [
    "CHECKSUM_NAME",
    "FORMAT_VERSION",
    "LEAF_CHECKSUM_NAME",
    "MANIFEST",
    "MAX_DEPTH",
    "MAX_MANIFEST_BYTES",
    "MAX_NDIM",
    "STATE",
    "EncodedTree",
    "Selection",
    "SelectionError",
    "Tree",
    "Writeback",
    "checksum",
    "decode_sidecar",
    "describe_leaves",
    "encode_sidecar",
    "encode_tree",
    "iter_leaves",
    "read_file",
    "read_meta",
    "selection",
    "verify_file",
    "write_file",
]


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
        self.manifest_crc = 0  # the manifest's CRC-32, once read (packed blocks start from it)
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
    if fmt not in READABLE_FORMATS:
        raise CorruptCheckpointError(f"{where}: unsupported format version {fmt!r}")
    h5path = "/" + MANIFEST
    ds = f.child(f.id, MANIFEST, h5d.open, "malformed manifest")
    try:
        shape = ds.shape
        if shape is None or len(shape) != 1 or not ds.get_type().equal(_memory_type(np.dtype(np.uint8))):
            raise CorruptCheckpointError(f"{where}: malformed manifest")
        size = shape[0]
        _check_dataset_storage(ds, size, where, h5path)
        if size > _format.MAX_MANIFEST_BYTES:
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
    f.manifest_crc = expected
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
    with _reading(os.fspath(path)), _File(path) as f, gc_paused():
        return _read_manifest(f)


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
    mapped: np.ndarray[Any, Any] | None = None,
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
        offset = (_direct_offset(ds, stored_dtype, nbytes, f, h5path)
                  if as_is and (fd is not None or mapped is not None) and nbytes else None)
        if mapped is not None and offset is not None and offset % dtype.alignment == 0:
            return mapped[offset:offset + nbytes].view(dtype).reshape(shape)
        out = np.empty(shape, dtype)
        if fd is not None and offset is not None:  # mapped is None here
            value = _pread_checked(fd, offset, out.reshape(-1).view(np.uint8), crc, where, h5path)
        else:
            if nbytes:
                ds.read(h5s.ALL, h5s.ALL, out.reshape(-1).view(np.uint8).reshape(stored_shape) if raw else out)
            value = crc(_contiguous_bytes(out), 0) if crc is not None else 0
    finally:
        ds.close()
    if crc is not None and value != node.get("crc"):
        raise CorruptCheckpointError(f"{where}: checksum mismatch in {h5path}")
    if mapped is not None:
        out.flags.writeable = False  # read in place of a mapping: read-only as one
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


class _Leaves:
    """Reads a file's leaves: from their own datasets, or from the pack (format 2).

    ``whole``: every leaf will be read, so the pack is read in one pass, into one
    buffer, verifying each block of it, and its leaves are views of that buffer.
    Otherwise each packed leaf is read with the blocks that hold it (verified, and kept
    for the next leaf). ``mapped``: the leaves are read-only views of the file mapped
    in memory (no checksum is checked: that would read every byte).
    """

    def __init__(
        self, f: _File, manifest: dict[str, Any], crc: Callable[[Any, int], int] | None, *, whole: bool,
        mapped: bool,
    ) -> None:
        self.f = f
        self.manifest = manifest
        self.crc = None if mapped else crc
        self.whole = whole
        self.fd = _direct_fd(f)
        self._own_fd: int | None = None
        self.map: np.ndarray[Any, Any] | None = None  # the whole file, mapped read-only
        if mapped:
            # The descriptor HDF5 validated the layout through, where there is one: a
            # checkpoint saved again under the same name meanwhile is another file.
            if self.fd is not None:
                self.map = np.frombuffer(mmap.mmap(self.fd, 0, access=mmap.ACCESS_READ), np.uint8)
            else:
                with open(f.where, "rb") as fh:
                    self.map = np.frombuffer(mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ), np.uint8)
        self.claimed = 0
        self.filesize = f.filesize()
        self._pack: tuple[int, int] | None = None
        self._block = PACK_BLOCK
        self._block_crcs: np.ndarray[Any, Any] | None = None
        self._buffer: np.ndarray[Any, Any] | None = None
        self.bad_blocks: set[int] = set()  # whole reads: blocks whose checksum failed
        self._blocks: dict[int, np.ndarray[Any, Any]] = {}  # partial reads: verified blocks

    def close(self) -> None:
        if self._own_fd is not None:
            os.close(self._own_fd)
            self._own_fd = None

    def _read_fd(self) -> int:
        if self.fd is not None:
            return self.fd
        if self._own_fd is None:
            self._own_fd = os.open(self.f.where, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        return self._own_fd

    def array(self, node: dict[str, Any], h5path: str) -> np.ndarray[Any, Any]:
        where = self.f.where
        dtype = _dtype_from_str(node.get("dtype"), where)
        shape = _validate_shape(node, where)
        nbytes = math.prod(shape) * dtype.itemsize
        # Each leaf's storage is checked to hold exactly its bytes, but HDF5 hard links
        # (or packed leaves at one place) can put one stored array under many names:
        # reading each would allocate its size again, a 1 MB file making the reader
        # allocate gigabytes. So the arrays read never add up to more than the file.
        self.claimed += nbytes
        if self.claimed > self.filesize:
            raise CorruptCheckpointError(
                f"{where}: the tree claims more bytes of arrays ({self.claimed} by {h5path}) "
                f"than the file has ({self.filesize})"
            )
        at = node.get("at")
        if at is None:
            return _read_leaf(self.f, node, h5path, self.crc, self.fd, self.map)
        base, size = self._pack or self.pack()
        if type(at) is not int or at < 0 or at + nbytes > size:
            raise CorruptCheckpointError(f"{where}: {h5path} lies outside the packed leaves ({at!r})")
        if self.map is not None and (base + at) % dtype.alignment == 0:
            raw = self.map[base + at:base + at + nbytes]
        elif self.whole:
            buffer = self._buffer if self._buffer is not None else self.buffer()
            raw = buffer[at:at + nbytes]
            if self.bad_blocks and nbytes and not self.bad_blocks.isdisjoint(
                    range(at // self._block, (at + nbytes - 1) // self._block + 1)):
                raise CorruptCheckpointError(f"{where}: checksum mismatch in {h5path}")
        else:
            raw = self._read_packed(at, nbytes, h5path)
        if self.map is not None:
            out: np.ndarray[Any, Any] = raw.view(dtype).reshape(shape)
            out.flags.writeable = False  # mapped, or (where not aligned) read in its place
            return out
        if dtype.kind == "b" and self.crc is None:
            # Stored as bytes 0/1; an unverified read must not make other bools.
            flags: np.ndarray[Any, Any] = np.not_equal(raw, 0)
            return flags.reshape(shape)
        return raw.view(dtype).reshape(shape)

    def quick(self, node: dict[str, Any]) -> np.ndarray[Any, Any] | None:
        """A packed array leaf of a whole read, with a few checks inline: about a third of
        :meth:`array`'s time. None for anything else, or anything :meth:`array` would
        refuse (it then raises the error)."""
        at, name, shape = node.get("at"), node.get("dtype"), node.get("shape")
        array: np.ndarray[Any, Any]
        if type(at) is not int or type(name) is not str or type(shape) is not list or len(shape) > MAX_NDIM:
            return None
        dtype = _parsed_dtypes.get(name)  # names already validated in this process
        if dtype is None or dtype.kind == "b":
            return None
        nbytes = dtype.itemsize
        for n in shape:
            if type(n) is not int or not 0 <= n < MAX_DIM:
                return None
            nbytes *= n
        base, size = self._pack or self.pack()
        if at < 0 or at + nbytes > size or self.claimed + nbytes > self.filesize:
            return None
        if self.map is not None:
            if (base + at) % dtype.alignment:
                return None  # a small pack HDF5 did not align: array() copies it
            array = np.ndarray(shape, dtype, self.map, base + at)
        else:
            buffer = self._buffer if self._buffer is not None else self.buffer()
            if self.bad_blocks and nbytes and not self.bad_blocks.isdisjoint(
                    range(at // self._block, (at + nbytes - 1) // self._block + 1)):
                return None  # array() raises the checksum mismatch
            array = np.ndarray(shape, dtype, buffer, at)
        self.claimed += nbytes
        return array

    def pack(self) -> tuple[int, int]:
        """The pack's offset in the file and its size (and, to verify, its block checksums)."""
        if self._pack is None:
            f = self.f
            h5path = "/" + PACK
            ds = f.child(f.id, PACK, h5d.open, "malformed packed leaves")
            try:
                shape = ds.shape
                if (shape is None or len(shape) != 1
                        or not ds.get_type().equal(_memory_type(np.dtype(np.uint8)))):
                    raise CorruptCheckpointError(f"{f.where}: malformed packed leaves")
                size = int(shape[0])
                _check_dataset_storage(ds, size, f.where, h5path)
                offset = ds.get_offset() if size else 0
            finally:
                ds.close()
            if offset is None or offset + size > f.filesize():
                raise CorruptCheckpointError(f"{f.where}: {h5path} runs past the end of the file")
            if self.crc is not None:
                self._block_crcs = self._read_block_crcs(size)
            self._pack = (int(offset), size)
        return self._pack

    def _read_block_crcs(self, size: int) -> np.ndarray[Any, Any]:
        f = self.f
        pack = self.manifest.get("pack")
        block = pack.get("block") if isinstance(pack, dict) else None
        if type(block) is not int or not 4096 <= block <= 1 << 30:
            raise CorruptCheckpointError(f"{f.where}: malformed manifest (packed block size {block!r})")
        self._block = block
        count = -(-size // block)
        ds = f.child(f.id, PACK_CRC, h5d.open, "malformed packed checksums")
        try:
            if ds.shape != (count,) or not ds.get_type().equal(_memory_type(np.dtype("<u4"))):
                raise CorruptCheckpointError(
                    f"{f.where}: malformed packed checksums (expected {count} uint32 values)"
                )
            _check_dataset_storage(ds, 4 * count, f.where, "/" + PACK_CRC)
            crcs = np.empty(count, "<u4")
            if count:
                ds.read(h5s.ALL, h5s.ALL, crcs)
        finally:
            ds.close()
        return crcs

    def _block_ok(self, index: int, data: Any) -> bool:
        assert self.crc is not None and self._block_crcs is not None
        return self.crc(data, self.f.manifest_crc) == int(self._block_crcs[index])

    def buffer(self) -> np.ndarray[Any, Any]:
        """The whole pack, read once, each block checked as soon as it is read."""
        if self._buffer is None:
            base, size = self._pack or self.pack()
            buffer = np.empty(size, np.uint8)
            fd = self._read_fd()
            block = self._block
            for index, start in enumerate(range(0, size, block)):
                part = buffer[start:start + block]
                _pread_checked(fd, base + start, part, None, self.f.where, "/" + PACK)
                if self.crc is not None and not self._block_ok(index, part):
                    self.bad_blocks.add(index)
            if self.map is not None:
                buffer.flags.writeable = False  # read in place of a mapping: read-only as one
            self._buffer = buffer
        return self._buffer

    def _read_packed(self, at: int, nbytes: int, h5path: str) -> np.ndarray[Any, Any]:
        """One packed leaf's bytes (a copy), reading and verifying the blocks that hold it."""
        base, size = self._pack or self.pack()
        if not nbytes:
            return np.empty(0, np.uint8)
        block = self._block
        parts = []
        for index in range(at // block, (at + nbytes - 1) // block + 1):
            data = self._blocks.get(index)
            if data is None:
                start = index * block
                data = np.empty(min(block, size - start), np.uint8)
                _pread_checked(self._read_fd(), base + start, data, None, self.f.where, h5path)
                if self.crc is not None and not self._block_ok(index, data):
                    raise CorruptCheckpointError(f"{self.f.where}: checksum mismatch in {h5path}")
                self._blocks[index] = data
            lo = max(at - index * block, 0)
            hi = min(at + nbytes - index * block, len(data))
            parts.append(data[lo:hi])
        return parts[0].copy() if len(parts) == 1 else np.concatenate(parts)

    def check_all_blocks(self) -> None:
        """After a whole read: a damaged block no leaf lies in (padding) still fails."""
        if self.bad_blocks:
            index = min(self.bad_blocks)
            raise CorruptCheckpointError(
                f"{self.f.where}: checksum mismatch in /{PACK} (bytes {index * self._block} to "
                f"{(index + 1) * self._block})"
            )


def read_file(
    path: str | os.PathLike[str], *, verify: bool = True, select: Selection | None = None, mmap: bool = False,
) -> tuple[Tree, dict[str, Any]]:
    """Read a checkpoint file; return ``(tree, manifest)`` (the manifest without ``tree``,
    its description of the state: :func:`read_meta` has it).

    With ``verify`` every array read has its checksum checked against the manifest.
    With ``select`` (see :func:`selection`) only those subtrees are read. With ``mmap``
    arrays are read-only views of the file mapped in memory, read from disk when first
    touched; their checksums are not checked (the manifest's is; :func:`verify_file`
    checks the rest). Arrays HDF5 must convert (bools of format 1, compact datasets)
    are read as usual.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CorruptCheckpointError: the file is damaged, tampered with or hostile.
        CheckpointError: ``verify`` of a ``crc32c`` file without the crc32c package.
        OSError: the file could not be read.
    """
    where = os.fspath(path)
    with _reading(where), _File(path) as f, gc_paused():
        manifest = _read_manifest(f)
        # Not returned: 20,000 leaves' descriptions, kept, cost the garbage collector
        # about 10 ms once it runs again; dropped here, they are freed as the tree is built.
        spec = manifest.pop("tree", None)
        crc = _leaf_checksum(manifest, where) if verify and not mmap else None
        leaves = _Leaves(f, manifest, crc, whole=select is None, mapped=mmap)
        if select is None and not mmap and "pack" in manifest:
            # The pack lies right after the manifest: read it now, while the disk is
            # there, then the big leaves in the order they lie in the file.
            leaves.buffer()

        def leaf_value(node: dict[str, Any], h5path: str) -> Any:
            array = leaves.array(node, h5path)
            kind = node["t"]
            if kind == "ndarray":
                return array
            if kind == "npscalar":
                if array.shape != ():
                    raise CorruptCheckpointError(f"{where}: scalar {h5path} has a shape")
                return array[()]
            return _decode_scalar(kind, array, where)

        try:
            tree = _build(spec, leaf_value, where, select, leaves.quick if select is None else None)
            leaves.check_all_blocks()
        except SelectionError:
            raise
        except (KeyError, TypeError, ValueError, RecursionError) as exc:
            if isinstance(exc, CorruptCheckpointError):
                raise
            raise CorruptCheckpointError(f"{where}: malformed tree ({exc})") from exc
        finally:
            leaves.close()
            del spec
    return tree, manifest


def verify_file(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Check every checksum of a checkpoint file without keeping the arrays; return its manifest.

    Raises:
        FileNotFoundError, CorruptCheckpointError, CheckpointError, OSError: as :func:`read_file`.
    """
    where = os.fspath(path)
    with _reading(where), _File(path) as f, gc_paused():
        manifest = _read_manifest(f)
        leaves = _Leaves(f, manifest, _leaf_checksum(manifest, where), whole=True, mapped=False)
        try:
            for _keys, h5path, node in list(iter_leaves(manifest.get("tree"), where)):
                leaves.array(node, h5path)
            if "pack" in manifest:  # every block, also those only padding lies in
                leaves.buffer()
                leaves.check_all_blocks()
        finally:
            leaves.close()
    return manifest
