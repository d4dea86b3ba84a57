"""Processes sharing a directory (invariant 7): readers never see a torn or failed
restore while a writer saves and deletes; writers exclude each other under contention;
a writer killed mid-save hands the directory to the next one at once.

test_lock.py (another harness) has the single-writer lock in and across processes, an
idle holder killed with SIGKILL, and one in-process reader beside a saving child; this
file adds several reader processes (latest, best, by step; native, async and payload
writers), writers contending in a loop, and take-overs after kills inside a save.
"""

from __future__ import annotations

import os
import random
import signal
import warnings
from collections import Counter
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Literal

import pytest
from _reliability import (
    MONITOR,
    PLANS,
    ChildRun,
    Hooks,
    check_writer_view,
    crash_child,
    drain,
    payload_bytes,
    processes,
    reader_child,
    record,
)

import ckptmgr
from ckptmgr import CheckpointManager, CheckpointWarning, DirectoryLockedError, FilePayload

READERS = 3
RESTORES = 100  # per reader, default run; 1,000 with -m slow


def _start_writer(directory: Path, plan_name: str) -> tuple[Any, Connection, ChildRun]:
    ctx = processes()
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=crash_child, args=(child, str(directory), plan_name, {}), daemon=True)
    proc.start()
    child.close()
    return proc, parent, ChildRun()


def _readers_beside_a_writer(tmp_path: Path, plan_name: str, restores: int) -> Counter[str]:
    directory = tmp_path / "run"
    writer, wconn, wrun = _start_writer(directory, plan_name)
    ctx = processes()
    readers = []
    try:
        while len(wrun.promised) < 3:
            assert drain(wconn, wrun, 60.0), f"the writer died: {wrun.error}"
        for n in range(READERS):
            which = ("latest", "each", "best")[n % 3]
            parent, child = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=reader_child, args=(child, str(directory), plan_name, restores, which),
                               daemon=True)
            proc.start()
            child.close()
            readers.append((proc, parent, which))
        reports = []
        for proc, conn, which in readers:
            kind, value = conn.recv()
            assert kind == "ready", value
            kind, value = conn.recv()
            assert kind == "done", f"reader of {which}: {value}"
            reports.append((which, value))
            proc.join(60)
        drain(wconn, wrun)
        assert writer.is_alive(), f"the writer stopped: {wrun.error}"
    finally:
        writer.kill()
        writer.join(60)
        for proc, _, _ in readers:
            if proc.is_alive():
                proc.kill()
                proc.join(60)
    while drain(wconn, wrun, 5.0):
        pass
    counts: Counter[str] = Counter()
    for which, report in reports:
        counts[f"restores of {which}"] += report["restores"]
        counts["stale (deleted after listing or after return)"] += report["stale"]
        key = f"distinct steps seen (most by one '{which}' reader)"
        counts[key] = max(counts[key], report["distinct steps"])
    counts["steps the writer committed meanwhile"] = len(wrun.promised)
    # The writer really moved on while they read: the latest reader saw several steps.
    assert counts["distinct steps seen (most by one 'latest' reader)"] > 1, counts
    check_writer_view(directory, PLANS[plan_name], wrun.promised, Counter())
    return counts


@pytest.mark.parametrize("plan_name", ["retention", "async", "payload", "payload-unique"])
def test_readers_restore_while_a_writer_saves_and_deletes(tmp_path: Path, plan_name: str) -> None:
    counts = _readers_beside_a_writer(tmp_path, plan_name, RESTORES)
    record("concurrency", f"readers[{plan_name}]", counts)


@pytest.mark.slow
@pytest.mark.parametrize("plan_name", ["retention", "async", "payload", "payload-unique", "index"])
def test_readers_restore_while_a_writer_saves_and_deletes_long(tmp_path: Path, plan_name: str) -> None:
    counts = _readers_beside_a_writer(tmp_path, plan_name, 10 * RESTORES)
    record("concurrency", f"readers-long[{plan_name}]", counts)


# ------------------------------------------- races made deterministic in-process


