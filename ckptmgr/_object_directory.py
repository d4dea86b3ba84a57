"""ObjectCheckpointDirectory: a checkpoint location on object storage (``s3://bucket/prefix``).

The object-store counterpart of :class:`ckptmgr._directory.CheckpointDirectory`, with the
methods the manager uses. An object store has no rename and no fsync, so the commit is
built on its conditional writes instead (:mod:`ckptmgr.storage._object`). Under the prefix:

- ``data/ckpt-<step>-<16 hex>.h5``: a checkpoint's file (the same HDF5 format as on a
  local disk), uploaded first under a name no other save uses (multipart, invisible until
  complete);
- ``ckpt-<step>.json``: the step's *commit marker*, written LAST, create-only
  (``If-None-Match: *``), or compare-and-swap (``If-Match``) on the marker it replaces
  when a step is saved again. It holds the metadata (step, time, metrics, nbytes,
  tracker), the data object's name, size and ETag and a random token, with a CRC. Only
  steps with a marker exist; a marker whose data object is missing or does not verify is
  a corrupt checkpoint (``restore()`` falls back past it, as on a local disk);
- ``.ckptmgr-index.json``: a cache of the markers (by name and ETag), so that opening
  reads one object instead of every marker; written with compare-and-swap, never trusted
  over the markers;
- ``.ckptmgr-lease.json``: the writer's lease (:class:`ckptmgr.storage._object.Lease`):
  one writer per location; a SIGKILLed writer's lease is taken over once it has not been
  renewed for its ttl (30 s; ``CKPTMGR_LEASE_TTL`` sets it, for tests).

A writer that opens cleans up after a dead one: data objects that no marker references
and unfinished uploads, older than half the lease's ttl (a writer that lost its lease
died at least two thirds of a ttl before it could be taken over). Retention deletes a
step's marker before its data. Files are staged in a local temporary directory
(``ckptmgr-staging-*``): written there, then uploaded; downloaded there, then read.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import re
import secrets
import shutil
import tempfile
import time
import warnings
import weakref
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from . import codec
from ._directory import Loaded, _recorded_reasons, reason_of
from ._retention import Record
from ._writer import at_exit
from .codec._sidecar import decode_signed, encode_signed
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointWarning,
    CorruptCheckpointError,
    DirectoryLockedError,
    ObjectStoreError,
)
from .info import CheckpointDescription, CheckpointInfo, KeepReason, ObjectURL
from .metrics import is_finite_number
from .storage._layout import io_error
from .storage._object import LEASE_NAME, Lease, ObjectStore

LEASE_TTL_ENV = "CKPTMGR_LEASE_TTL"
DEFAULT_LEASE_TTL = 30.0
INDEX_NAME = ".ckptmgr-index.json"
DATA_PREFIX = "data/"
MARKER_FORMAT = 1
_MARKER_KEY = "ckptmgr_marker"
_MARKER_RE = re.compile(r"ckpt-([0-9]{9,19})\.json")
_DATA_RE = re.compile(r"data/(ckpt-([0-9]{9,19})-[0-9a-f]{16}\.h5)")
_DATA_FILE_RE = re.compile(r"ckpt-([0-9]{9,19})-[0-9a-f]{16}\.h5")
_INDEX_AFTER_SAVES = 16
_STAGING_PREFIX = "ckptmgr-staging-"


def is_url(location: object) -> bool:
    """Whether a manager's ``directory`` argument is a URL (``scheme://...``), not a path."""
    return isinstance(location, str) and "://" in location


def lease_ttl() -> float:
    """The writer lease's ttl: ``$CKPTMGR_LEASE_TTL`` seconds (for tests), else 30 s.

    Raises:
        ValueError: the variable is set but not a number > 0.
    """
    text = os.environ.get(LEASE_TTL_ENV, "")
    if not text:
        return DEFAULT_LEASE_TTL
    try:
        ttl = float(text)
    except ValueError:
        ttl = math.nan
    if not (math.isfinite(ttl) and ttl > 0):
        raise ValueError(f"Expected {LEASE_TTL_ENV} to be a number of seconds > 0. Received: {LEASE_TTL_ENV}={text!r}")
    return ttl


