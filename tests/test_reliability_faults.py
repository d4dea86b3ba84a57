"""OS errors, injected at every call of a save and met on real file systems (invariant 9).

The fault harness. An OS error surfaces as a :class:`CheckpointIOError` (a
CheckpointError and an OSError) naming the path and the cause; no earlier checkpoint is
touched; the manager stays usable.

- Injected. Every call a save makes on the checkpoint directory's files goes through
  :class:`_reliability.Hooks` (patched ``os`` functions and the ``open`` of codec and
  storage): each open, write, fsync, rename and unlink is labelled, and a test makes
  exactly one of them fail with EIO, EACCES or ENOSPC, for a native and for a payload
  checkpoint, with ``async_save`` off and on. Whatever call fails, the save either
  raises a :class:`CheckpointIOError` naming the checkpoint and the cause and leaves
  nothing behind, or (a retention delete) commits and warns; nothing earlier is touched,
  the manager's view matches the disk, and the manager saves again at once. Named cases
  through the same hooks follow: the commit's rename or every fsync failing (EROFS
  too), the clean-up failing, a retention delete failing, a failed save and the best.
- Real file systems: a full tmpfs (ENOSPC) under native and payload saves, sync and
  async; a read-only remount (EROFS) and a read-only bind mount beside a live writer.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import traceback
import warnings
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import pytest
from _reliability import (
    MONITOR,
    Hooks,
    copy_directory,
    listing,
    payload_bytes,
    record,
    snapshot,
    state_for,
    writes,
)
from _trees import assert_tree_equal

import ckptmgr
from ckptmgr import (
    CheckpointError,
    CheckpointIOError,
    CheckpointManager,
    CheckpointWarning,
    FilePayload,
    KeepLast,
)

Listing = Callable[[Path], list[str]]  # the checkpoint_files and temp_files fixtures

ERRNOS = [errno.EIO, errno.EACCES, errno.ENOSPC]
METRICS = {1: 0.5, 2: 0.4, 3: 0.3, 4: 0.2, 5: 0.1}


def _checkpoint(kind: str, step: int, content: int | None = None) -> Any:
    """Step ``step``'s checkpoint, holding ``content``'s state (a step saved again: other bytes)."""
    content = step if content is None else content
    if kind == "native":
        return state_for(content, 300)
    data = payload_bytes(content, 5000)
    return FilePayload(f"model-{step}.bin", lambda path: path.write_bytes(data))


def _check_content(mgr: CheckpointManager, kind: str, step: int, content: int | None = None) -> None:
    value = mgr.restore(step)
    content = step if content is None else content
    if kind == "native":
        assert_tree_equal(value, state_for(content, 300))
    else:
        assert value.read_bytes() == payload_bytes(content, 5000)


def _open(directory: Path, mode: str) -> CheckpointManager:
    return CheckpointManager(directory, keep=KeepLast(2), monitor=MONITOR, async_save=mode == "async")


def _save(mgr: CheckpointManager, kind: str, step: int, content: int | None = None) -> None:
    mgr.save(step, _checkpoint(kind, step, content), metrics={MONITOR: METRICS[step]})
    mgr.wait()


# The save under test: step 3 (new), or step 2 saved again with step 3's bytes.
SAVES = {"new": (3, 3), "again": (2, 3)}


def _ours(directory: Path) -> set[str]:
    """The checkpoint files (payloads and their sidecars included) in ``directory``."""
    return {n for n in listing(directory) if not n.startswith(".ckpt") and n != ".ckptmgr.lock"}


def _disk_steps(directory: Path) -> list[int]:
    with CheckpointManager(directory, read_only=True) as reader:
        return [c.step for c in reader.checkpoints]


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Directories holding steps 1 and 2 (step 1 is due for deletion at the next save)."""
    out = {}
    for kind in ("native", "payload"):
        directory = tmp_path_factory.mktemp(kind) / "run"
        with _open(directory, "sync") as mgr:
            for step in (1, 2):
                _save(mgr, kind, step)
        out[kind] = directory
    return out


def _hooks(directory: Path, monkeypatch: pytest.MonkeyPatch) -> Hooks:
    hooks = Hooks(directory, writes="calls", opens=True)
    hooks.install(lambda obj, name, value: monkeypatch.setattr(obj, name, value, raising=False))
    return hooks


def _trace(template: Path, work: Path, kind: str, mode: str, save: str = "new") -> list[str]:
    directory = copy_directory(template, work)
    with _open(directory, mode) as mgr, pytest.MonkeyPatch.context() as patch:
        hooks = _hooks(directory, patch)
        _save(mgr, kind, *SAVES[save])
        labels = list(hooks.labels)
    return labels


