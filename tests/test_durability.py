"""Directory entries are durable before a save is reported committed.

A new name in a directory (made by ``mkdir``, ``rename`` or file creation) survives a
power cut only once that directory is fsynced: the POSIX minimum, and what ext4 with
``data=writeback``, XFS and some network file systems actually do. These tests record
the order of ``mkdir``, ``rename``/``replace`` and directory ``fsync`` calls made by a
real manager on real files (patching ``os``, as filelock's own tests do) and check that
every entry ckptmgr created or renamed has its parent fsynced after it and before
``save()`` (or ``wait()``, for an asynchronous save) returns.
"""

from __future__ import annotations

import errno
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ckptmgr


class FsLog:
    """The directory-entry operations and directory fsyncs of this process, in order."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def unsynced(self) -> list[tuple[str, str]]:
        """Entries created or renamed whose parent directory was not fsynced after them.

        The index is left out: it is a cache, rebuilt from the checkpoints when missing
        or stale, and deliberately never fsynced.
        """
        missing = []
        for i, (kind, path) in enumerate(self.events):
            if kind == "fsync" or os.path.basename(path) == ".ckptmgr-index.json":
                continue
            parent = os.path.dirname(path)
            if ("fsync", parent) not in self.events[i + 1 :]:
                missing.append((kind, path))
        return missing

    def made(self, kind: str) -> list[str]:
        return [path for k, path in self.events if k == kind]


@pytest.fixture
def fslog(monkeypatch: pytest.MonkeyPatch) -> Iterator[FsLog]:
    log = FsLog()
    real_mkdir, real_rename, real_replace, real_fsync = os.mkdir, os.rename, os.replace, os.fsync

    def mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
        real_mkdir(path, *args, **kwargs)
        log.events.append(("mkdir", os.path.realpath(path)))

    def renamer(real: Callable[..., None], kind: str) -> Callable[..., None]:
        def rename(src: Any, dst: Any, *args: Any, **kwargs: Any) -> None:
            real(src, dst, *args, **kwargs)
            log.events.append((kind, os.path.realpath(dst)))

        return rename

    def fsync(fd: int) -> None:
        real_fsync(fd)
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            log.events.append(("fsync", os.path.realpath(os.readlink(f"/proc/self/fd/{fd}"))))

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "rename", renamer(real_rename, "rename"))
    monkeypatch.setattr(os, "replace", renamer(real_replace, "replace"))
    monkeypatch.setattr(os, "fsync", fsync)
    yield log


pytestmark = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd (Linux)")

STATE = {"w": np.arange(12, dtype=np.float32).reshape(3, 4), "step": 1}


def _write_payload(path: Path) -> None:
    path.write_bytes(b"framework-native bytes")


@pytest.mark.parametrize("kind", ["sync", "async", "payload"])
def test_every_created_directory_is_durable_before_the_first_save_returns(
    tmp_path: Path, fslog: FsLog, kind: str
) -> None:
    directory = tmp_path / "a" / "b" / "runs"
    with ckptmgr.CheckpointManager(directory, async_save=kind == "async", keep=ckptmgr.KeepLast(1)) as mgr:
        if kind == "payload":
            info = mgr.save(1, ckptmgr.FilePayload("model.bin", _write_payload))
        else:
            info = mgr.save(1, STATE)
        mgr.wait()
        events_at_commit = len(fslog.events)
        assert info is not None

    made = fslog.made("mkdir")
    for path in (tmp_path / "a", tmp_path / "a" / "b", directory):
        assert os.path.realpath(path) in made
    assert fslog.made("replace"), "the checkpoint was never renamed into place"
    fslog.events = fslog.events[:events_at_commit]
    assert fslog.unsynced() == []


def test_second_save_renames_are_durable_too(tmp_path: Path, fslog: FsLog) -> None:
    with ckptmgr.CheckpointManager(tmp_path / "runs", keep=ckptmgr.KeepLast(1)) as mgr:
        for step in (1, 2, 3):
            mgr.save(step, STATE)
            assert fslog.unsynced() == [], f"after save({step})"
            assert mgr.latest is not None and mgr.latest.step == step


def test_existing_directory_creates_nothing(tmp_path: Path, fslog: FsLog) -> None:
    (tmp_path / "runs").mkdir()
    fslog.events.clear()
    with ckptmgr.CheckpointManager(tmp_path / "runs") as mgr:
        mgr.save(1, STATE)
    assert fslog.made("mkdir") == []
    assert fslog.unsynced() == []


def test_relative_directory_is_made_durable(
    tmp_path: Path, fslog: FsLog, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    with ckptmgr.CheckpointManager(Path("x") / "y") as mgr:
        mgr.save(1, STATE)
    assert os.path.realpath(tmp_path / "x" / "y") in fslog.made("mkdir")
    assert fslog.unsynced() == []


def test_failed_fsync_of_a_new_directory_is_a_checkpoint_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parent = os.path.realpath(tmp_path / "a")
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        if os.path.realpath(os.readlink(f"/proc/self/fd/{fd}")) == parent:
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    directory = tmp_path / "a" / "runs"
    with pytest.raises(ckptmgr.CheckpointError) as excinfo:
        ckptmgr.CheckpointManager(directory)
    assert str(directory) in str(excinfo.value)
    assert "Input/output error" in str(excinfo.value)
    monkeypatch.setattr(os, "fsync", real_fsync)
    # Nothing is lost by the failure: the next open (the disk is fine again) works.
    with ckptmgr.CheckpointManager(directory) as mgr:
        mgr.save(1, STATE)
    with ckptmgr.CheckpointManager(directory, read_only=True) as reader:
        assert [c.step for c in reader.checkpoints] == [1]


def test_a_file_in_the_way_is_named(tmp_path: Path) -> None:
    (tmp_path / "runs").write_bytes(b"not a directory")
    with pytest.raises(ckptmgr.CheckpointError, match=r"Expected a directory, found a file at .*runs"):
        ckptmgr.CheckpointManager(tmp_path / "runs")
    with pytest.raises(ckptmgr.CheckpointError, match="runs"):
        ckptmgr.CheckpointManager(tmp_path / "runs" / "below")
    assert (tmp_path / "runs").read_bytes() == b"not a directory"