def marker_name(step: int) -> str:
    return f"ckpt-{step:09d}.json"


def _new_data_name(step: int) -> str:
    return f"{DATA_PREFIX}ckpt-{step:09d}-{secrets.token_hex(8)}.h5"


def encode_marker(meta: Mapping[str, Any]) -> bytes:
    """A commit marker: the metadata as canonical JSON, with its CRC (like a payload's sidecar)."""
    return encode_signed(_MARKER_KEY, dict(meta, format=MARKER_FORMAT))


def decode_marker(blob: bytes, step: int, where: str) -> dict[str, Any]:
    """Parse and check a commit marker of ``step``.

    Raises:
        CorruptCheckpointError: damaged, malformed, of another step, or naming a data
            object that is not one of this step's (it would escape the location).
    """
    meta = decode_signed(blob, _MARKER_KEY, where, "commit marker")
    data = meta.get("data") if isinstance(meta, dict) else None
    match = _DATA_RE.fullmatch(data) if isinstance(data, str) else None
    if (
        not isinstance(meta, dict)
        or meta.get("format") != MARKER_FORMAT
        or type(meta.get("step")) is not int
        or match is None
        or type(meta.get("size")) is not int
        or meta["size"] < 0
        or not isinstance(meta.get("data_etag"), str)
    ):
        raise CorruptCheckpointError(f"{where}: malformed commit marker")
    if meta["step"] != step or int(match.group(2)) != step:
        raise CorruptCheckpointError(f"{where}: holds step {meta['step']!r} (data {data}), its name says {step}")
    return meta


def _marker_token(blob: bytes) -> str | None:
    try:
        token = json.loads(json.loads(blob.decode("utf-8"))[_MARKER_KEY]).get("token")
    except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
        return None
    return token if isinstance(token, str) else None


# What a record's meta holds: the manager's metadata and where the checkpoint's objects are.
_META_KEYS = ("step", "time", "metrics", "nbytes", "tracker", "data", "size", "data_etag")


@dataclasses.dataclass(frozen=True)
class _Marker:
    """A commit marker as the writer last wrote or listed it."""

    name: str
    etag: str
    data: str | None  # the data object it references (None: unreadable marker)


