"""One writer per directory (invariant 7), in this process and across processes."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import ckptmgr
from ckptmgr import CheckpointError, CheckpointManager, DirectoryLockedError

# A writer that saves step 1, says so, and holds the directory until stdin says stop.
HOLDER = """
import sys, ckptmgr
try:
    mgr = ckptmgr.CheckpointManager(sys.argv[1])
except ckptmgr.DirectoryLockedError:
    print("DirectoryLockedError", flush=True)
    sys.exit(0)
mgr.save(int(sys.argv[2]), {"by": "child"})
print("holding", flush=True)
sys.stdin.readline()
mgr.close()
print("released", flush=True)
"""

# A writer that only tries to open.
TRY_OPEN = """
import sys, ckptmgr
try:
    ckptmgr.CheckpointManager(sys.argv[1]).close()
except ckptmgr.DirectoryLockedError as exc:
    print("DirectoryLockedError:", exc)
else:
    print("opened")
"""


def _returns_promptly(call: Callable[[], Any], seconds: float = 30.0) -> BaseException | None:
    """Run ``call`` in a thread; fail if it blocks. Returns what it raised, if anything."""
    outcome: list[BaseException | None] = []

    def target() -> None:
        try:
            call()
        except BaseException as exc:
            outcome.append(exc)
        else:
            outcome.append(None)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"blocked for {seconds} s instead of failing at once"
    return outcome[0]


@contextlib.contextmanager
def _holder(directory: Path, step: int = 1) -> Iterator[subprocess.Popen[str]]:
    """A child process holding ``directory`` (having saved ``step``); killed at the end."""
    with subprocess.Popen([sys.executable, "-c", HOLDER, str(directory), str(step)], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            assert line == "holding", f"the holder said {line!r}"
            yield proc
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait(60)


def _try_open_in_child(directory: Path) -> str:
    result = subprocess.run([sys.executable, "-c", TRY_OPEN, str(directory)], capture_output=True, text=True,
                            timeout=60, check=True)
    return result.stdout.strip()


def test_second_writer_in_this_process_is_refused_at_once(ckpt_dir: Path) -> None:
    with CheckpointManager(ckpt_dir) as first:
        first.save(1, {"a": 1})
        # A save of the first writer in progress: the refused writer must not touch it.
        in_progress = ckpt_dir / ".ckpt-00112233445566ff.tmp"
        in_progress.write_bytes(b"being written")
        exc = _returns_promptly(lambda: CheckpointManager(ckpt_dir))
        assert isinstance(exc, DirectoryLockedError)
        assert isinstance(exc, CheckpointError) and isinstance(exc, BlockingIOError)
        assert str(ckpt_dir) in str(exc) and "read_only=True" in str(exc)
        assert in_progress.read_bytes() == b"being written"
        # The first writer is unaffected.
        first.save(2, {"a": 2})
        assert [c.step for c in first.checkpoints] == [1, 2]
        in_progress.unlink()
    with CheckpointManager(ckpt_dir) as second:
        assert second.restore() == {"a": 2}


def test_second_writer_in_another_process_is_refused(ckpt_dir: Path) -> None:
    with CheckpointManager(ckpt_dir) as mgr:
        mgr.save(1, {"a": 1})
        out = _try_open_in_child(ckpt_dir)
        assert out.startswith("DirectoryLockedError:") and str(ckpt_dir) in out
        mgr.save(2, {"a": 2})
    assert _try_open_in_child(ckpt_dir) == "opened"


def test_writer_killed_with_sigkill_releases_the_directory(ckpt_dir: Path) -> None:
    with _holder(ckpt_dir) as holder:
        exc = _returns_promptly(lambda: CheckpointManager(ckpt_dir))
        assert isinstance(exc, DirectoryLockedError)
        # Readers need no lock, even while another process writes.
        reader = CheckpointManager(ckpt_dir, read_only=True)
        assert reader.restore() == {"by": "child"}
        holder.send_signal(signal.SIGKILL)
        holder.wait(60)
    assert holder.returncode == -signal.SIGKILL
    assert (ckpt_dir / ".ckptmgr.lock").exists()  # the file stays; the OS dropped the lock
    with CheckpointManager(ckpt_dir) as mgr:
        assert [c.step for c in mgr.checkpoints] == [1]
        mgr.save(2, {"by": "parent"})
    assert reader.restore() == {"by": "parent"}


def test_writer_closing_cleanly_releases_the_directory(ckpt_dir: Path) -> None:
    with _holder(ckpt_dir) as holder:
        assert holder.stdin is not None and holder.stdout is not None
        assert isinstance(_returns_promptly(lambda: CheckpointManager(ckpt_dir)), DirectoryLockedError)
        holder.stdin.write("stop\n")
        holder.stdin.flush()
        assert holder.stdout.readline().strip() == "released"
        holder.wait(60)
    assert holder.returncode == 0
    with CheckpointManager(ckpt_dir) as mgr:
        mgr.save(2, {"by": "parent"})


def test_two_processes_racing_for_an_empty_directory_one_wins(ckpt_dir: Path) -> None:
    with contextlib.ExitStack() as stack:
        procs = [stack.enter_context(subprocess.Popen(
            [sys.executable, "-c", HOLDER, str(ckpt_dir), str(step)], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True)) for step in (1, 2)]
        for p in procs:
            stack.callback(p.wait, 60)
            stack.callback(p.kill)
        said = sorted(p.stdout.readline().strip() for p in procs if p.stdout is not None)
        assert said == ["DirectoryLockedError", "holding"]
    with CheckpointManager(ckpt_dir) as mgr:
        assert len(mgr.checkpoints) == 1


def test_readers_take_no_lock(ckpt_dir: Path) -> None:
    with CheckpointManager(ckpt_dir) as mgr:
        mgr.save(1, {"a": 1})
    (ckpt_dir / ".ckptmgr.lock").unlink(missing_ok=True)
    readers = [CheckpointManager(ckpt_dir, read_only=True) for _ in range(3)]
    assert not (ckpt_dir / ".ckptmgr.lock").exists()
    # A writer opens while readers are open, and readers see its saves.
    with CheckpointManager(ckpt_dir) as writer:
        writer.save(2, {"a": 2})
        assert [r.restore() for r in readers] == [{"a": 2}] * 3
    for r in readers:
        r.close()


def test_refused_writer_leaves_no_lock_behind_in_this_process(ckpt_dir: Path) -> None:
    first = CheckpointManager(ckpt_dir)
    for _ in range(3):
        with pytest.raises(DirectoryLockedError):
            CheckpointManager(ckpt_dir)
    first.close()
    # The refusals did not leave a half-acquired lock that would now block.
    assert _returns_promptly(lambda: CheckpointManager(ckpt_dir).close()) is None
    assert _try_open_in_child(ckpt_dir) == "opened"


def test_lock_error_is_catchable_as_the_builtin() -> None:
    assert issubclass(ckptmgr.DirectoryLockedError, BlockingIOError)
    assert issubclass(ckptmgr.DirectoryLockedError, OSError)


def test_reader_never_sees_partial_data_while_the_writer_saves_and_deletes(ckpt_dir: Path) -> None:
    """A reader restoring over and over while another process saves with aggressive
    retention: every restore is a complete checkpoint, never an error or a warning."""
    from _reliability import PLANS, ChildRun, crash_child, drain, processes

    plan = PLANS["save"]  # KeepLast(2): every save deletes one; 320 KB of arrays a step
    ctx = processes()
    parent, child = ctx.Pipe(duplex=False)
    writer = ctx.Process(target=crash_child, args=(child, str(ckpt_dir), plan.name, {}), daemon=True)
    writer.start()
    child.close()
    run = ChildRun()
    seen = set()
    try:
        deadline = time.monotonic() + 60
        while len(run.promised) < 3 and time.monotonic() < deadline:
            assert drain(parent, run, 1.0), f"the writer stopped: {run.error}"
        assert len(run.promised) >= 3, "the writer did not save"
        reader = CheckpointManager(ckpt_dir, read_only=True)
        for _ in range(40):
            state = reader.restore()
            plan.check_content(reader, state["step"], state)
            seen.add(state["step"])
            latest = reader.latest
            assert latest is not None and latest.step >= state["step"]
        assert writer.is_alive(), f"the writer stopped early: {run.error}"
    finally:
        writer.kill()
        writer.join(60)
        parent.close()
    assert len(seen) > 1  # the writer really moved on while we read
