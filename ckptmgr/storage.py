"""The only module that touches the filesystem: naming, atomic commit, scan, lock, index.

Directory layout::

    runs/exp1/
      ckpt-000001000.h5        committed checkpoints (step zero-padded to 9+ digits)
      model-03-0.31.keras      a payload checkpoint: a framework-native file ...
      .ckptmgr-<hash>.json     ... and its metadata (step, metrics, size, checksum);
                               <hash> is derived from the payload's file name
      .ckpt-<random>.tmp[-NAME] a save in progress; removed by the next writer that opens
      .ckpt-<random>.commit    a payload commit in progress (see below)
      .ckptmgr.lock            the writer lock (filelock; released by the OS on death)
      .ckptmgr-index.json      a cache of the checkpoints' metadata; rebuilt when stale
      anything else            not ours: ignored, never deleted

Commit protocol (invariant 1): write to ``.ckpt-<random>.tmp`` in the same directory,
flush and fsync it, rename it to its final name, fsync the directory. A crash before
the rename leaves only a temporary file; after it, a complete, durable checkpoint.

A payload's file and its metadata are two files, and the payload may replace an
earlier file of the same name, so its commit has two phases: write the payload to a
temporary name and fsync it; write its metadata as ``.ckpt-<random>.commit`` and fsync
it; rename the payload; rename the commit record over the sidecar; fsync the directory.
The next writer that opens finishes an interrupted commit whose payload is in place and
matches the record's checksum, and discards one whose payload is not.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import secrets
import stat
import sys
import threading
import time
import weakref
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import filelock

from .errors import CheckpointIOError, DirectoryLockedError, describe_os_error

T = TypeVar("T")

LOCK_NAME = ".ckptmgr.lock"
INDEX_NAME = ".ckptmgr-index.json"
INDEX_VERSION = 2  # 2: keep reasons stored as [text, kind, detail]
_CKPT_RE = re.compile(r"ckpt-(\d{9,20})\.h5")
_TMP_RE = re.compile(r"\.ckpt-[0-9a-f]{16}\.tmp(-.+)?", re.DOTALL)
_COMMIT_RE = re.compile(r"\.ckpt-[0-9a-f]{16}\.commit")
_SIDECAR_RE = re.compile(r"\.ckptmgr-[0-9a-f]{16}\.json")
MAX_PAYLOAD_NAME = 200
_CHUNK = 8 * 1024 * 1024
_LIST_RETRIES = 10


def checkpoint_name(step: int) -> str:
    """The file name of the checkpoint of ``step``."""
    return f"ckpt-{step:09d}.h5"


def parse_name(name: str) -> int | None:
    """The step of a checkpoint file name, or None if the name is not one of ours."""
    match = _CKPT_RE.fullmatch(name)
    if match is None:
        return None
    step = int(match.group(1))
    # Only the canonical spelling: "ckpt-0000000001.h5" and "ckpt-000000001.h5" would
    # otherwise both claim step 1.
    return step if checkpoint_name(step) == name else None


def sidecar_name(payload_name: str) -> str:
    """The metadata file name of a payload checkpoint named ``payload_name``."""
    digest = hashlib.sha256(payload_name.encode("utf-8", "surrogatepass")).hexdigest()
    return f".ckptmgr-{digest[:16]}.json"


def check_payload_name(name: object) -> str:
    """Validate the file name of a payload checkpoint.

    Raises:
        ValueError: not a plain, visible file name of at most 200 characters, or one
            that a native checkpoint uses.
    """
    if (
        not isinstance(name, str)
        or not 0 < len(name) <= MAX_PAYLOAD_NAME
        or name.startswith(".")
        or any(c in name for c in "/\\\0")
        or parse_name(name) is not None
        or _CKPT_RE.fullmatch(name) is not None
    ):
        raise ValueError(
            "Expected a payload name that is a plain file name (no '/', no NUL, not "
            f"starting with '.', at most {MAX_PAYLOAD_NAME} characters, not ckpt-<step>.h5). "
            f"Received: name={name!r}"
        )
    return name


def io_error(action: str, path: str | os.PathLike[str], exc: OSError) -> CheckpointIOError:
    """A CheckpointIOError whose message names what failed, the path, and the cause."""
    return CheckpointIOError(f"{action} {os.fspath(path)}: {describe_os_error(exc)}", path, exc)


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


def fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_fdatasync: Callable[[int], None] = getattr(os, "fdatasync", os.fsync)
_SYNC_FILE_RANGE_WRITE = 2  # <linux/fs.h>: start writeback of the range's dirty pages, no waiting


def _load_sync_file_range() -> Any:
    """libc's ``sync_file_range`` (Linux; Python has no binding), or None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load_sync_file_range()


