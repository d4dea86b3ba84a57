"""The local file system: atomic, durable commits (temp file, fsync, rename, directory fsync), deletion, the lock, the index file."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import stat
import threading
import weakref
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, ClassVar

import filelock

from ..errors import DirectoryLockedError
from ._layout import (
    _CHUNK,
    _COMMIT_RE,
    _SIDECAR_RE,
    _TMP_RE,
    INDEX_NAME,
    INDEX_VERSION,
    LOCK_NAME,
    T,
    check_payload_name,
    io_error,
    parse_name,
    read_small,
    sidecar_name,
)


def ensure_directory(path: Path) -> None:
    """Create ``path`` and any missing parents, each one durable in its parent.

    A new directory entry survives a power cut only once its parent directory is
    fsynced (the POSIX minimum; ext4 with ``data=writeback``, XFS and some network file
    systems do lose it). Without that, a power cut after the first ``save()`` returned
    could lose the whole new directory and every checkpoint in it. So every directory
    made here is followed by an fsync of its parent, before this returns and so before
    anything inside it is committed. A directory that appears concurrently (another
    process made it) gets the same fsync: its maker may not have done it yet, and so do
    the ancestors of the part that existed (best effort), which a caller may have made
    just before with ``os.makedirs`` and no fsync.

    Raises:
        CheckpointIOError: it cannot be created or made durable, or exists and is not
            a directory.
    """
    missing: list[Path] = []
    current = Path(os.path.abspath(path))
    while not os.path.lexists(current):
        missing.append(current)
        if current.parent == current:
            break
        current = current.parent
    try:
        for directory in reversed(missing):
            try:
                os.mkdir(directory)
            except FileExistsError:
                if not directory.is_dir():
                    raise
            fsync_directory(directory.parent)
        # The part that existed may be new too: a caller's os.makedirs() a moment ago
        # leaves entries no parent fsync has made durable. Make them durable, best
        # effort: these directories are not ours, and an ancestor may not be readable.
        for ancestor in current.parents:
            with contextlib.suppress(OSError):
                fsync_directory(ancestor)
        if not path.is_dir():
            raise FileExistsError(errno.EEXIST, "not a directory", os.fspath(path))
    except FileExistsError as exc:
        raise io_error("Expected a directory, found a file at", path, exc) from exc
    except OSError as exc:
        raise io_error("Cannot create checkpoint directory", path, exc) from exc


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, os.O_RDONLY | flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_directory(path: Path) -> None:
    """Make the entries of directory ``path`` durable."""
    _fsync(path, getattr(os, "O_DIRECTORY", 0))


def fsync_file(path: Path) -> None:
    """Make the data of file ``path`` durable (not following a symbolic link)."""
    _fsync(path, getattr(os, "O_NOFOLLOW", 0))


class DirectoryLock:
    """The single-writer lock of a checkpoint directory (non-blocking).

    Raises:
        DirectoryLockedError: from :meth:`acquire`, when a live process holds it.
        CheckpointIOError: the lock file cannot be created.
    """

    # Lock files held by this process -> who holds them, so that a second writer in the
    # same process is told where the first one was opened, not "another process".
    # Weak: a manager dropped without close() releases its lock when collected. The pid:
    # a forked child inherits this table, not the locks.
    _held: ClassVar[dict[str, tuple[int, weakref.ref[DirectoryLock]]]] = {}
    _held_mutex: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, directory: Path, owner: str = "") -> None:
        self.path = directory / LOCK_NAME
        self.owner = owner
        self._key = os.path.realpath(self.path)
        self._lock = filelock.FileLock(self.path, timeout=0, thread_local=False)

    def acquire(self) -> None:
        with DirectoryLock._held_mutex:
            pid, ref = DirectoryLock._held.get(self._key, (0, None))
            holder = ref() if ref is not None and pid == os.getpid() else None
            if holder is not None and holder.is_locked:
                raise DirectoryLockedError(
                    f"Checkpoint directory {self.path.parent} is already open for writing in this "
                    f"process ({holder.owner or 'another CheckpointManager'}). Only one writer per "
                    "directory: use that manager, or close() it first; pass read_only=True to "
                    "restore from it meanwhile",
                    lock_path=self.path,
                )
            self._acquire()
            DirectoryLock._held[self._key] = (os.getpid(), weakref.ref(self))

    def _acquire(self) -> None:
        try:
            self._lock.acquire(timeout=0)
        except filelock.Timeout as exc:
            raise DirectoryLockedError(
                f"Checkpoint directory {self.path.parent} is locked by another writer "
                f"(lock file {self.path}). Only one process may save to a directory; "
                "pass read_only=True to restore from it while it is in use",
                lock_path=self.path,
            ) from exc
        except OSError as exc:
            raise io_error("Cannot lock checkpoint directory", self.path.parent, exc) from exc

    def release(self) -> None:
        with DirectoryLock._held_mutex:
            self._lock.release(force=True)
            _pid, ref = DirectoryLock._held.get(self._key, (0, None))
            if ref is not None and ref() is self:
                del DirectoryLock._held[self._key]

    @property
    def is_locked(self) -> bool:
        return self._lock.is_locked


def write_atomic(directory: Path, final_name: str, write: Callable[[Path], T]) -> T:
    """Run ``write(tmp_path)`` and commit its file as ``directory/final_name`` atomically.

    ``write`` must create ``tmp_path`` itself (exclusively). The temporary file is
    removed if anything fails, so no leftover stays behind and nothing that existed
    before is touched: a file ``final_name`` replaced by the rename is put back when
    the directory cannot be fsynced after it.

    Raises:
        CheckpointIOError: any OS error, naming the final path and the cause.
        Exception: whatever ``write`` raises for reasons other than I/O.
    """
    final = directory / final_name
    tmp = directory / f".ckpt-{secrets.token_hex(8)}.tmp"
    kept: _Kept | None = None
    try:
        result = write(tmp)
        fsync_file(tmp)
        kept = _Kept.aside(final)
        os.replace(tmp, final)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if kept is not None:
            kept.drop()
        if isinstance(exc, OSError):
            raise io_error("Cannot write checkpoint", final, exc) from exc
        raise
    try:
        fsync_directory(directory)
    except OSError as exc:
        # The rename may not be durable. Undo it, so that a save that raised leaves no
        # checkpoint its caller does not know of (a crash before the undo leaves a
        # complete one, as any crash after the rename does), and puts back the one it
        # replaced.
        if not kept.put_back(final):
            kept.drop()
        raise io_error("Cannot make checkpoint durable (fsync of directory)", final, exc) from exc
    kept.drop()
    return result


class _Kept:
    """What a rename over ``final`` replaces, kept under a second name (a hard link,
    named like a temp file: a crash leaves a leftover the next writer removes) until
    the rename is durable, so that a commit that fails after it can be undone."""

    def __init__(self, existed: bool, aside: Path | None) -> None:
        self.existed, self._aside = existed, aside

    @classmethod
    def aside(cls, final: Path) -> _Kept:
        if not os.path.lexists(final):
            return cls(False, None)  # the usual case: a new name
        aside = final.parent / f".ckpt-{secrets.token_hex(8)}.tmp"
        try:
            os.link(final, aside, follow_symlinks=False)
        except OSError:
            return cls(True, None)  # no hard links here (or no second name to be had)
        return cls(True, aside)

    def put_back(self, final: Path) -> bool:
        """Undo the rename: the earlier file back under ``final``, or no file there.
        False where that failed, or where there is no second name to put back: the new
        file, complete, then stays (better than none)."""
        try:
            if self._aside is not None:
                os.replace(self._aside, final)
                # Renaming a name onto another of the same file does nothing (POSIX):
                # the case where the rename to undo never happened.
                self.drop()
            elif self.existed:
                return False
            else:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(final)
        except OSError:
            return False
        return True

    def drop(self) -> None:
        if self._aside is not None:
            _discard(self._aside)
            self._aside = None


def file_checksum(path: Path, checksum: Callable[[bytes, int], int]) -> tuple[int, int]:
    """``(size, checksum)`` of a file, read in chunks (bounded memory)."""
    size, value = 0, 0
    with open(path, "rb", buffering=0) as fh:
        while chunk := fh.read(_CHUNK):
            size += len(chunk)
            value = checksum(chunk, value)
    return size, value


def write_payload(directory: Path, name: str, write: Callable[[Path], object]) -> Path:
    """Run ``write(tmp)`` for a payload named ``name``; return the temporary file.

    The temporary name ends with ``-NAME`` so writers that check the suffix (Keras'
    ``.keras``, ``.weights.h5``) accept it.

    Raises:
        CheckpointIOError: an OS error (the temporary file is removed).
        CheckpointError: ``write`` did not create a regular file at the path given.
    """
    from ..errors import CheckpointError

    tmp = directory / f".ckpt-{secrets.token_hex(8)}.tmp-{name}"
    final = directory / name
    try:
        write(tmp)
        if not stat.S_ISREG(os.lstat(tmp).st_mode):
            raise CheckpointError(f"The writer of {final} did not create a regular file at {tmp}")
    except FileNotFoundError as exc:
        raise CheckpointError(f"The writer of {final} did not create a file at {tmp}") from exc
    except BaseException as exc:
        _discard(tmp)
        if isinstance(exc, OSError):
            raise io_error("Cannot write checkpoint", final, exc) from exc
        raise
    return tmp


def commit_payload(
    directory: Path, tmp: Path, name: str, record: Callable[[int, int], bytes],
    checksum: Callable[[bytes, int], int],
) -> tuple[int, int]:
    """Commit a payload written by :func:`write_payload` as ``directory/name``.

    ``record(size, crc)`` returns the metadata to store in the payload's sidecar.
    Returns ``(size, crc)`` of the payload.

    Raises:
        CheckpointIOError: an OS error. Nothing of this commit stays: when the payload
            was already renamed (replacing an earlier payload of the same name, if any),
            it and its metadata are removed again, so that a save that raised leaves no
            checkpoint its caller does not know of. If even that fails, the commit
            record stays and the next writer finishes the commit, as after a crash.
    """
    final = directory / name
    sidecar = directory / sidecar_name(name)
    commit = directory / f".ckpt-{secrets.token_hex(8)}.commit"
    kept: _Kept | None = None
    kept_sidecar: _Kept | None = None
    try:
        fsync_file(tmp)
        size, crc = file_checksum(tmp, checksum)
        fd = os.open(commit, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            os.write(fd, record(size, crc))
            os.fsync(fd)
        finally:
            os.close(fd)
        # A payload saved again under its name: the earlier one and its metadata are
        # kept aside until the commit is durable, to be put back if it fails.
        kept, kept_sidecar = _Kept.aside(final), _Kept.aside(sidecar)
        os.replace(tmp, final)
    except BaseException as exc:
        _discard(tmp)
        _discard(commit)
        for aside in (kept, kept_sidecar):
            if aside is not None:
                aside.drop()
        if isinstance(exc, OSError):
            raise io_error("Cannot write checkpoint", final, exc) from exc
        raise
    try:
        os.replace(commit, sidecar)
        fsync_directory(directory)
    except OSError as exc:
        # Undo, payload first: a crash in between leaves metadata without a payload,
        # which the next writer removes (or a commit record it discards).
        if kept.put_back(final):
            _discard(commit)
            if not kept_sidecar.put_back(sidecar):
                _discard(sidecar)
        # else: the record stays; the next writer finishes the commit
        kept.drop()
        kept_sidecar.drop()
        raise io_error("Cannot commit checkpoint", final, exc) from exc
    kept.drop()
    kept_sidecar.drop()
    return size, crc


def pending_commits(directory: Path, parse: Callable[[bytes], dict[str, Any]]) -> list[dict[str, Any]]:
    """The readable payload commit records in progress in ``directory`` (for readers)."""
    records = []
    try:
        with os.scandir(directory) as it:
            names = [e.name for e in it if _COMMIT_RE.fullmatch(e.name)]
    except OSError:
        return []
    for name in names:
        try:
            records.append(parse(read_small(directory / name)))
        except (OSError, ValueError):
            continue
    return records


def recover_commits(
    directory: Path, parse: Callable[[bytes], dict[str, Any]], checksum: Callable[[bytes, int], int]
) -> list[str]:
    """Finish or discard interrupted payload commits; return the payload names finished.

    ``parse`` decodes a commit record (raising ValueError when it is damaged). Only
    call while holding the writer lock.
    """
    finished = []
    with os.scandir(directory) as it:
        commits = [e.name for e in it if _COMMIT_RE.fullmatch(e.name)]
    for commit_name in commits:
        commit = directory / commit_name
        try:
            meta = parse(read_small(commit, 1024 * 1024))
            name = check_payload_name(meta["name"])
            payload = directory / name
            if stat.S_ISREG(os.lstat(payload).st_mode) and file_checksum(payload, checksum) == (
                meta["size"], meta["crc32"],
            ):
                os.replace(commit, directory / sidecar_name(name))
                finished.append(name)
                continue
        except (OSError, ValueError, KeyError, TypeError):
            pass
        _discard(commit)
    if commits:
        with contextlib.suppress(OSError):
            fsync_directory(directory)
    return finished


def _discard(path: Path) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def remove_files(directory: Path, names: Iterable[str]) -> dict[str, OSError]:
    """Delete ``names`` in ``directory``, fsync it once; return the failures by name.

    A payload's sidecar listed after a payload that could not be deleted is kept (and
    not reported): the checkpoint stays whole, rather than an untracked payload file
    that nothing would ever delete.
    """
    failures: dict[str, OSError] = {}
    removed = False
    kept: set[str] = set()
    for name in names:
        if name in kept:
            continue
        try:
            os.unlink(directory / name)
            removed = True
        except FileNotFoundError:
            pass
        except OSError as exc:
            failures[name] = exc
            kept.add(sidecar_name(name))
    if removed:
        try:
            fsync_directory(directory)
        except OSError as exc:
            failures[""] = exc
    return failures


def remove_leftovers(directory: Path) -> list[str]:
    """Remove temporary files left by interrupted saves; return their names.

    Only call while holding the writer lock: then no save is in progress.
    """
    names = []
    with os.scandir(directory) as it:
        for entry in it:
            if _TMP_RE.fullmatch(entry.name) and not entry.is_dir(follow_symlinks=False):
                names.append(entry.name)
    failures = remove_files(directory, names)
    return [n for n in names if n not in failures]


def _index_body(entries: dict[str, Any]) -> str:
    return json.dumps(entries, separators=(",", ":"))


def _valid_index_entry(name: str, entry: Any) -> bool:
    """Whether a cached entry can describe the file ``name`` at all: a checkpoint's
    step is the one its name says, a sidecar's payload name is valid and hashes to it."""
    meta = entry.get("meta") if isinstance(entry, dict) else None
    if not isinstance(meta, dict):
        return False
    step = parse_name(name)
    if step is not None:
        return type(meta.get("step")) is int and meta["step"] == step
    if not _SIDECAR_RE.fullmatch(name):
        return False
    try:
        return sidecar_name(check_payload_name(meta.get("name"))) == name
    except ValueError:
        return False


