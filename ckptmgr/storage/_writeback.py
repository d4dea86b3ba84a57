"""Starting the disk on a file's data while it is still being written (Linux)."""

from __future__ import annotations

import ctypes
import errno
import os
import sys
import threading
from collections.abc import Callable
from typing import Any

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