class ObjectCheckpointDirectory:
    """A checkpoint location on object storage, opened for writing (lease) or reading.

    Args:
        url: ``s3://bucket/prefix``.
        storage_options: for s3fs (``endpoint_url``, ``key``, ``secret``, ...).
        read_only: no lease, no writes.
        owner: who opened it (stored in the lease, shown to a second writer).

    Raises:
        ValueError: not an ``s3://`` URL; a bad ``CKPTMGR_LEASE_TTL``.
        ImportError: s3fs is not installed.
        ObjectStoreError: the bucket does not exist, the credentials are refused, the
            server cannot be reached (naming the URL and the cause).
        CheckpointNotFoundError: read-only, and nothing of ckptmgr's is under the prefix.
        DirectoryLockedError: another live writer holds the lease (naming it).
    """

    def __init__(
        self, url: str, storage_options: Mapping[str, Any] | None = None, *, read_only: bool, owner: str = ""
    ) -> None:
        ttl = lease_ttl()
        self.store = ObjectStore(url, storage_options)
        self.url = self.store.url
        self.read_only = read_only
        self._lease: Lease | None = None
        self._staging: Path | None = None
        self._finalizer: weakref.finalize[Any, Any] | None = None
        self._lease_finalizer: weakref.finalize[Any, Any] | None = None
        self._markers: dict[int, _Marker] = {}  # the writer's: step -> its marker
        self._cache: dict[tuple[str, str], tuple[dict[str, Any], str | None]] = {}  # (name, etag) -> meta, corrupt
        self._reasons: dict[tuple[str, str], tuple[KeepReason, ...]] = {}  # the writer's, from the index
        self._listed: frozenset[tuple[str, str]] | None = None
        self._index_etag: str | None = None
        self._indexed: frozenset[tuple[str, str]] | None = None  # what the index holds
        self._unindexed = 0
        self._missing_data: set[str] = set()  # referenced data objects found missing at open
        self._planned: tuple[int, str] | None = None  # tree_path()'s name for the next commit
        self._uncertain: set[str] = set()  # tokens of marker writes whose outcome is unknown
        self.store.check()
        if read_only:
            if (
                not self._list_markers()
                and self.store.stat(INDEX_NAME) is None
                and self.store.stat(LEASE_NAME) is None
            ):
                raise CheckpointNotFoundError(
                    f"No checkpoint location at {self.url}: nothing of ckptmgr's under that prefix"
                )
            return
        self._lease = Lease(self.store, ttl=ttl, owner={"opened": owner} if owner else None)
        self._lease.acquire()
        # Given up at interpreter exit (or when dropped) without close(), as a local
        # directory's lock is by the OS: the next writer need not wait out the ttl.
        self._lease_finalizer = weakref.finalize(self, _give_up, self._lease)
        at_exit(self._lease_finalizer)  # after the flush of a save in flight (registered later)
        try:
            self._recover()
        except BaseException:
            self.release()
            raise

    # ---------------------------------------------------------------------- lifecycle

    @property
    def locked(self) -> bool:
        return self._lease is not None and self._lease.held

    def release(self) -> None:
        """Give the lease up (if held) and remove the local staging directory."""
        if self._lease_finalizer is not None:
            self._lease_finalizer()
        if self._finalizer is not None:
            self._finalizer()

    def _staging_dir(self) -> Path:
        if self._staging is None or not self._staging.is_dir():
            _remove_dead_staging()
            try:
                staging = Path(tempfile.mkdtemp(prefix=_STAGING_PREFIX))
                # Held (flock) while this process lives: how others tell the directory
                # is in use, whatever host or PID namespace shares $TMPDIR.
                owner = os.open(staging / _STAGING_OWNER, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
            except OSError as exc:
                raise io_error("Cannot create a staging directory in", tempfile.gettempdir(), exc) from exc
            if _can_lock:
                with contextlib.suppress(OSError):
                    _try_lock(owner)
            self._staging = staging
            self._finalizer = weakref.finalize(self, _remove_staging, str(staging), owner)
        return self._staging

    @contextlib.contextmanager
    def _temp_file(self, name: str) -> Iterator[Path]:
        path = self._staging_dir() / f"{secrets.token_hex(4)}-{name.rsplit('/', 1)[-1]}"
        try:
            yield path
        finally:
            with contextlib.suppress(OSError):
                os.unlink(path)

    def _recover(self) -> None:
        """Writer only, at open (holding the lease): clean up after a dead writer.

        Data objects no marker references and unfinished uploads are a writer's that
        died or lost the lease; those older than half the ttl are removed (a dead
        holder stopped at least 2/3 of a ttl before its lease could be taken over).
        Only names ckptmgr writes are considered: whatever else lies under ``data/``
        (another program's files, its uploads) is left alone.
        """
        assert self._lease is not None
        margin = self._lease.ttl / 2
        try:
            self.read_records()
            referenced = {m.data for m in self._markers.values() if m.data is not None}
            objects = [o for o in self.store.list(DATA_PREFIX) if _DATA_RE.fullmatch(o.name)]
            now = self.store.server_time()
            present = {o.name for o in objects}
            self._missing_data = referenced - present
            doomed = [o.name for o in objects if o.name not in referenced and now - o.last_modified > margin]
            self.store.delete(doomed)
            self.store.abort_uploads(DATA_PREFIX, older_than=margin, ours=_DATA_RE.fullmatch)
        except ObjectStoreError as exc:
            warnings.warn(f"ckptmgr: cannot clean up {self.url}: {exc}", CheckpointWarning, stacklevel=4)

    # ------------------------------------------------------------------------ listing

    def _list_markers(self) -> list[tuple[str, str, float]]:
        return [(o.name, o.etag, o.last_modified) for o in self.store.list("ckpt-") if _MARKER_RE.fullmatch(o.name)]

    def _info(self, name: str, meta: Mapping[str, Any], corrupt: str | None) -> CheckpointInfo:
        metrics = meta.get("metrics")
        data = meta.get("data")
        marker = ObjectURL(self.store.url_of(name))
        return CheckpointInfo(
            step=int(meta["step"]),
            path=ObjectURL(self.store.url_of(data)) if isinstance(data, str) else marker,
            metrics=metrics if isinstance(metrics, dict) else {},
            time=float(meta["time"]) if is_finite_number(meta.get("time")) else 0.0,
            nbytes=int(meta["nbytes"]) if type(meta.get("nbytes")) is int else 0,
            kind="tree",
            metadata_path=marker,
            corrupt=corrupt,
        )

    def _record(self, name: str, etag: str, meta: dict[str, Any], corrupt: str | None,
                reasons: tuple[KeepReason, ...] = ()) -> Record:
        return Record(self._info(name, meta, corrupt), dict(meta, marker_etag=etag), corrupt, None, reasons)

    def read_records(self) -> dict[int, Record]:
        """The committed checkpoints by step: one listing of the markers, and a read of
        each marker the cache (in memory, else the index) does not hold by name and ETag.

        Raises:
            ObjectStoreError: the location cannot be listed or read.
        """
        listing = self._list_markers()
        keys = frozenset((name, etag) for name, etag, _ in listing)
        if any(k not in self._cache for k in keys) or (self.read_only and keys != self._listed):
            self._read_index(keys)  # a reader: the writer's keep reasons may have changed too
        self._listed = keys
        records: dict[int, Record] = {}
        markers: dict[int, _Marker] = {}
        for name, etag, modified in listing:
            step = int(name[5:-5])
            cached = self._cache.get((name, etag))
            if cached is None:
                fetched = self.store.get(name)
                if fetched is None:
                    continue  # deleted since the listing (a reader racing retention)
                blob, etag = fetched
                try:
                    meta = {k: v for k, v in decode_marker(blob, step, self.store.url_of(name)).items() if k in _META_KEYS}
                    cached = (meta, None)
                except CorruptCheckpointError as exc:
                    cached = ({"step": step, "time": modified}, reason_of(exc))
                self._cache[(name, etag)] = cached
            meta, corrupt = cached
            if corrupt is None and meta.get("data") in self._missing_data:
                corrupt = "its data object is missing"
            records[step] = self._record(name, etag, meta, corrupt, self._reasons.get((name, etag), ()))
            data = meta.get("data")
            markers[step] = _Marker(name, etag, data if isinstance(data, str) else None)
        live = {(m.name, m.etag) for m in markers.values()}
        for key in [k for k in self._cache if k not in live]:
            del self._cache[key]
        if not self.read_only:
            self._markers = markers
            if self._indexed != frozenset(live):
                self.write_index(records)
        return records

    def _read_index(self, keys: frozenset[tuple[str, str]]) -> None:
        """Fill the cache from the index's entries that match a listed marker."""
        try:
            fetched = self.store.get(INDEX_NAME)
        except ObjectStoreError:
            return  # a cache: the markers say the same
        if fetched is None:
            self._index_etag, self._indexed = None, None
            return
        blob, self._index_etag = fetched
        try:
            outer = json.loads(blob.decode("utf-8"))
            body = outer["entries"]
            if not isinstance(body, str) or codec.checksum(body.encode("utf-8")) != outer["crc32"]:
                return
            entries = json.loads(body)
            if not isinstance(entries, dict):
                return
        except (ValueError, KeyError, TypeError, RecursionError):
            return
        indexed = set()
        for name, entry in entries.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("etag"), str):
                continue
            key = (name, entry["etag"])
            meta, corrupt = entry.get("meta"), entry.get("corrupt")
            match = _MARKER_RE.fullmatch(name) if isinstance(name, str) else None
            if match is None or not isinstance(meta, dict) or meta.get("step") != int(match.group(1)):
                continue
            data = meta.get("data")
            if corrupt is None and not (isinstance(data, str) and _DATA_RE.fullmatch(data)):
                continue  # a data name that could escape the location: read the marker itself
            indexed.add(key)
            if key in keys:
                self._cache[key] = (meta, corrupt if isinstance(corrupt, str) else None)
                self._reasons[key] = _recorded_reasons(entry.get("reasons"))
        self._indexed = frozenset(indexed)

    def write_index(self, records: Mapping[int, Record]) -> None:
        """Rewrite the index (compare-and-swap). A cache: failing to write it loses nothing."""
        if self.read_only:
            return
        entries: dict[str, Any] = {}
        for record in records.values():
            name = record.info.metadata_path.name if record.info.metadata_path is not None else None
            etag = record.meta.get("marker_etag")
            if not isinstance(name, str) or not isinstance(etag, str):
                continue
            entries[name] = {
                "etag": etag,
                "meta": {k: v for k, v in record.meta.items() if k in _META_KEYS},
                "corrupt": record.corrupt,
                "reasons": [[r, r.kind, r.detail] for r in record.info.keep_reasons],
            }
        body = json.dumps(entries, separators=(",", ":"), sort_keys=True, allow_nan=True)
        blob = json.dumps({"version": 1, "crc32": codec.checksum(body.encode("utf-8")), "entries": body}).encode()
        try:
            if self._index_etag is None:
                etag = self.store.put_if_absent(INDEX_NAME, blob)
            else:
                etag = self.store.put_if_match(INDEX_NAME, blob, self._index_etag)
            if etag is None:  # changed behind our back: learn its ETag, write it next time
                info = self.store.stat(INDEX_NAME)
                self._index_etag = None if info is None else info.etag
                return
        except ObjectStoreError:
            return
        self._index_etag = etag
        self._indexed = frozenset((name, entry["etag"]) for name, entry in entries.items())
        self._unindexed = 0

    def saved(self, records: Mapping[int, Record]) -> None:
        """Count a commit; rewrite the index when enough saves are missing from it."""
        self._unindexed += 1
        if self._unindexed >= _INDEX_AFTER_SAVES:
            self.write_index(records)

    # ------------------------------------------------------------------------ writing

    def _unsupported(self, what: str) -> CheckpointError:
        return CheckpointError(f"{what} is not supported on object storage yet ({self.url}); use a local directory")

    def tree_path(self, step: int) -> ObjectURL:
        """The data object the next commit of ``step`` will write (chosen now)."""
        name = _new_data_name(step)
        self._planned = (step, name)
        return ObjectURL(self.store.url_of(name))

    def commit_tree(self, step: int, state: Any, meta: dict[str, Any]) -> Record:
        """Upload ``state`` as the checkpoint of ``step``, then write its commit marker.

        Raises:
            DirectoryLockedError: the lease was lost (another writer may have taken over):
                nothing is committed.
            ObjectStoreError: a request failed; nothing partial is visible (the marker is
                written last), earlier checkpoints are untouched.
            CheckpointIOError: the local staging file cannot be written.
            CheckpointError: another writer changed this step's marker.
        """
        assert self._lease is not None, "read-only"
        planned, self._planned = self._planned, None
        data = planned[1] if planned is not None and planned[0] == step else _new_data_name(step)
        self._lease.check()
        with self._temp_file(data) as tmp:
            try:
                nbytes = codec.write_file(tmp, state, meta)
                size = os.path.getsize(tmp)
            except OSError as exc:
                if isinstance(exc, CheckpointError):
                    raise
                raise io_error("Cannot stage checkpoint", tmp, exc) from exc
            data_etag = self.store.put_file(data, tmp)
        token = secrets.token_hex(16)
        full = dict(meta, nbytes=nbytes, data=data, size=size, data_etag=data_etag)
        body = encode_marker(dict(full, token=token))
        name = marker_name(step)
        try:
            self._lease.check()  # a writer that lost its lease must not commit
        except DirectoryLockedError:
            self._forget_data(data)
            raise
        old = self._markers.get(step)
        try:
            etag = (self.store.put_if_match(name, body, old.etag) if old is not None
                    else self.store.put_if_absent(name, body))
        except ObjectStoreError:
            self._uncertain.add(token)  # it may have landed: a retry may replace it
            raise
        dropped: str | None = None
        if etag is None:
            current = self.store.get(name)
            if current is not None and _marker_token(current[0]) in self._uncertain:
                # Our own earlier attempt, which landed although it failed: replace it.
                with contextlib.suppress(CorruptCheckpointError):
                    dropped = decode_marker(current[0], step, name)["data"]
                etag = self.store.put_if_match(name, body, current[1])
            if etag is None:
                self._forget_data(data)
                raise CheckpointError(
                    f"Cannot commit step {step} to {self.url}: its commit marker {self.store.url_of(name)} was "
                    "changed by another writer meanwhile; this writer's upload was discarded"
                )
        self._markers[step] = _Marker(name, etag, data)
        if dropped is not None and dropped != data and (old is None or dropped != old.data):
            self._forget_data(dropped)
        meta_out = {k: v for k, v in full.items() if k in _META_KEYS}
        return self._record(name, etag, meta_out, None)

    def _forget_data(self, data: str) -> None:
        """Best effort: a data object no marker references (the next writer's open removes it otherwise)."""
        with contextlib.suppress(ObjectStoreError):
            self.store.delete([data])

    def write_payload(self, name: str, write: Callable[[Path], object]) -> Path:
        raise self._unsupported("Saving a FilePayload")

    def commit_payload(self, name: str, tmp: Path, meta: dict[str, Any]) -> Record:
        raise self._unsupported("Saving a FilePayload")

    def _delete(self, names: list[str]) -> tuple[dict[str, OSError], list[str]]:
        """Delete checkpoints' objects, each step's marker before its data.

        ``names`` are what :attr:`Record.files` holds: a data object's file name (its
        marker goes too when it still references it; otherwise it is the old data of a
        step saved again), or a marker's name (a marker that could not be read).
        Returns the failures by name, and the data objects left behind (their marker
        is gone: the checkpoint is deleted; the next writer's open removes them).

        Raises:
            DirectoryLockedError: this writer no longer holds the lease (another may be
                writing there: nothing is deleted).
        """
        if not names:
            return {}, []
        self._check_lease()
        markers: dict[str, str] = {}  # marker -> the name asked for
        data: dict[str, str] = {}
        for given in names:
            if _MARKER_RE.fullmatch(given):
                markers[given] = given
                continue
            match = _DATA_FILE_RE.fullmatch(given)
            if match is None:
                continue
            obj = DATA_PREFIX + given
            data[obj] = given
            current = self._markers.get(int(match.group(1)))
            if current is not None and current.data == obj:
                markers[current.name] = given
        failures: dict[str, OSError] = {}
        try:
            self.store.delete(list(markers))
        except ObjectStoreError as exc:
            for given in markers.values():
                failures[given] = exc
        else:
            for marker in markers:
                step = int(marker[5:-5])
                if step in self._markers and self._markers[step].name == marker:
                    del self._markers[step]
        data = {obj: given for obj, given in data.items() if given not in failures}
        left: list[str] = []
        try:
            self.store.delete(list(data))
        except ObjectStoreError as exc:
            for obj, given in data.items():
                if given in markers.values():
                    left.append(self.store.url_of(obj))
                else:
                    failures[given] = exc
        return failures, left

    def _check_lease(self) -> None:
        """Raise unless this writer still holds the lease: one that lost it (frozen,
        cut off) must not delete what the writer that took over relies on."""
        if self._lease is not None:
            self._lease.check()

    def delete(self, names: list[str], *, stacklevel: int = 6) -> dict[str, OSError]:
        """Delete checkpoints' objects (see :meth:`_delete`); warn about each failure.

        Retention's, after a commit: a lease found lost (or about to be) then deletes
        nothing and warns, the commit standing (the next save raises).
        """
        try:
            failures, left = self._delete(names)
        except DirectoryLockedError as lost:
            warnings.warn(f"ckptmgr: not deleting from {self.url}: {lost}", CheckpointWarning, stacklevel=stacklevel)
            return dict.fromkeys(names, lost)
        for name, exc in failures.items():
            warnings.warn(f"ckptmgr: cannot delete {name} from {self.url}: {exc}", CheckpointWarning, stacklevel=stacklevel)
        for url in left:
            warnings.warn(f"ckptmgr: cannot delete {url} (its checkpoint is deleted; the next writer "
                          "to open removes it)", CheckpointWarning, stacklevel=stacklevel)
        return failures

    def delete_checkpoint(self, record: Record) -> None:
        """Delete one checkpoint: its marker, then its data.

        Raises:
            ObjectStoreError: its marker could not be deleted.
        """
        failures, _left = self._delete(record.files)
        own = record.info.path.name
        if own in failures:
            raise failures[own]

    def remove_index_and_lock(self) -> None:
        """What delete_all leaves last: any marker and data object left, the index (the
        lease goes at :meth:`release`).

        Raises:
            DirectoryLockedError: this writer no longer holds the lease.
        """
        self._check_lease()
        try:
            self.store.delete([o.name for o in self.store.list("ckpt-") if _MARKER_RE.fullmatch(o.name)])
            self.store.delete([o.name for o in self.store.list(DATA_PREFIX) if _DATA_RE.fullmatch(o.name)])
            self.store.delete([INDEX_NAME])
        except ObjectStoreError as exc:
            warnings.warn(f"ckptmgr: cannot delete everything from {self.url}: {exc}", CheckpointWarning, stacklevel=4)
        self._markers.clear()

    # ------------------------------------------------------------------------ reading

    @contextlib.contextmanager
    def _downloaded(self, record: Record) -> Iterator[tuple[Path, str]]:
        """The record's data object in a local temporary file (removed after), checked
        against its marker, and its URL.

        Raises:
            CorruptCheckpointError: it is missing (its marker still there) or does not
                match its marker (size, ETag).
            CheckpointNotFoundError: it was deleted with its marker (a reader racing the
                writer's retention) or the step was saved again.
            ObjectStoreError: a request failed.
        """
        url = str(record.info.path)
        if record.corrupt is not None:
            raise CorruptCheckpointError(f"{url}: {record.corrupt}")
        data = str(record.meta["data"])
        with self._temp_file(data) as tmp:
            try:
                got = self.store.get_file(data, tmp)
            except ObjectStoreError as exc:
                if exc.errno not in (errno.ENOENT, errno.ESTALE):
                    raise
                marker = record.info.metadata_path.name if record.info.metadata_path is not None else ""
                now = self.store.stat(marker)
                if now is None or now.etag != record.meta.get("marker_etag"):
                    raise CheckpointNotFoundError(f"Checkpoint {url} no longer exists") from exc
                if exc.errno == errno.ESTALE:
                    raise CorruptCheckpointError(f"{url}: replaced while being read (data objects are never rewritten)") from exc
                raise CorruptCheckpointError(f"{url}: its data object is missing") from exc
            expected = (record.meta.get("size"), record.meta.get("data_etag"))
            if (got.size, got.etag) != expected:
                raise CorruptCheckpointError(
                    f"{url}: does not match its commit marker (object has {got.size} bytes, ETag {got.etag}; "
                    f"the marker says {expected[0]} bytes, ETag {expected[1]})"
                )
            yield tmp, url

    @contextlib.contextmanager
    def _codec_errors(self, tmp: Path, url: str) -> Iterator[None]:
        """The codec's errors name the local file: name the object instead."""
        try:
            yield
        except CorruptCheckpointError as exc:
            raise CorruptCheckpointError(str(exc).replace(str(tmp), url)) from exc
        except (CheckpointError, KeyError, ValueError):
            raise
        except OSError as exc:
            raise io_error(f"Cannot read the local copy of {url} at", tmp, exc) from exc

    def load(
        self, record: Record, *, verify: bool, tree: bool = True, select: codec.Selection | None = None,
        mmap: bool = False, rank: int | None = None,
    ) -> Loaded:
        """Download, then read (and verify) one checkpoint; ``tree=False``: verify only.

        With ``mmap`` the arrays map the downloaded file, which is unlinked at once
        (the mapping keeps its pages until the arrays die).

        Raises:
            CheckpointNotFoundError: deleted meanwhile (list again).
            CorruptCheckpointError: its data object is missing or does not verify.
            ObjectStoreError: a request failed (server down, ...).
            KeyError: ``select`` names a key path the tree lacks.
        """
        with self._downloaded(record) as (tmp, url), self._codec_errors(tmp, url):
            if not tree:
                manifest = codec.verify_file(tmp)
                value = None
            else:
                value, manifest = codec.read_file(tmp, verify=verify, select=select, mmap=mmap)
        if manifest.get("step") != record.info.step:
            raise CorruptCheckpointError(f"{url}: holds step {manifest.get('step')!r}, its marker says {record.info.step}")
        return Loaded(value, record)

    def describe(self, record: Record) -> CheckpointDescription:
        """Metadata and tree layout of one checkpoint (downloads its data object)."""
        with self._downloaded(record) as (tmp, url), self._codec_errors(tmp, url):
            manifest = codec.read_meta(tmp)
            leaves = tuple(codec.describe_leaves(manifest, url))
        return CheckpointDescription(record.info, {k: v for k, v in manifest.items() if k != "tree"}, leaves)

    # ----------------------------------------------------------------------- rollback

    def set_aside(self, step: int, later: list[Record], now: float) -> None:
        raise self._unsupported("rollback()")

    def rolled_back(self) -> list[Path]:
        return []


