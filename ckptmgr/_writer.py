"""The save pipeline: a commit runs now (sync) or on one background thread (async).

Sync: ``save()`` encodes the tree, writes and commits it before returning.
Async: ``save()`` encodes the tree once in the caller's thread (validating it, so a bad
tree raises at the call), copies its arrays (into the previous snapshot's arrays where
shapes match: no allocation, so the copy runs at memcpy speed), and returns; the write and commit run on
one background thread, one save at a time. The next ``save()``, ``wait()`` and
``close()`` wait for the write in flight and raise its error; interpreter exit flushes it
(and prints its error on stderr: no caller is left to raise it to).
"""

from __future__ import annotations

import atexit
import sys
import threading
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from . import codec
from .errors import CheckpointError


class SaveWriter:
    """Runs commits, in the foreground or on one background thread."""

    def __init__(self, owner: object, directory: Path | str, *, background: bool) -> None:
        self._directory = directory
        self._executor: ThreadPoolExecutor | None = None
        self._pending: Future[Any] | None = None
        self._in_flight: list[tuple[int, Future[Any]]] = []  # shared with the exit hook
        self._on_failure: Callable[[], None] | None = None
        self.pending_step: int | None = None
        # The last snapshot handed to the background writer; once written, the next
        # snapshot is copied into its arrays (one state's memory stays allocated).
        self._spare: codec.EncodedTree | None = None
        self._result: Any = None  # what the last background job returned, until taken
        if background:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ckptmgr-writer")
            # Flush pending writes at interpreter exit even if close() was never called.
            self._finalizer = weakref.finalize(owner, _flush_at_exit, self._executor, self._in_flight,
                                               directory)
            at_exit(self._finalizer)

    @property
    def background(self) -> bool:
        return self._executor is not None

    def prepare(self, state: Any) -> Any:
        """What the commit will write: for a background write, the tree encoded once
        with private copies of its arrays (raising here if it is not a valid tree)."""
        if self._executor is None:
            return state
        self.wait()
        # The previous snapshot is written (or failed): its arrays take this one.
        spare, self._spare = self._spare, None
        snapshot = codec.encode_tree(state).copied(into=spare)
        self._spare = snapshot
        return snapshot

    def run(
        self, step: int, commit: Callable[[], Any], on_failure: Callable[[], None]
    ) -> Any:
        """Commit now and return its info, or start it in the background and return None.

        ``on_failure`` runs when the commit fails (now, or when the failure surfaces).
        """
        if self._executor is None:
            try:
                return commit()
            except BaseException:
                on_failure()
                raise
        self.wait()
        self._pending = self._executor.submit(commit)
        self.pending_step, self._on_failure = step, on_failure
        self._in_flight[:] = [(step, self._pending)]
        return None

    def poll(self) -> None:
        """Raise a failed background write's error now if it has finished; never block."""
        if self._pending is not None and self._pending.done():
            self.wait()

    def wait(self) -> None:
        """Block until the background write (if any) is committed.

        Raises:
            CheckpointError: it failed.
        """
        pending = self._pending
        if pending is None:
            return
        exc = pending.exception()  # interrupted (Ctrl-C), the write stays pending: its error is not lost
        self._pending = None
        self._in_flight.clear()
        self.pending_step = None
        on_failure, self._on_failure = self._on_failure, None
        if exc is None:
            self._result = pending.result()
            return
        if on_failure is not None:
            on_failure()
        if isinstance(exc, CheckpointError):
            raise exc
        raise CheckpointError(f"Background save to {self._directory} failed: {exc!r}") from exc

    def take_result(self) -> Any:
        """What the last background job that finished returned (once; None after)."""
        result, self._result = self._result, None
        return result

    def shutdown(self) -> None:
        """Stop the background thread (after what is in flight)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._finalizer.detach()
        self._spare = None


def at_exit(function: Callable[[], Any]) -> None:
    """Call ``function`` at interpreter exit while threads can still start work.

    Registered where ``concurrent.futures`` registers its own exit hook (which stops
    every thread pool: an upload to object storage, or anything run in an executor,
    then fails with "cannot schedule new futures after shutdown"), and run before it,
    the later registered running first; ``atexit`` (which runs after it) where that
    hook is missing.
    """
    register = getattr(threading, "_register_atexit", None)
    try:
        if register is None:
            raise RuntimeError("no threading._register_atexit")
        register(function)
    except RuntimeError:  # none here, or the interpreter is already shutting down
        atexit.register(function)


def _flush_at_exit(executor: ThreadPoolExecutor, in_flight: list[tuple[int, Future[Any]]],
                   directory: Path | str) -> None:
    """At interpreter exit (or when the manager is collected unclosed): finish the write
    in flight; if it failed, say so on stderr, the only place left to say it."""
    executor.shutdown(wait=True)
    for step, future in in_flight:
        exc = future.exception()
        if exc is not None:
            print(f"ckptmgr: the background save of step {step} to {directory} failed, and nothing "
                  f"was left to raise it to (close() or wait() were not called): {exc}", file=sys.stderr)
    in_flight.clear()
