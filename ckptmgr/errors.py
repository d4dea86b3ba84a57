"""Exceptions and warnings raised by ckptmgr.

Every exception derives from :class:`CheckpointError`; the leaves also derive from
the builtin that describes them best, so callers can catch either::

    Exception
     └── CheckpointError
          ├── CheckpointNotFoundError (also FileNotFoundError)
          ├── CorruptCheckpointError  (also ValueError)
          ├── DirectoryLockedError    (also BlockingIOError)
          ├── StepOrderError          (also ValueError)
          ├── CoordinatorError        (also TimeoutError)
          └── CheckpointIOError       (also OSError)
               └── ObjectStoreError

    UserWarning
     └── CheckpointWarning
          └── MissingMetricWarning

Errors that come from the operating system (disk full, permission denied, read-only
file system, I/O error) are raised as :class:`CheckpointIOError`, whose message names
the path and the cause and whose ``__cause__`` is the original :class:`OSError`.
Failures of an object store (``s3://``) are raised as :class:`ObjectStoreError`, whose
``path`` is the object's or the location's URL.
"""

from __future__ import annotations

import errno as _errno
import os


class CheckpointError(Exception):
    """Root of every exception raised by ckptmgr."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """The requested checkpoint (or any checkpoint at all) does not exist."""


class CorruptCheckpointError(CheckpointError, ValueError):
    """A checkpoint exists but fails verification (checksum, structure or metadata)."""


class DirectoryLockedError(CheckpointError, BlockingIOError):
    """Another writer (a live process, or a manager open in this one) holds the lock.

    ``lock_path`` is the lock file, or None where the lock is not a file.
    """

    def __init__(self, message: str, *, lock_path: str | os.PathLike[str] | None = None) -> None:
        super().__init__(message)
        self.lock_path = None if lock_path is None else os.fspath(lock_path)


class StepOrderError(CheckpointError, ValueError):
    """``save(step)`` below the directory's latest checkpoint: steps only move forward.

    Raised before anything is written. Resume the run with ``restore()``, or continue
    from an earlier step with ``rollback(step)``, which sets the later checkpoints aside.
    ``step`` is the step asked for, ``latest`` the directory's latest.
    """

    def __init__(self, message: str, *, step: int, latest: int) -> None:
        super().__init__(message)
        self.step = step
        self.latest = latest


class CoordinatorError(CheckpointError, TimeoutError):
    """The processes of a job could not agree: a peer died, stalled past the
    coordinator's timeout, or failed its part of a save or restore.

    Raised on every surviving rank, within the coordinator's timeout; nothing partial
    becomes visible (a step is committed only once every part is durable).
    """


class CheckpointIOError(CheckpointError, OSError):
    """An operating-system error while reading or writing a checkpoint.

    ``path`` is the file or directory involved; ``errno`` and ``strerror`` are those of
    the underlying :class:`OSError` (also available as ``__cause__``).
    """

    def __init__(self, message: str, path: str | os.PathLike[str], cause: OSError) -> None:
        super().__init__(cause.errno or _errno.EIO, message)
        self.filename = os.fspath(path)
        self.path = self.filename

    def __str__(self) -> str:
        return str(self.strerror)


class ObjectStoreError(CheckpointIOError):
    """A request to an object store (``s3://``) failed: no such bucket, access denied,
    server unreachable, timed out, throttled, connection dropped, ...

    The message names the URL and the cause in plain words; ``path`` is the URL of the
    object or of the location. ``errno`` says which cause, for code that must tell them
    apart: ``ENOENT`` no such bucket (or object), ``EACCES`` access denied or bad
    credentials, ``ECONNREFUSED`` connection refused, ``ETIMEDOUT`` timed out,
    ``ECONNRESET`` connection dropped, ``EAGAIN`` throttled, ``ESTALE`` the object changed
    while being read, ``EIO`` anything else. ``__cause__`` is an :class:`OSError` with
    that errno; the client library's own exception is its ``__context__``.
    """


class CheckpointWarning(UserWarning):
    """Something was wrong but ckptmgr recovered (a corrupt checkpoint was skipped,
    a metric was missing or not finite, a leftover could not be removed, ...)."""


class MissingMetricWarning(CheckpointWarning):
    """``save()`` got metrics without the monitored one (filter this category to silence it)."""


def describe_os_error(exc: OSError) -> str:
    """A short cause for an OSError, e.g. ``"No space left on device (ENOSPC)"``."""
    name = _errno.errorcode.get(exc.errno or 0)
    text = exc.strerror or str(exc) or type(exc).__name__
    return f"{text} ({name})" if name else text