class Writeback:
    """Starts the disk on a file's data while the rest of the file is still being written.

    With a single fsync at the end, a save first copies everything into the page cache
    while the disk idles, then waits while the disk writes. The writer instead tells
    this what it has written: :meth:`start` queues it for the disk at once, with
    Linux's ``sync_file_range(SYNC_FILE_RANGE_WRITE)``, which neither waits nor
    flushes the drive's cache (elsewhere it does nothing); :meth:`kick` makes a
    background thread ``fdatasync`` what is written so far (several kicks while it is
    busy make one more call). Copying and writing overlap, and the final fsync of
    :func:`write_atomic` finds less left to do. This only saves time: durability still
    comes from that final fsync.

    :meth:`close` joins the thread and returns the first error of a background
    fdatasync or of queueing writes. The caller must raise it: Linux reports a
    writeback error to one fsync only, so after this one saw it, the final fsync may
    succeed on a damaged file.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._cond = threading.Condition()
        self._pending = False
        self._closing = False
        self._thread: threading.Thread | None = None
        self._queue_writes = _sync_file_range is not None
        self.error: OSError | None = None

    def start(self) -> None:
        """Queue what is written so far for the disk, without waiting (Linux; else nothing)."""
        if not self._queue_writes or self._closing:
            return
        # Pages already queued are skipped: offset 0, length 0 (to the end) costs little.
        if _sync_file_range(self._fd, 0, 0, _SYNC_FILE_RANGE_WRITE) == 0:
            return
        code = ctypes.get_errno()
        if code in (errno.ENOSYS, errno.EINVAL, errno.ESPIPE, errno.EOPNOTSUPP, errno.EPERM):
            self._queue_writes = False  # not for this kind of file (or this kernel)
            return
        with self._cond:
            self.error = self.error or OSError(code, os.strerror(code))
            self._closing = True

    def kick(self) -> None:
        with self._cond:
            if self._closing:
                return
            self._pending = True
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ckptmgr-writeback", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closing:
                    self._cond.wait()
                if self._closing:
                    return
                self._pending = False
            try:
                _fdatasync(self._fd)
            except OSError as exc:
                with self._cond:
                    self.error = exc
                    self._closing = True
                return

    def close(self) -> OSError | None:
        """Stop (the final fsync does what is left); return the background error, if any."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        return self.error


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
    before is touched.

    Raises:
        CheckpointIOError: any OS error, naming the final path and the cause.
        Exception: whatever ``write`` raises for reasons other than I/O.
    """
    final = directory / final_name
    tmp = directory / f".ckpt-{secrets.token_hex(8)}.tmp"
    try:
        result = write(tmp)
        fsync_file(tmp)
        os.replace(tmp, final)
    except BaseException as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        if isinstance(exc, OSError):
            raise io_error("Cannot write checkpoint", final, exc) from exc
        raise
    try:
        fsync_directory(directory)
    except OSError as exc:
        # The rename may not be durable. Undo it, so that a save that raised leaves no
        # checkpoint its caller does not know of (a crash before the undo leaves a
        # complete one, as any crash after the rename does).
        _discard(final)
        raise io_error("Cannot make checkpoint durable (fsync of directory)", final, exc) from exc
    return result


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
    from .errors import CheckpointError

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
    commit = directory / f".ckpt-{secrets.token_hex(8)}.commit"
    try:
        fsync_file(tmp)
        size, crc = file_checksum(tmp, checksum)
        fd = os.open(commit, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
        try:
            os.write(fd, record(size, crc))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
    except BaseException as exc:
        _discard(tmp)
        _discard(commit)
        if isinstance(exc, OSError):
            raise io_error("Cannot write checkpoint", final, exc) from exc
        raise
    sidecar = directory / sidecar_name(name)
    try:
        os.replace(commit, sidecar)
        fsync_directory(directory)
    except OSError as exc:
        # Undo, payload first: a crash in between leaves metadata without a payload,
        # which the next writer removes (or a commit record it discards).
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(final)
        except OSError:
            pass  # the record stays; the next writer finishes the commit
        else:
            _discard(commit)
            _discard(sidecar)
        raise io_error("Cannot commit checkpoint", final, exc) from exc
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


@dataclass(frozen=True)
class Entry:
    """A file seen by :func:`scan`: a native checkpoint (``step`` from its name) or a
    payload's sidecar (``step`` None: it is in the sidecar)."""

    step: int | None
    name: str
    size: int
    mtime_ns: int