@pytest.mark.parametrize("which", [
    "latest",
    "best",
])
def test_restore_racing_retention(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  which: Literal["latest", "best"]) -> None:
    """The writer saves a new best and its retention deletes the old one exactly between
    the reader's listing and its read."""
    from ckptmgr import codec

    directory = tmp_path / "run"
    writer = CheckpointManager(directory, keep=ckptmgr.KeepLast(1), monitor=MONITOR)
    writer.save(1, {"s": 1}, metrics={MONITOR: 0.5})
    reader = CheckpointManager(directory, read_only=True)
    real = codec.read_file
    raced: list[int] = []

    def read_file(path: Any, *args: Any, **kwargs: Any) -> Any:
        if not raced:
            raced.append(1)
            writer.save(2, {"s": 2}, metrics={MONITOR: 0.1})  # the new latest and best; 1 is deleted
        return real(path, *args, **kwargs)

    monkeypatch.setattr(codec, "read_file", read_file)
    assert reader.restore(which) == {"s": 2}
    assert raced and [c.step for c in reader.checkpoints] == [2]
    writer.close()


def test_restore_racing_retention_while_listing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer replaces the only checkpoint (KeepLast(1)) while a reader lists it."""
    from ckptmgr import codec

    directory = tmp_path / "run"
    writer = CheckpointManager(directory, keep=ckptmgr.KeepLast(1))
    writer.save(1, {"s": 1})
    reader = CheckpointManager(directory, read_only=True)
    real = codec.read_meta
    raced: list[int] = []

    def read_meta(path: Any, *args: Any, **kwargs: Any) -> Any:
        if not raced:
            raced.append(1)
            writer.save(2, {"s": 2})  # 1 is deleted before the reader reads its metadata
        return real(path, *args, **kwargs)

    monkeypatch.setattr(codec, "read_meta", read_meta)
    assert reader.restore() == {"s": 2}
    writer.close()


# -------------------------------------------------- a replaced payload, mid-commit


def _pause_between_renames(conn: Connection, go: Connection, directory: str) -> None:
    """Save step 2 as the payload that replaces step 1's file, stopping after the payload
    was renamed and before its metadata is (until the parent says go)."""
    path = Path(directory)
    hooks = Hooks(path)

    def after(n: int, label: str) -> None:
        if label == "rename payload-tmp>payload":
            conn.send("between")
            go.recv()

    hooks.after = after
    hooks.install(setattr)
    with CheckpointManager(path, monitor=MONITOR) as mgr:
        mgr.save(2, FilePayload("model.bin", lambda p: p.write_bytes(payload_bytes(2))), metrics={MONITOR: 0.5})
    conn.send("committed")


def test_a_reader_between_the_two_renames_of_a_replaced_payload(tmp_path: Path) -> None:
    directory = tmp_path / "run"
    with CheckpointManager(directory, monitor=MONITOR) as mgr:
        mgr.save(1, FilePayload("model.bin", lambda p: p.write_bytes(payload_bytes(1))), metrics={MONITOR: 0.9})
    ctx = processes()
    parent, child = ctx.Pipe(duplex=False)
    go_parent, go_child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_pause_between_renames, args=(child, go_parent, str(directory)), daemon=True)
    proc.start()
    child.close()
    try:
        assert parent.recv() == "between"
        reader = CheckpointManager(directory, read_only=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                value = reader.restore()
            except ckptmgr.CorruptCheckpointError as exc:
                raise AssertionError(f"a reader failed while the writer replaced the payload: {exc}") from None
        assert [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)] == []
        assert value.read_bytes() in (payload_bytes(1), payload_bytes(2))
    finally:
        go_child.send("go")
        assert parent.recv() == "committed"
        proc.join(60)


# ---------------------------------------------------------- contending writers


def _contender(conn: Connection, go: Connection, directory: str, worker: int, wins: int) -> None:
    """Try to become the writer until having saved ``wins`` times; while holding the
    lock, own a marker file created exclusively (two holders at once would collide)."""
    counts: Counter[str] = Counter()
    saved: list[tuple[int, int]] = []  # (step, n)
    marker = Path(directory) / "holder.marker"
    try:
        go.recv()
        while counts["acquired"] < wins:
            try:
                mgr = CheckpointManager(directory)
            except DirectoryLockedError:
                counts["refused"] += 1
                continue
            with mgr:
                counts["acquired"] += 1
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)  # FileExistsError: two writers
                os.close(fd)
                for _ in range(2):
                    # Steps only move forward in a directory: each holder continues the run.
                    step = mgr.latest.step + 1 if mgr.latest is not None else 0
                    mgr.save(step, {"worker": worker, "n": len(saved)})
                    saved.append((step, len(saved)))
                os.unlink(marker)
        conn.send(("done", (dict(counts), saved)))
    except BaseException:
        import traceback

        conn.send(("error", traceback.format_exc()))


def test_writers_contending_for_a_directory_exclude_each_other(tmp_path: Path) -> None:
    directory = tmp_path / "run"
    CheckpointManager(directory).close()
    ctx = processes()
    workers = []
    for worker in range(3):
        parent, child = ctx.Pipe(duplex=False)
        go_parent, go_child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=_contender, args=(child, go_parent, str(directory), worker + 1, 4), daemon=True)
        proc.start()
        child.close()
        workers.append((proc, parent, go_child))
    for _, _, go in workers:
        go.send("go")
    counts: Counter[str] = Counter()
    saved: dict[int, dict[str, int]] = {}
    for worker, (proc, conn, _) in enumerate(workers, 1):
        kind, value = conn.recv()
        assert kind == "done", value
        for key, n in value[0].items():
            counts[key] += n
        for step, n in value[1]:
            assert step not in saved, f"step {step} saved by two writers"
            saved[step] = {"worker": worker, "n": n}
        proc.join(60)
    with CheckpointManager(directory) as mgr:
        assert sorted(c.step for c in mgr.checkpoints) == sorted(saved) == list(range(len(saved)))
        for step, expected in saved.items():
            assert mgr.restore(step) == expected
    assert counts["acquired"] == 12
    record("concurrency", "contending-writers", {**counts, "checkpoints, all verified": len(saved)})


# ------------------------------------------------ take-over after a killed writer


def _successor(conn: Connection, go: Connection, directory: str, plan_name: str) -> None:
    """Be refused while the writer lives; when told, take over at the first try, check
    the directory, save the next step."""
    plan = PLANS[plan_name]
    try:
        try:
            plan.open(directory).close()
        except DirectoryLockedError:
            conn.send(("refused", None))
        else:
            conn.send(("error", "opened while the writer was alive"))
            return
        go.recv()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            mgr = plan.open(directory)
        with mgr:
            last = mgr.latest.step if mgr.latest is not None else 0
            if last:
                plan.check_content(mgr, last, mgr.restore())
            plan.save(mgr, last + 1)
        conn.send(("done", last + 1))
    except BaseException:
        import traceback

        conn.send(("error", traceback.format_exc()))


def _take_overs(tmp_path: Path, plan_name: str, cycles: int, seed: int) -> Counter[str]:
    rng = random.Random(seed)
    ctx = processes()
    directory = tmp_path / plan_name
    counts: Counter[str] = Counter()
    promised: set[int] = set()
    for _ in range(cycles):
        writer, wconn, wrun = _start_writer(directory, plan_name)
        while wrun.ready is None:
            assert drain(wconn, wrun, 60.0), f"the writer died: {wrun.error}"
        parent, child = ctx.Pipe(duplex=False)
        go_parent, go_child = ctx.Pipe(duplex=False)
        successor = ctx.Process(target=_successor, args=(child, go_parent, str(directory), plan_name), daemon=True)
        successor.start()
        child.close()
        kind, value = parent.recv()
        assert kind == "refused", value
        # Kill the writer inside its save loop: after a few saves, at a random moment.
        wanted = len(wrun.promised) + rng.randint(1, 3)
        while len(wrun.promised) < wanted:
            assert drain(wconn, wrun, 60.0), f"the writer died: {wrun.error}"
        if wconn.poll(rng.uniform(0.0, 0.03)):
            drain(wconn, wrun)
        writer.kill()  # SIGKILL
        writer.join(60)
        assert writer.exitcode == -signal.SIGKILL
        while drain(wconn, wrun, 5.0):
            pass
        promised |= wrun.promised
        go_child.send("go")
        kind, value = parent.recv()
        assert kind == "done", value
        successor.join(60)
        promised.add(value)
        counts["writers killed mid-save"] += 1
        counts["take-overs at the first try"] += 1
    check_writer_view(directory, PLANS[plan_name], promised, counts)
    return counts


@pytest.mark.parametrize("plan_name", ["native", "async", "payload"])
def test_a_writer_killed_mid_save_hands_over_at_once(tmp_path: Path, plan_name: str) -> None:
    counts = _take_overs(tmp_path, plan_name if plan_name != "async" else "native-async", 10, 7)
    record("concurrency", f"take-over[{plan_name}]", counts)

