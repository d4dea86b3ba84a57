"""The HDF5 tree format's constants, checksums and dtype names."""

from __future__ import annotations

import contextlib
import gc
import re
import threading
import zlib
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np

from ..errors import CheckpointError, CorruptCheckpointError

_crc32c: Any
try:
    import crc32c as _crc32c
except ImportError:  # pragma: no cover - crc32c is a dependency; zlib keeps working without it
    _crc32c = None


FORMAT_VERSION = 2
READABLE_FORMATS = frozenset({1, 2})
MANIFEST = "ckptmgr_manifest"
STATE = "state"
# Format 2: leaves smaller than PACK_THRESHOLD bytes are stored back to back in one
# uint8 dataset (PACK), each at a multiple of its item size (at most PACK_ALIGN), with a checksum per
# PACK_BLOCK bytes in PACK_CRC (uint32, each started from the manifest's CRC-32);
# PACK_INDEX is a table naming them, for people (readers use the manifest). Datasets of FILE_ALIGN_THRESHOLD
# bytes or more start at a multiple of FILE_ALIGN in the file (page-aligned for mmap).
PACK = "ckptmgr_packed"
PACK_INDEX = "ckptmgr_packed_index"
PACK_CRC = "ckptmgr_packed_crc"
PACK_BLOCK = 1024 * 1024
PACK_THRESHOLD = 256 * 1024
PACK_ALIGN = 16
FILE_ALIGN = 4096
FILE_ALIGN_THRESHOLD = 64 * 1024
MAX_DEPTH = 200
MAX_MANIFEST_BYTES = 256 * 1024 * 1024
MAX_NDIM = 32
MAX_DIM = 2**62  # bound on each dimension a manifest may declare

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


_gc_lock = threading.Lock()
_gc_depth = 0
_gc_was_enabled = False


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Pause Python's cyclic garbage collector while a tree is encoded or decoded.

    Describing or parsing a tree of 20,000 leaves makes about 100,000 containers; each
    700 start a collection, which walks the young objects, and every tenth one the
    older ones: about half the time of encoding a state, and two thirds of parsing its
    manifest. Nothing made there forms a cycle, so nothing is lost by collecting after.
    Nested and concurrent uses (a background save beside a restore) restore the
    collector's state once the last one ends.
    """
    global _gc_depth, _gc_was_enabled
    with _gc_lock:
        if _gc_depth == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_depth += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_depth -= 1
            if _gc_depth == 0 and _gc_was_enabled:
                gc.enable()


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


_dtype_names: dict[np.dtype[Any], str | None] = {}  # _dtype_to_str's answers so far


def _dtype_to_str(dtype: np.dtype[Any]) -> str | None:
    """The manifest name of a supported dtype, or None if the dtype is not supported."""
    try:
        return _dtype_names[dtype]
    except KeyError:
        pass
    name = _dtype_name(dtype)
    if len(_dtype_names) < 1024:
        _dtype_names[dtype] = name
    return name


def _dtype_name(dtype: np.dtype[Any]) -> str | None:
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


def _keystr(path: tuple[str | int, ...]) -> str:
    return "state" + "".join(f"[{p!r}]" for p in path)