def load_index(directory: Path) -> dict[str, Any]:
    """The cached metadata by file name; empty when the index is missing or damaged.

    The index has a CRC of its entries (a flipped digit in a cached metric must not
    change which checkpoint is best), and entries that cannot describe their file (a
    payload name outside the directory, a step its file name contradicts) are left
    out, so that the file itself is read instead.
    """
    try:
        data = json.loads(read_small(directory / INDEX_NAME, 64 * 1024 * 1024))
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(data, dict) or data.get("version") != INDEX_VERSION:
        return {}
    entries = data.get("entries")
    if not isinstance(entries, dict) or type(data.get("crc32")) is not int:
        return {}
    try:
        if zlib.crc32(_index_body(entries).encode("utf-8")) != data["crc32"]:
            return {}
    except (ValueError, RecursionError):
        return {}
    return {name: entry for name, entry in entries.items() if _valid_index_entry(name, entry)}


def save_index(directory: Path, entries: dict[str, Any]) -> None:
    """Replace the index atomically. It is a cache: not fsynced, errors ignored."""
    tmp = directory / f".ckpt-{secrets.token_hex(8)}.tmp"
    try:
        body = _index_body(entries)
        crc = zlib.crc32(body.encode("utf-8"))
        with open(tmp, "x", encoding="utf-8") as fh:
            fh.write(f'{{"version":{INDEX_VERSION},"crc32":{crc},"entries":{body}}}')
        os.replace(tmp, directory / INDEX_NAME)
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