def scan(directory: Path) -> Iterator[Entry]:
    """The checkpoint files and payload sidecars of ``directory``.

    Only regular files with our name patterns; symbolic links and anything else are
    skipped: reading through them could read outside the directory.

    Raises:
        CheckpointIOError: the directory cannot be listed.
    """
    for _attempt in range(_LIST_RETRIES):
        try:
            with os.scandir(directory) as it:
                listed = list(it)
        except OSError as exc:
            raise io_error("Cannot list checkpoint directory", directory, exc) from exc
        found, vanished = [], False
        for entry in listed:
            step = parse_name(entry.name)
            if step is None and not _SIDECAR_RE.fullmatch(entry.name):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                vanished = True
                continue
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                found.append(Entry(step, entry.name, st.st_size, st.st_mtime_ns))
        # A listing is no snapshot: while a writer renames a new checkpoint in and
        # deletes an old one, it can hold the old one and miss the new. List again.
        if not vanished:
            break
    return iter(found)


def read_small(path: Path, limit: int = 1024 * 1024) -> bytes:
    """The content of a small regular file (not following a symlink), at most ``limit`` bytes.

    Raises:
        OSError: it cannot be read, or is not a regular file (a FIFO planted under the
            name would otherwise block the reader forever; a symbolic link would make
            it read outside the directory).
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0))
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(errno.EINVAL, "Not a regular file", os.fspath(path))
        # Sized by the file, not the limit: read(limit) would allocate the whole limit.
        return fh.read(min(limit, st.st_size + 1))


def is_regular_file(path: Path) -> bool:
    """Whether ``path`` is a regular file and not a symbolic link.

    Raises:
        FileNotFoundError: it does not exist.
    """
    return stat.S_ISREG(os.lstat(path).st_mode)


def file_mtime(path: Path) -> float:
    return os.lstat(path).st_mtime


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


# ------------------------------------------------------------------------- rollback
#
# rollback(step) moves the checkpoints after ``step`` into a sub-folder of
# ROLLED_BACK_DIR, deleting nothing. Several renames cannot be one atomic step, so the
# decision is committed first, as a durable marker listing the files to move and where;
# readers ignore the files a marker lists, and the next writer to open finishes the moves
# of a rollback that a crash interrupted.

ROLLED_BACK_DIR = "rolled-back"
ROLLBACK_MARKER = ".ckptmgr-rollback.json"
_FOLDER_RE = re.compile(r"after-step-\d{9,20}-\d{8}T\d{6}Z(-\d{1,4})?")


def rollback_folder(directory: Path, step: int, now: float) -> str:
    """A new folder name under ROLLED_BACK_DIR for the checkpoints after ``step``."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    base = f"after-step-{step:09d}-{stamp}"
    name, n = base, 1
    while os.path.lexists(directory / ROLLED_BACK_DIR / name):
        n += 1
        name = f"{base}-{n}"
    return f"{ROLLED_BACK_DIR}/{name}"


