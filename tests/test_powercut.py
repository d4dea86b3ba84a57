"""Power cut at any instant: every checkpoint that ``save()`` returned for survives.

A real child process (``_powercut.py``) creates a manager in a directory that does not
exist yet (``ROOT/a/b/runs``), saves six steps with ``KeepLast(2)`` retention across two
manager sessions, and marks each step once ``save()`` (with ``async_save``, ``wait()``)
has returned for it. It runs with an ``LD_PRELOAD`` shim (``powercut/shim.c``, compiled
here) that logs, in order, every file creation, ``mkdir``, rename, unlink and
``fsync``/``fdatasync`` under ROOT, made by Python or by C code (HDF5) alike, and copies
each file's content when it is fsynced. The test then replays the log and, for a power
cut after each logged event, builds the directory tree that survives, opens it with a
reader and with a writer (which recovers), and checks that every step marked returned
before the cut, and not deleted by retention before it, is listed and restores to
exactly what was saved, and that every listed checkpoint restores exactly.

What the simulated file system models (POSIX minimum durability):

- A new or changed directory entry (created file, ``mkdir``, rename, unlink) is durable
  only once its parent directory is fsynced after the change; until then the directory
  keeps the entries of its last fsync. A directory whose own entry is not durable is
  lost with everything in it.
- A file's content is durable as of its last ``fsync``/``fdatasync`` (the content it had
  when the call began); a file never fsynced survives, if its entry does, empty.
- Every cut is also checked under each journal prefix: every entry operation among
  the first ``prefix`` events durable as well, as a journaling file system that
  committed that far on its own would keep them (prefix 0 is the POSIX minimum; prefix
  = the cut keeps all the metadata but the data only as fsynced, like ext4's
  ``data=writeback``).

What it does not model: reordering or partial persistence of data within a file other
than "content as of the last fsync" (no torn writes, no stale blocks in a file never
fsynced, no data the kernel wrote back without an fsync: an unsynced file is empty); a
file system that persists more than the minimum other than the journal prefixes above
(e.g. a later unsynced entry operation kept without an earlier one); metadata such as
size, mode and mtime (the replayed files have fresh ones); ``fsync`` failures; a second
power cut during the recovery of the first (the writer's recovery is checked on the
replayed tree without the shim); operations the shim does not intercept (``link``,
``symlink``, ``O_TMPFILE``, ``sync``/``syncfs``, ``msync``, calls that do not go
through libc's exported functions, such as libc's own ``fopen``); renaming or removing
directories; directories that existed before the test (ROOT itself is taken as
durable).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import _powercut as pc
import pytest

import ckptmgr
from ckptmgr import storage

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="needs LD_PRELOAD and /proc/self/fd (Linux)"
)

SHIM_SOURCE = Path(__file__).parent / "powercut" / "shim.c"
CHILD = Path(__file__).with_name("_powercut.py")
RUNS = Path("a") / "b" / "runs"


@dataclass
class Run:
    """One workload run under the shim: what it saved and the log it left."""

    kind: str
    phases: list[list[int]]
    trace: pc.Trace

    @property
    def steps(self) -> set[int]:
        return {step for phase in self.phases for step in phase}

    def owners(self) -> dict[str, set[int]]:
        """The steps each checkpoint file name belongs to."""
        owners: dict[str, set[int]] = {}
        for step in self.steps:
            if self.kind.startswith("payload"):
                name = pc.payload_name(self.kind, step)
                names = [name, storage.sidecar_name(name)]
            else:
                names = [storage.checkpoint_name(step)]
            for name in names:
                owners.setdefault(name, set()).add(step)
        return owners


@pytest.fixture(scope="module")
def shim(tmp_path_factory: pytest.TempPathFactory) -> Path:
    compiler = next((c for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
    if compiler is None:
        pytest.skip("no C compiler (cc) to build the LD_PRELOAD shim")
    library = tmp_path_factory.mktemp("powercut-shim") / "shim.so"
    proc = subprocess.run(
        [compiler, "-shared", "-fPIC", "-O1", "-o", str(library), str(SHIM_SOURCE), "-ldl"],
        capture_output=True, text=True, check=False,
    )
    assert proc.returncode == 0, f"building {SHIM_SOURCE} failed:\n{proc.stderr}"
    return library


def _run_child(shim: Path, tmp_path: Path, kind: str, phases: str = pc.PHASES) -> Run:
    root = Path(os.path.realpath(tmp_path)) / "root"
    snapshots = tmp_path / "snapshots"
    root.mkdir()
    snapshots.mkdir()
    log = tmp_path / "events.log"
    env = dict(os.environ)
    env.update({
        "LD_PRELOAD": ":".join(filter(None, (str(shim), os.environ.get("LD_PRELOAD")))),
        pc.LOG_ENV: str(log),
        pc.ROOT_ENV: str(root),
        pc.SNAPSHOTS_ENV: str(snapshots),
    })
    proc = subprocess.run(
        [sys.executable, str(CHILD), kind, str(root / RUNS), phases],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, f"child failed:\n{proc.stdout}\n{proc.stderr}"
    run = Run(kind, pc.parse_phases(phases), pc.Trace.load(log, str(root), snapshots))
    _check_trace(run)
    return run


def _check_trace(run: Run) -> None:
    """The log shows what the workload must have done: if it does not, the shim missed it."""
    events = run.trace.events
    made = {e.args[0] for e in events if e.kind == "mkdir"}
    for path in ("a", "a/b", RUNS.as_posix()):
        assert f"{run.trace.root}/{path}" in made, f"no mkdir of {path} logged"
    for kind in ("create", "rename", "fsyncdir"):
        assert any(e.kind == kind for e in events), f"no {kind} logged"
    assert run.trace.marks(len(events))[-1] == f"closed {len(run.phases)}"
    # Retention deletes only what KeepLast allows: a step at least KEEP_LAST below the
    # one being saved (so the per-cut check may excuse a step whose file was deleted).
    owners = run.owners()
    saving = None
    unlinked = 0
    for event in events:
        if event.kind == "mark" and event.args[0].startswith("saving "):
            saving = int(event.args[0].split()[1])
        elif event.kind == "unlink" and os.path.basename(event.args[0]) in owners:
            unlinked += 1
            for step in owners[os.path.basename(event.args[0])]:
                assert saving is not None and step <= saving - pc.KEEP_LAST, f"{event}: deleted while saving {saving}"
    if run.kind != "payload-replace":
        assert unlinked, "retention deleted nothing"


def _expectations(run: Run, cut: int) -> tuple[frozenset[int], int | None]:
    """(steps that must be listed, the newest step returned) after the first ``cut`` events."""
    owners = run.owners()
    returned: set[int] = set()
    retired: set[int] = set()  # deleted by retention, or replaced by a later save
    saving = 0
    for event in run.trace.events[:cut]:
        if event.kind == "mark":
            what, _, step = event.args[0].partition(" ")
            if what == "saving":
                saving = int(step)
            elif what == "returned":
                returned.add(int(step))
        elif event.kind in ("unlink", "rename"):
            name = os.path.basename(event.args[-1])
            retired |= {step for step in owners.get(name, set()) if step < saving}
    return frozenset(returned - retired), max(returned, default=None)


def _check_directory(
    run: Run, directory: Path, required: frozenset[int], newest: int | None,
    tree_equal: Callable[[Any, Any], None],
) -> list[str]:
    """What is wrong with a checkpoint directory that survived a power cut."""
    if not directory.is_dir():
        return [] if newest is None else [f"the checkpoint directory is lost; save() had returned for step {newest}"]
    problems: list[str] = []

    def check_content(who: str, step: int, value: Any) -> None:
        if step not in run.steps:
            problems.append(f"{who}: lists step {step}, never saved")
        elif run.kind.startswith("payload"):
            if not isinstance(value, Path) or value.read_bytes() != pc.payload_for(step):
                problems.append(f"{who}: step {step}'s payload differs from what was saved")
        else:
            try:
                tree_equal(value, pc.state_for(step))
            except AssertionError as exc:
                problems.append(f"{who}: step {step} differs from what was saved: {exc}")

    for who in ("reader", "writer"):  # the writer second: it recovers, changing the directory
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                with ckptmgr.CheckpointManager(
                    directory, read_only=who == "reader", keep=ckptmgr.KeepLast(pc.KEEP_LAST)
                ) as mgr:
                    listed = [c.step for c in mgr.checkpoints]
                    if not required <= set(listed):
                        problems.append(f"{who}: lists {listed}, missing returned {sorted(required - set(listed))}")
                    if run.kind == "payload-replace":
                        # One file name: each save replaces the last. The newest returned
                        # step, or one saved after it, must be there.
                        if newest is not None:
                            value = mgr.restore()
                            assert mgr.restored is not None
                            if mgr.restored.step < newest:
                                problems.append(f"{who}: latest is step {mgr.restored.step}, {newest} had returned")
                            check_content(who, mgr.restored.step, value)
                    else:
                        for step in listed:
                            check_content(who, step, mgr.restore(step))
                    if who == "writer":
                        left = sorted(n for n in os.listdir(directory) if n.startswith(".ckpt-"))
                        if left:
                            problems.append(f"writer: leftovers after recovery: {left}")
            except ckptmgr.CheckpointError as exc:
                problems.append(f"{who}: {type(exc).__name__}: {exc}")
        problems.extend(f"{who}: warning: {w.message}" for w in caught)
    return problems


def _replay(run: Run, tmp_path: Path, tree_equal: Callable[[Any, Any], None]) -> tuple[list[str], int, int]:
    """Check a power cut after each event, under each journal prefix (0 is the POSIX
    minimum); return (failures, cut points checked, distinct directory states opened)."""
    trace = run.trace
    results: dict[Any, list[str]] = {}
    failures: list[str] = []
    cuts = 0
    for cut in range(len(trace.events) + 1):
        required, newest = _expectations(run, cut)
        for prefix in range(cut + 1):
            cuts += 1
            state = trace.durable(cut, prefix)
            key = (tuple(state.items()), required, newest)
            if key not in results:
                where = tmp_path / "cuts" / str(len(results))
                trace.materialize(state, where)
                results[key] = _check_directory(run, where / RUNS, required, newest, tree_equal)
                shutil.rmtree(where)
            after = f"after {trace.events[cut - 1]}".replace(trace.root, "ROOT") if cut else "before the first event"
            failures.extend(f"cut {after} (journal prefix {prefix}): {p}" for p in results[key])
    return failures, cuts, len(results)


def _report(failures: list[str], cuts: int) -> str:
    shown = "\n  ".join(failures[:12])
    more = f"\n  ... and {len(failures) - 12} more" if len(failures) > 12 else ""
    return f"{len(failures)} problems over {cuts} cut points:\n  {shown}{more}"


@pytest.mark.parametrize("kind", pc.KINDS)
def test_every_returned_checkpoint_survives_a_power_cut(
    shim: Path, tmp_path: Path, kind: str, tree_equal: Callable[[Any, Any], None]
) -> None:
    run = _run_child(shim, tmp_path, kind)
    failures, cuts, _states = _replay(run, tmp_path, tree_equal)
    assert not failures, _report(failures, cuts)


@pytest.mark.slow
@pytest.mark.parametrize("kind", pc.KINDS)
def test_every_returned_checkpoint_survives_a_power_cut_in_a_long_run(
    shim: Path, tmp_path: Path, kind: str, tree_equal: Callable[[Any, Any], None]
) -> None:
    """Twenty saves in one session (the index is rewritten after 16), then three sessions."""
    run = _run_child(shim, tmp_path, kind, "1-20,21-22,23,24-25")
    failures, cuts, _states = _replay(run, tmp_path, tree_equal)
    assert not failures, _report(failures, cuts)


def test_the_replay_loses_an_unsynced_directory(tmp_path: Path) -> None:
    """The model itself: a directory whose parent was not fsynced after its mkdir is lost
    with its checkpoint, though the checkpoint and its own directory were fsynced."""
    root = "/r"
    log = tmp_path / "log"
    snapshots = tmp_path / "snaps"
    snapshots.mkdir()
    (snapshots / "1").write_bytes(b"data")
    log.write_text(
        "mkdir\t/r/d\n"
        "create\t1:7\t/r/d/.tmp\n"
        "fsync\t1:7\t1\t/r/d/.tmp\n"
        "rename\t/r/d/.tmp\t/r/d/ckpt\n"
        "fsyncdir\t/r/d\n"
        "mark\treturned 1\n"
        "fsyncdir\t/r\n"
    )
    trace = pc.Trace.load(log, root, snapshots)
    assert trace.durable(6) == {}
    assert trace.durable(6, prefix=6) == {"d": None, "d/ckpt": "1"}
    assert trace.durable(7) == {"d": None, "d/ckpt": "1"}
    assert trace.durable(4, prefix=4) == {"d": None, "d/ckpt": "1"}
    assert trace.durable(3, prefix=3) == {"d": None, "d/.tmp": "1"}
    assert trace.durable(2, prefix=2) == {"d": None, "d/.tmp": ""}
    assert trace.marks(6) == ["returned 1"]
