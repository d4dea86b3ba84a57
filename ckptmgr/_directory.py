"""CheckpointDirectory: the one place that knows what a checkpoint directory holds.

It knows the layout and the names (through ``storage``), the per-checkpoint metadata
schema, and the index cache; it commits, lists, loads, verifies, deletes and sets aside
checkpoints, and holds the writer lock. It decides nothing: *when* to save, *what* to
keep and which checkpoint is *best* are the manager's.

A checkpoint is one of two kinds:

- a state tree, one HDF5 file ``ckpt-<step>.h5`` whose manifest carries its metadata;
- a payload (a framework's own file) with its metadata in a sidecar file.

Each carries its own metadata (invariant 3); the index is a cache of it, rebuilt from
the files when missing or stale, rewritten every few saves so that opening after a
crash re-reads only the newest checkpoints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

from . import codec, storage
from ._retention import Record
from .errors import (
    CheckpointIOError,
    CheckpointNotFoundError,
    CheckpointWarning,
    CorruptCheckpointError,
)
from .info import REASON_KINDS, CheckpointDescription, CheckpointInfo, KeepReason
from .metrics import is_finite_number

# How often a listing is taken again when a file vanished while it was read (a
# reader racing the writer's retention).
READ_RETRIES = 20
# The index is rewritten once this many saves are missing from it, at most once per
# this many seconds or 100 times its last write time.
_INDEX_AFTER_SAVES = 16
_INDEX_MIN_INTERVAL = 5.0
# The part of a checkpoint's metadata kept in memory and in the index.
_META_KEYS = ("step", "time", "metrics", "nbytes", "tracker", "name", "size", "crc32", "parts")


def meta_subset(manifest: Mapping[str, Any]) -> dict[str, Any]:
    return {k: manifest[k] for k in _META_KEYS if k in manifest}


@dataclasses.dataclass(frozen=True)
class Loaded:
    """What :meth:`CheckpointDirectory.load` read.

    ``record`` is the checkpoint the value belongs to. It differs from the one asked
    for when a payload listed under its name was replaced by a commit still in
    progress (the writer is between its two renames, or died there): the file is then
    that commit's step, complete and verified by its durable record.
    """

    value: Any
    record: Record


class CheckpointDirectory:
    """A checkpoint directory, opened for writing (locked) or for reading (no lock).

    Raises:
        CheckpointNotFoundError: read-only, and the directory does not exist.
        DirectoryLockedError: another writer holds it.
        CheckpointIOError: it cannot be created, listed or locked.
    """

    def __init__(self, path: Path, *, read_only: bool, owner: str = "") -> None:
        self.path = path
        self.read_only = read_only
        self._lock: storage.DirectoryLock | None = None
        self._index_seen: tuple[tuple[int, int, int], dict[str, Any]] | None = None
        self._unindexed = 0  # saves since the index was last written
        self._index_next = 0.0  # time.monotonic() before which it is not rewritten
        if read_only:
            if not path.is_dir():
                raise CheckpointNotFoundError(f"No checkpoint directory at {path}")
            return
        storage.ensure_directory(path)
        self._lock = storage.DirectoryLock(path, owner=owner)
        self._lock.acquire()
        try:
            self._recover()
        except BaseException:
            self.release()
            raise

    @property
    def locked(self) -> bool:
        return self._lock is not None and self._lock.is_locked

    def release(self) -> None:
        if self._lock is not None and self._lock.is_locked:
            self._lock.release()

    def _recover(self) -> None:
        """Writer only, at open: finish or discard interrupted saves and rollbacks."""
        try:
            storage.recover_commits(self.path, decode_sidecar, codec.checksum)
            storage.remove_leftovers(self.path)
            storage.finish_rollback(self.path)
        except OSError as exc:
            warnings.warn(f"ckptmgr: cannot clean up {self.path}: {exc}", CheckpointWarning, stacklevel=4)

    # ------------------------------------------------------------------------ listing

    def info(
        self, name: str, meta: Mapping[str, Any], sidecar: str | None = None, corrupt: str | None = None
    ) -> CheckpointInfo:
        metrics = meta.get("metrics")
        path = self.path / name
        try:
            parts = tuple(self.path / part for part in part_names(meta, str(path)))
        except CorruptCheckpointError:
            parts = ()
        return CheckpointInfo(
            step=int(meta["step"]),
            path=path,
            metrics=metrics if isinstance(metrics, dict) else {},
            time=float(meta["time"]) if is_finite_number(meta.get("time")) else 0.0,
            nbytes=_parts_nbytes(meta) if "parts" in meta else
            int(meta["nbytes"]) if type(meta.get("nbytes")) is int else 0,
            kind="payload" if sidecar is not None else "tree",
            metadata_path=path if sidecar is None else self.path / sidecar,
            corrupt=corrupt,
            parts=parts,
        )

    def read_records(self) -> dict[int, Record]:
        """The committed checkpoints by step, reading only the files the index lacks.

        The writer also removes sidecars whose payload is gone (a deletion cut short)
        and rewrites the index when it was stale.

        Raises:
            CheckpointIOError: the directory cannot be listed.
        """
        index = self._load_index()
        for _attempt in range(READ_RETRIES):
            vanished = False
            entries = list(storage.scan(self.path))
            pending = storage.read_rollback_marker(self.path)
            if pending is not None:
                # Files an unfinished rollback moves aside are gone already, for readers too.
                entries = [e for e in entries if e.name not in pending[1]]
            changed = len(entries) != len(index)
            records: dict[int, Record] = {}
            orphans: list[str] = []
            for entry in entries:
                cached = index.get(entry.name)
                if (
                    isinstance(cached, dict)
                    and cached.get("size") == entry.size
                    and cached.get("mtime_ns") == entry.mtime_ns
                    and isinstance(cached.get("meta"), dict)
                    and type(cached["meta"].get("step")) is int
                ):
                    meta, corrupt = cached["meta"], cached.get("corrupt")
                    recorded = _recorded_reasons(cached.get("reasons"))
                else:
                    changed = True
                    recorded = ()
                    try:
                        meta, corrupt = self._read_entry_meta(entry), None
                    except FileNotFoundError:
                        vanished = True  # deleted since the listing
                        continue
                    except (CorruptCheckpointError, OSError) as exc:
                        if entry.step is None:
                            warnings.warn(f"ckptmgr: ignoring unreadable metadata {exc}", CheckpointWarning, stacklevel=5)
                            continue
                        meta = {"step": entry.step, "time": entry.mtime_ns / 1e9}
                        corrupt = reason_of(exc)
                if entry.step is None:  # a payload's sidecar
                    name = meta.get("name")
                    if not isinstance(name, str) or storage.sidecar_name(name) != entry.name:
                        # Swapped or copied over: not ours to delete, not trustworthy to use.
                        warnings.warn(
                            f"ckptmgr: ignoring {self.path / entry.name}: it describes "
                            f"{name!r}, whose metadata file would be {storage.sidecar_name(str(name))}",
                            CheckpointWarning, stacklevel=5,
                        )
                        continue
                    try:
                        if not storage.is_regular_file(self.path / name):
                            continue
                    except FileNotFoundError:
                        orphans.append(entry.name)
                        continue
                    record = Record(self.info(name, meta, entry.name, corrupt), meta, corrupt, entry.name, recorded)
                else:
                    try:
                        parts = part_names(meta, str(self.path / entry.name))
                    except CorruptCheckpointError as exc:
                        meta, corrupt, parts = {"step": entry.step, "time": entry.mtime_ns / 1e9}, reason_of(exc), ()
                    record = Record(self.info(entry.name, meta, None, corrupt), meta, corrupt, None, recorded, parts)
                previous = records.get(record.info.step)
                if previous is None or previous.info.time <= record.info.time:
                    records[record.info.step] = record
            # Deleted while we read: the listing may miss what replaced it. Again.
            if not vanished:
                break
        if not self.read_only:
            # Parts no commit record names: a sharded save that failed or was killed
            # before its commit, or a deletion cut short. No save runs while the
            # writer lists (it lists only when it opens and in rollback()).
            referenced = {name for record in records.values() for name in record.parts}
            orphans += [name for name in storage.part_files(self.path) if name not in referenced]
            if orphans:
                storage.remove_files(self.path, orphans)
            if changed:
                self.write_index(records)
        return records

    def _load_index(self) -> dict[str, Any]:
        """The index, parsed again only when it was replaced (a reader lists often)."""
        try:
            st = os.stat(self.path / storage.INDEX_NAME, follow_symlinks=False)
        except OSError:
            return {}
        key = (st.st_ino, st.st_size, st.st_mtime_ns)
        if self._index_seen is None or self._index_seen[0] != key:
            self._index_seen = (key, storage.load_index(self.path))
        return self._index_seen[1]

    def _read_entry_meta(self, entry: storage.Entry) -> dict[str, Any]:
        path = self.path / entry.name
        if entry.step is None:
            return meta_subset(decode_sidecar(storage.read_small(path), str(path)))
        manifest = codec.read_meta(path)
        if manifest.get("step") != entry.step:
            raise CorruptCheckpointError(f"{path}: holds step {manifest.get('step')!r}, its name says {entry.step}")
        return meta_subset(manifest)

    def write_index(self, records: Mapping[int, Record]) -> None:
        """Rewrite the index. It is a cache: failing to write it loses nothing."""
        started = time.monotonic()
        try:
            entries = list(storage.scan(self.path))
        except CheckpointIOError:
            return
        by_file = {r.sidecar or r.info.path.name: r for r in records.values()}
        data = {
            e.name: {"size": e.size, "mtime_ns": e.mtime_ns, "meta": by_file[e.name].meta,
                     "corrupt": by_file[e.name].corrupt,
                     "reasons": [[r, r.kind, r.detail] for r in by_file[e.name].info.keep_reasons]}
            for e in entries if e.name in by_file
        }
        storage.save_index(self.path, data)
        self._unindexed = 0
        now = time.monotonic()
        self._index_next = now + max(_INDEX_MIN_INTERVAL, 100 * (now - started))

    def saved(self, records: Mapping[int, Record]) -> None:
        """Count a commit; rewrite the index when enough saves are missing from it."""
        self._unindexed += 1
        if self._unindexed >= _INDEX_AFTER_SAVES and time.monotonic() >= self._index_next:
            self.write_index(records)

    # ------------------------------------------------------------------------ writing

    def commit_tree(self, step: int, state: Any, meta: dict[str, Any]) -> Record:
        """Write ``state`` as the checkpoint of ``step``: atomic and durable."""
        name = storage.checkpoint_name(step)
        nbytes = storage.write_atomic(self.path, name, lambda tmp: codec.write_file(tmp, state, meta, writeback=storage.Writeback))
        meta = dict(meta, nbytes=nbytes)
        return Record(self.info(name, meta), meta)

    def tree_path(self, step: int) -> Path:
        return self.path / storage.checkpoint_name(step)

    def write_part(self, step: int, rank: int, world_size: int, token: str, state: Any,
                   meta: dict[str, Any]) -> dict[str, Any]:
        """Write one rank's part of a sharded checkpoint (atomic, durable; not listed
        until :meth:`commit_parts`). Any rank may call it; it needs no lock.

        Returns:
            What the commit record keeps of it: ``{"name", "size", "nbytes"}``.
        """
        name = storage.part_name(step, rank, world_size, token)
        meta = dict(meta, part={"rank": rank, "world_size": world_size, "token": token})
        nbytes = storage.write_atomic(
            self.path, name, lambda tmp: codec.write_file(tmp, state, meta, writeback=storage.Writeback))
        try:
            size = os.stat(self.path / name).st_size
        except OSError as exc:
            raise storage.io_error("Cannot stat checkpoint part", self.path / name, exc) from exc
        return {"name": name, "size": size, "nbytes": nbytes}

    def commit_parts(self, step: int, token: str, parts: list[dict[str, Any]], meta: dict[str, Any]) -> Record:
        """Commit a sharded checkpoint whose parts (by rank) are written and durable:
        its commit record ``ckpt-<step>.h5`` names each part, its size and the token."""
        meta = dict(meta, parts={"world_size": len(parts), "token": token, "files": parts})
        name = storage.checkpoint_name(step)
        storage.write_atomic(self.path, name, lambda tmp: codec.write_file(tmp, None, meta, writeback=storage.Writeback))
        return Record(self.info(name, meta), meta, parts=tuple(p["name"] for p in parts))

    def discard_parts(self, names: list[str]) -> None:
        """Remove parts of a save that will not be committed (best effort: the next
        writer's open removes what is left)."""
        storage.remove_files(self.path, [n for n in names if storage.parse_part_name(n) is not None])

    def write_payload(self, name: str, write: Callable[[Path], object]) -> Path:
        """Run a payload's writer on a temporary file; return it, for :meth:`commit_payload`."""
        return storage.write_payload(self.path, name, write)

    def commit_payload(self, name: str, tmp: Path, meta: dict[str, Any]) -> Record:
        """Commit a payload written by :meth:`write_payload` as ``name``, with its metadata."""

        def record(size: int, crc: int) -> bytes:
            meta.update(name=name, size=size, crc32=crc, nbytes=size)
            return codec.encode_sidecar(meta)

        storage.commit_payload(self.path, tmp, name, record, codec.checksum)
        sidecar = storage.sidecar_name(name)
        return Record(self.info(name, meta, sidecar), meta_subset(meta), sidecar=sidecar)

    def delete(self, names: list[str], *, stacklevel: int = 6) -> dict[str, OSError]:
        """Delete files (and fsync once); warn about each that could not be deleted."""
        failures = storage.remove_files(self.path, names)
        for name, exc in failures.items():
            warnings.warn(f"ckptmgr: cannot delete {self.path / name}: {exc}", CheckpointWarning, stacklevel=stacklevel)
        return failures

    def delete_checkpoint(self, record: Record) -> None:
        """Delete one checkpoint's files.

        Raises:
            CheckpointIOError: its own file could not be deleted.
        """
        failures = storage.remove_files(self.path, record.files)
        own = record.info.path.name
        if own in failures:
            raise storage.io_error("Cannot delete checkpoint", record.info.path, failures[own])

    def remove_index_and_lock(self) -> None:
        """What delete_all leaves last: the index, and (still held) the lock file."""
        storage.remove_files(self.path, [storage.INDEX_NAME])
        if self._lock is not None:
            # Unlinked while still held, so no other process can lock this file after
            # we release it and believe it owns a directory we are deleting.
            storage.remove_files(self.path, [storage.LOCK_NAME])

    # ------------------------------------------------------------------------ reading

    def load(
        self, record: Record, *, verify: bool, tree: bool = True, select: codec.Selection | None = None,
        mmap: bool = False, rank: int | None = None,
    ) -> Loaded:
        """Read (and verify) one checkpoint: its tree (None with ``tree=False``), or a payload's path.

        A sharded checkpoint (several ranks' parts): ``rank``'s part; with ``tree=False``
        the commit record and every part are verified.

        Raises:
            CheckpointNotFoundError: its file is gone (deleted under a reader), or a
                newer checkpoint replaced a payload of the same name.
            CorruptCheckpointError: it does not verify.
            CheckpointIOError: it could not be read.
            KeyError: ``select`` names a key path the tree lacks.
            ValueError: ``select`` for a payload.
        """
        path = Path(record.info.path)
        if record.corrupt is not None:
            raise CorruptCheckpointError(f"{path}: {record.corrupt}")
        with _read_errors(path):
            if not storage.is_regular_file(path):
                raise CorruptCheckpointError(f"{path}: not a regular file, refused")
            if record.sidecar is not None:
                if verify:
                    size, crc = storage.file_checksum(path, codec.checksum)
                    if (size, crc) != (record.meta.get("size"), record.meta.get("crc32")):
                        replaced = self._replaced_by(record, size, crc)
                        if replaced is not None:
                            return Loaded(path, replaced)
                        raise CorruptCheckpointError(
                            f"{path}: checksum mismatch (file has {size} bytes, crc32 {crc:#010x}; "
                            f"expected {record.meta.get('size')} bytes, crc32 {record.meta.get('crc32', 0):#010x})"
                        )
                if select is not None:
                    raise ValueError(
                        f"Expected a state-tree checkpoint for select=. Received: {path} is a file payload"
                    )
                return Loaded(path, record)
            if record.parts:
                return Loaded(self._load_sharded(record, verify=verify, tree=tree, select=select,
                                                 mmap=mmap, rank=rank), record)
            if not tree:
                manifest = codec.verify_file(path)
                value = None
            else:
                value, manifest = codec.read_file(path, verify=verify, select=select, mmap=mmap)
        if manifest.get("step") != record.info.step:
            raise CorruptCheckpointError(
                f"{path}: holds step {manifest.get('step')!r}, its name says {record.info.step}"
            )
        return Loaded(value, record)

    def _load_sharded(self, record: Record, *, verify: bool, tree: bool, select: codec.Selection | None,
                      mmap: bool, rank: int | None) -> Any:
        """One rank's part (or, with ``tree=False``, a check of every part).

        The commit record is read again (a listing may be older than a save of the same
        step), and each part must be the file it names: its size, and the step, rank,
        world size and token in the part's own checksummed manifest.
        """
        path = Path(record.info.path)
        world = len(record.parts)
        manifest = codec.verify_file(path) if verify else codec.read_meta(path)
        if manifest.get("step") != record.info.step:
            raise CorruptCheckpointError(f"{path}: holds step {manifest.get('step')!r}, its name says {record.info.step}")
        names = part_names(manifest, str(path))
        if names != record.parts:
            raise CheckpointNotFoundError(f"{path} was replaced by a newer save of step {record.info.step}")
        sizes = [int(p["size"]) for p in manifest["parts"]["files"]]
        token = manifest["parts"]["token"]
        if not tree:
            wanted = list(range(world))
        elif rank is None or not 0 <= rank < world:
            raise ValueError(
                f"Expected rank to be the rank of one part of {path} (sharded across {world} ranks: 0 to "
                f"{world - 1}). Received: rank={rank!r}"
            )
        else:
            wanted = [rank]
        value = None
        for k in wanted:
            part = self.path / names[k]
            where = f"{part} (part {k} of {world} of step {record.info.step})"
            try:
                size = os.stat(part, follow_symlinks=False).st_size
            except FileNotFoundError as exc:
                raise CorruptCheckpointError(f"{where}: missing") from exc
            if size != sizes[k]:
                raise CorruptCheckpointError(f"{where}: {size} bytes, its commit record says {sizes[k]}")
            if not storage.is_regular_file(part):
                raise CorruptCheckpointError(f"{where}: not a regular file, refused")
            try:
                if tree:
                    value, part_manifest = codec.read_file(part, verify=verify, select=select, mmap=mmap)
                else:
                    part_manifest = codec.verify_file(part)
            except FileNotFoundError as exc:
                raise CorruptCheckpointError(f"{where}: missing") from exc
            expected = {"rank": k, "world_size": world, "token": token}
            if part_manifest.get("step") != record.info.step or part_manifest.get("part") != expected:
                raise CorruptCheckpointError(
                    f"{where}: its manifest says step {part_manifest.get('step')!r}, part "
                    f"{part_manifest.get('part')!r}; the commit record expects {expected}"
                )
        return value

    def _replaced_by(self, record: Record, size: int, crc: int) -> Record | None:
        """A payload failing its listed checksum may have been replaced under its name.

        Returns the record of the commit in progress that describes the file as it is
        (None: it is just corrupt).

        Raises:
            CheckpointNotFoundError: the sidecar now describes the file: a newer
                checkpoint replaced the one listed (list again).
        """
        assert record.sidecar is not None
        name = record.info.path.name
        for pending in storage.pending_commits(self.path, decode_sidecar):
            if (pending.get("name"), pending.get("size"), pending.get("crc32")) == (name, size, crc):
                meta = meta_subset(pending)
                return Record(self.info(name, meta, record.sidecar), meta, sidecar=record.sidecar)
        try:
            now = decode_sidecar(storage.read_small(self.path / record.sidecar))
        except (OSError, CorruptCheckpointError):
            return None
        if (now.get("name"), now.get("size"), now.get("crc32")) == (name, size, crc):
            raise CheckpointNotFoundError(f"{record.info.path} was replaced while being read")
        return None

    def describe(self, record: Record) -> CheckpointDescription:
        """Metadata and tree layout of one checkpoint, reading no arrays."""
        path = Path(record.info.metadata_path or record.info.path)
        with _read_errors(path):
            if record.sidecar is not None:
                meta = decode_sidecar(storage.read_small(path), str(path))
                return CheckpointDescription(record.info, meta, None)
            manifest = codec.read_meta(path)
            leaves = tuple(codec.describe_leaves(manifest, str(path)))
        return CheckpointDescription(record.info, {k: v for k, v in manifest.items() if k != "tree"}, leaves)

    # ----------------------------------------------------------------------- rollback

    def set_aside(self, step: int, later: list[Record], now: float) -> None:
        """Move the checkpoints in ``later`` into a new rolled-back folder (crash-safe)."""
        names = sorted({name for record in later for name in record.files})
        folder = storage.rollback_folder(self.path, step, now)
        storage.write_rollback_marker(self.path, folder, names)
        storage.finish_rollback(self.path)

    def rolled_back(self) -> list[Path]:
        return storage.rolled_back_folders(self.path)


@contextlib.contextmanager
def _read_errors(path: Path) -> Iterator[None]:
    """Reading ``path``: gone -> CheckpointNotFoundError; other OS errors -> CheckpointIOError."""
    try:
        yield
    except (CorruptCheckpointError, CheckpointNotFoundError):
        raise
    except FileNotFoundError as exc:
        raise CheckpointNotFoundError(f"Checkpoint {path} no longer exists") from exc
    except OSError as exc:
        raise storage.io_error("Cannot read checkpoint", path, exc) from exc


def decode_sidecar(blob: bytes, where: str = "") -> dict[str, Any]:
    """A payload's metadata file, checked (codec), naming a payload file of ours.

    Raises:
        CorruptCheckpointError: damaged or malformed, or its payload name is not a plain
            file name here ("../x" or "a/b" would make readers verify and return, and
            retention delete, a file elsewhere).
    """
    meta = codec.decode_sidecar(blob, where)
    try:
        storage.check_payload_name(meta["name"])
    except ValueError as exc:
        raise CorruptCheckpointError(f"{where}: malformed metadata (payload name {meta['name']!r})") from exc
    return meta


def _parts_nbytes(meta: Mapping[str, Any]) -> int:
    """A sharded checkpoint's bytes of array data: its parts' (0 if malformed)."""
    raw = meta["parts"]
    files = raw.get("files") if isinstance(raw, dict) else None
    if not isinstance(files, list):
        return 0
    return sum(f["nbytes"] for f in files if isinstance(f, dict) and type(f.get("nbytes")) is int)


def part_names(meta: Mapping[str, Any], where: str) -> tuple[str, ...]:
    """The part files (by rank) a commit record names; () for a checkpoint in one file.

    Raises:
        CorruptCheckpointError: the part list is malformed: each name must be the part
            file of this step for its rank, the world size and the token (a hostile or
            damaged record must not make readers read, or retention delete, other files).
    """
    raw = meta.get("parts")
    if raw is None:
        return ()
    try:
        step, world, token, files = meta["step"], raw["world_size"], raw["token"], raw["files"]
        ok = (type(world) is int and 1 <= world <= 99_999 and isinstance(token, str) and isinstance(files, list)
              and len(files) == world and type(step) is int)
        names = tuple(
            storage.part_name(step, k, world, token) if ok and isinstance(f, dict) and f.get("name")
            == storage.part_name(step, k, world, token) and type(f.get("size")) is int and f["size"] >= 0
            and type(f.get("nbytes")) is int and f["nbytes"] >= 0 else ""
            for k, f in enumerate(files if ok else [])
        )
        if not ok or not all(names) or storage.parse_part_name(names[0]) is None:
            raise ValueError
    except (KeyError, TypeError, ValueError) as exc:
        raise CorruptCheckpointError(f"{where}: malformed list of parts") from exc
    return names


def reason_of(exc: BaseException) -> str:
    """Why a checkpoint failed, in a few words, for its "corrupt" keep reason."""
    text = str(exc)
    return text.split(": ", 1)[1] if ": " in text else text


def is_checkpoint_directory(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a directory a CheckpointManager has written to.

    True when it holds a checkpoint, or the writer's lock or index file (a run that
    has not saved yet). Reads only names; takes no lock.

    >>> import ckptmgr, tempfile
    >>> directory = tempfile.mkdtemp()
    >>> ckptmgr.is_checkpoint_directory(directory)
    False
    >>> ckptmgr.CheckpointManager(directory).close()
    >>> ckptmgr.is_checkpoint_directory(directory)
    True
    """
    directory = Path(path)
    if not directory.is_dir():
        return False
    if any((directory / name).exists() for name in (storage.LOCK_NAME, storage.INDEX_NAME)):
        return True
    try:
        return next(storage.scan(directory), None) is not None
    except CheckpointIOError:
        return False


def _recorded_reasons(cached: object) -> tuple[KeepReason, ...]:
    """The writer's keep reasons from an index entry (``[text, kind, detail]`` each)."""
    if not isinstance(cached, list):
        return ()
    return tuple(
        KeepReason(item[0], item[1], item[2]) for item in cached
        if isinstance(item, list) and len(item) == 3 and all(isinstance(x, str) for x in item)
        and item[1] in REASON_KINDS
    )