def write_rollback_marker(directory: Path, folder: str, names: list[str]) -> None:
    """Commit the decision to move ``names`` into ``folder``: written, fsynced, renamed, directory fsynced.

    Raises:
        CheckpointIOError: an OS error (no marker is left behind).
    """
    body = json.dumps({"version": 1, "folder": folder, "files": names}).encode("utf-8")

    def write(tmp: Path) -> None:
        with open(tmp, "xb") as fh:
            fh.write(body)

    write_atomic(directory, ROLLBACK_MARKER, write)


def read_rollback_marker(directory: Path) -> tuple[str, list[str]] | None:
    """The folder and file names of an unfinished rollback, or None.

    A marker that does not parse, or names anything but plain file names and a folder
    of ours, is ignored (with nothing moved): it cannot send files outside the directory.
    """
    try:
        data = json.loads(read_small(directory / ROLLBACK_MARKER))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    folder, names = data.get("folder"), data.get("files")
    if (
        not isinstance(folder, str)
        or not folder.startswith(ROLLED_BACK_DIR + "/")
        or _FOLDER_RE.fullmatch(folder[len(ROLLED_BACK_DIR) + 1 :]) is None
        or not isinstance(names, list)
        or not all(isinstance(n, str) and (parse_name(n) is not None or _SIDECAR_RE.fullmatch(n)
                                           or _is_payload_name(n)) for n in names)
    ):
        return None
    return folder, names


def _is_payload_name(name: str) -> bool:
    try:
        check_payload_name(name)
    except ValueError:
        return False
    return True


def finish_rollback(directory: Path) -> str | None:
    """Move the files an unfinished rollback lists, then remove its marker; return its folder.

    Each move is a rename within the file system; the folder (and rolled-back/) are made
    durable first, both directories are fsynced after the moves, and only then is the
    marker removed. Files already moved (or gone) are skipped, so a crash anywhere here
    is finished by the next call.

    Raises:
        CheckpointIOError: an OS error; the marker stays and the next writer retries.
    """
    pending = read_rollback_marker(directory)
    if pending is None:
        remove_files(directory, [ROLLBACK_MARKER])
        return None
    folder, names = pending
    target = directory / folder
    ensure_directory(target)
    try:
        for name in names:
            try:
                os.rename(directory / name, target / name)
            except FileNotFoundError:
                continue
        fsync_directory(target)
        fsync_directory(directory)
    except OSError as exc:
        raise io_error("Cannot move checkpoints aside into", target, exc) from exc
    failures = remove_files(directory, [ROLLBACK_MARKER])
    if failures:
        raise io_error("Cannot remove the rollback record", directory / ROLLBACK_MARKER, next(iter(failures.values())))
    return folder


def rolled_back_folders(directory: Path) -> list[Path]:
    """The folders rollbacks set aside in ``directory``, oldest first."""
    try:
        with os.scandir(directory / ROLLED_BACK_DIR) as it:
            names = [e.name for e in it if _FOLDER_RE.fullmatch(e.name) and e.is_dir(follow_symlinks=False)]
    except (FileNotFoundError, NotADirectoryError):
        return []
    except OSError as exc:
        raise io_error("Cannot list", directory / ROLLED_BACK_DIR, exc) from exc
    def when(name: str) -> tuple[str, int]:
        stamp, _, n = name.split("-", 3)[3].partition("-")
        return stamp, int(n or 1)

    return [directory / ROLLED_BACK_DIR / n for n in sorted(names, key=when)]