def _targets(labels: list[str]) -> list[int]:
    """Every call, except that of HDF5's many writes to the file only the first, one in
    the middle and the last fail (each write fails the same way; the rest add time)."""
    hdf5_writes = [n for n, label in enumerate(labels) if label == "write tmp"]
    sampled = {hdf5_writes[0], hdf5_writes[len(hdf5_writes) // 2], hdf5_writes[-1]} if hdf5_writes else set()
    return [n for n, label in enumerate(labels) if label != "write tmp" or n in sampled]


def _fail_calls(code: int, *labels: str) -> Callable[[int, str, str], None]:
    """A ``before`` hook: every call whose label starts with one of ``labels`` fails with ``code``."""

    def before(n: int, label: str, path: str) -> None:
        if label.startswith(labels):
            raise OSError(code, os.strerror(code), path)

    return before


def _injecting(directory: Path, patch: pytest.MonkeyPatch, code: int, *labels: str) -> Hooks:
    """Hooks on ``directory`` that fail the calls labelled ``labels`` with ``code``."""
    hooks = _hooks(directory, patch)
    hooks.before = _fail_calls(code, *labels)
    return hooks


def _fail_at(target: int, code: int, *, cleanup_fails: bool) -> Callable[[int, str, str], None]:
    failed: list[int] = []

    def before(n: int, label: str, path: str) -> None:
        if label.startswith("index "):
            return  # the index update as a whole: the calls inside it are the faults
        if n == target or (cleanup_fails and failed and label.startswith("unlink")):
            failed.append(n)
            raise OSError(code, os.strerror(code), path)

    return before


def _one_fault(template: Path, directory: Path, kind: str, mode: str, target: int, label: str, code: int,
               *, cleanup_fails: bool, findings: Counter[str], save: str = "new") -> None:
    copy_directory(template, directory)
    mgr = _open(directory, mode)
    before_files = snapshot(directory, sorted(_ours(directory) - {".ckptmgr-index.json"}))
    step, content = SAVES[save]
    new_path = directory / (f"model-{step}.bin" if kind == "payload" else f"ckpt-{step:09d}.h5")
    error: CheckpointIOError | None = None
    with pytest.MonkeyPatch.context() as patch, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        hooks = _hooks(directory, patch)
        hooks.before = _fail_at(target, code, cleanup_fails=cleanup_fails)
        try:
            _save(mgr, kind, step, content)
        except CheckpointIOError as exc:
            error = exc
    assert hooks.labels[target] == label, f"the save took another path: {hooks.labels}"
    steps = [c.step for c in mgr.checkpoints]
    if error is not None:
        # The save failed: it says where and why, and left nothing.
        assert error.errno == code, error
        assert str(new_path) in str(error) and errno.errorcode[code] in str(error), str(error)
        assert isinstance(error.__cause__, OSError) and error.__cause__.errno == code
        assert steps == [1, 2], f"the manager lists {steps} after a failed save"
        assert snapshot(directory, sorted(before_files)) == before_files, "an earlier checkpoint changed"
        left = sorted(_ours(directory) - set(before_files) - {".ckptmgr-index.json"})
        left += [n for n in listing(directory) if n.startswith(".ckpt-")]
        # Only when removing them failed too may files of the failed save stay behind.
        assert left == [] or cleanup_fails, f"left behind: {left}"
        findings["failed with CheckpointIOError"] += 1
        findings["left behind (clean-up failing too), handled at the next open"] += bool(left)
    elif save == "again" and label.startswith(("link", "unlink tmp")):
        # Committed. What failed is giving the replaced file a second name until the
        # commit is durable (only needed were that to fail too), or removing it then (a
        # leftover the next open removes: checked below).
        assert steps == [1, 2], steps
        _check_content(mgr, kind, step, content)
        findings["committed; the replaced file's second name failed, or its removal"] += 1
    else:
        # Committed; only deleting what retention let go may fail, and that warns.
        messages = [str(w.message) for w in caught if issubclass(w.category, CheckpointWarning)]
        assert label.startswith(("unlink", "fsync dir", "open dir")) and messages, (
            f"{label} failed with {errno.errorcode[code]} and the save neither raised nor warned"
        )
        assert any("cannot delete" in m for m in messages), messages
        assert 3 in steps and 2 in steps, steps
        assert snapshot(directory, [n for n in before_files if "2" in n]) == {
            n: v for n, v in before_files.items() if "2" in n
        }
        findings["committed with a CheckpointWarning"] += 1
    assert [w for w in caught if not issubclass(w.category, CheckpointWarning)] == []
    # The manager's view is the disk's, and it saves again at once.
    if not cleanup_fails:
        assert steps == _disk_steps(directory), f"manager {steps}, disk {_disk_steps(directory)}"
    _save(mgr, kind, 4)
    assert [c.step for c in mgr.checkpoints][-1] == 4
    _check_content(mgr, kind, 4)
    mgr.close()
    with _open(directory, "sync") as again:
        assert [n for n in listing(directory) if n.startswith(".ckpt-")] == []
        for info in again.checkpoints:
            _check_content(again, kind, info.step, content if error is None and info.step == step else None)
        assert again.latest is not None and again.latest.step == 4
    findings["usable afterwards"] += 1


@pytest.mark.parametrize("save", list(SAVES))
@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("kind", ["native", "payload"])
def test_every_call_of_a_save_failing(templates: dict[str, Path], tmp_path: Path, kind: str, mode: str,
                                      save: str) -> None:
    """A new step, or the latest step saved again (replacing it): whatever call fails, the
    earlier checkpoints, the replaced one included, are as they were."""
    labels = _trace(templates[kind], tmp_path / "trace", kind, mode, save)
    ops = Counter(label.split()[0] for label in labels)
    assert {"open", "write", "fsync", "rename", "unlink"} <= set(ops), labels
    assert ("link" in ops) == (save == "again"), labels
    findings: Counter[str] = Counter()
    failures = []
    for target in _targets(labels):
        label = labels[target]
        for code in ERRNOS:
            directory = tmp_path / f"{target}-{code}"
            try:
                _one_fault(templates[kind], directory, kind, mode, target, label, code, cleanup_fails=False,
                           findings=findings, save=save)
            except AssertionError as exc:
                failures.append(f"{label} (call {target}) failing with {errno.errorcode[code]}: {exc}")
            findings["faults injected"] += 1
            findings[f"injected: {label.split()[0]}"] += 1
            findings[f"injected: {errno.errorcode[code]}"] += 1
    assert failures == [], "\n".join(failures)
    record("faults", f"every-call[{kind}-{mode}]" + ("" if save == "new" else "-again"),
           {"calls": len(labels), **findings})


@pytest.mark.parametrize("mode", ["sync", "async"])
@pytest.mark.parametrize("kind", ["native", "payload"])
def test_every_call_failing_with_the_clean_up_failing_too(templates: dict[str, Path], tmp_path: Path, kind: str,
                                                          mode: str) -> None:
    """The first fault, then every unlink: the error still names the first cause, the
    leftover is never listed, and the next writer removes it."""
    labels = _trace(templates[kind], tmp_path / "trace", kind, mode)
    findings: Counter[str] = Counter()
    failures = []
    for target in _targets(labels):
        label = labels[target]
        if label.startswith("unlink"):
            continue
        try:
            _one_fault(templates[kind], tmp_path / f"{target}", kind, mode, target, label, errno.EIO,
                       cleanup_fails=True, findings=findings)
        except AssertionError as exc:
            failures.append(f"{label} (call {target}) failing, then every unlink: {exc}")
        findings["faults injected"] += 1
        findings[f"injected: {label.split()[0]}"] += 1
    assert failures == [], "\n".join(failures)
    assert findings["left behind (clean-up failing too), handled at the next open"] > 0
    record("faults", f"clean-up-failing-too[{kind}-{mode}]", findings)


@pytest.mark.parametrize("code", ERRNOS, ids=[errno.errorcode[c] for c in ERRNOS])
def test_index_update_failing_is_harmless(templates: dict[str, Path], tmp_path: Path, code: int) -> None:
    """The index is a cache: a failure to write it loses nothing and leaves nothing."""
    def close_with(target: int | None, directory: Path) -> list[str]:
        mgr = _open(directory, "sync")
        _save(mgr, "native", 3)
        with pytest.MonkeyPatch.context() as patch:
            hooks = _hooks(directory, patch)
            if target is not None:
                hooks.before = _fail_at(target, code, cleanup_fails=False)
            mgr.close()  # writes the index
        return hooks.labels

    labels = close_with(None, copy_directory(templates["native"], tmp_path / "trace"))
    writes = [n for n, label in enumerate(labels) if label == "write index-tmp"]
    targets = [labels.index("open index-tmp"), writes[0], writes[-1], labels.index("rename index-tmp>index")]
    for target in targets:
        directory = copy_directory(templates["native"], tmp_path / f"{target}")
        assert close_with(target, directory)[target] == labels[target]
        assert [n for n in listing(directory) if n.startswith(".ckpt-")] == []
        with _open(directory, "sync") as again:
            assert [c.step for c in again.checkpoints] == [2, 3]
            _check_content(again, "native", 3)
    labels_seen = [labels[t] for t in targets]
    record("faults", f"index-update[{errno.errorcode[code]}]", {
        "faults injected": len(labels_seen), **Counter(f"injected: {label.split()[0]}" for label in labels_seen)})


# --------------------------------------------------------------- named injected cases


INJECTED = [
    pytest.param("rename tmp>ckpt", errno.EACCES, id="replace-EACCES"),
    pytest.param("rename tmp>ckpt", errno.EIO, id="replace-EIO"),
    pytest.param("rename tmp>ckpt", errno.EROFS, id="replace-EROFS"),
    pytest.param("fsync", errno.EIO, id="fsync-EIO"),
    pytest.param("fsync", errno.ENOSPC, id="fsync-ENOSPC"),
]


@pytest.mark.parametrize(("calls", "code"), INJECTED)
def test_injected_write_errors(ckpt_dir: Path, checkpoint_files: Listing, temp_files: Listing, calls: str,
                               code: int) -> None:
    """The commit's rename, or every fsync, failing: the error names the checkpoint and
    the cause; nothing earlier is touched (not even by retention), nothing is left."""
    name = errno.errorcode[code]
    with CheckpointManager(ckpt_dir, keep=KeepLast(2), monitor="val_loss") as mgr:
        mgr.save(1, state_for(1, 1000), metrics={"val_loss": 0.5})
        mgr.save(2, state_for(2, 1000), metrics={"val_loss": 0.6})
        before = snapshot(ckpt_dir, checkpoint_files(ckpt_dir))
        with pytest.MonkeyPatch.context() as patch:
            _injecting(ckpt_dir, patch, code, calls)
            with pytest.raises(CheckpointIOError) as excinfo:
                mgr.save(3, state_for(3, 1000), metrics={"val_loss": 0.7})
        exc = excinfo.value
        path = str(ckpt_dir / "ckpt-000000003.h5")
        assert exc.errno == code and exc.filename == path
        assert path in str(exc) and name in str(exc)
        assert isinstance(exc.__cause__, OSError) and exc.__cause__.errno == code
        # Nothing earlier was touched (not even by retention), nothing was left behind.
        assert snapshot(ckpt_dir, checkpoint_files(ckpt_dir)) == before
        assert temp_files(ckpt_dir) == []
        assert [c.step for c in mgr.checkpoints] == [1, 2]
        # Usable again: the retried save commits and retention resumes.
        mgr.save(3, state_for(3, 1000), metrics={"val_loss": 0.7})
        mgr.save(4, state_for(4, 1000), metrics={"val_loss": 0.8})
        assert [c.step for c in mgr.checkpoints] == [1, 3, 4]
        assert_tree_equal(mgr.restore(), state_for(4, 1000))
        assert_tree_equal(mgr.restore("best"), state_for(1, 1000))


def test_cleanup_failure_leaves_a_leftover_that_the_next_open_removes(ckpt_dir: Path, temp_files: Listing) -> None:
    with CheckpointManager(ckpt_dir) as mgr:
        mgr.save(1, state_for(1, 1000))
        with pytest.MonkeyPatch.context() as patch:
            hooks = _injecting(ckpt_dir, patch, errno.EIO, "rename tmp>ckpt", "unlink tmp")
            with pytest.raises(CheckpointIOError, match="EIO"):
                mgr.save(2, state_for(2, 1000))
        assert "unlink tmp" in hooks.labels
        assert len(temp_files(ckpt_dir)) == 1  # the temporary file could not be removed
        assert [c.step for c in mgr.checkpoints] == [1]
        # The leftover is never mistaken for a checkpoint.
        assert_tree_equal(mgr.restore(), state_for(1, 1000))
    with CheckpointManager(ckpt_dir) as mgr:
        assert temp_files(ckpt_dir) == []
        assert [c.step for c in mgr.checkpoints] == [1]


def test_retention_delete_failure_warns_and_is_retried(ckpt_dir: Path, checkpoint_files: Listing) -> None:
    with CheckpointManager(ckpt_dir, keep=KeepLast(1)) as mgr:
        mgr.save(1, state_for(1, 1000))
        with pytest.MonkeyPatch.context() as patch:
            _injecting(ckpt_dir, patch, errno.EACCES, "unlink ckpt")
            with pytest.warns(CheckpointWarning, match=r"cannot delete .*ckpt-000000001\.h5.*Permission denied"):
                info = mgr.save(2, state_for(2, 1000))
        assert info is not None  # the save itself succeeded
        reasons = {c.step: c.keep_reasons for c in mgr.checkpoints}
        assert reasons[2] == ("latest", "last 1")
        assert len(reasons[1]) == 1 and reasons[1][0].startswith("not deleted:")
        mgr.save(3, state_for(3, 1000))
        assert [c.step for c in mgr.checkpoints] == [3]
    assert checkpoint_files(ckpt_dir) == ["ckpt-000000003.h5"]


def test_directory_that_cannot_be_created(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(CheckpointIOError, match=str(blocker)):
        CheckpointManager(blocker)
    with pytest.raises(CheckpointIOError, match=str(blocker / "sub")):
        CheckpointManager(blocker / "sub")

    def mkdir(path: Any, *args: Any, **kwargs: Any) -> None:  # the directory is not there to hook
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))

    monkeypatch.setattr(os, "mkdir", mkdir)
    with pytest.raises(CheckpointIOError, match="EROFS") as excinfo:
        CheckpointManager(tmp_path / "new")
    assert excinfo.value.errno == errno.EROFS and str(tmp_path / "new") in str(excinfo.value)


def test_failed_save_does_not_count_as_best(ckpt_dir: Path) -> None:
    with CheckpointManager(ckpt_dir, monitor="val_loss", best_only=True) as mgr:
        mgr.save(1, state_for(1, 1000), metrics={"val_loss": 0.5})
        with pytest.MonkeyPatch.context() as patch:
            _injecting(ckpt_dir, patch, errno.EIO, "rename tmp>ckpt")
            with pytest.raises(CheckpointIOError):
                mgr.save(2, state_for(2, 1000), metrics={"val_loss": 0.3})
        # Retrying the step saves it: no checkpoint holds that value yet, so it still improves.
        assert mgr.save(2, state_for(2, 1000), metrics={"val_loss": 0.3}) is not None
        assert mgr.best is not None and mgr.best.step == 2


@pytest.mark.parametrize("how", ["bad tree (async)", "payload writer raising", "bad tree (sync)"])
def test_a_save_failing_before_its_write_does_not_count_as_best_or_as_saved(ckpt_dir: Path, how: str) -> None:
    """Failures in save() itself, before any write: the step is not the best (best_only
    would never save that model again) and an EverySeconds schedule still counts from
    the last checkpoint saved."""
    now = [100.0]
    with CheckpointManager(ckpt_dir, monitor="val_loss", best_only=True, save_every=ckptmgr.EverySeconds(60),
                           async_save=how.endswith("(async)"), clock=lambda: now[0]) as mgr:
        mgr.save(1, state_for(1, 100), metrics={"val_loss": 0.5})
        mgr.wait()
        now[0] = 200.0
        if how == "payload writer raising":
            def write(path: Path) -> None:
                raise RuntimeError("the framework's save failed")

            bad: Any = FilePayload("model.bin", write)
        else:
            bad = {"w": object()}
        with pytest.raises((RuntimeError, TypeError)):
            mgr.save(2, bad, metrics={"val_loss": 0.3})
        assert mgr.tracker is not None and (mgr.tracker.best, mgr.tracker.best_step) == (0.5, 1)
        now[0] = 210.0  # 110 s after the last checkpoint, 10 s after the failed save
        assert mgr.should_save(2, metrics={"val_loss": 0.3})
        assert mgr.save(2, state_for(2, 100), metrics={"val_loss": 0.3}) is not None
        mgr.wait()
        assert mgr.best is not None and mgr.best.step == 2


def test_the_previous_background_write_failing_during_a_save_undoes_both(ckpt_dir: Path) -> None:
    """Step 2's background write fails while save(3) has already recorded 0.2 as the best:
    neither step was saved, so the best is step 1 again, and both retries save."""
    import threading

    blocked, release = threading.Event(), threading.Event()
    real_fsync = os.fsync

    def fsync(fd: int) -> None:  # step 2's temp file: blocks until released, then fails
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp") and not blocked.is_set():
            blocked.set()
            assert release.wait(60)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    armed = [False]

    def clock() -> float:  # save(3) decides (reads the clock) while step 2 is still in flight
        if armed[0]:
            release.set()
        return 1000.0

    with CheckpointManager(ckpt_dir, monitor="val_loss", best_only=True, async_save=True, clock=clock) as mgr:
        mgr.save(1, state_for(1, 100), metrics={"val_loss": 0.5})
        mgr.wait()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(os, "fsync", fsync)
            mgr.save(2, state_for(2, 100), metrics={"val_loss": 0.4})
            assert blocked.wait(60)
            armed[0] = True
            with pytest.raises(CheckpointIOError, match="EIO"):
                mgr.save(3, state_for(3, 100), metrics={"val_loss": 0.2})
        assert release.is_set(), "save(3) never decided while step 2 was in flight: the case under test"
        assert mgr.tracker is not None and (mgr.tracker.best, mgr.tracker.best_step) == (0.5, 1)
        assert [c.step for c in mgr.checkpoints] == [1]
        for step, loss in [(2, 0.4), (3, 0.2)]:
            assert mgr.save(step, state_for(step, 100), metrics={"val_loss": loss}) is not None
            mgr.wait()
        assert [c.step for c in mgr.checkpoints] == [1, 2, 3] and mgr.best is not None and mgr.best.step == 3


def test_saving_again_the_step_being_written_waits_for_that_write_first(ckpt_dir: Path) -> None:
    """A forced save at the end of a run, of the step a scheduled save is still writing:
    when that write fails, the step is not the best and the clock counts from step 1."""
    import threading

    from ckptmgr._writer import SaveWriter

    entered, release, armed = threading.Event(), threading.Event(), threading.Event()
    real_fsync, real_wait = os.fsync, SaveWriter.wait

    def fsync(fd: int) -> None:  # step 2's first write: fails once the second save waits for it
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp") and not release.is_set():
            entered.set()
            assert release.wait(60)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    def wait(self: SaveWriter) -> None:
        if armed.is_set():
            assert entered.wait(60)  # step 2's write is in its fsync: it fails once let go
            release.set()
        real_wait(self)

    now = [100.0]
    with CheckpointManager(ckpt_dir, monitor="val_loss", async_save=True, save_every=ckptmgr.EverySeconds(60),
                           clock=lambda: now[0]) as mgr:
        mgr.save(1, state_for(1, 100), metrics={"val_loss": 0.5}, force=True)
        mgr.wait()
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(os, "fsync", fsync)
            patch.setattr(SaveWriter, "wait", wait)
            now[0] = 200.0
            assert mgr.save(2, state_for(2, 100), metrics={"val_loss": 0.4}) is not None  # scheduled
            armed.set()
            now[0] = 201.0
            with pytest.raises(CheckpointIOError, match="EIO"):
                mgr.save(2, state_for(2, 100), metrics={"val_loss": 0.4}, force=True)
        assert mgr.tracker is not None and (mgr.tracker.best, mgr.tracker.best_step) == (0.5, 1)
        assert mgr.should_save(2, metrics={"val_loss": 0.4})  # 101 s after step 1, the last saved
        assert mgr.save(2, state_for(2, 100), metrics={"val_loss": 0.4}, force=True) is not None
        mgr.wait()
        assert [c.step for c in mgr.checkpoints] == [1, 2] and mgr.best is not None and mgr.best.step == 2


def test_a_read_failing_is_an_io_error_not_damage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Reading a file the OS cannot read (EIO, EACCES) is an I/O error, not corruption:
    the manager does not skip past it as if it were damaged."""
    run = tmp_path / "run"
    with CheckpointManager(run) as mgr:
        mgr.save(1, {"a": 1})
        mgr.save(2, {"a": 2})
    real = h5py.File

    def failing(path: Any, *args: Any, **kwargs: Any) -> Any:
        if os.fspath(path).endswith("ckpt-000000002.h5"):
            raise OSError(errno.EIO, "Input/output error", os.fspath(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(h5py, "File", failing)
    reader = CheckpointManager(run, read_only=True)
    with pytest.raises(ckptmgr.CheckpointIOError, match="EIO") as excinfo:
        reader.restore()
    assert str(run / "ckpt-000000002.h5") in str(excinfo.value)
    assert reader.restore(1) == {"a": 1}


# ------------------------------------------------------------- real file systems


def open_fds_under(directory: Path) -> list[str]:
    """Files this process still has open under ``directory`` (a leaked HDF5 handle, say)."""
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(directory)) and not target.endswith(".ckptmgr.lock"):
            out.append(target)
    return out


def many_leaves(step: int, n: int) -> dict[str, Any]:
    return {"step": step, "leaves": {f"k{i}": np.full(40, step + i, dtype=np.int32) for i in range(n)}}


DISK_FULL_STATES = [
    pytest.param("2m", lambda step: state_for(step, 40_000), id="320KB-arrays"),
    pytest.param("2m", lambda step: state_for(step, 110_000), id="880KB-arrays"),
    pytest.param("2m", lambda step: state_for(step, 300_000), id="too-big-for-the-disk"),
    pytest.param("2m", lambda step: state_for(step, 9_000), id="72KB-arrays"),
    pytest.param("160k", lambda step: many_leaves(step, 100), id="metadata-heavy"),
]


@pytest.mark.parametrize(("size", "make_state"), DISK_FULL_STATES)
def test_disk_full(tmpfs: tuple[Path, Callable[[str], None]], checkpoint_files: Listing, temp_files: Listing,
                   size: str, make_state: Callable[[int], Any]) -> None:
    mnt, remount = tmpfs
    remount(f"size={size}")
    mgr = CheckpointManager(mnt, monitor="val_loss")
    saved: list[int] = []
    with pytest.raises(CheckpointIOError) as excinfo:
        for step in range(1000):
            mgr.save(step, make_state(step), metrics={"val_loss": 1.0 / (step + 1)})
            saved.append(step)
    failed = len(saved)
    exc = excinfo.value
    assert isinstance(exc, CheckpointError) and isinstance(exc, OSError)
    assert exc.errno == errno.ENOSPC
    path = str(mnt / f"ckpt-{failed:09d}.h5")
    assert exc.filename == path
    assert path in str(exc) and "ENOSPC" in str(exc)
    # Every earlier checkpoint is intact; nothing of the failed one is left behind.
    assert [c.step for c in mgr.checkpoints] == saved
    assert checkpoint_files(mnt) == [f"ckpt-{s:09d}.h5" for s in saved]
    assert temp_files(mnt) == []
    assert open_fds_under(mnt) == []
    for step in saved:
        assert_tree_equal(mgr.restore(step), make_state(step))
    # Once there is room, the same manager saves again.
    remount("size=16m")
    assert mgr.save(failed, make_state(failed), metrics={"val_loss": 0.0}) is not None
    assert_tree_equal(mgr.restore(), make_state(failed))
    assert mgr.best is not None and mgr.best.step == failed
    mgr.close()
    with CheckpointManager(mnt, read_only=True) as reader:
        assert [c.step for c in reader.checkpoints] == [*saved, failed]


def test_disk_full_in_the_background_writer(tmpfs: tuple[Path, Callable[[str], None]], temp_files: Listing) -> None:
    mnt, remount = tmpfs
    remount("size=2m")
    mgr = CheckpointManager(mnt, async_save=True)
    saved: list[int] = []
    with pytest.raises(CheckpointIOError) as excinfo:
        for step in range(100):
            mgr.save(step, state_for(step, 40_000))
            mgr.wait()
            saved.append(step)
    assert excinfo.value.errno == errno.ENOSPC and "ENOSPC" in str(excinfo.value)
    assert [c.step for c in mgr.checkpoints] == saved
    assert temp_files(mnt) == []
    remount("size=16m")
    mgr.save(len(saved), state_for(len(saved), 40_000))
    mgr.close()
    with CheckpointManager(mnt, read_only=True) as reader:
        assert_tree_equal(reader.restore(), state_for(len(saved), 40_000))


def test_a_background_write_failing_at_interpreter_exit_is_reported_on_stderr(
    tmpfs: tuple[Path, Callable[[str], None]],
) -> None:
    """No close() and no wait(): exit still finishes the write, and its error is printed."""
    mnt, _ = tmpfs  # 4 MiB
    script = (
        "import sys, numpy as np, ckptmgr\n"
        "mgr = ckptmgr.CheckpointManager(sys.argv[1], async_save=True)\n"
        "mgr.save(int(sys.argv[2]), {'w': np.ones(int(sys.argv[3]))})\n"
        "print('returned', flush=True)\n"
    )
    for step, size in [(1, 1000), (2, 1 << 20)]:  # 8 MiB: the disk is full before the end
        done = subprocess.run([sys.executable, "-c", script, str(mnt), str(step), str(size)], capture_output=True,
                              text=True, timeout=120)
        assert done.stdout == "returned\n" and done.returncode == 0, done
        if step == 1:
            assert done.stderr == ""
            with CheckpointManager(mnt, read_only=True) as reader:  # the write in flight was finished at exit
                assert_tree_equal(reader.restore(1), {"w": np.ones(1000)})
    assert f"the background save of step 2 to {mnt} failed" in done.stderr, done.stderr
    assert "No space left on device" in done.stderr, done.stderr
    with CheckpointManager(mnt, read_only=True) as reader:
        assert [c.step for c in reader.checkpoints] == [1]


def test_an_interrupted_wait_loses_no_error(tmp_path: Path) -> None:
    """Ctrl-C while wait() blocks on a background write: the write goes on, and when it
    fails, the next wait() raises its error (it used to be dropped)."""
    import signal
    import threading

    entered, release = threading.Event(), threading.Event()
    real_fsync = os.fsync

    def fsync(fd: int) -> None:  # the temp file's fsync blocks, then fails
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".tmp") and threading.current_thread().name.startswith(
                "ckptmgr-writer"):
            entered.set()
            assert release.wait(60)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        real_fsync(fd)

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    mgr = CheckpointManager(tmp_path, async_save=True)
    mgr.save(1, {"w": np.ones(3)})
    mgr.wait()
    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(os, "fsync", fsync)
            mgr.save(2, {"w": np.ones(3)})
            assert entered.wait(60)
            while True:  # until the interrupt lands inside wait(), which cannot return yet
                signal.setitimer(signal.ITIMER_REAL, 0.2)
                try:
                    mgr.wait()
                except KeyboardInterrupt as exc:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    frames = [f.f_code.co_name for f, _ in traceback.walk_tb(exc.__traceback__)]
                    if "wait" in frames[1:]:
                        break
            release.set()
            with pytest.raises(CheckpointIOError, match="EIO"):
                mgr.wait()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        release.set()
    assert [c.step for c in mgr.checkpoints] == [1]
    mgr.save(3, {"w": np.ones(3)})
    mgr.close()
    assert [c.step for c in CheckpointManager(tmp_path, read_only=True).checkpoints] == [1, 3]


def test_disk_full_is_survived_by_a_new_writer_too(tmpfs: tuple[Path, Callable[[str], None]]) -> None:
    mnt, remount = tmpfs
    remount("size=2m")
    with CheckpointManager(mnt) as mgr, pytest.raises(CheckpointIOError):
        for step in range(100):
            mgr.save(step, state_for(step, 40_000))
    remount("size=16m")
    with CheckpointManager(mnt) as mgr:
        steps = [c.step for c in mgr.checkpoints]
        assert steps == list(range(len(steps))) and steps
        for step in steps:
            assert_tree_equal(mgr.restore(step), state_for(step, 40_000))


def test_read_only_remount(tmpfs: tuple[Path, Callable[[str], None]]) -> None:
    """A real read-only remount. Linux refuses it while a file is open for writing, and a
    live writer holds its lock file open, so writers are closed first (a live writer
    meeting EROFS is the injected case above, and the read-only bind mount below)."""
    mnt, remount = tmpfs
    findings: Counter[str] = Counter()
    for mode in ("sync", "async"):
        with _open(mnt / mode, mode) as mgr:
            _save(mgr, "native", 1)
            _save(mgr, "payload", 2)
    before = {mode: snapshot(mnt / mode) for mode in ("sync", "async")}
    try:
        remount("ro")
    except subprocess.CalledProcessError as exc:
        pytest.skip(f"cannot remount read-only here: {exc.stderr!r}")
    try:
        for mode in ("sync", "async"):
            with pytest.raises(CheckpointIOError) as excinfo:
                _open(mnt / mode, mode)
            refusal = excinfo.value
            assert refusal.errno == errno.EROFS and "EROFS" in str(refusal) and str(mnt / mode) in str(refusal)
            findings["writer refused with EROFS"] += 1
            with CheckpointManager(mnt / mode, read_only=True, monitor=MONITOR) as reader:
                _check_content(reader, "native", 1)
                _check_content(reader, "payload", 2)
                assert [c.step for c in reader.prune(KeepLast(1), dry_run=True)] == [1]
                findings["restored from the read-only file system"] += 2
        with pytest.raises(CheckpointIOError, match="EROFS") as excinfo:
            CheckpointManager(mnt / "new")
        assert str(mnt / "new") in str(excinfo.value)
        findings["new directory refused with EROFS"] += 1
    finally:
        remount("rw")
    for mode in ("sync", "async"):
        assert snapshot(mnt / mode) == before[mode]
        with _open(mnt / mode, mode) as mgr:
            _save(mgr, "native", 3)
            _check_content(mgr, "native", 3)
    record("faults", "read-only-remount", findings)


def test_read_only_bind_mount_under_a_live_writer(tmpfs: tuple[Path, Callable[[str], None]], tmp_path: Path) -> None:
    """The same directory read-only through a bind mount while a writer saves through
    the read-write mount: a writer through the read-only one is refused, readers work."""
    mnt, _ = tmpfs
    view = tmp_path / "view"
    view.mkdir()
    try:
        subprocess.run(["mount", "--bind", str(mnt), str(view)], check=True, capture_output=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        pytest.skip(f"cannot bind-mount here: {exc}")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(view)], check=True, capture_output=True, timeout=60)
        with _open(mnt / "run", "async") as writer:
            _save(writer, "native", 1)
            with pytest.raises(ckptmgr.CheckpointError) as excinfo:
                _open(view / "run", "sync")
            assert isinstance(excinfo.value, (CheckpointIOError, ckptmgr.DirectoryLockedError)), excinfo.value
            for step in (2, 3):
                _save(writer, "native", step)
                with CheckpointManager(view / "run", read_only=True) as reader:
                    _check_content(reader, "native", step)
            assert [c.step for c in writer.checkpoints] == [2, 3]
    finally:
        subprocess.run(["umount", str(view)], capture_output=True, timeout=60)
    record("faults", "read-only-bind-mount", {"writer through the read-only mount refused": 1,
                                              "restores through it while the writer saved": 2})


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_disk_full_during_payload_saves(tmpfs: tuple[Path, Callable[[str], None]], mode: str) -> None:
    mnt, remount = tmpfs
    remount("size=1m")
    mgr = CheckpointManager(mnt / "run", async_save=mode == "async")
    saved: list[int] = []
    with pytest.raises(CheckpointIOError) as excinfo:
        for step in range(1, 100):
            data = payload_bytes(step, 150_000)
            mgr.save(step, FilePayload(f"model-{step}.bin", writes(data)))
            mgr.wait()
            saved.append(step)
    exc = excinfo.value
    assert exc.errno == errno.ENOSPC and "ENOSPC" in str(exc)
    assert str(mnt / "run" / f"model-{len(saved) + 1}.bin") in str(exc)
    assert [c.step for c in mgr.checkpoints] == saved and saved
    assert [n for n in listing(mnt / "run") if n.startswith(".ckpt-")] == []
    remount("size=16m")
    step = len(saved) + 1
    data = payload_bytes(step, 150_000)
    mgr.save(step, FilePayload(f"model-{step}.bin", lambda path: path.write_bytes(data)))
    mgr.close()
    with CheckpointManager(mnt / "run", read_only=True) as reader:
        assert [c.step for c in reader.checkpoints] == [*saved, step]
        for s in [*saved, step]:
            assert reader.restore(s).read_bytes() == payload_bytes(s, 150_000)
    record("faults", f"disk-full-payload[{mode}]", {"saves before ENOSPC": len(saved)})