__all__ = ["ObjectCheckpointDirectory", "is_url", "lease_ttl"]


def _give_up(lease: Lease) -> None:
    if lease.held:
        lease.release()


try:
    import fcntl

    def _try_lock(fd: int) -> None:
        """Lock ``fd`` (flock, exclusive) or raise OSError at once: another holds it."""
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)

    _can_lock = True
except ImportError:  # not POSIX: staging directories of dead processes are not removed
    _can_lock = False

_STAGING_OWNER = "owner.lock"
_STAGING_MIN_AGE = 2.0  # seconds: never an owner file just made, its lock not yet taken


def _remove_staging(path: str, owner: int) -> None:
    shutil.rmtree(path, ignore_errors=True)
    with contextlib.suppress(OSError):
        os.close(owner)


def _remove_dead_staging() -> None:
    """Remove the staging directories of processes that died without removing theirs
    (SIGKILL, power loss): each holds a whole checkpoint's copy. A live process holds
    a lock (flock) on its directory's owner file; a directory whose lock can be taken
    (its owner file a few seconds old: not one just being made) is a dead one's.
    Without flock (not POSIX), nothing is removed."""
    if not _can_lock:
        return
    parent = tempfile.gettempdir()
    try:
        names = [n for n in os.listdir(parent) if n.startswith(_STAGING_PREFIX)]
    except OSError:
        return
    now = time.time()
    for name in names:
        path = os.path.join(parent, name)
        try:
            fd = os.open(os.path.join(path, _STAGING_OWNER), os.O_RDWR | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            continue  # gone, another user's, or made before owner files (left alone)
        try:
            if now - os.fstat(fd).st_mtime >= _STAGING_MIN_AGE:
                _try_lock(fd)
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            pass  # held: its process lives
        finally:
            os.close(fd)
